import type { Redis } from "ioredis";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { RedisInvalidationBus, RedisSharedCache, connectRedis } from "../../src/cache/redis.js";
import type { Invalidation } from "../../src/cache/cache.js";
import type { KeySnapshot } from "../../src/store/store.js";
import { requireServer } from "../harness/ports.js";
import { redisAvailable, startRedis } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";

function snapshot(ownerId: string, id: string): KeySnapshot {
  return {
    key: {
      id,
      hash: `h-${id}`,
      ownerId,
      projectId: null,
      name: "n",
      mode: "live",
      start: "kg_live_abcd",
      last4: "wxyz",
      scopes: ["read"],
      metadata: { a: "b" },
      createdAtMs: 1,
      lastUsedAtMs: null,
      expiresAtMs: 5,
      revokedAtMs: null,
      revokeReason: null,
      graceEndsAtMs: null,
      rotatedToId: null,
      rateLimit: { limit: 10, windowSeconds: 60 },
    },
    account: { ownerId, plan: "pro", subscriptionStatus: "active", role: "standard", createdAtMs: 1, updatedAtMs: 2 },
  };
}

async function until(condition: () => boolean, timeoutMs: number): Promise<number> {
  const started = Date.now();
  while (!condition()) {
    if (Date.now() - started > timeoutMs) throw new Error(`condition not met within ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 10));
  }
  return Date.now() - started;
}

describe.runIf(requireServer("redis-server", redisAvailable(), "apt-get install redis-server or set KEYGATE_TEST_REDIS_URL"))("Redis L2 and invalidation bus", () => {
  let server: RedisServer;
  const connections: Redis[] = [];
  const connect = async (): Promise<Redis> => {
    const redis = await connectRedis(server.url);
    connections.push(redis);
    return redis;
  };

  beforeAll(async () => {
    const started = await startRedis();
    if (started === null) throw new Error("redis-server is not on PATH");
    server = started;
  });
  afterAll(async () => {
    for (const redis of connections) redis.disconnect();
    await server.stop();
  });

  it("round-trips snapshots and misses with TTLs, in one command per read", async () => {
    const redis = await connect();
    const cache = new RedisSharedCache(redis, { ttlSeconds: 30, negativeTtlSeconds: 5 });
    const snap = snapshot("o1", "k1");
    await cache.set("h1", snap);
    const statsBefore = await redis.info("commandstats");
    expect(await cache.get("h1")).toEqual(snap);
    const statsAfter = await redis.info("commandstats");
    const mgetCalls = (info: string): number => Number(/cmdstat_mget:calls=(\d+)/.exec(info)?.[1] ?? 0);
    expect(mgetCalls(statsAfter) - mgetCalls(statsBefore)).toBe(1);
    const ttl = await redis.ttl("kg:snap:h1");
    expect(ttl).toBeGreaterThan(0);
    expect(ttl).toBeLessThanOrEqual(30);
    await cache.setMissing("h2");
    expect(await cache.get("h2")).toBeNull();
    expect(await redis.ttl("kg:miss:h2")).toBeLessThanOrEqual(5);
    expect(await cache.get("h3")).toBeUndefined();
  });

  it("invalidates by key and by owner, and drops corrupt entries", async () => {
    const redis = await connect();
    const cache = new RedisSharedCache(redis, { ttlSeconds: 30, negativeTtlSeconds: 5, keyPrefix: "t2:" });
    await cache.set("a1", snapshot("alice", "a1"));
    await cache.set("a2", snapshot("alice", "a2"));
    await cache.set("b1", snapshot("bob", "b1"));
    await cache.invalidate({ kind: "key", hash: "a1" });
    expect(await cache.get("a1")).toBeUndefined();
    expect(await cache.get("a2")).toBeDefined();
    await cache.invalidate({ kind: "owner", ownerId: "alice" });
    expect(await cache.get("a2")).toBeUndefined();
    expect((await cache.get("b1"))?.key.id).toBe("b1");
    await redis.set("t2:snap:bad", '{"key":{"id":1}}');
    expect(await cache.get("bad")).toBeUndefined();
    expect(await redis.exists("t2:snap:bad")).toBe(0);
  });

  it("delivers invalidations to another replica, ignores malformed messages, and clears L1 after a reconnect", async () => {
    const [pubA, subA, pubB, subB] = [await connect(), await connect(), await connect(), await connect()];
    const busA = new RedisInvalidationBus(pubA, subA);
    const busB = new RedisInvalidationBus(pubB, subB);
    const seenB: Invalidation[] = [];
    busB.subscribe((event) => seenB.push(event));
    await busA.start();
    await busB.start();
    await busA.publish({ kind: "key", hash: "zz" });
    const elapsedMs = await until(() => seenB.length === 1, 1000);
    expect(seenB).toEqual([{ kind: "key", hash: "zz" }]);
    expect(elapsedMs).toBeLessThan(1000);

    await pubA.publish("keygate:invalidate", "not json");
    await pubA.publish("keygate:invalidate", '{"kind":"key"}');
    await busA.publish({ kind: "owner", ownerId: "o" });
    await until(() => seenB.length === 2, 1000);
    expect(seenB[1]).toEqual({ kind: "owner", ownerId: "o" });

    await server.stop();
    await until(() => !busB.connected, 5000);
    expect(seenB.at(-1)).toEqual({ kind: "all" });
    const beforeRestart = seenB.length;
    await server.start();
    await until(() => busB.connected && seenB.length > beforeRestart, 10_000);
    expect(seenB.at(-1)).toEqual({ kind: "all" });
    await until(() => pubA.status === "ready", 10_000);
    await busA.publish({ kind: "key", hash: "after" });
    await until(() => seenB.some((e) => e.kind === "key" && e.hash === "after"), 2000);
    await busA.close();
    await busB.close();
  });
});
