import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ADMIN_TOKEN, TEST_POLICY, postJson } from "../harness/keygate.js";
import { mongoWireAvailable, startMongoWire } from "../harness/mongo-wire.js";
import type { MongoWire } from "../harness/mongo-wire.js";
import { spawnKeygate } from "../harness/process.js";
import type { KeygateProcess } from "../harness/process.js";
import { requireServer } from "../harness/ports.js";
import { redisAvailable, startRedis } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";
import { writeFileSync } from "node:fs";
import { stringify } from "yaml";

const ready =
  requireServer("MongoDB-wire server", mongoWireAvailable(), "run .ci/install-mongo-wire.sh") &&
  requireServer("redis-server", redisAvailable(), "apt-get install redis-server");

async function check(replica: KeygateProcess, key: string): Promise<number> {
  const res = await fetch(`http://127.0.0.1:${replica.ports.http}/check/v1/things`, { headers: { "x-api-key": key } });
  await res.arrayBuffer();
  return res.status;
}

async function createKey(replica: KeygateProcess, ownerId: string): Promise<{ id: string; secret: string }> {
  await postJson(replica.ports.admin, "UpsertAccount", { ownerId, plan: "business" });
  const created = await postJson(replica.ports.admin, "CreateKey", { ownerId, name: "replica test" });
  expect(created.status, JSON.stringify(created.json)).toBe(200);
  const key = created.json["key"];
  const secret = created.json["secret"];
  if (typeof secret !== "string" || typeof key !== "object" || key === null || !("id" in key) || typeof key.id !== "string") {
    throw new Error(`unexpected CreateKey answer ${JSON.stringify(created.json)}`);
  }
  return { id: key.id, secret };
}

/** Polls until `probe` is true; returns the elapsed milliseconds. */
async function until(probe: () => Promise<boolean>, timeoutMs: number, what: string): Promise<number> {
  const started = performance.now();
  for (;;) {
    if (await probe()) return performance.now() - started;
    if (performance.now() - started > timeoutMs) throw new Error(`${what}: not within ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

describe.runIf(ready)("two replicas sharing MongoDB and Redis", () => {
  let mongo: MongoWire;
  let redis: RedisServer;
  let a: KeygateProcess;
  let b: KeygateProcess;
  let dir: string;

  beforeAll(async () => {
    const [startedMongo, startedRedis] = await Promise.all([startMongoWire(), startRedis()]);
    if (startedRedis === null) throw new Error("redis-server is not on PATH");
    [mongo, redis] = [startedMongo, startedRedis];
    dir = mkdtempSync(join(tmpdir(), "keygate-replicas-"));
    const policy = join(dir, "policy.yaml");
    writeFileSync(policy, stringify(TEST_POLICY));
    const env = {
      KEYGATE_MONGODB_URI: mongo.uri,
      KEYGATE_REDIS_URL: redis.url,
      KEYGATE_PEPPER: "replica-test-pepper-0123456789abcdefghijkl",
      KEYGATE_ADMIN_TOKENS: ADMIN_TOKEN,
      KEYGATE_CONFIG: policy,
      KEYGATE_HOST: "127.0.0.1",
      KEYGATE_GRPC_PORT: "0",
      KEYGATE_HTTP_AUTHZ_PORT: "0",
      KEYGATE_ADMIN_PORT: "0",
      KEYGATE_LOG_LEVEL: "info",
      KEYGATE_SHUTDOWN_GRACE_SECONDS: "5",
    };
    [a, b] = await Promise.all([spawnKeygate({ cwd: dir, env }), spawnKeygate({ cwd: dir, env })]);
  }, 120_000);

  afterAll(async () => {
    await Promise.allSettled([a?.stop("SIGKILL"), b?.stop("SIGKILL")]);
    await Promise.allSettled([mongo?.stop(), redis?.stop()]);
    if (dir !== undefined) rmSync(dir, { recursive: true, force: true });
  });

  it("a key revoked through replica A is refused by replica B within 1 s", async () => {
    const key = await createKey(a, "rep-revoke");
    expect(await check(b, key.secret)).toBe(200);
    expect(await check(a, key.secret)).toBe(200);
    const revoked = await postJson(a.ports.admin, "RevokeKey", { id: key.id });
    expect(revoked.status).toBe(200);
    const revokedAt = performance.now();
    const elapsedMs = await until(async () => (await check(b, key.secret)) === 401, 1000, "replica B refusing the revoked key");
    console.log(`revocation propagation A -> B: ${(performance.now() - revokedAt).toFixed(1)} ms (poll loop ${elapsedMs.toFixed(1)} ms)`);
    expect(await check(a, key.secret)).toBe(401);
  });

  it("keeps answering from L1 and the store while Redis is down, and reconnects when it returns", async () => {
    const warm = await createKey(a, "rep-redis-warm");
    const cold = await createKey(a, "rep-redis-cold");
    expect(await check(b, warm.secret)).toBe(200);
    await redis.stop();
    const statuses: number[] = [];
    for (let i = 0; i < 50; i++) statuses.push(await check(b, warm.secret), await check(b, cold.secret));
    expect(statuses.filter((s) => s !== 200)).toEqual([]);
    await redis.start();
    // Until A's connection is back, changes answer UNAVAILABLE (the caches could not be told).
    await until(async () => (await postJson(a.ports.admin, "UpsertAccount", { ownerId: "rep-redis-after" })).status === 200, 10_000, "A reconnected");
    // Back: invalidations flow again, so a revoke through A reaches B's L1 within 1 s.
    const key = await createKey(a, "rep-redis-after");
    await until(async () => (await check(b, key.secret)) === 200, 5000, "B serving after Redis returned");
    await until(async () => (await postJson(a.ports.admin, "RevokeKey", { id: key.id })).status === 200, 10_000, "A revoking after Redis returned");
    await until(async () => (await check(b, key.secret)) === 401, 1000, "B refusing after Redis returned");
  });

  it("200 checks then SIGTERM: last_used_at reaches MongoDB", async () => {
    const key = await createKey(a, "rep-last-used");
    for (let i = 0; i < 200; i++) expect(await check(a, key.secret)).toBe(200);
    expect(await a.stop("SIGTERM")).toBe(0);
    const got = await postJson(b.ports.admin, "GetKey", { id: key.id });
    expect(typeof (got.json["key"] as { lastUsedAt?: unknown }).lastUsedAt).toBe("string");
  });

  it("MongoDB down: cached keys pass, an uncached key is 503/UNAVAILABLE, readiness drops, and it recovers", async () => {
    const cached = await createKey(b, "rep-mongo-cached");
    const uncached = await createKey(b, "rep-mongo-uncached");
    expect(await check(b, cached.secret)).toBe(200);
    await mongo.pause();
    expect(await check(b, cached.secret)).toBe(200);
    await until(async () => (await check(b, uncached.secret)) === 503, 10_000, "uncached key answered 503");
    await until(async () => (await fetch(`http://127.0.0.1:${b.ports.admin}/readyz`)).status === 503, 10_000, "readyz 503");
    await mongo.start();
    await until(async () => (await fetch(`http://127.0.0.1:${b.ports.admin}/readyz`)).status === 200, 30_000, "readyz 200 again");
    // The test server keeps data in memory, so it comes back empty: a new key proves recovery.
    const fresh = await until(async () => (await postJson(b.ports.admin, "CreateKey", { ownerId: "rep-mongo-after", name: "after" })).status === 200, 10_000, "CreateKey after recovery");
    expect(fresh).toBeGreaterThanOrEqual(0);
  });
});
