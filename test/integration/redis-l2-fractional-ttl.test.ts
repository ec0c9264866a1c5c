import { Writable } from "node:stream";
import { Redis } from "ioredis";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { SharedCache } from "../../src/cache/cache.js";
import { SnapshotLookup } from "../../src/cache/lookup.js";
import { LocalInvalidationBus, MemoryCache } from "../../src/cache/memory.js";
import { RedisSharedCache } from "../../src/cache/redis.js";
import { KeyFormat } from "../../src/keys/key-format.js";
import { createLogger } from "../../src/server/logger.js";
import { TEST_POLICY, checkInit, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { lookupSnapshot, mapStore, redisConnections } from "../harness/lookup-stores.js";
import { until } from "../harness/poll.js";
import { requireServer } from "../harness/ports.js";
import { redisAvailable, redisCommand, startRedis } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";

// The policy takes any positive number of seconds for cache.ttlSeconds and
// cache.negativeTtlSeconds, and L1 honours a fraction. The Redis L2 sent it as `SET … EX` and
// `EXPIRE`, which Redis refuses unless it is a whole number: with a fractional TTL no snapshot and
// no miss marker ever reached Redis (the shared L2 and negative cache silently did not exist), and
// every made-up key with a valid checksum, which anyone can send, logged one warn line with its
// stack. L2 now sets its TTLs in whole milliseconds, and a Check's L2 failure is logged once a
// minute for each error, with the count since.

// Counts every key in Redis and sets maxmemory: a server of its own, not a shared one.
const ready = requireServer("redis-server", redisAvailable(), "apt-get install redis-server") && (process.env["KEYGATE_TEST_REDIS_URL"] ?? "") === "";
const DISTINCT_KEYS = 300;
const TTL_MS = 20_500;
const NEGATIVE_TTL_MS = 30_500;

interface LogLine {
  level: number;
  msg: string;
  since?: number;
  err?: { message?: string };
}

function parsed(lines: readonly string[]): LogLine[] {
  return lines.map((line) => JSON.parse(line) as LogLine);
}

/** The warn-or-worse lines about L2 among `lines`. */
function l2Warnings(lines: readonly string[]): LogLine[] {
  return parsed(lines).filter((line) => line.level >= 40 && line.msg.includes("L2"));
}

describe.runIf(ready)("a fractional cache TTL with the Redis L2", () => {
  let redis: RedisServer;
  let kg: TestKeygate;
  let client: Redis;
  const connections = redisConnections(() => redis.url);

  beforeAll(async () => {
    const started = await startRedis();
    if (started === null) throw new Error("redis-server is not on PATH");
    redis = started;
    client = new Redis(redis.url);
    kg = await startKeygate({
      policy: { ...TEST_POLICY, cache: { maxEntries: 1000, ttlSeconds: TTL_MS / 1000, negativeMaxEntries: 1000, negativeTtlSeconds: NEGATIVE_TTL_MS / 1000 } },
      env: { KEYGATE_REDIS_URL: redis.url },
    });
  });
  afterAll(async () => {
    await kg?.stop();
    connections.closeAll();
    client?.disconnect();
    await redis?.stop();
  });

  it("remembers every distinct unknown key in L2, within its TTL, without a warn line", async () => {
    const format = new KeyFormat("kg");
    const before = kg.logLines.length;
    for (let i = 0; i < DISTINCT_KEYS; i++) {
      const response = await kg.check(checkInit({ "x-api-key": format.generate("live") }));
      expect(response.status?.code).toBe(16);
    }
    // Filling L2 is off the answer's path: wait for the markers, not for a time.
    await until(async () => (await client.keys("kg:miss:*")).length === DISTINCT_KEYS, 10_000, `${DISTINCT_KEYS} miss markers in L2`, { intervalMs: 20 });
    const markers = await client.keys("kg:miss:*");
    const ttls = await Promise.all(markers.map((key) => client.pttl(key)));
    expect(ttls.filter((ttl) => ttl > 0 && ttl <= NEGATIVE_TTL_MS)).toHaveLength(DISTINCT_KEYS);
    expect(l2Warnings(kg.logLines.slice(before))).toEqual([]);
  });

  it("fills L2 with a valid key read from the store, and its owner's index, within the TTL", async () => {
    await kg.admin.upsertAccount({ ownerId: "frac-ttl", plan: "business" });
    const { secret } = await kg.admin.createKey({ ownerId: "frac-ttl", name: "frac" });
    const before = kg.logLines.length;
    const response = await kg.check(checkInit({ "x-api-key": secret }));
    expect(response.httpResponse.case).toBe("okResponse");
    await until(async () => (await client.keys("kg:snap:*")).length === 1, 10_000, "the snapshot in L2", { intervalMs: 20 });
    const [snapshotKey] = await client.keys("kg:snap:*");
    const snapshotTtl = await client.pttl(snapshotKey ?? "");
    const ownerTtl = await client.pttl("kg:owner:frac-ttl");
    expect({ snapshot: snapshotTtl > 0 && snapshotTtl <= TTL_MS, owner: ownerTtl > 0 && ownerTtl <= TTL_MS }).toEqual({ snapshot: true, owner: true });
    expect(l2Warnings(kg.logLines.slice(before))).toEqual([]);
  });

  it("keeps the fraction: entries live the configured milliseconds, and at least one", async () => {
    const main = await connections.open();
    const shared = new RedisSharedCache(main, { ttlSeconds: 1.5, negativeTtlSeconds: 1.25, keyPrefix: "frac:" });
    const started = performance.now();
    expect(await shared.set("h", lookupSnapshot("frac-owner", "key_frac", "h"))).toBe(true);
    await shared.setMissing("m");
    const [snapshotTtl, ownerTtl, missTtl] = await Promise.all([client.pttl("frac:snap:h"), client.pttl("frac:owner:frac-owner"), client.pttl("frac:miss:m")]);
    // What has passed since the writes bounds how far below the TTL each can be: a TTL cut to whole
    // seconds (1 s) would be below it.
    const elapsedMs = Math.ceil(performance.now() - started);
    for (const [ttl, configuredMs] of [
      [snapshotTtl, 1500],
      [ownerTtl, 1500],
      [missTtl, 1250],
    ] as const) {
      expect(ttl).toBeLessThanOrEqual(configuredMs);
      expect(ttl).toBeGreaterThanOrEqual(configuredMs - elapsedMs);
    }
    // A TTL under half a millisecond rounds to none, which Redis refuses: it is kept for 1 ms.
    await new RedisSharedCache(main, { ttlSeconds: 0.0001, negativeTtlSeconds: 0.0001, keyPrefix: "frac-tiny:" }).setMissing("m");
  });
});

describe.runIf(ready)("L2 write failures in the log", () => {
  let redis: RedisServer;
  const connections = redisConnections(() => redis.url);

  beforeAll(async () => {
    const started = await startRedis();
    if (started === null) throw new Error("redis-server is not on PATH");
    redis = started;
  });
  afterAll(async () => {
    connections.closeAll();
    await redis?.stop();
  });

  it("are one warn line a minute for each error, with the count since, while Checks keep failing the same way", async () => {
    const main = await connections.open();
    const real = new RedisSharedCache(main, { ttlSeconds: 30, negativeTtlSeconds: 5, keyPrefix: "full:" });
    let settled = 0;
    // The lookup's fills are off the answer's path: counting them settled is how the test knows
    // every failure has been logged (or counted), without a sleep.
    const shared: SharedCache = {
      get: (hash) => real.get(hash),
      read: (hash) => real.read(hash),
      set: (hash, snapshot, fill) =>
        real.set(hash, snapshot, fill).finally(() => {
          settled += 1;
        }),
      setMissing: (hash) =>
        real.setMissing(hash).finally(() => {
          settled += 1;
        }),
      invalidate: (event) => real.invalidate(event),
      distrustEarlierEntries: () => real.distrustEarlierEntries(),
    };
    const lines: string[] = [];
    const sink = new Writable({
      write(chunk: Buffer, _encoding, callback) {
        lines.push(chunk.toString("utf8"));
        callback();
      },
    });
    let nowMs = 0;
    const known = lookupSnapshot("full-owner", "key_full", "known");
    const { store, calls } = mapStore(new Map([["known", known]]));
    const lookup = new SnapshotLookup({
      local: new MemoryCache({ maxEntries: 1000, ttlSeconds: 30, negativeMaxEntries: 1000, negativeTtlSeconds: 5 }),
      shared,
      store,
      bus: new LocalInvalidationBus(),
      logger: createLogger("debug", sink),
      nowMs: () => nowMs,
    });
    expect(await real.set("known", known)).toBe(true);

    // Full under the noeviction policy README requires: Redis answers reads and refuses every
    // write that may grow memory (OOM), so every unknown key's miss marker fails the same way.
    expect(await redisCommand(redis.port, "CONFIG", "GET", "maxmemory-policy")).toEqual(["maxmemory-policy", "noeviction"]);
    await redisCommand(redis.port, "CONFIG", "SET", "maxmemory", "1");
    try {
      expect((await lookup.load("known"))?.key.id).toBe("key_full");
      expect(calls()).toBe(0);

      for (let i = 0; i < 25; i++) expect(await lookup.load(`unknown-${i}`)).toBeNull();
      // Still within the minute of the first line.
      nowMs = 59_999;
      for (let i = 25; i < 50; i++) expect(await lookup.load(`unknown-${i}`)).toBeNull();
      await until(() => settled === 50, 10_000, "50 failed fills settled", { intervalMs: 10 });
      expect(parsed(lines).map(({ level, msg, since }) => ({ level, msg, since }))).toEqual([{ level: 40, msg: "L2 cache write failed", since: 0 }]);
      expect(parsed(lines)[0]?.err?.message).toMatch(/^OOM /);

      nowMs = 60_000;
      expect(await lookup.load("unknown-50")).toBeNull();
      await until(() => settled === 51, 10_000, "the 51st failed fill settled", { intervalMs: 10 });
      expect(parsed(lines).map(({ level, msg, since }) => ({ level, msg, since }))).toEqual([
        { level: 40, msg: "L2 cache write failed", since: 0 },
        { level: 40, msg: "L2 cache write failed", since: 49 },
      ]);
      expect(calls()).toBe(51);
    } finally {
      await redisCommand(redis.port, "CONFIG", "SET", "maxmemory", "0");
    }
  });
});
