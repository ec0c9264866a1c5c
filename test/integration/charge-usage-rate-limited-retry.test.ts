import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { DEFAULT_POLICY_INPUT } from "../../src/config.js";
import { TestClock } from "../harness/clock.js";
import { startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { requireServer } from "../harness/ports.js";
import { redisAvailable, startRedis } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";

// A ChargeUsage refused RATE_LIMITED (its charge bucket, limits.chargeRateLimit) charged nothing:
// like a payments API's 429 it is not kept under its idempotency key, so a backend that follows
// Retry-After and retries with the same key is judged again, and charged once the bucket has room
// (kept, it would get the refusal back for 24 hours and the charge would never land). Every other
// refusal (INSUFFICIENT_CREDITS here) stays kept and is replayed. A charging VerifyKey goes the
// same way. Both ledgers: the process's own, and Redis's (with the script's own kept charges).

const DAY = "2026-12-03";
const POLICY = {
  ...DEFAULT_POLICY_INPUT,
  defaultPlan: "metered",
  plans: { metered: { maxActiveKeys: 5, rateLimit: { limit: 100, windowSeconds: 60 }, dailyQuota: null, monthlyCredits: 10 } },
  limits: { chargeRateLimit: { limit: 1, windowSeconds: 60 } },
};

function retryCases(start: () => Promise<TestKeygate>): void {
  let kg: TestKeygate;
  beforeAll(async () => {
    kg = await start();
  });
  afterAll(async () => kg?.stop());

  const charge = async (ownerId: string, idempotencyKey: string, cost = 1n) => {
    const answer = await kg.admin.chargeUsage({ ownerId, cost, idempotencyKey });
    return [answer.charged, answer.code, answer.replayed, answer.headers["retry-after"] ?? null, answer.headers["x-credits-remaining"] ?? null];
  };

  it("a RATE_LIMITED charge retried with its key after Retry-After is charged; a refusal for credits stays replayed", async () => {
    const ownerId = `retry-${kg.ports.http}`;
    await kg.admin.upsertAccount({ ownerId, plan: "metered" });
    expect(await charge(ownerId, "job-a")).toEqual([true, "OK", false, null, "9"]);
    expect(await charge(ownerId, "job-b")).toEqual([false, "RATE_LIMITED", false, "60", "9"]);
    // Judged again, not replayed: still no room.
    kg.clock.advanceMs(30_000);
    expect(await charge(ownerId, "job-b")).toEqual([false, "RATE_LIMITED", false, "30", "9"]);
    kg.clock.advanceMs(30_000);
    expect(await charge(ownerId, "job-b")).toEqual([true, "OK", false, null, "8"]);
    expect(await charge(ownerId, "job-b")).toEqual([true, "OK", true, null, "8"]);
    kg.clock.advanceMs(60_000);
    expect(await charge(ownerId, "job-c", 100n)).toEqual([false, "INSUFFICIENT_CREDITS", false, null, "8"]);
    await kg.admin.addCredits({ ownerId, amount: 200n, reason: "order 1" });
    kg.clock.advanceMs(60_000);
    expect(await charge(ownerId, "job-c", 100n)).toEqual([false, "INSUFFICIENT_CREDITS", true, null, "8"]);
    const usage = await kg.admin.getUsage({ ownerId, from: DAY, to: DAY });
    expect({ allowed: usage.totals?.allowed, denied: usage.totals?.denied, creditsUsed: usage.totals?.creditsUsed }).toEqual({
      allowed: 2n,
      denied: { RATE_LIMITED: 2n, INSUFFICIENT_CREDITS: 1n },
      creditsUsed: 2n,
    });
  });

  it("a charging VerifyKey refused RATE_LIMITED is charged when retried with its key after Retry-After", async () => {
    const ownerId = `verify-${kg.ports.http}`;
    await kg.admin.upsertAccount({ ownerId, plan: "metered" });
    const { secret } = await kg.admin.createKey({ ownerId, name: "k" });
    const verify = async (idempotencyKey: string) => {
      const answer = await kg.admin.verifyKey({ secret, cost: 1n, idempotencyKey });
      return [answer.valid, answer.code, answer.charged, answer.headers["x-credits-remaining"] ?? null];
    };
    expect(await verify("v-1")).toEqual([true, "OK", true, "9"]);
    expect(await verify("v-2")).toEqual([false, "RATE_LIMITED", false, "9"]);
    kg.clock.advanceMs(60_000);
    expect(await verify("v-2")).toEqual([true, "OK", true, "8"]);
    expect(await verify("v-2")).toEqual([true, "OK", true, "8"]);
    expect((await kg.admin.getAccount({ ownerId })).account?.creditBalance).toBe(8n);
  });
}

function startedClock(): TestClock {
  const clock = new TestClock();
  clock.freeze(`${DAY}T12:00:00.000Z`);
  return clock;
}

describe("ChargeUsage refused RATE_LIMITED and retried, in-process ledger", () => {
  retryCases(() => startKeygate({ policy: POLICY, clock: startedClock() }));
});

const redisReady = requireServer("redis-server", redisAvailable(), "apt-get install redis-server");

describe.runIf(redisReady)("ChargeUsage refused RATE_LIMITED and retried, Redis ledger", () => {
  let redis: RedisServer;
  afterAll(async () => redis?.stop());
  retryCases(async () => {
    const started = await startRedis();
    if (started === null) throw new Error("redis-server is not on PATH");
    redis = started;
    return startKeygate({ policy: POLICY, clock: startedClock(), env: { KEYGATE_REDIS_URL: redis.url } });
  });
});
