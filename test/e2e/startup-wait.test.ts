import { spawn } from "node:child_process";
import type { ChildProcess } from "node:child_process";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ADMIN_TOKEN, postJson } from "../harness/keygate.js";
import { mongoWireAvailable, tryStartMongoWire } from "../harness/mongo-wire.js";
import type { MongoWire } from "../harness/mongo-wire.js";
import { until } from "../harness/poll.js";
import { requireServer } from "../harness/ports.js";
import { embeddedEnv, listeningPorts, serveArgs, spawnedKeygates } from "../harness/process.js";
import { redisAvailable, startRedis } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";

// A replica started while its MongoDB or Redis does not answer yet (a cluster coming up together,
// a store restarting) tries it again until KEYGATE_STARTUP_WAIT_SECONDS, and starts as soon as it
// answers: before, it exited 2 at the first try, and under Kubernetes waited out the kubelet's
// crash-loop back-off (up to 5 minutes) after the store was back.

const PEPPER = "startup-wait-pepper-0123456789abcdefghijklmnop";
const RETRY_LINE = "trying again (the start waits KEYGATE_STARTUP_WAIT_SECONDS)";

const spawned = spawnedKeygates("keygate-startup-wait-");

/** `keygate serve` with `env`, its stdout kept as it comes (spawnKeygate only returns once it listens). */
function serveWatched(env: Record<string, string>): { child: ChildProcess; stdout(): string; exited(): boolean } {
  const childEnv: NodeJS.ProcessEnv = {};
  for (const [name, value] of Object.entries(process.env)) if (!name.startsWith("KEYGATE_")) childEnv[name] = value;
  Object.assign(childEnv, env);
  const { dir } = spawned.tempDataDir();
  const child = spawn(process.execPath, serveArgs(), { cwd: dir, env: childEnv, stdio: ["ignore", "pipe", "pipe"] });
  spawned.children.add(child);
  let stdout = "";
  let stderr = "";
  child.stdout?.on("data", (chunk: Buffer) => (stdout += chunk.toString()));
  child.stderr?.on("data", (chunk: Buffer) => (stderr += chunk.toString()));
  return { child, stdout: () => `${stdout}${stderr === "" ? "" : `\nstderr: ${stderr}`}`, exited: () => child.exitCode !== null || child.signalCode !== null };
}

/** Waits for the backend's first failed try, brings it up, and checks that the same process then serves. */
async function startsOnceAnswered(served: ReturnType<typeof serveWatched>, variable: string, bringUp: () => Promise<void>): Promise<void> {
  await until(() => served.stdout().includes(RETRY_LINE) || served.exited(), 30_000, "a failed try of the backend", { intervalMs: 50 });
  expect(served.exited(), served.stdout()).toBe(false);
  const retry = served.stdout().split("\n").find((line) => line.includes(RETRY_LINE)) ?? "";
  expect(retry).toContain(`"msg":"${variable}: `);
  expect(listeningPorts(served.stdout())).toBe(null);
  await bringUp();
  await until(() => listeningPorts(served.stdout()) !== null || served.exited(), 30_000, "keygate listening once the backend answers", { intervalMs: 50 });
  const ports = listeningPorts(served.stdout());
  if (ports === null) throw new Error(`keygate did not start: ${served.stdout()}`);
  await until(async () => (await fetch(`http://127.0.0.1:${ports.admin}/readyz`)).status === 200, 10_000, "/readyz 200");
  const account = await postJson(ports.admin, "UpsertAccount", { ownerId: "startup-wait-owner" });
  expect(account.status).toBe(200);
  served.child.kill("SIGTERM");
  const code = await new Promise<number | null>((done) => (served.exited() ? done(served.child.exitCode) : served.child.once("exit", (exitCode) => done(exitCode))));
  expect(code).toBe(0);
}

const mongoReady = requireServer("mongo-wire", mongoWireAvailable(), "bash .ci/install-mongo-wire.sh");

describe.runIf(mongoReady)("a start while MongoDB does not answer yet.happy", { timeout: 90_000 }, () => {
  let mongo: MongoWire | null = null;
  beforeAll(async () => {
    mongo = await tryStartMongoWire();
  }, 120_000);
  afterAll(async () => {
    await mongo?.stop();
  });

  it("tries MongoDB again, logging each try, and serves once it answers", async () => {
    if (mongo === null) throw new Error("the MongoDB-wire server did not start");
    const store = mongo;
    await store.pause();
    const served = serveWatched({
      KEYGATE_DATA_DIR: join(spawned.tempDir(), "data"),
      KEYGATE_MONGODB_URI: store.uri,
      KEYGATE_PEPPER: PEPPER,
      KEYGATE_ADMIN_TOKENS: ADMIN_TOKEN,
      KEYGATE_HOST: "127.0.0.1",
      KEYGATE_GRPC_PORT: "0",
      KEYGATE_HTTP_AUTHZ_PORT: "0",
      KEYGATE_ADMIN_PORT: "0",
      KEYGATE_STARTUP_WAIT_SECONDS: "60",
    });
    await startsOnceAnswered(served, "KEYGATE_MONGODB_URI", () => store.start());
  });
});

const redisReady = requireServer("redis-server", redisAvailable(), "apt-get install redis-server");

describe.runIf(redisReady)("a start while Redis does not answer yet.happy", { timeout: 90_000 }, () => {
  let redis: RedisServer | null = null;
  beforeAll(async () => {
    redis = await startRedis();
  });
  afterAll(async () => {
    await redis?.stop();
  });

  it("tries Redis again, logging each try, and serves once it answers", async () => {
    if (redis === null) throw new Error("redis-server did not start");
    const server = redis;
    await server.stop();
    const { dataDir } = spawned.tempDataDir();
    const served = serveWatched(embeddedEnv({ dataDir, adminToken: ADMIN_TOKEN, extra: { KEYGATE_REDIS_URL: server.url, KEYGATE_STARTUP_WAIT_SECONDS: "60" } }));
    await startsOnceAnswered(served, "KEYGATE_REDIS_URL", () => server.start());
  });
});
