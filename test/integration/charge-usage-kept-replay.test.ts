import { Redis } from "ioredis";
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from "vitest";
import { TestClock } from "../harness/clock.js";
import { startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { LIMITS_POLICY } from "../harness/limits-policy.js";
import { until } from "../harness/poll.js";
import { requireServer } from "../harness/ports.js";
import { redisAvailable, startRedis } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";

// With Redis, a ChargeUsage's outcome is kept twice: in the idempotency ledger (kg:idem:…, the
// answer stored after the charge) and beside the counters (kg:cu:…, by the charge script). When the
// ledger's answer is missing although the charge was made (its SET failed twice, so the 30 s claim
// ran out), a retry with the same idempotency key is answered by the script from what it kept:
// nothing is charged again (README, "Charges from a backend"), and nothing may be counted or spent
// again either, or GetUsage and the store's balance would show the charge twice. The answer says
// replayed: true, as a retry answered by the ledger does.

const POLICY = {
  ...LIMITS_POLICY,
  plans: { ...LIMITS_POLICY.plans, paid: { maxActiveKeys: 5, rateLimit: { limit: 1000, windowSeconds: 60 }, dailyQuota: null, monthlyCredits: 20 } },
};
const DAY = "2026-12-03";

const redisReady = requireServer("redis-server", redisAvailable(), "apt-get install redis-server");

describe.runIf(redisReady)("ChargeUsage answered from the charge Redis kept", () => {
  let redis: RedisServer;
  let kg: TestKeygate;
  let client: Redis;
  beforeAll(async () => {
    const started = await startRedis();
    if (started === null) throw new Error("redis-server is not on PATH");
    redis = started;
    const clock = new TestClock();
    clock.freeze(`${DAY}T12:00:00.000Z`);
    kg = await startKeygate({ policy: POLICY, clock, env: { KEYGATE_REDIS_URL: redis.url } });
    client = new Redis(redis.url);
  });
  afterEach(() => vi.restoreAllMocks());
  afterAll(async () => {
    client?.disconnect();
    await kg?.stop();
    await redis?.stop();
  });

  /**
   * Makes the ledger's write of an answer (JSON, put in place of the call's claim by a script) fail
   * `times` times, as a Redis blip right after the charge would.
   */
  function failAnswerWrites(times: number): void {
    const realEval = Redis.prototype.eval;
    let failures = 0;
    vi.spyOn(Redis.prototype, "eval").mockImplementation(function (this: Redis, ...args: unknown[]) {
      if (typeof args[4] === "string" && args[4].startsWith("{") && failures < times) {
        failures += 1;
        return Promise.reject(new Error("injected: connection reset")) as never;
      }
      return (realEval as (...a: unknown[]) => unknown).apply(this, args) as never;
    });
  }

  /** Lets a claim left running run out now instead of after 30 s. */
  async function lapseClaim(ownerId: string, idempotencyKey: string): Promise<void> {
    const claim = `kg:idem:${ownerId} ${idempotencyKey}`;
    expect(await client.get(claim)).toMatch(/^running:/);
    expect(await client.exists(`kg:cu:${ownerId} ${idempotencyKey}`)).toBe(1);
    await client.pexpire(claim, 1);
    await until(async () => (await client.exists(claim)) === 0, 5000, "the claim ran out");
  }

  it("a charge of 5 whose ledger answer was lost: the retry is replayed, charged nothing, and counted and spent once", async () => {
    const ownerId = "kept-allowed";
    await kg.admin.upsertAccount({ ownerId, plan: "paid" });
    failAnswerWrites(2);
    const first = await kg.admin.chargeUsage({ ownerId, cost: 5n, idempotencyKey: "job-1" });
    vi.restoreAllMocks();
    expect([first.charged, first.code, first.replayed, first.headers["x-credits-remaining"]]).toEqual([true, "OK", false, "15"]);
    await lapseClaim(ownerId, "job-1");
    const retry = await kg.admin.chargeUsage({ ownerId, cost: 5n, idempotencyKey: "job-1" });
    expect([retry.charged, retry.code, retry.replayed, retry.headers["x-credits-remaining"]]).toEqual([true, "OK", true, "15"]);
    expect((await kg.admin.getAccount({ ownerId })).account?.creditBalance).toBe(15n);
    const usage = await kg.admin.getUsage({ ownerId, from: DAY, to: DAY });
    const stored = await kg.app.store.getCredits(ownerId);
    expect({ allowed: usage.totals?.allowed, denied: usage.totals?.denied, creditsUsed: usage.totals?.creditsUsed, storedMonthlyUsed: stored.monthlyUsed }).toEqual({
      allowed: 1n,
      denied: {},
      creditsUsed: 5n,
      storedMonthlyUsed: 5,
    });
  });

  it("a refusal whose ledger answer was lost: the retry is the kept refusal, replayed, and counted once", async () => {
    const ownerId = "kept-refused";
    await kg.admin.upsertAccount({ ownerId, plan: "paid" });
    failAnswerWrites(2);
    const first = await kg.admin.chargeUsage({ ownerId, cost: 50n, idempotencyKey: "job-2" });
    vi.restoreAllMocks();
    expect([first.charged, first.code, first.replayed]).toEqual([false, "INSUFFICIENT_CREDITS", false]);
    await lapseClaim(ownerId, "job-2");
    const retry = await kg.admin.chargeUsage({ ownerId, cost: 50n, idempotencyKey: "job-2" });
    expect([retry.charged, retry.code, retry.message, retry.replayed]).toEqual([false, "INSUFFICIENT_CREDITS", first.message, true]);
    const usage = await kg.admin.getUsage({ ownerId, from: DAY, to: DAY });
    expect({ allowed: usage.totals?.allowed, denied: usage.totals?.denied, creditsUsed: usage.totals?.creditsUsed }).toEqual({
      allowed: 0n,
      denied: { INSUFFICIENT_CREDITS: 1n },
      creditsUsed: 0n,
    });
  });

  it("a ledger answer whose first write fails is written on the second try: the retry is the ledger's replay", async () => {
    const ownerId = "kept-second-try";
    await kg.admin.upsertAccount({ ownerId, plan: "paid" });
    failAnswerWrites(1);
    const first = await kg.admin.chargeUsage({ ownerId, cost: 3n, idempotencyKey: "job-3" });
    vi.restoreAllMocks();
    expect([first.charged, first.code, first.replayed]).toEqual([true, "OK", false]);
    const stored = await client.get(`kg:idem:${ownerId} job-3`);
    expect(stored === null ? null : (JSON.parse(stored) as { charge: { charged: boolean } }).charge.charged).toBe(true);
    const retry = await kg.admin.chargeUsage({ ownerId, cost: 3n, idempotencyKey: "job-3" });
    expect([retry.charged, retry.code, retry.replayed, retry.headers["x-credits-remaining"]]).toEqual([true, "OK", true, "17"]);
    expect((await kg.admin.getUsage({ ownerId, from: DAY, to: DAY })).totals?.creditsUsed).toBe(3n);
  });
});
