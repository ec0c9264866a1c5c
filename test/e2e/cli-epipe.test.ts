import { spawn } from "node:child_process";
import { resolve } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { builtCli } from "../harness/built-cli.js";
import { ADMIN_TOKEN, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

// A CLI whose stdout reader has gone (`keygate keys create --quiet | vault …` where the reader
// failed, `keygate audit --json | head -c0`) gets EPIPE on its write. With no listener for it, Node
// printed "Unhandled 'error' event" and a stack trace; for `keys create --quiet` the key had been
// issued, its secret reached nobody, and the only keygate line said "store the secret of key_…
// now" as if it had been printed. Now: keygate's own lines, exit 1, and for a new secret the key
// to revoke.

const root = resolve(import.meta.dirname, "../..");
let kg: TestKeygate;

/** Runs the CLI with its stdout pipe closed by the reader before the CLI writes. */
function cliIntoClosedPipe(args: readonly string[]): Promise<{ code: number | null; stderr: string }> {
  const env: NodeJS.ProcessEnv = {};
  for (const [name, value] of Object.entries(process.env)) if (!name.startsWith("KEYGATE_")) env[name] = value;
  Object.assign(env, { KEYGATE_URL: `http://127.0.0.1:${kg.ports.admin}`, KEYGATE_ADMIN_TOKEN: ADMIN_TOKEN });
  return new Promise((done, fail) => {
    const child = spawn(process.execPath, [builtCli(), ...args], { env, cwd: root, stdio: ["ignore", "pipe", "pipe"] });
    // The reader goes away at once: the child's first write to stdout meets EPIPE.
    child.stdout.destroy();
    let stderr = "";
    child.stderr.setEncoding("utf8");
    child.stderr.on("data", (chunk: string) => (stderr += chunk));
    const timer = setTimeout(() => child.kill("SIGKILL"), 20_000);
    child.on("error", fail);
    child.on("close", (code) => {
      clearTimeout(timer);
      done({ code, stderr });
    });
  });
}

/** Each line of `stderr`, which must all be keygate's own. */
function keygateLines(stderr: string): string[] {
  const lines = stderr.trimEnd().split("\n");
  for (const line of lines) expect(line).toMatch(/^keygate: /);
  return lines;
}

beforeAll(async () => {
  // Fails by name when dist/ is missing or older than src/ (`npm run build` makes it).
  builtCli();
  kg = await startKeygate();
  for (const ownerId of ["cli-epipe", "cli-epipe-rotate"]) await kg.admin.upsertAccount({ ownerId, plan: "business" });
});

afterAll(async () => {
  await kg.stop();
});

describe("keygate with stdout a closed pipe: error", { timeout: 60_000 }, () => {
  it("keys create --quiet: exit 1 and keygate's own lines only, saying the secret was not delivered", async () => {
    const result = await cliIntoClosedPipe(["keys", "create", "--owner", "cli-epipe", "--name", "lost", "--quiet"]);
    const keys = (await kg.admin.listKeys({ ownerId: "cli-epipe" })).keys;
    expect(keys).toHaveLength(1); // issued: the secret now exists nowhere
    expect(result.code).toBe(1);
    // Before the fix: "node:events:…  throw er; // Unhandled 'error' event", "Error: write EPIPE" and ~20 stack lines.
    expect(result.stderr).not.toContain("Unhandled 'error' event");
    const id = keys[0]?.id ?? "";
    expect(keygateLines(result.stderr)).toEqual([
      `keygate: the secret of ${id} could not be written to stdout and cannot be shown again; revoke it: keygate keys revoke ${id}`,
    ]);
  });

  it("keys rotate (the details and the secret): the same, naming the successor", async () => {
    const old = await kg.admin.createKey({ ownerId: "cli-epipe-rotate", name: "rotated" });
    const result = await cliIntoClosedPipe(["keys", "rotate", old.key?.id ?? ""]);
    const successor = (await kg.admin.getKey({ id: old.key?.id ?? "" })).key?.rotatedToId ?? "";
    expect(successor).toMatch(/^key_/);
    expect(result.code).toBe(1);
    expect(keygateLines(result.stderr)).toEqual([
      `keygate: the secret of ${successor} could not be written to stdout and cannot be shown again; revoke it: keygate keys revoke ${successor}`,
    ]);
  });

  it("keys list --json: a non-zero exit with one keygate line, not a stack trace", async () => {
    const result = await cliIntoClosedPipe(["keys", "list", "--owner", "cli-epipe", "--json"]);
    expect(result.code).not.toBe(0);
    expect(result.stderr).not.toContain("Unhandled 'error' event");
    expect(keygateLines(result.stderr)).toEqual(["keygate: could not write to stdout: the program reading it closed the pipe (EPIPE)"]);
    expect(result.code).toBe(1);
  });
});
