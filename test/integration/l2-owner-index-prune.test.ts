import { Redis } from "ioredis";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { OWNER_INDEX_PRUNE_FLOOR, RedisSharedCache } from "../../src/cache/redis.js";
import type { KeySnapshot } from "../../src/store/store.js";
import { newKeyRecord } from "../../src/store/store.js";
import { until } from "../harness/poll.js";
import { requireServer } from "../harness/ports.js";
import { redisAvailable, startRedis } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";

// The L2 keeps a set of hashes per owner (`owner:<ownerId>`) so that an account change can delete
// every snapshot of the owner; every fill adds to it and only ever lengthens its life. Nothing took
// a hash out but an owner invalidation, which deletes the whole set: a key invalidation (RevokeKey,
// RotateKey, a rescope) deleted the snapshot and left its hash, as did a snapshot expiring. For an
// owner with some key in use within every cache TTL the set never expired and grew with every key
// ever filled (5,001 hashes for one snapshot after 5,000 revoked keys), under `noeviction`, and the
// next account change ran one script that listed and deleted all of them, blocking Redis for
// every replica meanwhile. Now a key invalidation takes its hash out, and a fill prunes the hashes
// whose snapshot is gone once the set holds more than twice what it kept at its last pruning, or
// more than 64: the set stays within max(2 × the owner's live snapshots at the last pruning, 64).
// The safety side: a hash whose snapshot exists is never taken out, so an owner invalidation still
// deletes every snapshot (a missed one would be allowed after, e.g., a canceled subscription).

// Scans every snapshot in Redis: a server of its own, not a shared one.
const ready = requireServer("redis-server", redisAvailable(), "apt-get install redis-server") && (process.env["KEYGATE_TEST_REDIS_URL"] ?? "") === "";
const FLOOR = OWNER_INDEX_PRUNE_FLOOR;
const OWNER = "o1";
/** A TTL short enough to wait out for each churned key (1 ms: PX 1). */
const EXPIRING_TTL_SECONDS = 0.001;
const POLL = { intervalMs: 1 } as const;

function snapshot(ownerId: string, id: string): KeySnapshot {
  return {
    key: newKeyRecord({ id, hash: `h-${id}`, ownerId, name: id, mode: "live", start: "kg_live_abcd", last4: "wxyz", scopes: [], metadata: {}, createdAtMs: 1 }),
    account: { ownerId, plan: "business", subscriptionStatus: "active", role: "standard", createdAtMs: 1, updatedAtMs: 2 },
  };
}

