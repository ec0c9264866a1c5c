import { spawn } from "node:child_process";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { ADMIN_TOKEN } from "../harness/keygate.js";
import { until } from "../harness/poll.js";
import { embeddedEnv, listeningPorts, serveArgs, spawnedKeygates } from "../harness/process.js";

// serve's uncaughtException handler writes one line on stderr, the error with its whitespace
// folded. Folded before the configured secrets were looked for by their exact text, a pepper (any
// 32 or more characters, whitespace allowed) or a Redis or MongoDB password holding a tab, a line
// break or two spaces in a row was no longer found, and was printed. The secrets are redacted
// first now, as the JSON log line of the same error always was.

const spawned = spawnedKeygates("kg-recheck-uncaught-");
const PEPPER = "correct horse battery\tstaple  9f3kQ2xZ-pepper-tail";
// Stands for any exception whose message quotes the pepper (a library error that echoes its input).
const THROW_ON_SIGUSR2 = `process.on("SIGUSR2", () => { throw new Error("hmac key rejected: " + process.env.KEYGATE_PEPPER); });\n`;

describe("keygate serve: the stderr line of an uncaught exception", { timeout: 60_000 }, () => {
  it("never shows the configured pepper, whatever whitespace it holds", async () => {
    const { dir, dataDir } = spawned.tempDataDir();
    const preload = join(dir, "throw.mjs");
    writeFileSync(preload, THROW_ON_SIGUSR2);
    const env: NodeJS.ProcessEnv = {};
    for (const [name, value] of Object.entries(process.env)) if (!name.startsWith("KEYGATE_")) env[name] = value;
    Object.assign(env, embeddedEnv({ dataDir, adminToken: ADMIN_TOKEN, extra: { KEYGATE_PEPPER: PEPPER } }));
    const child = spawn(process.execPath, ["--import", preload, ...serveArgs()], { cwd: dir, env, stdio: ["ignore", "pipe", "pipe"] });
    spawned.children.add(child);
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (chunk: Buffer) => (stdout += chunk.toString()));
    child.stderr.on("data", (chunk: Buffer) => (stderr += chunk.toString()));
    let exited: number | null | undefined;
    child.on("exit", (code) => (exited = code));
    await until(() => listeningPorts(stdout) !== null || exited !== undefined, 30_000, "the listening line", { intervalMs: 20 });
    expect(listeningPorts(stdout)).not.toBe(null);
    child.kill("SIGUSR2");
    await until(() => exited !== undefined, 15_000, "the exit", { intervalMs: 20 });
    expect(exited).toBe(1);
    // The log line is scrubbed...
    expect(stdout).toContain("uncaught exception");
    expect(stdout).not.toContain("9f3kQ2xZ");
    // ...and so must the one stderr line be.
    expect(stderr).toMatch(/^keygate: unexpected error: /);
    expect(stderr).not.toContain("9f3kQ2xZ");
  });
});
