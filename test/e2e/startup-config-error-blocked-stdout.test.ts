import { spawn } from "node:child_process";
import { describe, expect, it } from "vitest";
import { ADMIN_TOKEN } from "../harness/keygate.js";
import { embeddedEnv, serveArgs, spawnedKeygates } from "../harness/process.js";

// A start that fails with a configuration mistake found once the log exists (here
// KEYGATE_REDIS_URL refused, which keygate reports as a ConfigError) exits 2. It used to call
// process.exit(2) at once, skipping the log's bounded wait: with a stdout nobody reads, pino's exit
// hook then retried the Redis connection-error line for ever (EAGAIN every 100 ms), and the
// process never exited (a pod Running and never ready, instead of CrashLoopBackOff). It now waits
// at most 2 s for stdout, as every other exit does.

const spawned = spawnedKeygates("kg-cfgerr-blocked-");

describe("keygate serve, failed start (ConfigError) with a stdout nobody reads", { timeout: 30_000 }, () => {
  it("exits 2 within a few seconds, as a failed start with a blocked stdout must", async () => {
    const { dir, dataDir } = spawned.tempDataDir();
    const env: NodeJS.ProcessEnv = {};
    for (const [name, value] of Object.entries(process.env)) if (!name.startsWith("KEYGATE_")) env[name] = value;
    // A misspelled variable: its "ignored" warning is written (and blocked) before the Redis
    // connection error line, which then waits in SonicBoom's buffer for pino's exit flush.
    // Port 1: nothing listens there, so the connection is refused (ECONNREFUSED) at once.
    Object.assign(env, embeddedEnv({ dataDir, adminToken: ADMIN_TOKEN, extra: { KEYGATE_REDIS_URL: "redis://127.0.0.1:1", KEYGATE_STARTUP_WAIT_SECONDS: "0", KEYGATE_LOG_LEVLE: "info" } }));
    env.KG_NODE = process.execPath;
    // stdout is a real pipe whose reader (sleep) never reads, filled before keygate starts (dd
    // stops at EAGAIN whatever the pipe's capacity); `timeout 10` bounds the hang; the exit code
    // comes back on stderr.
    const script = `{ dd if=/dev/zero bs=512 count=1024 oflag=nonblock 2>/dev/null; timeout 10 "$KG_NODE" "$@"; echo "rc=$?" >&2; } | sleep 15`;
    const child = spawn("sh", ["-c", script, "sh", ...serveArgs()], { cwd: dir, env, stdio: ["ignore", "ignore", "pipe"] });
    let stderr = "";
    child.stderr.on("data", (chunk: Buffer) => (stderr += chunk.toString()));
    const rc = await new Promise<string>((done) => {
      const poll = setInterval(() => {
        const match = /rc=(\d+)/.exec(stderr);
        if (match !== null) {
          clearInterval(poll);
          done(match[1] ?? "");
        }
      }, 50);
    });
    child.kill("SIGKILL");
    expect(stderr).toContain("keygate: KEYGATE_REDIS_URL:");
    // 124 was `timeout 10` killing it, hung in pino's exit flush.
    expect(rc).toBe("2");
  });
});
