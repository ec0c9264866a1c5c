import { spawn } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { SERVE_ARGS, spawnKeygate } from "../harness/process.js";
import type { KeygateProcess } from "../harness/process.js";

/** Starts `keygate serve` as `npm start` would, in `cwd`, with no KEYGATE_* variable set. */
async function serve(cwd: string): Promise<KeygateProcess> {
  const started = await spawnKeygate({ cwd, env: {} });
  running.push(started);
  return started;
}

// A failed assertion must not leave a keygate holding the default ports.
const running: KeygateProcess[] = [];
afterAll(async () => {
  await Promise.all(running.map((p) => p.stop("SIGKILL")));
});

const dirs: string[] = [];
afterAll(() => {
  for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
});

describe("keygate serve with no environment (the Quick start)", () => {
  it("creates ./data with 0600 secrets, prints the token once, serves all three ports, and exits 0 on SIGTERM", async () => {
    const cwd = mkdtempSync(join(tmpdir(), "keygate-serve-"));
    dirs.push(cwd);
    const first = await serve(cwd);
    const dataDir = join(cwd, "data");
    expect(statSync(join(dataDir, "keygate.db")).isFile()).toBe(true);
    expect(statSync(join(dataDir, "pepper")).mode & 0o777).toBe(0o600);
    expect(statSync(join(dataDir, "admin-token")).mode & 0o777).toBe(0o600);
    expect(statSync(dataDir).mode & 0o777).toBe(0o700);
    const token = readFileSync(join(dataDir, "admin-token"), "utf8").trim();
    expect(first.stdout().split(token).length - 1).toBe(1);
    expect(first.stdout()).toContain("Use it: curl");

    // Admin port (default 8080): create a key over Connect JSON.
    const created = await fetch("http://127.0.0.1:8080/keygate.v1.KeyAdmin/CreateKey", {
      method: "POST",
      headers: { "content-type": "application/json", authorization: `Bearer ${token}` },
      body: JSON.stringify({ ownerId: "quickstart", name: "first" }),
    });
    expect(created.status).toBe(200);
    const { secret } = (await created.json()) as { secret: string };
    // The secret went to the HTTP client only, never to the log.
    expect(first.stdout()).not.toContain(secret);

    // HTTP authz port (default 8181).
    const allowed = await fetch("http://127.0.0.1:8181/check/v1/anything", { headers: { "x-api-key": secret } });
    expect(allowed.status).toBe(200);
    expect(allowed.headers.get("x-keygate-owner-id")).toBe("quickstart");

    // gRPC port (default 9191): a plain TCP connect proves it listens; Check itself is covered elsewhere.
    const { connect } = await import("node:net");
    await new Promise<void>((done, fail) => {
      const socket = connect(9191, "127.0.0.1", () => {
        socket.destroy();
        done();
      });
      socket.once("error", fail);
    });

    expect(await first.stop("SIGTERM")).toBe(0);

    // A second start reuses the data: the token is not printed again and the key still verifies.
    const second = await serve(cwd);
    expect(second.stdout()).not.toContain(token);
    const again = await fetch("http://127.0.0.1:8181/check", { headers: { authorization: `Bearer ${secret}` } });
    expect(again.status).toBe(200);
    expect(await second.stop("SIGTERM")).toBe(0);
  });

  it("refuses to start on a bad variable, naming it", async () => {
    const cwd = mkdtempSync(join(tmpdir(), "keygate-badenv-"));
    dirs.push(cwd);
    const child = spawn(process.execPath, [...SERVE_ARGS], {
      cwd,
      env: { ...process.env, KEYGATE_GRPC_PORT: "not-a-port" },
      stdio: ["ignore", "pipe", "pipe"],
    });
    let err = "";
    child.stderr.on("data", (chunk: Buffer) => (err += chunk.toString()));
    const code = await new Promise<number | null>((done) => child.on("exit", done));
    expect(code).toBe(2);
    expect(err).toContain("KEYGATE_GRPC_PORT");
  });
});