describe.runIf(ready)("the L2 owner index under key churn", () => {
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

  /** Every snapshot under the prefix, by hash. */
  async function snapshotHashes(prefix: string): Promise<string[]> {
    const [cursor, names] = await admin.scan("0", "MATCH", `${prefix}snap:*`, "COUNT", 100_000);
    expect(cursor).toBe("0");
    return names.map((name) => name.slice(`${prefix}snap:`.length)).sort();
  }

  /** A key used once, whose snapshot then expires: filled with a 1 ms TTL, waited out. */
  async function fillAndExpire(prefix: string, hash: string): Promise<void> {
    const expiring = new RedisSharedCache(admin, { ttlSeconds: EXPIRING_TTL_SECONDS, negativeTtlSeconds: 1, keyPrefix: prefix });
    expect(await expiring.set(hash, snapshot(OWNER, hash))).toBe(true);
    await until(async () => (await admin.exists(`${prefix}snap:${hash}`)) === 0, 5000, `${hash}'s snapshot expired`, POLL);
  }

  /** The owner's index lists every live hash and holds at most max(2 × `liveAtMost`, FLOOR). */
  async function expectIndexBounded(prefix: string, live: string[], liveAtMost: number): Promise<void> {
    const index = `${prefix}owner:${OWNER}`;
    expect(await admin.smismember(index, ...live)).toEqual(live.map(() => 1));
    expect(await admin.scard(index)).toBeLessThanOrEqual(Math.max(2 * liveAtMost, FLOOR));
  }

  describe("happy", () => {
    it("a revoked key's hash leaves its owner's index with its snapshot", async () => {
      const prefix = "g1:";
      const cache = new RedisSharedCache(admin, { ttlSeconds: 30, negativeTtlSeconds: 1, keyPrefix: prefix });
      // The owner's one key that stays in use.
      expect(await cache.set("live", snapshot(OWNER, "live"))).toBe(true);
      // Key churn: each key is issued, used (its snapshot filled), then revoked (its key invalidated).
      for (let i = 0; i < 5000; i += 250) {
        await Promise.all(
          Array.from({ length: 250 }, async (_, j) => {
            const hash = `gone-${i + j}`;
            expect(await cache.set(hash, snapshot(OWNER, hash))).toBe(true);
            await cache.invalidate({ kind: "key", hash });
          }),
        );
      }
      // A snapshot as a replica of the release before generations writes it (bare JSON, one MULTI).
      await admin.multi().set(`${prefix}snap:old`, JSON.stringify(snapshot(OWNER, "old")), "EX", 30).sadd(`${prefix}owner:${OWNER}`, "old").exec();
      await cache.invalidate({ kind: "key", hash: "old" });

      expect(await snapshotHashes(prefix)).toEqual(["live"]);
      expect(await admin.smembers(`${prefix}owner:${OWNER}`)).toEqual(["live"]);
    });

    it("hashes of expired snapshots are pruned by later fills: the index never holds more than 64 for one live key", async () => {
      const prefix = "g2:";
      const cache = new RedisSharedCache(admin, { ttlSeconds: 30, negativeTtlSeconds: 1, keyPrefix: prefix });
      expect(await cache.set("live", snapshot(OWNER, "live"))).toBe(true);
      let largest = 0;
      for (let i = 0; i < 300; i += 1) {
        await fillAndExpire(prefix, `gone-${i}`);
        // At each fill the live key's snapshot and the one just filled exist: 2 × 2 is under the floor.
        await expectIndexBounded(prefix, ["live"], 2);
        largest = Math.max(largest, await admin.scard(`${prefix}owner:${OWNER}`));
      }
      // The bound is reached (pruning is amortized, not at every fill) and never passed.
      expect(largest).toBe(FLOOR);
      expect(await snapshotHashes(prefix)).toEqual(["live"]);
    });
  });

  describe("security", () => {
    it("pruning never drops a live snapshot's hash: an owner invalidation still deletes every snapshot", async () => {
      const prefix = "g3:";
      const cache = new RedisSharedCache(admin, { ttlSeconds: 30, negativeTtlSeconds: 1, keyPrefix: prefix });
      const live: string[] = [];
      for (let i = 0; i < 150; i += 1) {
        const hash = `live-${i}`;
        expect(await cache.set(hash, snapshot(OWNER, hash))).toBe(true);
        live.push(hash);
        await expectIndexBounded(prefix, live, live.length);
        // Churn between the live keys' fills, so that prunings run with many live snapshots listed.
        for (let j = 0; j < 4; j += 1) {
          await fillAndExpire(prefix, `gone-${i}-${j}`);
          await expectIndexBounded(prefix, live, live.length + 1);
        }
      }
      const snapshots = await snapshotHashes(prefix);
      expect(snapshots).toEqual([...live].sort());
      expect(await admin.smismember(`${prefix}owner:${OWNER}`, ...snapshots)).toEqual(snapshots.map(() => 1));

      await cache.invalidate({ kind: "owner", ownerId: OWNER });
      expect(await snapshotHashes(prefix)).toEqual([]);
      expect(await admin.exists(`${prefix}owner:${OWNER}`, `${prefix}l2:pruned:o:${OWNER}`)).toBe(0);
    });

    it("an index deleted without its kept size (a replica of the earlier release's owner invalidation) is still bounded when made again", async () => {
      const prefix = "g4:";
      const index = `${prefix}owner:${OWNER}`;
      const cache = new RedisSharedCache(admin, { ttlSeconds: 30, negativeTtlSeconds: 1, keyPrefix: prefix });
      // 200 live keys: the index was pruned at 65 and 131 members, and keeps 131 as its size.
      for (let i = 0; i < 200; i += 1) expect(await cache.set(`old-${i}`, snapshot(OWNER, `old-${i}`))).toBe(true);
      expect(await admin.get(`${prefix}l2:pruned:o:${OWNER}`)).toBe("131");
      // 1dffb08's account change: SMEMBERS, then DEL of the snapshots and of the index, not the size kept.
      const hashes = await admin.smembers(index);
      await admin.del(...hashes.map((hash) => `${prefix}snap:${hash}`), index);

      expect(await cache.set("live", snapshot(OWNER, "live"))).toBe(true);
      for (let i = 0; i < 200; i += 1) {
        await fillAndExpire(prefix, `gone-${i}`);
        await expectIndexBounded(prefix, ["live"], 2);
      }
      await cache.invalidate({ kind: "owner", ownerId: OWNER });
      expect(await snapshotHashes(prefix)).toEqual([]);
    });
  });
});
