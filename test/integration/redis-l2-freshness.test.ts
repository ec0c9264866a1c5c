import { randomUUID } from "node:crypto";
import { Redis } from "ioredis";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import type { Invalidation } from "../../src/cache/cache.js";
import { SnapshotLookup } from "../../src/cache/lookup.js";
import { MemoryCache } from "../../src/cache/memory.js";
import { RedisInvalidationBus, RedisSharedCache, redisOptions } from "../../src/cache/redis.js";
import type { KeySnapshot } from "../../src/store/store.js";
import { mapStore } from "../harness/lookup-stores.js";
import { until } from "../harness/poll.js";
import { requireServer } from "../harness/ports.js";
import { redisAvailable, startRedis } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";
import { newKeyRecord } from "../../src/store/store.js";

/** Polls every 10 ms: fine enough for the elapsed times reported, light on the shared Redis. */
const POLL = { intervalMs: 10 } as const;

// What keeps L2 from serving a snapshot older than a change: entries carry the invalidation
// generation they were read under, a store read is written back only if nothing invalidated the
// key or its owner since, and a replica that could not hear invalidations distrusts every older
// entry. And how the bus notices a Redis that keeps its connections open but stops answering.

const ready = requireServer("redis-server", redisAvailable(), "apt-get install redis-server");
const ns = `l2f-${randomUUID().slice(0, 8)}:`;

function snapshot(ownerId: string, id: string, revokedAtMs: number | null = null): KeySnapshot {
  return {
    key: newKeyRecord({
      id,
      hash: `h-${id}`,
      ownerId,
      name: id,
      mode: "live",
      start: "kg_live_abcd",
      last4: "wxyz",
      scopes: ["read"],
      createdAtMs: 1_700_000_000_000,
      revokedAtMs,
    }),
    account: { ownerId, plan: "pro", subscriptionStatus: "active", role: "standard", createdAtMs: 1, updatedAtMs: 2 },
  };
}

