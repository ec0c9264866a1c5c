import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { TestClock } from "../harness/clock.js";
import { startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { LIMITS_POLICY } from "../harness/limits-policy.js";
import { requireServer } from "../harness/ports.js";
import { redisAvailable, startRedis } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";

// A wall clock that reads the previous month after credits were already spent in the new one (an
// NTP step back of a couple of seconds just after 00:00 UTC on the 1st, or two replicas a few
// seconds apart) spends the new month's allowance, and its spend is written under the month it
// was charged to: written under the earlier month, the meter and the store dropped it (all ten
// charges of 5 passed on 15 credits; a reloaded balance gave the spend back).

const ALLOWANCE = 20;
const POLICY = {
  ...LIMITS_POLICY,
  plans: {
    ...LIMITS_POLICY.plans,
    paid: { maxActiveKeys: 5, rateLimit: { limit: 1000, windowSeconds: 60 }, dailyQuota: null, monthlyCredits: ALLOWANCE },
  },
};

const redisReady = requireServer("redis-server", redisAvailable(), "apt-get install redis-server");

async function balance(kg: TestKeygate, ownerId: string): Promise<bigint> {
  return (await kg.admin.getAccount({ ownerId })).account?.creditBalance ?? -1n;
}

describe("monthly credits when the clock steps back over 00:00 UTC on the 1st (embedded)", () => {
  let kg: TestKeygate;
  afterAll(async () => {
    await kg?.stop();
  });

  it("a clock stepped back 2 s into January still spends February's allowance", async () => {
    const clock = new TestClock();
    clock.freeze("2027-02-01T00:00:01.000Z");
    kg = await startKeygate({ policy: POLICY, clock });
    const ownerId = "step-back";
    await kg.admin.upsertAccount({ ownerId, plan: "paid" });
    const first = await kg.admin.chargeUsage({ ownerId, cost: 5n, idempotencyKey: "feb-1" });
    expect([first.charged, first.headers["x-credits-remaining"]]).toEqual([true, "15"]);

    // NTP steps the clock back 2 s: it reads January 31st again.
    clock.freeze("2027-01-31T23:59:59.000Z");
    const charged: boolean[] = [];
    for (let i = 0; i < 10; i++) charged.push((await kg.admin.chargeUsage({ ownerId, cost: 5n, idempotencyKey: `back-${i}` })).charged === true);
    // 15 credits left: three charges of 5, then INSUFFICIENT_CREDITS.
    expect(charged.filter(Boolean).length).toBe(3);

    clock.freeze("2027-02-01T00:00:05.000Z");
    expect(await balance(kg, ownerId)).toBe(0n);
  });
});

describe.runIf(redisReady)("monthly credits with two replicas a few seconds apart at the month's end (Redis)", () => {
  let redis: RedisServer;
  let dataDir: string;
  const started: TestKeygate[] = [];
  afterAll(async () => {
    await Promise.allSettled(started.map((kg) => kg.stop()));
    await redis?.stop();
    if (dataDir !== undefined) rmSync(dataDir, { recursive: true, force: true });
  });

  it("a charge on the replica whose clock is 3 s behind is kept in the store under the month Redis charged it to", async () => {
    const up = await startRedis();
    if (up === null) throw new Error("redis-server is not on PATH");
    redis = up;
    dataDir = mkdtempSync(join(tmpdir(), "keygate-tmp-time-"));
    const ahead = new TestClock();
    ahead.freeze("2027-02-01T00:00:01.000Z");
    const behind = new TestClock();
    behind.freeze("2027-01-31T23:59:58.000Z");
    const a = await startKeygate({ dataDir, policy: POLICY, clock: ahead, env: { KEYGATE_REDIS_URL: redis.url } });
    started.push(a);
    const b = await startKeygate({ dataDir, policy: POLICY, clock: behind, env: { KEYGATE_REDIS_URL: redis.url } });
    started.push(b);

    const ownerId = "skewed-month";
    await a.admin.upsertAccount({ ownerId, plan: "paid" });
    expect((await a.admin.chargeUsage({ ownerId, cost: 5n, idempotencyKey: "on-a" })).charged).toBe(true);
    const onB = await b.admin.chargeUsage({ ownerId, cost: 5n, idempotencyKey: "on-b" });
    // Redis charged February's allowance for both: 10 of 20 left, on either replica.
    expect([onB.charged, onB.headers["x-credits-remaining"]]).toEqual([true, "10"]);

    // Both stop (each flushes its spend to the store); Redis loses the live balance (its idle
    // expiry, an eviction or a restart), so the balance is read from the store again.
    await b.stop({ keepData: true });
    await a.stop({ keepData: true });
    started.length = 0;
    await redis.stop();
    const later = new TestClock();
    later.freeze("2027-02-01T00:30:00.000Z");
    const c = await startKeygate({ dataDir, policy: POLICY, clock: later });
    started.push(c);
    // Expected 10 (20 - 5 - 5); the store lost replica b's February spend.
    expect(await balance(c, ownerId)).toBe(10n);
  });
});
