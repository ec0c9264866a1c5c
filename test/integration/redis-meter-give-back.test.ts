import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { Redis } from "ioredis";
import { ChargeAbandonedError } from "../../src/limits/limits.js";
import type { ChargeInput } from "../../src/limits/limits.js";
import { MemoryMeter } from "../../src/limits/memory.js";
import { RedisMeter } from "../../src/limits/redis.js";
import { requireServer } from "../harness/ports.js";
import { chargeInput, lateCharge, startRedisWithClient, stubMeterDeps } from "../harness/redis-charge.js";
import type { RedisWithClient } from "../harness/redis-charge.js";
import { redisAvailable } from "../harness/redis-server.js";

// README "One budget per Check": a charge Redis allows after its Check was answered UNAVAILABLE
// (budgetExpired set while the script was on its way) is given back, so Redis holds exactly what
// it held before: the rate bucket's time to the digit (a fractional interval, 7 s / 3), the quota
// counter, and a balance whose spend took monthly credits and top-ups both. A bucket and counter
// the late charge created are gone again.

const ready = requireServer("redis-server", redisAvailable(), "apt-get install redis-server");

/** Every key Redis holds, with its value (a hash's fields sorted); expiries left out. */
async function everything(client: Redis): Promise<Record<string, unknown>> {
  const out: Record<string, unknown> = {};
  for (const key of (await client.keys("*")).sort()) {
    out[key] = (await client.type(key)) === "hash" ? Object.fromEntries(Object.entries(await client.hgetall(key)).sort()) : await client.get(key);
  }
  return out;
}

describe.runIf(ready)("the Redis meter gives back an allow that comes after its Check's budget", () => {
  let r: RedisWithClient;
  beforeAll(async () => {
    r = await startRedisWithClient();
  });
  afterAll(async () => {
    await r?.stop();
  });

  it("leaves the bucket, the quota counter and the balance exactly as the charge found them", async () => {
    const deps = stubMeterDeps();
    // 4 credits a month and 5 of top-ups; each charge costs 3.
    const store = { ...deps.store, getCredits: async () => ({ period: "2026-12", monthlyUsed: 0, topupBalance: 5, topupTotal: 5 }) };
    const meter = new RedisMeter(r.client, store, deps.usage, new MemoryMeter(store, deps.usage), "fail-closed", deps.logger);
    const input: ChargeInput = { ...chargeInput("give-back"), rate: { limit: 3, windowSeconds: 7 }, monthlyCredits: 4, nowMs: Date.parse("2026-12-03T12:00:00Z") + 0.4 };
    const first = await meter.charge(input);
    expect(first.spent).toEqual({ period: "2026-12", monthly: 3, topup: 0 });
    const held = await everything(r.client);
    // This one would spend the last monthly credit and 2 of the top-ups.
    expect(await lateCharge(meter, { ...input, nowMs: input.nowMs + 1000.3 })).toBeInstanceOf(ChargeAbandonedError);
    expect(await everything(r.client)).toEqual(held);
    // The next charge finds the first one's counts only.
    const next = await meter.charge({ ...input, nowMs: input.nowMs + 1000.3 });
    expect({ allowed: next.allowed, rate: next.rate.remaining, quota: next.quota?.remaining, credits: next.credits?.balance, spent: next.spent }).toEqual({
      allowed: true,
      rate: 1,
      quota: 98,
      credits: 3,
      spent: { period: "2026-12", monthly: 1, topup: 2 },
    });
  });

  it("drops the bucket and the counter a late first charge created", async () => {
    const deps = stubMeterDeps();
    const meter = new RedisMeter(r.client, deps.store, deps.usage, new MemoryMeter(deps.store, deps.usage), "fail-closed", deps.logger);
    const before = await everything(r.client);
    expect(await lateCharge(meter, { ...chargeInput("give-back-first"), monthlyCredits: null, cost: 0 })).toBeInstanceOf(ChargeAbandonedError);
    expect(await everything(r.client)).toEqual(before);
  });
});
