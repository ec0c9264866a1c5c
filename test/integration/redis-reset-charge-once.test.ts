import type { Redis } from "ioredis";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { DEFAULT_POLICY_INPUT } from "../../src/config.js";
import { MemoryMeter } from "../../src/limits/memory.js";
import { RedisMeter } from "../../src/limits/redis.js";
import { checkInit, checkOutcome } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { requireServer } from "../harness/ports.js";
import { chargeInput, startKeygateBehindRelay, stubMeterDeps, suiteRedisClient } from "../harness/redis-charge.js";
import type { KeygateBehindRelay } from "../harness/redis-charge.js";
import { redisAvailable } from "../harness/redis-server.js";

// A charge script whose answer is lost when its connection resets (a network blip, a load
// balancer's idle cut, a failover) may have run in Redis: keygate never sends it again (ioredis
// would, on the next connection: autoResendUnfulfilledCommands), it counts the reset as a Redis
// failure (limits.onRedisError; fallback here). A Check is then charged once in Redis's counts,
// not twice; and a first ChargeUsage is recorded, never answered as a replay of itself.

const ready = requireServer("redis-server", redisAvailable(), "apt-get install redis-server");

const POLICY = {
  ...DEFAULT_POLICY_INPUT,
  defaultPlan: "metered",
  plans: { metered: { maxActiveKeys: 5, rateLimit: { limit: 1000, windowSeconds: 60 }, dailyQuota: 100, monthlyCredits: 10 } },
  scopes: { catalog: ["read"], default: ["read"] },
  routes: [{ method: "*", pathPrefix: "/v1", cost: 1 }],
};

describe.runIf(ready)("error: a charge script whose answer was lost when its connection reset", () => {
  let stack: KeygateBehindRelay;
  let kg: TestKeygate;
  let client: Redis;

  beforeAll(async () => {
    stack = await startKeygateBehindRelay(POLICY);
    ({ kg, client } = stack);
  });
  afterAll(async () => {
    await stack?.stop();
  });

  it("a Check charged once by Redis is charged once (credits and quota)", async () => {
    const ownerId = "check-owner";
    await kg.admin.upsertAccount({ ownerId, plan: "metered" });
    const key = await kg.admin.createKey({ ownerId, name: "k" });
    const headers = { "x-api-key": key.secret };
    // Loads the balance into Redis: 10 - 1.
    expect(checkOutcome(await kg.check(checkInit(headers, "/v1/a"))).code).toBe(null);
    expect(await client.hget(`kg:c:${ownerId}`, "monthly_used")).toBe("1");
    const second = await stack.withAnswerLost(
      () => kg.check(checkInit(headers, "/v1/b")),
      async () => (await client.hget(`kg:c:${ownerId}`, "monthly_used")) === "2",
      `kg:c:${ownerId}`,
    );
    expect(checkOutcome(second).code).toBe(null);
    const day = new Date(kg.clock.now()).toISOString().slice(0, 10);
    const quotaUsed = await client.get(`kg:q:${ownerId}:${day}`);
    const usage = await kg.admin.getUsage({ ownerId, from: day, to: day });
    expect({
      redisMonthlyUsed: await client.hget(`kg:c:${ownerId}`, "monthly_used"),
      redisQuotaUsed: quotaUsed,
      allowed: usage.totals?.allowed,
      creditsUsed: usage.totals?.creditsUsed,
    }).toEqual({ redisMonthlyUsed: "2", redisQuotaUsed: "2", allowed: 2n, creditsUsed: 2n });
  });

  it("a first ChargeUsage whose script is resent is recorded, and not answered replayed", async () => {
    const ownerId = "charge-owner";
    await kg.admin.upsertAccount({ ownerId, plan: "metered" });
    const warm = await kg.admin.chargeUsage({ ownerId, cost: 1n, idempotencyKey: "warm" });
    expect(warm.charged).toBe(true);
    const first = await stack.withAnswerLost(
      () => kg.admin.chargeUsage({ ownerId, cost: 3n, idempotencyKey: "job-1" }),
      async () => (await client.exists(`kg:cu:${ownerId} job-1`)) === 1,
      `kg:cu:${ownerId} job-1`,
    );
    const day = new Date(kg.clock.now()).toISOString().slice(0, 10);
    const usage = await kg.admin.getUsage({ ownerId, from: day, to: day });
    expect({
      charged: first.charged,
      replayed: first.replayed,
      redisMonthlyUsed: await client.hget(`kg:c:${ownerId}`, "monthly_used"),
      allowed: usage.totals?.allowed,
      creditsUsed: usage.totals?.creditsUsed,
    }).toEqual({ charged: true, replayed: false, redisMonthlyUsed: "4", allowed: 2n, creditsUsed: 4n });
  });
});

describe.runIf(ready)("error: a ChargeUsage's charge script run twice for one call", () => {
  const redisClient = suiteRedisClient();

  it("answers the second run as the call's own charge (not replayed), and a retry's run as replayed", async () => {
    const client = redisClient();
    const { logger, store, usage } = stubMeterDeps();
    // A connection that sends each charge script twice and answers the second reply, as a client
    // resending a command whose first answer it lost would.
    const twice = new Proxy(client, {
      get(target, property, receiver) {
        if (property !== "evalsha") return Reflect.get(target, property, receiver) as unknown;
        return async (...args: Parameters<Redis["evalsha"]>) => {
          await target.evalsha(...args).catch(() => undefined);
          return target.evalsha(...args);
        };
      },
    });
    const meter = new RedisMeter(twice, store, usage, new MemoryMeter(store, usage), "fail-closed", logger);
    const input = { ...chargeInput("twice-owner"), idempotencyKey: "job-1" };
    const first = await meter.charge(input);
    expect([first.allowed, first.replayed, first.spent, first.credits]).toEqual([true, false, { period: "2026-12", monthly: 3, topup: 0 }, { balance: 7 }]);
    const retry = await meter.charge({ ...input });
    expect([retry.allowed, retry.replayed, retry.spent, retry.credits]).toEqual([true, true, null, { balance: 7 }]);
    expect(await client.hget("kg:c:twice-owner", "monthly_used")).toBe("3");
  });
});
