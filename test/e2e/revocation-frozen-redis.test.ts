import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Redis } from "ioredis";
import { stringify } from "yaml";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { KeyHasher } from "../../src/keys/hasher.js";
import { ADMIN_TOKEN, TEST_POLICY, postJson } from "../harness/keygate.js";
import { mongoWireAvailable, startMongoWire } from "../harness/mongo-wire.js";
import type { MongoWire } from "../harness/mongo-wire.js";
import { until } from "../harness/poll.js";
import { requireServer } from "../harness/ports.js";
import { sharedBackendEnv, spawnKeygate } from "../harness/process.js";
import type { KeygateProcess } from "../harness/process.js";
import { redisAvailable, startRedis } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";

/** Polls every 20 ms: these waits are for Redis and delivery to come back; the revocation delay is timed separately. */
const POLL = { intervalMs: 20 } as const;

// Revocation across two replicas (two `keygate serve` processes sharing the MongoDB-wire server
// and one redis-server) while Redis is frozen with SIGSTOP: its connections stay open and nothing
// answers, so no connection error tells a replica that invalidations stopped.

const ready =
  requireServer("MongoDB-wire server", mongoWireAvailable(), "run .ci/install-mongo-wire.sh") &&
  requireServer("redis-server", redisAvailable(), "apt-get install redis-server");

const PEPPER = "frozen-redis-test-pepper-0123456789abcdef";
const FROZEN_RUNS = 5;
const HEALTHY_RUNS = 5;
/**
 * How long the test waits for replica B to refuse. The bound keygate states is about 2.5 s with
 * Redis frozen; this is far above it, so load cannot fail the test, and far below the cache TTL
 * (60 s here), which is how long B would go on allowing the key without the bus's heartbeat.
 */
const REFUSAL_DEADLINE_MS = 15_000;
/** Checks in flight at once while polling, one started every POLL_EVERY_MS. */
const POLL_EVERY_MS = 25;

interface Answer {
  status: number;
  code: string | null;
}

async function check(replica: KeygateProcess, key: string): Promise<Answer> {
  const res = await fetch(`http://127.0.0.1:${replica.ports.http}/check/v1/things`, { headers: { "x-api-key": key } });
  const body = await res.text();
  let code: string | null = null;
  if (res.status !== 200) {
    const parsed: unknown = JSON.parse(body);
    if (typeof parsed === "object" && parsed !== null && "error" in parsed && typeof parsed.error === "object" && parsed.error !== null && "code" in parsed.error) {
      code = typeof parsed.error.code === "string" ? parsed.error.code : null;
    }
  }
  return { status: res.status, code };
}

/**
 * Starts a Check every POLL_EVERY_MS without waiting for the one before (while Redis is frozen
 * an allowed Check waits for its rate-limit call to time out), until one is refused 401
 * KEY_REVOKED. Returns when the first refused Check was sent, in performance.now() time.
 */
async function firstRefusal(replica: KeygateProcess, key: string, sinceMs: number): Promise<number> {
  const inFlight = new Set<Promise<void>>();
  let refusedSentAt: number | null = null;
  const other: Answer[] = [];
  while (refusedSentAt === null) {
    if (performance.now() - sinceMs > REFUSAL_DEADLINE_MS) {
      await Promise.all(inFlight);
      throw new Error(`replica B still allowed the revoked key ${REFUSAL_DEADLINE_MS} ms after RevokeKey; unexpected answers ${JSON.stringify(other)}`);
    }
    const sentAt = performance.now();
    const probe = check(replica, key).then(
      (answer) => {
        if (answer.status === 401 && answer.code === "KEY_REVOKED") refusedSentAt = refusedSentAt === null ? sentAt : Math.min(refusedSentAt, sentAt);
        else if (answer.status !== 200) other.push(answer);
      },
      () => {
        other.push({ status: -1, code: "transport error" });
      },
    );
    inFlight.add(probe);
    void probe.finally(() => inFlight.delete(probe));
    await new Promise((resolve) => setTimeout(resolve, POLL_EVERY_MS));
  }
  await Promise.all(inFlight);
  expect(other).toEqual([]);
  return refusedSentAt;
}

function logCount(replica: KeygateProcess, message: string): number {
  return replica.stdout().split(`"msg":"${message}`).length - 1;
}

function stats(values: number[]): string {
  const sorted = [...values].sort((x, y) => x - y);
  const median = sorted[Math.floor(sorted.length / 2)] ?? 0;
  return `min ${(sorted[0] ?? 0).toFixed(0)} ms, median ${median.toFixed(0)} ms, max ${(sorted.at(-1) ?? 0).toFixed(0)} ms (${values.map((v) => v.toFixed(0)).join(", ")})`;
}

