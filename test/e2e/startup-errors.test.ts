import { spawn } from "node:child_process";
import type { ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import type { Server } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { mongoWireAvailable, startMongoWire } from "../harness/mongo-wire.js";
import type { MongoWire } from "../harness/mongo-wire.js";
import { freePort, requireServer, waitForPort } from "../harness/ports.js";
import { serveUntilExit, spawnKeygate } from "../harness/process.js";
import { redisAvailable } from "../harness/redis-server.js";

const PEPPER = "p".repeat(40);
const ADMIN = `kgadm_${"t".repeat(30)}`;

const children = new Set<ChildProcess>();
const dirs: string[] = [];
const blockers: Server[] = [];
afterAll(() => {
  for (const child of children) child.kill("SIGKILL");
  for (const server of blockers) server.close();
  for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
});

function tempDir(): string {
  const dir = mkdtempSync(join(tmpdir(), "keygate-startup-"));
  dirs.push(dir);
  return dir;
}

/** Holds a port on 127.0.0.1, as another program would. */
async function occupiedPort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((done) => server.listen(0, "127.0.0.1", done));
  blockers.push(server);
  const address = server.address();
  if (typeof address !== "object" || address === null) throw new Error("no port");
  return address.port;
}

/** The one line a start failure must be: the variable first, no stack trace, nothing else. */
function expectOneLine(stderr: string, variable: string): string {
  const lines = stderr.trimEnd().split("\n");
  expect(lines).toHaveLength(1);
  const [line = ""] = lines;
  expect(line.startsWith(`keygate: ${variable}: `)).toBe(true);
  expect(stderr).not.toMatch(/\n\s+at /);
  return line;
}

describe("start-up errors.error", () => {
  it.each(["KEYGATE_GRPC_PORT", "KEYGATE_HTTP_AUTHZ_PORT", "KEYGATE_ADMIN_PORT"])(
    "a busy %s is one line naming the variable and the port, exit 2",
    async (variable) => {
      const busy = await occupiedPort();
      const env: Record<string, string> = {
        KEYGATE_DATA_DIR: join(tempDir(), "data"),
        KEYGATE_HOST: "127.0.0.1",
        KEYGATE_GRPC_PORT: "0",
        KEYGATE_HTTP_AUTHZ_PORT: "0",
        KEYGATE_ADMIN_PORT: "0",
        [variable]: String(busy),
      };
      const result = await serveUntilExit(tempDir(), env, children);
      expect(result.code).toBe(2);
      const line = expectOneLine(result.stderr, variable);
      expect(line).toBe(`keygate: ${variable}: port ${busy} on 127.0.0.1 is already in use; stop what holds it or choose another port`);
      expect(result.stdout).not.toContain("keygate listening");
    },
  );

  it("a generated admin token is printed by the first start that gets its listeners up, once", async () => {
    const cwd = tempDir();
    const dataDir = join(cwd, "data");
    const busy = await occupiedPort();
    const base = { KEYGATE_DATA_DIR: dataDir, KEYGATE_HOST: "127.0.0.1", KEYGATE_HTTP_AUTHZ_PORT: "0", KEYGATE_ADMIN_PORT: "0" };
    const failed = await serveUntilExit(cwd, { ...base, KEYGATE_GRPC_PORT: String(busy) }, children);
    expect(failed.code).toBe(2);
    const token = readFileSync(join(dataDir, "admin-token"), "utf8").trim();
    expect(failed.stdout).not.toContain(token);
    expect(failed.stderr).not.toContain(token);

    const second = await spawnKeygate({ cwd, env: { ...base, KEYGATE_GRPC_PORT: "0" } });
    expect(second.stdout().split(token).length - 1).toBe(1);
    expect(await second.stop("SIGTERM")).toBe(0);
    expect(existsSync(join(dataDir, "admin-token.unshown"))).toBe(false);

    const third = await spawnKeygate({ cwd, env: { ...base, KEYGATE_GRPC_PORT: "0" } });
    expect(third.stdout()).not.toContain(token);
    expect(await third.stop("SIGTERM")).toBe(0);
  });
});

/** Every listener on a port of 127.0.0.1 the system picks. */
const LOOPBACK = { KEYGATE_HOST: "127.0.0.1", KEYGATE_GRPC_PORT: "0", KEYGATE_HTTP_AUTHZ_PORT: "0", KEYGATE_ADMIN_PORT: "0" } as const;
const OTHER_PEPPER = "q".repeat(40);

/** The one line a start with a pepper the store's keys were not hashed with exits with. */
function pepperMismatchLine(where: string): string {
  return `keygate: KEYGATE_PEPPER is not the pepper this store's keys were hashed with: every key would be unknown. Restore the pepper the store was created with (${where})\n`;
}