describe.runIf(ready)("L2 freshness and the bus heartbeat (Redis)", () => {
  let server: RedisServer;
  const connections: Redis[] = [];

  async function open(options: Parameters<typeof redisOptions>[0] = {}): Promise<Redis> {
    const redis = new Redis(server.url, redisOptions({ lazyConnect: false, retryStrategy: () => 100, ...options }));
    redis.on("error", () => undefined);
    connections.push(redis);
    await until(() => redis.status === "ready", 5000, "connection ready", POLL);
    return redis;
  }

  beforeAll(async () => {
    const started = await startRedis();
    if (started === null) throw new Error("redis-server is not on PATH");
    server = started;
  });

  // A test that timed out while Redis was frozen must not leave it frozen for the next one.
  afterEach(() => {
    server?.thaw();
  });

  afterAll(async () => {
    for (const connection of connections) connection.disconnect();
    await server?.stop();
  });

  describe("security", () => {
    it("does not write back a store read made before an invalidation of the key", async () => {
      const cache = new RedisSharedCache(await open(), { ttlSeconds: 30, negativeTtlSeconds: 5, keyPrefix: `${ns}a:` });
      const read = await cache.read("h1");
      expect(read.value).toBeUndefined();
      // The key is revoked (store, then invalidation) while this replica's store read is in flight.
      await cache.invalidate({ kind: "key", hash: "h1" });
      expect(await cache.set("h1", snapshot("o1", "k1"), read.fill)).toBe(false);
      expect(await cache.get("h1")).toBeUndefined();

      const again = await cache.read("h1");
      expect(await cache.set("h1", snapshot("o1", "k1", 5), again.fill)).toBe(true);
      expect((await cache.get("h1"))?.key.revokedAtMs).toBe(5);
    });

    it("does not write back a store read made before an invalidation of the key's owner", async () => {
      const cache = new RedisSharedCache(await open(), { ttlSeconds: 30, negativeTtlSeconds: 5, keyPrefix: `${ns}b:` });
      const read = await cache.read("h2");
      await cache.invalidate({ kind: "owner", ownerId: "o2" });
      expect(await cache.set("h2", snapshot("o2", "k2"), read.fill)).toBe(false);
      // Another owner's read of the same age is not affected.
      expect(await cache.set("h3", snapshot("o3", "k3"), read.fill)).toBe(true);
    });

    it("does not write back a store read that arrives after the fill window (a write held up in a frozen socket)", async () => {
      const cache = new RedisSharedCache(await open(), { ttlSeconds: 30, negativeTtlSeconds: 5, keyPrefix: `${ns}c:` });
      const read = await cache.read("h4");
      expect(await cache.set("h4", snapshot("o4", "k4"), { generation: read.fill.generation, atMs: read.fill.atMs - 60_000 })).toBe(false);
      expect(await cache.get("h4")).toBeUndefined();
    });

    it("after distrustEarlierEntries, entries written before read as not cached, even one put back afterwards", async () => {
      const admin = await open();
      const cache = new RedisSharedCache(admin, { ttlSeconds: 30, negativeTtlSeconds: 5, keyPrefix: `${ns}d:` });
      const read = await cache.read("h5");
      expect(await cache.set("h5", snapshot("o5", "k5"), read.fill)).toBe(true);
      const entry = await admin.get(`${ns}d:snap:h5`);
      if (entry === null) throw new Error("no entry written");

      await cache.distrustEarlierEntries();
      expect(await cache.get("h5")).toBeUndefined();
      // A fill read before the distrust is refused too.
      expect(await cache.set("h5", snapshot("o5", "k5"), read.fill)).toBe(false);
      // The old entry written back, as a lost invalidation would leave it: still not trusted.
      await admin.set(`${ns}d:snap:h5`, entry, "EX", 30);
      expect(await cache.get("h5")).toBeUndefined();

      const fresh = await cache.read("h5");
      expect(await cache.set("h5", snapshot("o5", "k5", 9), fresh.fill)).toBe(true);
      expect((await cache.get("h5"))?.key.revokedAtMs).toBe(9);
    });

    it("reads an entry written by an earlier version (plain JSON, no generation) as not cached, and deletes it", async () => {
      const admin = await open();
      const cache = new RedisSharedCache(admin, { ttlSeconds: 30, negativeTtlSeconds: 5, keyPrefix: `${ns}e:` });
      await admin.set(`${ns}e:snap:h6`, JSON.stringify(snapshot("o6", "k6")), "EX", 30);
      expect(await cache.get("h6")).toBeUndefined();
      expect(await admin.exists(`${ns}e:snap:h6`)).toBe(0);
    });
  });

  describe("error", () => {
    it("a Check's L2 read on a frozen Redis gives up and reads the store, even on a connection without a command timeout", async () => {
      const main = await open({ commandTimeout: undefined });
      const [publisher, subscriber] = [await open(), await open()];
      // A bus that will not notice the freeze during this test, so the lookup still tries L2.
      const bus = new RedisInvalidationBus(publisher, subscriber, { channel: `${ns}f:inv`, silenceLimitMs: 600_000 });
      await bus.start();
      const snap = snapshot("o7", "k7");
      const { store, calls } = mapStore(new Map([["h7", snap]]));
      const lookup = new SnapshotLookup({
        local: new MemoryCache({ maxEntries: 10, ttlSeconds: 30, negativeMaxEntries: 10, negativeTtlSeconds: 5 }),
        shared: new RedisSharedCache(main, { ttlSeconds: 30, negativeTtlSeconds: 5, keyPrefix: `${ns}f:` }),
        store,
        bus,
      });
      server.freeze();
      try {
        expect(await lookup.load("h7")).toStrictEqual(new MemoryCache({ maxEntries: 10, ttlSeconds: 60, negativeMaxEntries: 10, negativeTtlSeconds: 5 }).set("h7", snap));
        expect(calls()).toBe(1);
      } finally {
        server.thaw();
        await bus.close();
      }
    });

    it("a frozen Redis: the bus counts itself disconnected (one `all`), and connected again after SIGCONT (another `all`)", async () => {
      const [publisher, subscriber] = await Promise.all([open(), open()]);
      const bus = new RedisInvalidationBus(publisher, subscriber, { channel: `${ns}g:inv`, heartbeatIntervalMs: 100, silenceLimitMs: 600 });
      const seen: Array<{ event: Invalidation; connected: boolean }> = [];
      bus.subscribe((event) => seen.push({ event, connected: bus.connected }));
      await bus.start();
      expect(bus.connected).toBe(true);

      server.freeze();
      let silentMs: number;
      try {
        silentMs = await until(() => !bus.connected, 10_000, "the bus noticing the frozen Redis", POLL);
        expect(seen).toEqual([{ event: { kind: "all" }, connected: false }]);
      } finally {
        server.thaw();
      }
      await until(() => bus.connected, 10_000, "the bus hearing Redis again", POLL);
      expect(seen).toEqual([
        { event: { kind: "all" }, connected: false },
        { event: { kind: "all" }, connected: true },
      ]);
      console.log(`bus heartbeat (100 ms, silence limit 600 ms): disconnected ${silentMs.toFixed(0)} ms after SIGSTOP`);

      // Still subscribed on the same connection: events flow again.
      await bus.publish({ kind: "key", hash: "after-thaw" });
      await until(() => seen.length === 3, 5000, "the event after the thaw", POLL);
      expect(seen[2]).toEqual({ event: { kind: "key", hash: "after-thaw" }, connected: true });
      await bus.close();
    });
  });
});
