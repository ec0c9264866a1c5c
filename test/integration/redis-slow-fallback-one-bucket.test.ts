import { describe, expect, it } from "vitest";
import { TEST_POLICY } from "../harness/keygate.js";
import { until } from "../harness/poll.js";
import { requireServer } from "../harness/ports.js";
import { checkStatusOrCode, redisCallCount, suiteBehindSlowRedis } from "../harness/redis-charge.js";
import { redisAvailable } from "../harness/redis-server.js";

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

describe.runIf(ready)("a slow (800 ms) Redis under limits.onRedisError fallback and a 150 ms Check budget", () => {
  const slow = suiteBehindSlowRedis(POLICY, 150);

  it("once Redis counts as lost, the replica lets through one in-process bucket (3), however many late charge answers land", async () => {
    const kg = slow.kg();
    const ownerId = "slow-redis-fallback";
    await kg.admin.upsertAccount({ ownerId, plan: "tiny" });
    const key = await kg.admin.createKey({ ownerId, name: "k" });
    const status = (): Promise<number | string> => checkStatusOrCode(kg, key.secret);
    // One of the three in Redis's bucket, with Redis fast.
    expect(await status()).toBe(200);
    slow.setDelay(800);
    const logged = kg.logLines.length;
    const lost = (): boolean => kg.logLines.slice(logged).some((l) => l.includes("Redis is not answering; charges go to limits.onRedisError"));
    // Charged Checks, one at a time, until one finds Redis counted lost: each before it waits out its budget.
    const before: Array<number | string> = [];
    while (!lost()) {
      before.push(await status());
      if (before.length > 60) throw new Error("Redis not counted lost within 60 Checks");
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
        return (await redisCallCount(kg, "charge")) >= sentToRedis;
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
