import { Redis } from "ioredis";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { pino } from "pino";
import { MeterUnavailableError } from "../../src/limits/limits.js";
import { MemoryMeter } from "../../src/limits/memory.js";
import { RedisMeter } from "../../src/limits/redis.js";
import { UsageRecorder } from "../../src/limits/usage.js";
import { requireServer } from "../harness/ports.js";
import { redisAvailable, startRedis } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";

// limits.onRedisError: fail-open lets Checks through uncharged, but never a charge with an
// idempotency key (ChargeUsage, VerifyKey with a cost): its answer is kept under the key, so a
// charge let through uncharged would be replayed by every retry. Through KeyAdmin, with a reset
// that lost Redis's answer: charge-usage-reset-lost-answer.test.ts (both modes).

const ready = requireServer("redis-server", redisAvailable(), "apt-get install redis-server");

describe.runIf(ready)("error: fail-open while Redis is known not to answer (its heartbeats stopped)", () => {
  let redis: RedisServer;
  let client: Redis;
  beforeAll(async () => {
    const started = await startRedis();
    if (started === null) throw new Error("redis-server is not on PATH");
    redis = started;
    client = new Redis(redis.url);
  });
  afterAll(async () => {
    client?.disconnect();
    await redis?.stop();
  });

  it("refuses a charge with an idempotency key as unavailable, sending nothing, and lets a Check through uncharged", async () => {
    const logger = pino({ level: "silent" });
    const store = {
      getCredits: async () => ({ period: "", monthlyUsed: 0, topupBalance: 0, topupTotal: 0 }),
      listUsage: async () => [],
      applyUsage: async () => undefined,
    };
    const usage = new UsageRecorder(store, logger, 5000);
    // The connection itself still answers (the idempotency ledger's calls go through), but the
    // invalidation bus has reported Redis lost.
    const meter = new RedisMeter(client, store, usage, new MemoryMeter(store, usage), "fail-open", logger, undefined, "kg:", undefined, () => true);
    const input = {
      ownerId: "lost-owner",
      bucketKind: "u" as const,
      bucketId: "lost-owner",
      rate: { limit: 1000, windowSeconds: 60 },
      dailyQuota: 100,
      countsDaily: true,
      monthlyCredits: 10,
      cost: 3,
      nowMs: Date.parse("2026-12-03T12:00:00Z"),
      meter: "live" as const,
      quota: null,
      budgetExpired: false,
    };
    let confirmed = 0;
    const charge = meter.charge({ ...input, idempotencyKey: "job-1", confirmClaim: async () => void confirmed++ });
    await expect(charge).rejects.toBeInstanceOf(MeterUnavailableError);
    const check = await meter.charge({ ...input, bucketKind: "a" });
    expect({ confirmed, allowed: check.allowed, spent: check.spent, keys: await client.dbsize() }).toEqual({ confirmed: 0, allowed: true, spent: null, keys: 0 });
    await meter.close();
  });
});
