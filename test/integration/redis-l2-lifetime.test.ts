import { randomUUID } from "node:crypto";
import { Redis } from "ioredis";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { SnapshotLookup } from "../../src/cache/lookup.js";
import { MemoryCache } from "../../src/cache/memory.js";
import { RedisInvalidationBus, RedisSharedCache } from "../../src/cache/redis.js";
import type { KeySnapshot } from "../../src/store/store.js";
import { lookupOnlyStore, lookupSnapshot, redisConnections } from "../harness/lookup-stores.js";
import { until } from "../harness/poll.js";
import { requireServer } from "../harness/ports.js";
import { redisAvailable, startRedis } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";

// L1 keeps an entry read from L2 for what is left of its lifetime in L2, not a fresh TTL: a change
// whose invalidation never reached a replica is seen within one cache TTL of the store read that
// filled L2, not two.

const ready = requireServer("redis-server", redisAvailable(), "apt-get install redis-server");

const snapshot = (hash: string): KeySnapshot => lookupSnapshot("life-owner", "key_life", hash);

describe.runIf(ready)("an L2 hit in L1", () => {
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

  it("is kept no longer than what is left of its lifetime in L2", async () => {
    const prefix = `life-${randomUUID().slice(0, 8)}:`;
    const main = await open();
    const bus = new RedisInvalidationBus(main, await open(), { channel: `${prefix}inv` });
    await bus.start();
    const shared = new RedisSharedCache(main, { ttlSeconds: 30, negativeTtlSeconds: 5, keyPrefix: prefix });
    const local = new MemoryCache({ maxEntries: 100, ttlSeconds: 30, negativeMaxEntries: 100, negativeTtlSeconds: 5 });
    const store = lookupOnlyStore(async () => snapshot("h"));
    const lookup = new SnapshotLookup({ local, shared, store, bus });
    try {
      expect(await shared.set("h", snapshot("h"))).toBe(true);
      // Another replica filled L2 almost a cache TTL ago: 300 ms of its lifetime are left.
      expect(await main.pexpire(`${prefix}snap:h`, 300)).toBe(1);
      expect((await lookup.load("h"))?.key.id).toBe("key_life");
      expect(local.get("h")?.key.id).toBe("key_life");
      // Gone from L1 when it is gone from L2 (well before L1's own 30 s).
      await until(() => local.get("h") === undefined, 10_000, "the L1 copy to expire with the L2 entry", { intervalMs: 20 });
      expect(bus.connected).toBe(true);
    } finally {
      await bus.close();
    }
  });
});