describe.runIf(ready)("revocation between two replicas while Redis is frozen (SIGSTOP)", () => {
  let mongo: MongoWire;
  let redis: RedisServer;
  let a: KeygateProcess;
  let b: KeygateProcess;
  let probe: Redis;
  let dir: string;
  let seq = 0;
  const hasher = new KeyHasher(PEPPER);

  beforeAll(async () => {
    const [startedMongo, startedRedis] = await Promise.all([startMongoWire(), startRedis()]);
    if (startedRedis === null) throw new Error("redis-server is not on PATH");
    [mongo, redis] = [startedMongo, startedRedis];
    dir = mkdtempSync(join(tmpdir(), "keygate-frozen-redis-"));
    const policy = join(dir, "policy.yaml");
    // A cache TTL far above the refusal deadline: only the bus's heartbeat can make B re-read in time.
    const cache = { maxEntries: 10_000, ttlSeconds: 60, negativeMaxEntries: 10_000, negativeTtlSeconds: 5 };
    writeFileSync(policy, stringify({ ...TEST_POLICY, cache }));
    const env = sharedBackendEnv({ mongoUri: mongo.uri, redisUrl: redis.url, pepper: PEPPER, policyFile: policy, adminToken: ADMIN_TOKEN });
    [a, b] = await Promise.all([spawnKeygate({ cwd: dir, env }), spawnKeygate({ cwd: dir, env })]);
    probe = new Redis(redis.url, { lazyConnect: true, maxRetriesPerRequest: 1 });
    await probe.connect();
  }, 120_000);

  afterAll(async () => {
    probe?.disconnect();
    try {
      redis?.thaw();
    } catch {
      // Not running: nothing to thaw.
    }
    await Promise.allSettled([a?.stop("SIGKILL"), b?.stop("SIGKILL")]);
    await Promise.allSettled([mongo?.stop(), redis?.stop()]);
    if (dir !== undefined) rmSync(dir, { recursive: true, force: true });
  });

  /** A key created through A and cached by B in L1 and L2. */
  async function keyCachedByB(): Promise<{ id: string; secret: string; l2Key: string }> {
    const ownerId = `frozen-${++seq}`;
    expect((await postJson(a.ports.admin, "UpsertAccount", { ownerId, plan: "business" })).status).toBe(200);
    const created = await postJson(a.ports.admin, "CreateKey", { ownerId, name: "frozen" });
    const secret = created.json["secret"];
    const key = created.json["key"];
    const id = typeof key === "object" && key !== null && "id" in key ? key.id : undefined;
    if (typeof secret !== "string" || typeof id !== "string") throw new Error(`CreateKey failed: ${JSON.stringify(created.json)}`);
    const l2Key = `kg:snap:${hasher.hash(secret)}`;
    expect(await check(b, secret)).toEqual({ status: 200, code: null });
    await until(async () => (await probe.exists(l2Key)) === 1, 5000, "B filled L2", POLL);
    return { id, secret, l2Key };
  }

  it("healthy Redis: B refuses a key revoked through A (measured)", async () => {
    const elapsed: number[] = [];
    for (let run = 0; run < HEALTHY_RUNS; run++) {
      const key = await keyCachedByB();
      const revokeSentAt = performance.now();
      expect((await postJson(a.ports.admin, "RevokeKey", { id: key.id })).status).toBe(200);
      elapsed.push((await firstRefusal(b, key.secret, revokeSentAt)) - revokeSentAt);
    }
    console.log(`revocation A -> B, Redis healthy, ${HEALTHY_RUNS} runs: ${stats(elapsed)}`);
  }, 120_000);

  it("Redis frozen: B refuses a key revoked through A within the heartbeat bound, and after SIGCONT no stale L2 entry brings it back", async () => {
    const elapsed: number[] = [];
    for (let run = 0; run < FROZEN_RUNS; run++) {
      const key = await keyCachedByB();
      // What L2 held for the key before the revocation: put back after the thaw, it stands for an
      // invalidation that never reached Redis (a replica that died before it could retry).
      const staleEntry = await probe.get(key.l2Key);
      if (staleEntry === null) throw new Error("no L2 entry to keep");
      const recoveredA = logCount(a, "invalidation channel answering again");
      const recoveredB = logCount(b, "invalidation channel answering again");
      const deliveredA = logCount(a, "waiting invalidations reached the other replicas");

      redis.freeze();
      let refusedAt: number;
      const revokeSentAt = performance.now();
      try {
        // The store change is made; telling the caches fails, and A says so and keeps trying.
        const revoked = await postJson(a.ports.admin, "RevokeKey", { id: key.id });
        expect({ status: revoked.status, code: revoked.json["code"] }).toEqual({ status: 503, code: "unavailable" });
        refusedAt = await firstRefusal(b, key.secret, revokeSentAt);
        expect(await check(a, key.secret)).toEqual({ status: 401, code: "KEY_REVOKED" });
      } finally {
        redis.thaw();
      }
      elapsed.push(refusedAt - revokeSentAt);

      // Back: both replicas hear Redis again, and A's queued invalidation has landed.
      await until(
        () => logCount(a, "invalidation channel answering again") > recoveredA && logCount(b, "invalidation channel answering again") > recoveredB,
        15_000,
        "both replicas hearing Redis again",
        POLL,
      );
      await until(() => logCount(a, "waiting invalidations reached the other replicas") > deliveredA, 15_000, "A's queued invalidation delivered", POLL);
      expect(await probe.exists(key.l2Key)).toBe(0);
      // The worst case: the pre-revocation entry back in L2, and B's L1 entry dropped, so B's next
      // Check reads L2. Entries from before the outage are no longer trusted, so B reads the store.
      await probe.set(key.l2Key, staleEntry, "EX", 60);
      await probe.publish("keygate:invalidate", JSON.stringify({ kind: "key", hash: hasher.hash(key.secret) }));
      for (let i = 0; i < 5; i++) {
        expect(await check(b, key.secret)).toEqual({ status: 401, code: "KEY_REVOKED" });
        expect(await check(a, key.secret)).toEqual({ status: 401, code: "KEY_REVOKED" });
      }
    }
    console.log(`revocation A -> B, Redis frozen (SIGSTOP), ${FROZEN_RUNS} runs, from RevokeKey sent to the first refused Check sent: ${stats(elapsed)}`);
  }, 300_000);
});