describe("start-up errors: the pepper.error", () => {
  /** A data directory a first start has used (generated pepper, its check recorded), and that pepper. */
  async function usedDataDir(): Promise<{ cwd: string; dataDir: string; pepper: string }> {
    const cwd = tempDir();
    const dataDir = join(cwd, "data");
    const first = await spawnKeygate({ cwd, env: { KEYGATE_DATA_DIR: dataDir, ...LOOPBACK } });
    expect(await first.stop("SIGTERM")).toBe(0);
    return { cwd, dataDir, pepper: readFileSync(join(dataDir, "pepper"), "utf8").trim() };
  }

  it("a KEYGATE_PEPPER other than the one the store was made with: exit 2, one line naming the variable, and no pepper printed", async () => {
    const { cwd, dataDir, pepper } = await usedDataDir();
    const result = await serveUntilExit(cwd, { KEYGATE_DATA_DIR: dataDir, KEYGATE_PEPPER: OTHER_PEPPER, ...LOOPBACK }, children);
    expect(result.code).toBe(2);
    expect(result.stderr).toBe(pepperMismatchLine(`${join(dataDir, "pepper")}, or the keygate-secrets Secret`));
    expect(result.stdout).not.toContain("keygate listening");
    for (const secret of [pepper, OTHER_PEPPER]) expect(result.stdout + result.stderr).not.toContain(secret);
  });

  it("data/pepper replaced: exit 2, one line naming the file", async () => {
    const { cwd, dataDir, pepper } = await usedDataDir();
    const file = join(dataDir, "pepper");
    writeFileSync(file, `${OTHER_PEPPER}\n`, { mode: 0o600 });
    const result = await serveUntilExit(cwd, { KEYGATE_DATA_DIR: dataDir, ...LOOPBACK }, children);
    expect(result.code).toBe(2);
    expect(result.stderr).toBe(
      `keygate: ${file} is not the pepper this store's keys were hashed with: every key would be unknown. Restore the ${file} the store was created with, or set KEYGATE_PEPPER to that pepper\n`,
    );
    for (const secret of [pepper, OTHER_PEPPER]) expect(result.stdout + result.stderr).not.toContain(secret);
  });

  it("data/pepper missing beside the store: exit 2, one line, and no new pepper is generated", async () => {
    const { cwd, dataDir } = await usedDataDir();
    const file = join(dataDir, "pepper");
    rmSync(file);
    const result = await serveUntilExit(cwd, { KEYGATE_DATA_DIR: dataDir, ...LOOPBACK }, children);
    expect(result.code).toBe(2);
    expect(result.stderr).toBe(
      `keygate: ${file} is missing but the data directory holds keys: a new pepper would make every key unknown. Restore it from a backup, or set KEYGATE_PEPPER to the pepper the keys were made with\n`,
    );
    expect(existsSync(file)).toBe(false);
  });
});

describe("start-up: the pepper.happy", () => {
  it("data/pepper given as KEYGATE_PEPPER with its trailing newline (a --from-file Secret) starts, warns naming the variable, and prints no pepper", async () => {
    const cwd = tempDir();
    const dataDir = join(cwd, "data");
    const first = await spawnKeygate({ cwd, env: { KEYGATE_DATA_DIR: dataDir, ...LOOPBACK } });
    expect(await first.stop("SIGTERM")).toBe(0);
    const fileBytes = readFileSync(join(dataDir, "pepper"), "utf8");
    expect(fileBytes.endsWith("\n")).toBe(true);
    const second = await spawnKeygate({ cwd, env: { KEYGATE_DATA_DIR: dataDir, KEYGATE_PEPPER: fileBytes, ...LOOPBACK } });
    const warnings = second
      .stdout()
      .split("\n")
      .filter((line) => line.startsWith("{"))
      .map((line) => JSON.parse(line) as Record<string, unknown>)
      .filter((entry) => entry["level"] === 40);
    expect(warnings.map((entry) => entry["variable"])).toEqual(["KEYGATE_PEPPER"]);
    expect(await second.stop("SIGTERM")).toBe(0);
    expect(second.stderr()).toBe("");
    expect(second.stdout()).not.toContain(fileBytes.trim());
  });
});

const mongoReady = requireServer("MongoDB-wire server", mongoWireAvailable(), "run .ci/install-mongo-wire.sh");

