import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { TEST_POLICY, checkInit, checkOutcome, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { startOrderedDelayRelay } from "../harness/ordered-delay-relay.js";
import type { OrderedDelayRelay } from "../harness/ordered-delay-relay.js";
import { until } from "../harness/poll.js";
import { requireServer } from "../harness/ports.js";
import { redisAvailable, startRedis } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";

// README "If Redis fails": under limits.onRedisError `fallback` limits are per replica meanwhile,
// one in-process bucket each. A Redis that answers every command, but 800 ms late (under ioredis's
// 1 s command timeout): each charged Check waits out its 150 ms budget (UNAVAILABLE) while its
// charge script is still on the way back, and the heartbeats come back too late, so after 2 s the
// bus counts Redis lost and charges go to the fallback. The charges sent before that then answer,
// late, one after the other, and each was taken as "Redis is back" (RedisMeter.charge dropped the
// fallback's counts) although Redis was still counted lost: the next charge went to the fallback
// again and found a full bucket. A rate limit of 3 an hour let through about 3 per late answer.
// Only an answer to a charge sent after the fallback's last charge, with Redis not counted lost,
// drops its counts now.

const ready = requireServer("redis-server", redisAvailable(), "apt-get install redis-server");

const POLICY = {
  ...TEST_POLICY,
  plans: { ...TEST_POLICY.plans, tiny: { maxActiveKeys: 5, rateLimit: { limit: 3, windowSeconds: 3600 }, dailyQuota: null, monthlyCredits: null } },
  limits: { onRedisError: "fallback" },
};

/** Charge scripts this replica has run against Redis, answered or failed. */
async function redisCharges(kg: TestKeygate): Promise<number> {
  const metric = kg.app.metrics.registry.getSingleMetric("keygate_backend_duration_seconds");
  if (metric === undefined) throw new Error("keygate_backend_duration_seconds is not registered");
  const { values } = await metric.get();
  return values.find((v) => "metricName" in v && v.metricName === "keygate_backend_duration_seconds_count" && v.labels["backend"] === "redis" && v.labels["op"] === "charge")?.value ?? 0;
}

describe.runIf(ready)("a slow (800 ms) Redis under limits.onRedisError fallback and a 150 ms Check budget", () => {
  let redis: RedisServer;
  let relay: OrderedDelayRelay;
  let kg: TestKeygate;
  let delayMs = 0;

  beforeAll(async () => {
    const started = await startRedis();
    if (started === null) throw new Error("redis-server is not on PATH");
    redis = started;
    relay = await startOrderedDelayRelay(redis.port, () => delayMs);
    kg = await startKeygate({ policy: POLICY, env: { KEYGATE_REDIS_URL: `redis://127.0.0.1:${relay.port}`, KEYGATE_CHECK_BUDGET_MS: "150" } });
  });

  afterAll(async () => {
    delayMs = 0;
    await kg?.stop();
    await relay?.close();
    await redis?.stop();
  });

  it("once Redis counts as lost, the replica lets through one in-process bucket (3), however many late charge answers land", async () => {
    const ownerId = "slow-redis-fallback";
    await kg.admin.upsertAccount({ ownerId, plan: "tiny" });
    const key = await kg.admin.createKey({ ownerId, name: "k" });
    const status = async (): Promise<number | string> => {
      try {
        return checkOutcome(await kg.check(checkInit({ "x-api-key": key.secret }))).status;
      } catch (error) {
        return `grpc ${(error as { code?: number }).code}`;
      }
    };
    // One of the three in Redis's bucket, with Redis fast.
    expect(await status()).toBe(200);
    delayMs = 800;
    const logged = kg.logLines.length;
    const lost = (): boolean => kg.logLines.slice(logged).some((l) => l.includes("Redis is not answering; charges go to limits.onRedisError"));
    // Charged Checks, one at a time, until one finds Redis counted lost: each before it waits out its budget.
    const before: Array<number | string> = [];
    while (!lost()) {
      before.push(await status());
      if (before.length > 60) throw new Error("Redis was never counted lost");
    }
    // The one that found Redis lost was the fallback's first (200); each before it was UNAVAILABLE.
    expect(before.slice(0, -1).every((s) => s === "grpc 14")).toBe(true);
    expect(before.at(-1)).toBe(200);
    const sentToRedis = before.length;
    // Checks every 20 ms until every charge sent to Redis has answered, then one more: each late
    // answer is followed by a Check.
    const after: Array<number | string> = [];
    await until(
      async () => {
        after.push(await status());
        return (await redisCharges(kg)) >= sentToRedis;
      },
      10_000,
      "every charge sent to Redis answered",
      { intervalMs: 20 },
    );
    after.push(await status());
    // Two more of the in-process bucket of 3 (it does not know Redis's count: limits are per
    // replica meanwhile), every other one refused by rate.
    expect({ allowed: after.filter((s) => s === 200).length, limited: after.filter((s) => s === 429).length }).toEqual({ allowed: 2, limited: after.length - 2 });
  }, 40_000);
});
