import { spawn } from "node:child_process";
import type { ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { freePort, requireServer, waitForPort } from "../harness/ports.js";
import { serveUntilExit } from "../harness/process.js";
import { redisAvailable } from "../harness/redis-server.js";

// Refused credentials, a master the Sentinels do not know and a node without cluster support are
// mistakes no wait mends: the start exits 2 at once, not after KEYGATE_STARTUP_WAIT_SECONDS.
// Through a Cluster or Sentinel the refusal comes wrapped in ioredis's own "cannot reach" error
// ("Failed to refresh slots cache.", "All sentinels are unreachable. … Last error: WRONGPASS …"),
// which read as a Redis not answering yet, and the start tried the refused credentials again.

const RETRY_LINE = "trying again (the start waits KEYGATE_STARTUP_WAIT_SECONDS)";

const children = new Set<ChildProcess>();
const dirs: string[] = [];
afterAll(() => {
  for (const child of children) child.kill("SIGKILL");
  for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
});

function tempDir(): string {
  const dir = mkdtempSync(join(tmpdir(), "keygate-startup-wait-refusals-"));
  dirs.push(dir);
  return dir;
}

async function redisWith(args: string[], what: string): Promise<number> {
  const port = await freePort();
  const child = spawn("redis-server", [...args, "--port", String(port), "--bind", "127.0.0.1"], { stdio: "ignore", cwd: tempDir() });
  children.add(child);
  await waitForPort(port, 10_000, () => what);
  return port;
}

async function sentinelWith(lines: string[]): Promise<number> {
  const port = await freePort();
  const dir = tempDir();
  const conf = join(dir, "sentinel.conf");
  writeFileSync(conf, [`port ${port}`, "bind 127.0.0.1", `dir ${dir}`, ...lines, ""].join("\n"));
  const child = spawn("redis-server", [conf, "--sentinel"], { stdio: "ignore", cwd: dir });
  children.add(child);
  await waitForPort(port, 10_000, () => "redis sentinel");
  return port;
}

function env(url: string, waitSeconds: string): Record<string, string> {
  return { KEYGATE_DATA_DIR: join(tempDir(), "data"), KEYGATE_REDIS_URL: url, KEYGATE_HOST: "127.0.0.1", KEYGATE_GRPC_PORT: "0", KEYGATE_HTTP_AUTHZ_PORT: "0", KEYGATE_ADMIN_PORT: "0", KEYGATE_STARTUP_WAIT_SECONDS: waitSeconds };
}

function retries(stdout: string): string[] {
  return stdout.split("\n").filter((line) => line.includes(RETRY_LINE));
}

const redisReady = requireServer("redis-server", redisAvailable(), "apt-get install redis-server");

describe.runIf(redisReady)("a refused Redis Cluster or Sentinel exits 2 at once, without the start's wait.error", () => {
  const password = `pw${randomBytes(12).toString("hex")}`;
  let clusterPort = 0;
  let plainPort = 0;
  beforeAll(async () => {
    clusterPort = await redisWith(["--cluster-enabled", "yes", "--requirepass", password, "--save", "", "--appendonly", "no"], "cluster-enabled redis-server with requirepass");
    plainPort = await redisWith(["--requirepass", password, "--save", "", "--appendonly", "no"], "redis-server with requirepass");
  });

  it("a wrong Cluster password is not tried again", async () => {
    const wrong = `wrong${randomBytes(8).toString("hex")}`;
    const result = await serveUntilExit(tempDir(), env(`redis+cluster://:${wrong}@127.0.0.1:${clusterPort}`, "8"), children);
    expect(result.code).toBe(2);
    expect(retries(result.stdout)).toEqual([]);
    expect(result.stderr).toBe("keygate: KEYGATE_REDIS_URL: Redis refused the credentials (WRONGPASS)\n");
    expect(result.stdout + result.stderr).not.toContain(wrong);
  }, 60_000);

  it("redis+cluster:// naming a Redis without cluster support is not tried again", async () => {
    const result = await serveUntilExit(tempDir(), env(`redis+cluster://:${password}@127.0.0.1:${plainPort}`, "8"), children);
    expect(result.code).toBe(2);
    expect(retries(result.stdout)).toEqual([]);
    expect(result.stderr).toMatch(/^keygate: KEYGATE_REDIS_URL: the connection failed \(ERR .*cluster support disabled/);
  }, 60_000);

  it("a wrong Sentinel password is not tried again", async () => {
    const sentinelPassword = `sent${randomBytes(12).toString("hex")}`;
    const sentinel = await sentinelWith([`requirepass ${sentinelPassword}`]);
    const wrong = `wrong${randomBytes(8).toString("hex")}`;
    // ioredis would go on asking the Sentinels for the whole try (15 s); the refusal ends it.
    const result = await serveUntilExit(tempDir(), env(`redis+sentinel://127.0.0.1:${sentinel}/mymaster?sentinelPassword=${wrong}`, "8"), children);
    expect(result.code).toBe(2);
    expect(retries(result.stdout)).toEqual([]);
    expect(result.stderr).toBe("keygate: KEYGATE_REDIS_URL: Redis refused the credentials (WRONGPASS)\n");
    expect(result.stdout + result.stderr).not.toContain(wrong);
  }, 60_000);

  it("a Sentinel that answers but does not know the master is not tried again", async () => {
    const sentinel = await sentinelWith([]);
    const result = await serveUntilExit(tempDir(), env(`redis+sentinel://127.0.0.1:${sentinel}/mymaster`, "8"), children);
    expect(result.code).toBe(2);
    expect(retries(result.stdout)).toEqual([]);
    expect(result.stderr).toBe("keygate: KEYGATE_REDIS_URL: the connection failed (ERR No such master with that name)\n");
  }, 60_000);
});