describe.runIf(mongoReady)("start-up errors: MongoDB.error", () => {
  let mongo: MongoWire;
  beforeAll(async () => {
    mongo = await startMongoWire();
  });
  afterAll(async () => {
    await mongo.stop();
  });

  it("refused credentials are one line naming KEYGATE_MONGODB_URI, without the password", async () => {
    const password = `pw${randomBytes(12).toString("hex")}`;
    const uri = mongo.uri.replace("mongodb://", `mongodb://keygate:${password}@`);
    const env = { KEYGATE_DATA_DIR: join(tempDir(), "data"), KEYGATE_MONGODB_URI: uri, KEYGATE_PEPPER: PEPPER, KEYGATE_ADMIN_TOKENS: ADMIN, KEYGATE_GRPC_PORT: "0", KEYGATE_HTTP_AUTHZ_PORT: "0", KEYGATE_ADMIN_PORT: "0" };
    const result = await serveUntilExit(tempDir(), env, children);
    expect(result.code).toBe(2);
    const line = expectOneLine(result.stderr, "KEYGATE_MONGODB_URI");
    expect(line).toContain("MongoDB refused the credentials");
    expect(result.stdout + result.stderr).not.toContain(password);
  });

  it("a second keygate with another pepper on the same MongoDB: exit 2, one line naming KEYGATE_PEPPER, no pepper printed; the first keeps serving", async () => {
    const uri = mongo.uri.replace(/\/([^/?]+)(\?|$)/, "/$1_pepper$2");
    const env = { KEYGATE_DATA_DIR: join(tempDir(), "data"), KEYGATE_MONGODB_URI: uri, KEYGATE_ADMIN_TOKENS: ADMIN, ...LOOPBACK };
    const first = await spawnKeygate({ cwd: tempDir(), env: { ...env, KEYGATE_PEPPER: PEPPER } });
    try {
      const second = await serveUntilExit(tempDir(), { ...env, KEYGATE_PEPPER: OTHER_PEPPER }, children);
      expect(second.code).toBe(2);
      expect(second.stderr).toBe(pepperMismatchLine("the keygate-secrets Secret; every replica needs the same one"));
      for (const secret of [PEPPER, OTHER_PEPPER]) expect(second.stdout + second.stderr).not.toContain(secret);
      expect((await fetch(`http://127.0.0.1:${first.ports.admin}/readyz`)).status).toBe(200);
    } finally {
      expect(await first.stop("SIGTERM")).toBe(0);
    }
  });

  it("an unreachable MongoDB is one line naming KEYGATE_MONGODB_URI", async () => {
    const port = await freePort();
    const env = {
      KEYGATE_DATA_DIR: join(tempDir(), "data"),
      KEYGATE_MONGODB_URI: `mongodb://127.0.0.1:${port}/keygate`,
      KEYGATE_PEPPER: PEPPER,
      KEYGATE_ADMIN_TOKENS: ADMIN,
      KEYGATE_GRPC_PORT: "0",
      KEYGATE_HTTP_AUTHZ_PORT: "0",
      KEYGATE_ADMIN_PORT: "0",
      KEYGATE_STARTUP_WAIT_SECONDS: "0",
    };
    const result = await serveUntilExit(tempDir(), env, children);
    expect(result.code).toBe(2);
    expect(expectOneLine(result.stderr, "KEYGATE_MONGODB_URI")).toContain("no MongoDB server answered");
  });
});

const redisReady = requireServer("redis-server", redisAvailable(), "apt-get install redis-server");

