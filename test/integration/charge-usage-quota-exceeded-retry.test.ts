import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { TestClock } from "../harness/clock.js";
import { startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { LIMITS_POLICY } from "../harness/limits-policy.js";
import { requireServer } from "../harness/ports.js";
import { redisAvailable, startRedis } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";

// A ChargeUsage refused QUOTA_EXCEEDED charged nothing and answers Retry-After: the seconds to the
// quota's reset at midnight UTC. As with RATE_LIMITED it is not kept under its idempotency key, so
// a backend that does what the answer says (waits, then retries the same charge with the same key)
// is judged again and charged once the quota has reset. Kept, the retry got the refusal back,
// `replayed: true` with its stale `Retry-After: 60`, for the 24 hours the key is kept, while a new
// key was charged at once. A charging VerifyKey goes the same way. Both ledgers: the process's
// own, and Redis's, whose charge script kept the refusal beside its counters as well.

const DAY = "2026-11-22";
const NEXT_DAY = "2026-11-23";

function retryCases(start: () => Promise<TestKeygate>): void {
  let kg: TestKeygate;
  beforeAll(async () => {
    kg = await start();
  });
  afterAll(async () => kg?.stop());

  /** Uses up the "quota" plan's daily quota of 5 with charges under other keys. */
  const useUpQuota = async (ownerId: string) => {
    for (let i = 0; i < 5; i++) expect((await kg.admin.chargeUsage({ ownerId, cost: 0n, idempotencyKey: `use-${i}` })).charged).toBe(true);
  };

  it("a QUOTA_EXCEEDED charge retried with its key is judged again: refused before midnight, charged once after", async () => {
    const ownerId = `quota-retry-${kg.ports.http}`;
    await kg.admin.upsertAccount({ ownerId, plan: "quota" });
    await useUpQuota(ownerId);
    const charge = async (idempotencyKey: string) => {
      const answer = await kg.admin.chargeUsage({ ownerId, cost: 0n, idempotencyKey });
      return [answer.charged, answer.code, answer.replayed, answer.headers["retry-after"] ?? null];
    };
    expect(await charge("job-42")).toEqual([false, "QUOTA_EXCEEDED", false, "60"]);
    // Judged again, not replayed: the quota has not reset yet, and Retry-After counts down.
    kg.clock.advanceMs(30_000);
    expect(await charge("job-42")).toEqual([false, "QUOTA_EXCEEDED", false, "30"]);
    // Past what Retry-After said: the quota has reset and the charge lands, once.
    kg.clock.advanceMs(31_000);
    expect(await charge("job-42")).toEqual([true, "OK", false, null]);
    expect(await charge("job-42")).toEqual([true, "OK", true, null]);
    const usage = await kg.admin.getUsage({ ownerId, from: DAY, to: NEXT_DAY });
    expect({ allowed: usage.totals?.allowed, denied: usage.totals?.denied }).toEqual({ allowed: 6n, denied: { QUOTA_EXCEEDED: 2n } });
  });

  it("a charging VerifyKey refused QUOTA_EXCEEDED is charged when retried with its key after Retry-After", async () => {
    const ownerId = `verify-quota-${kg.ports.http}`;
    await kg.admin.upsertAccount({ ownerId, plan: "quota" });
    const { secret } = await kg.admin.createKey({ ownerId, name: "k" });
    await useUpQuota(ownerId);
    const verify = async (idempotencyKey: string) => {
      const answer = await kg.admin.verifyKey({ secret, cost: 0n, idempotencyKey });
      return [answer.valid, answer.code, answer.charged, answer.headers["retry-after"] ?? null];
    };
    const [valid, code, charged, retryAfter] = await verify("v-1");
    expect([valid, code, charged]).toEqual([false, "QUOTA_EXCEEDED", false]);
    expect(retryAfter).toMatch(/^[1-9][0-9]*$/);
    kg.clock.advanceMs(Number(retryAfter) * 1000);
    expect(await verify("v-1")).toEqual([true, "OK", true, null]);
    expect(await verify("v-1")).toEqual([true, "OK", true, null]);
    // Charged once: one of the new day's 5.
    expect((await kg.admin.chargeUsage({ ownerId, cost: 0n, idempotencyKey: "after" })).headers.ratelimit).toMatch(/"day";r=3;/);
  });
}

/** 23:59:00 UTC: a minute before the daily quota resets. */
function beforeMidnight(): TestClock {
  const clock = new TestClock();
  clock.freeze(`${DAY}T23:59:00.000Z`);
  return clock;
}

describe("ChargeUsage refused QUOTA_EXCEEDED and retried, in-process ledger", () => {
  retryCases(() => startKeygate({ policy: LIMITS_POLICY, clock: beforeMidnight() }));
});

const redisReady = requireServer("redis-server", redisAvailable(), "apt-get install redis-server");

describe.runIf(redisReady)("ChargeUsage refused QUOTA_EXCEEDED and retried, Redis ledger", () => {
  let redis: RedisServer;
  afterAll(async () => redis?.stop());
  retryCases(async () => {
    const started = await startRedis();
    if (started === null) throw new Error("redis-server is not on PATH");
    redis = started;
    return startKeygate({ policy: LIMITS_POLICY, clock: beforeMidnight(), env: { KEYGATE_REDIS_URL: redis.url } });
  });
});
