import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Redis } from "ioredis";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { RedisSharedCache } from "../../src/cache/redis.js";
import type { KeySnapshot } from "../../src/store/store.js";
import { newKeyRecord } from "../../src/store/store.js";
import { TEST_POLICY, checkInit, checkOutcome, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { mongoWireAvailable, startMongoWire } from "../harness/mongo-wire.js";
import type { MongoWire } from "../harness/mongo-wire.js";
import { until } from "../harness/poll.js";
import { requireServer } from "../harness/ports.js";
import { redisAvailable, startRedis } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";

// The L2 keeps a set of hashes per owner (`owner:<ownerId>`) so that an account change can delete
// every snapshot of the owner. Each fill set the set's lifetime to the filling replica's cache TTL,
// and replicas may run different TTLs (cache.ttlSeconds takes effect at a restart, so replicas
// restarted at different times after a policy edit differ). A fill through a replica with a shorter
// TTL cut the index's life below that of snapshots another replica had written for the owner; once
// the index expired, an account change (UpsertAccount: canceled) deleted none of them, and every
// replica's next L1 miss read the stale snapshot back and allowed the key (200, not 402) for the rest
// of the longer TTL. A fill now only ever lengthens the index's lifetime.

// Counts every snapshot in Redis: a server of its own, not a shared one.
const ready = requireServer("redis-server", redisAvailable(), "apt-get install redis-server") && (process.env["KEYGATE_TEST_REDIS_URL"] ?? "") === "";
const POLL = { intervalMs: 50, retryErrors: true } as const;
const LONG_TTL_SECONDS = 120;
const SHORT_TTL_SECONDS = 1;

function snapshot(ownerId: string, id: string): KeySnapshot {
  return {
    key: newKeyRecord({ id, hash: `h-${id}`, ownerId, name: id, mode: "live", start: "kg_live_abcd", last4: "wxyz", scopes: [], metadata: {}, createdAtMs: 1 }),
    account: { ownerId, plan: "business", subscriptionStatus: "active", role: "standard", createdAtMs: 1, updatedAtMs: 2 },
  };
}

function policyWithTtl(ttlSeconds: number): unknown {
  return { ...TEST_POLICY, cache: { maxEntries: 1000, ttlSeconds, negativeMaxEntries: 1000, negativeTtlSeconds: 1 } };
}

describe.runIf(ready)("the L2 owner index when replicas' cache TTLs differ", () => {
  let redis: RedisServer;
  let admin: Redis;

  beforeAll(async () => {
    const started = await startRedis();
    if (started === null) throw new Error("redis-server is not on PATH");
    redis = started;
    admin = new Redis(redis.url);
  });

  afterAll(async () => {
    admin?.disconnect();
    await redis?.stop();
  });

  describe("security", () => {
    it("a fill with a shorter TTL leaves the index outliving the snapshots listed in it, so an owner invalidation deletes them", async () => {
      const prefix = "t1:";
      const long = new RedisSharedCache(admin, { ttlSeconds: LONG_TTL_SECONDS, negativeTtlSeconds: 1, keyPrefix: prefix });
      const short = new RedisSharedCache(admin, { ttlSeconds: SHORT_TTL_SECONDS, negativeTtlSeconds: 1, keyPrefix: prefix });
      expect(await long.set("h1", snapshot("o1", "k1"))).toBe(true);
      expect(await short.set("h2", snapshot("o1", "k2"))).toBe(true);

      // The index keeps the longer lifetime: it lives at least as long as h1's snapshot.
      const [indexLeftMs, snapshotLeftMs] = await Promise.all([admin.pttl(`${prefix}owner:o1`), admin.pttl(`${prefix}snap:h1`)]);
      expect(snapshotLeftMs).toBeGreaterThan((LONG_TTL_SECONDS - 10) * 1000);
      expect(indexLeftMs).toBeGreaterThanOrEqual(snapshotLeftMs);
      // Past the short TTL (the index's whole life before the fix), the owner's change still finds h1.
      await until(async () => (await admin.exists(`${prefix}snap:h2`)) === 0, 10_000, "h2's snapshot expired", POLL);
      await short.invalidate({ kind: "owner", ownerId: "o1" });
      expect(await admin.exists(`${prefix}snap:h1`, `${prefix}owner:o1`)).toBe(0);
    });

    it("a fill with a longer TTL lengthens the index a shorter one made", async () => {
      const prefix = "t2:";
      const long = new RedisSharedCache(admin, { ttlSeconds: LONG_TTL_SECONDS, negativeTtlSeconds: 1, keyPrefix: prefix });
      const short = new RedisSharedCache(admin, { ttlSeconds: SHORT_TTL_SECONDS, negativeTtlSeconds: 1, keyPrefix: prefix });
      expect(await short.set("h1", snapshot("o2", "k1"))).toBe(true);
      // A new index gets the filler's TTL (PTTL is -1 for the set SADD has just made): never left without one.
      const firstLeftMs = await admin.pttl(`${prefix}owner:o2`);
      expect(firstLeftMs).toBeGreaterThan(0);
      expect(firstLeftMs).toBeLessThanOrEqual(SHORT_TTL_SECONDS * 1000);
      expect(await long.set("h2", snapshot("o2", "k2"))).toBe(true);
      expect(await admin.pttl(`${prefix}owner:o2`)).toBeGreaterThan((LONG_TTL_SECONDS - 10) * 1000);
      expect(await admin.smembers(`${prefix}owner:o2`)).toEqual(expect.arrayContaining(["h1", "h2"]));
    });
  });

  describe("security: two replicas", () => {
    const started: TestKeygate[] = [];
    let mongo: MongoWire | null = null;
    const dataDir = mkdtempSync(join(tmpdir(), "keygate-owner-index-ttl-"));

    afterAll(async () => {
      await Promise.allSettled(started.map((kg) => kg.stop({ keepData: true })));
      await mongo?.stop();
      rmSync(dataDir, { recursive: true, force: true });
    });

    it.each(["sqlite", "mongodb"] as const)("%s: a canceled subscription is refused by both replicas, also for a key another replica cached for longer", async (store) => {
      if (store === "mongodb" && !mongoWireAvailable()) throw new Error("MongoDB-wire server not installed");
      await Promise.allSettled(started.splice(0).map((kg) => kg.stop({ keepData: true })));
      await admin.flushall();
      let env: Record<string, string> = { KEYGATE_REDIS_URL: redis.url };
      let dirA = join(dataDir, store);
      let dirB = dirA;
      if (store === "mongodb") {
        mongo = await startMongoWire();
        env = { ...env, KEYGATE_MONGODB_URI: mongo.uri, KEYGATE_PEPPER: "owner-index-ttl-test-pepper-0123456789abc" };
        dirA = join(dataDir, "mongo-a");
        dirB = join(dataDir, "mongo-b");
      }
      mkdirSync(dirA, { recursive: true });
      mkdirSync(dirB, { recursive: true });
      // A runs the policy from before an edit (120 s), B was restarted after it (1 s).
      const a = await startKeygate({ policy: policyWithTtl(LONG_TTL_SECONDS), dataDir: dirA, env });
      started.push(a);
      const b = await startKeygate({ policy: policyWithTtl(SHORT_TTL_SECONDS), dataDir: dirB, env });
      started.push(b);
      const ownerId = "ttl-owner";
      await a.admin.upsertAccount({ ownerId, plan: "business" });
      const k1 = (await a.admin.createKey({ ownerId, name: "k1" })).secret;
      const k2 = (await a.admin.createKey({ ownerId, name: "k2" })).secret;
      const outcome = async (kg: TestKeygate, secret: string) => checkOutcome(await kg.check(checkInit({ "x-api-key": secret })));
      const snapshots = async (): Promise<number> => (await admin.keys("kg:snap:*")).length;

      // k1 through A: its snapshot lives 120 s in L2. k2 through B: its fill is the owner index's
      // latest, with B's 1 s.
      expect(await outcome(a, k1)).toEqual({ status: 200, code: null });
      await until(async () => (await snapshots()) === 1, 10_000, "k1's snapshot in L2", POLL);
      expect(await outcome(b, k2)).toEqual({ status: 200, code: null });
      await until(async () => (await snapshots()) === 2, 10_000, "k2's snapshot in L2", POLL);
      // k2's snapshot expires with B's TTL, as the index did before the fix; k1's is still there.
      await until(async () => (await snapshots()) === 1, 10_000, "k2's snapshot expired", POLL);

      await a.admin.upsertAccount({ ownerId, subscriptionStatus: "canceled" });

      // B has no L1 entry for k1 and A's was dropped by the change: both read L2, which must no
      // longer hold k1's snapshot.
      const refused = { status: 402, code: "PLAN_REQUIRED" };
      expect(await outcome(b, k1)).toEqual(refused);
      expect(await outcome(a, k1)).toEqual(refused);
    }, 120_000);
  });
});