describe.runIf(redisReady)("start-up errors: Redis.error", () => {
  let redis: ChildProcess;
  let port = 0;
  const password = `pw${randomBytes(12).toString("hex")}`;
  beforeAll(async () => {
    port = await freePort();
    redis = spawn("redis-server", ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--requirepass", password], { stdio: "ignore" });
    children.add(redis);
    await waitForPort(port, 10_000, () => "redis-server with requirepass");
  });

  it("a wrong Redis password is one line naming KEYGATE_REDIS_URL, and neither password is printed", async () => {
    const wrong = `wrong${randomBytes(8).toString("hex")}`;
    const env = { KEYGATE_DATA_DIR: join(tempDir(), "data"), KEYGATE_REDIS_URL: `redis://:${wrong}@127.0.0.1:${port}`, KEYGATE_GRPC_PORT: "0", KEYGATE_HTTP_AUTHZ_PORT: "0", KEYGATE_ADMIN_PORT: "0" };
    const result = await serveUntilExit(tempDir(), env, children);
    expect(result.code).toBe(2);
    expect(expectOneLine(result.stderr, "KEYGATE_REDIS_URL")).toBe("keygate: KEYGATE_REDIS_URL: Redis refused the credentials (WRONGPASS)");
    // The connection error is logged, but ioredis's copy of the AUTH command (with the password) is not.
    expect(result.stdout + result.stderr).not.toContain(wrong);
    expect(result.stdout + result.stderr).not.toContain(password);
  });

  it("a Redis that refuses connections is tried again until KEYGATE_STARTUP_WAIT_SECONDS, then one line naming KEYGATE_REDIS_URL", async () => {
    const closed = await freePort();
    const env = { KEYGATE_DATA_DIR: join(tempDir(), "data"), KEYGATE_REDIS_URL: `redis://127.0.0.1:${closed}`, KEYGATE_GRPC_PORT: "0", KEYGATE_HTTP_AUTHZ_PORT: "0", KEYGATE_ADMIN_PORT: "0", KEYGATE_STARTUP_WAIT_SECONDS: "2" };
    const result = await serveUntilExit(tempDir(), env, children);
    expect(result.code).toBe(2);
    expect(expectOneLine(result.stderr, "KEYGATE_REDIS_URL")).toBe("keygate: KEYGATE_REDIS_URL: nothing accepts connections at that host and port (ECONNREFUSED)");
    // A refused connection fails at once, so the 2 s hold at least one more try (after 1 s).
    const retries = result.stdout.split("\n").filter((line) => line.includes("trying again (the start waits KEYGATE_STARTUP_WAIT_SECONDS)"));
    expect(retries.length).toBeGreaterThanOrEqual(1);
    for (const line of retries) {
      expect(line).toContain(`"level":40`);
      expect(line).toContain("KEYGATE_REDIS_URL: nothing accepts connections at that host and port (ECONNREFUSED); trying again");
    }
  });

  it("a Cluster whose seed nodes do not answer is one line naming KEYGATE_REDIS_URL, without the password", async () => {
    const secret = `clusterpw${randomBytes(8).toString("hex")}`;
    const [p1, p2] = [await freePort(), await freePort()];
    const url = `redis+cluster://:${secret}@127.0.0.1:${p1},127.0.0.1:${p2}`;
    const env = { KEYGATE_DATA_DIR: join(tempDir(), "data"), KEYGATE_REDIS_URL: url, KEYGATE_GRPC_PORT: "0", KEYGATE_HTTP_AUTHZ_PORT: "0", KEYGATE_ADMIN_PORT: "0", KEYGATE_STARTUP_WAIT_SECONDS: "0" };
    const result = await serveUntilExit(tempDir(), env, children);
    expect(result.code).toBe(2);
    expect(expectOneLine(result.stderr, "KEYGATE_REDIS_URL")).toBe("keygate: KEYGATE_REDIS_URL: no seed node of the Cluster answered");
    expect(result.stdout + result.stderr).not.toContain(secret);
  });

  it("Sentinels that do not answer are one line naming KEYGATE_REDIS_URL, without either password", async () => {
    const secret = `masterpw${randomBytes(8).toString("hex")}`;
    const sentinelSecret = `sentinelpw${randomBytes(8).toString("hex")}`;
    const url = `redis+sentinel://:${secret}@127.0.0.1:${await freePort()}/mymaster?sentinelPassword=${sentinelSecret}`;
    const env = { KEYGATE_DATA_DIR: join(tempDir(), "data"), KEYGATE_REDIS_URL: url, KEYGATE_GRPC_PORT: "0", KEYGATE_HTTP_AUTHZ_PORT: "0", KEYGATE_ADMIN_PORT: "0", KEYGATE_STARTUP_WAIT_SECONDS: "0" };
    const result = await serveUntilExit(tempDir(), env, children);
    expect(result.code).toBe(2);
    expect(expectOneLine(result.stderr, "KEYGATE_REDIS_URL")).toBe("keygate: KEYGATE_REDIS_URL: no Sentinel answered");
    expect(result.stdout + result.stderr).not.toContain(secret);
    expect(result.stdout + result.stderr).not.toContain(sentinelSecret);
  }, 60_000);

  it("a malformed topology URL is refused before any connection, naming the variable and not the password", async () => {
    const secret = `formpw${randomBytes(8).toString("hex")}`;
    const env = { KEYGATE_DATA_DIR: join(tempDir(), "data"), KEYGATE_REDIS_URL: `redis+sentinel://:${secret}@127.0.0.1:26379`, KEYGATE_GRPC_PORT: "0", KEYGATE_HTTP_AUTHZ_PORT: "0", KEYGATE_ADMIN_PORT: "0" };
    const result = await serveUntilExit(tempDir(), env, children);
    expect(result.code).toBe(2);
    expect(result.stderr.trimEnd()).toBe(
      "keygate: invalid environment: KEYGATE_REDIS_URL: redis+sentinel:// needs the master's name as its path: redis+sentinel://host:26379/mymaster",
    );
    expect(result.stdout + result.stderr).not.toContain(secret);
  });
});
