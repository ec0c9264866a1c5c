import { randomUUID } from "node:crypto";
import { Redis } from "ioredis";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { SnapshotLookup } from "../../src/cache/lookup.js";
import { MemoryCache } from "../../src/cache/memory.js";
import { RedisInvalidationBus, RedisSharedCache } from "../../src/cache/redis.js";
import type { KeySnapshot } from "../../src/store/store.js";
import { heldStore, lookupSnapshot, mapStore, redisConnections } from "../harness/lookup-stores.js";
import { startKeygate } from "../harness/keygate.js";
import { until } from "../harness/poll.js";
import { requireServer } from "../harness/ports.js";
import { redisAvailable, startRedis } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";

// The L2 fill guard ("a store read that began before an invalidation of its key or owner is
// never written back over it") rests on Redis keys: the generation counter and the per-key and
// per-owner markers. A Redis that loses its data (FLUSHALL, a restart without persistence) starts
// the counter again; it starts from Redis's clock, so a fill token read before the loss is older
// than any marker set after it and is refused. Eviction can drop a marker too, which no counter
// can make up for: keygate warns at start about a Redis set to evict.

const POLL = { intervalMs: 10 } as const;
// FLUSHALL below would wipe a shared server: run only against a redis-server of our own.
const ready = requireServer("redis-server", redisAvailable(), "apt-get install redis-server") && (process.env["KEYGATE_TEST_REDIS_URL"] ?? "") === "";

const snapshot = lookupSnapshot;

describe.runIf(ready)("the L2 fill guard when Redis loses its data", () => {
  let server: RedisServer;
  const connections = redisConnections(() => server.url);
  const open = (): Promise<Redis> => connections.open();

  beforeAll(async () => {
    const started = await startRedis();
    if (started === null) throw new Error("redis-server is not on PATH");
    server = started;
  });

  afterAll(async () => {
    connections.closeAll();
    await server?.stop();
  });

  it("FLUSHALL between a fill's cache read and the key's invalidation: the pre-revocation store read is refused", async () => {
    const admin = await open();
    const ns = `g1-${randomUUID().slice(0, 8)}:`;
    const cache = new RedisSharedCache(admin, { ttlSeconds: 30, negativeTtlSeconds: 5, keyPrefix: ns });
    // Some invalidations have happened in this Redis's life (any key, any owner).
    for (let i = 0; i < 5; i++) await cache.invalidate({ kind: "key", hash: `other-${i}` });

    // Replica B misses L2 for h and starts its store read (which sees the key still active).
    const read = await cache.read("h");
    expect(read.value).toBeUndefined();
    // An operator clears the cache Redis ("Redis holds only caches and live counters").
    await admin.flushall();
    // The key is revoked: store first, then the L2 invalidation (gen and marker start again at 1).
    await cache.invalidate({ kind: "key", hash: "h" });
    // B's store read, begun before the revocation, comes back and is written with its old token.
    const written = await cache.set("h", snapshot("o", "k", "h"), read.fill);
    expect(written, "a fill read before the key's invalidation must be refused").toBe(false);
    expect((await cache.get("h"))?.key.revokedAtMs ?? "not cached").toBe("not cached");
  });

  it("end to end (lookups of three replicas): after FLUSHALL, a key revoked meanwhile never comes back active from L2 on another replica", async () => {
    const ns = `g2-${randomUUID().slice(0, 8)}:`;
    const channel = `${ns}inv`;
    const cacheOptions = { ttlSeconds: 30, negativeTtlSeconds: 5, keyPrefix: ns };
    const l1 = (): MemoryCache => new MemoryCache({ maxEntries: 100, ttlSeconds: 30, negativeMaxEntries: 100, negativeTtlSeconds: 5 });
    const admin = await open();
    const [mainA, mainB, mainC] = [await open(), await open(), await open()];
    const busA = new RedisInvalidationBus(mainA, await open(), { channel });
    const busB = new RedisInvalidationBus(mainB, await open(), { channel });
    const busC = new RedisInvalidationBus(mainC, await open(), { channel });
    await Promise.all([busA.start(), busB.start(), busC.start()]);
    const sharedA = new RedisSharedCache(mainA, cacheOptions);
    const revoked = snapshot("o2", "k2", "h2", 1_700_000_100_000);
    const stored = new Map<string, KeySnapshot>();
    const held = heldStore();
    const lookupB = new SnapshotLookup({ local: l1(), shared: new RedisSharedCache(mainB, cacheOptions), store: held.store, bus: busB });
    const lookupC = new SnapshotLookup({ local: l1(), shared: new RedisSharedCache(mainC, cacheOptions), store: mapStore(stored).store, bus: busC });
    try {
      for (let i = 0; i < 5; i++) await sharedA.invalidate({ kind: "key", hash: `other-${i}` });

      // B: an L1 and L2 miss for h2; its store read is in flight (it read the key before the revoke).
      const loadB = lookupB.load("h2");
      await until(() => held.calls() === 1, 5000, "B's store read in flight", POLL);
      await admin.flushall();
      // A revokes the key: the store (C's view), then L2.
      stored.set("h2", revoked);
      await sharedA.invalidate({ kind: "key", hash: "h2" });
      // B's read answers with what it read before the revocation; B fills L2 with it.
      held.answer(snapshot("o2", "k2", "h2"));
      expect((await loadB)?.key.revokedAtMs).toBeNull();
      await mainB.ping(); // the fill went out on this connection before the PING: it has landed
      // A's publish reaches every replica (B drops its L1 entry).
      await busA.publish({ kind: "key", hash: "h2" });

      // C, a replica with nothing in L1 for h2, reads it: it must see the revocation.
      const seenByC = await lookupC.load("h2");
      expect(seenByC?.key.revokedAtMs ?? null, "replica C must not get the pre-revocation snapshot from L2").toBe(revoked.key.revokedAtMs);
    } finally {
      await Promise.all([busA.close(), busB.close(), busC.close()]);
    }
  });

  it("a Redis set to evict is named in a warning at start; one set to noeviction is not", async () => {
    const admin = await open();
    const warning = "Redis may evict keygate's keys";
    await admin.config("SET", "maxmemory-policy", "allkeys-lru");
    const evicting = await startKeygate({ env: { KEYGATE_REDIS_URL: server.url } });
    await evicting.stop();
    await admin.config("SET", "maxmemory-policy", "noeviction");
    const keeping = await startKeygate({ env: { KEYGATE_REDIS_URL: server.url } });
    await keeping.stop();
    const warned = (lines: string[]): string[] => lines.filter((line) => line.includes(warning)).map((line) => (JSON.parse(line) as { maxmemoryPolicy: string }).maxmemoryPolicy);
    expect({ evicting: warned(evicting.logLines), keeping: warned(keeping.logLines) }).toEqual({ evicting: ["allkeys-lru"], keeping: [] });
  });
});
