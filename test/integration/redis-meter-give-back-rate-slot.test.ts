import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ChargeAbandonedError } from "../../src/limits/limits.js";
import type { ChargeInput } from "../../src/limits/limits.js";
import { MemoryMeter } from "../../src/limits/memory.js";
import { RedisMeter } from "../../src/limits/redis.js";
import { requireServer } from "../harness/ports.js";
import { chargeInput, lateCharge, startRedisWithClient, stubMeterDeps } from "../harness/redis-charge.js";
import type { RedisWithClient } from "../harness/redis-charge.js";
import { redisAvailable } from "../harness/redis-server.js";

// README "One budget per Check": a late allow's give-back (GIVE_BACK) takes the rate bucket's
// interval back only while the bucket still holds the time that charge wrote. It took one
// interval off whatever time was stored: when the late charge's slot had already come back on its
// own (its answer came later than one interval, as every answer later than a 150 ms budget is for a
// limit of 10 a second) before later charges ran, the interval taken off was a served charge's,
// and one request more than the limit went through per give-back.

const ready = requireServer("redis-server", redisAvailable(), "apt-get install redis-server");

describe.runIf(ready)("the give-back of a late charge whose rate slot had already come back", () => {
  let r: RedisWithClient;
  beforeAll(async () => {
    r = await startRedisWithClient();
  });
  afterAll(async () => {
    await r?.stop();
  });

  it("leaves a later served charge's slot taken: the limit's next request is refused", async () => {
    const deps = stubMeterDeps();
    const meter = new RedisMeter(r.client, deps.store, deps.usage, new MemoryMeter(deps.store, deps.usage), "fail-closed", deps.logger);
    const t0 = Date.parse("2026-12-03T12:00:00Z");
    // 10 a second: one slot every 100 ms.
    const at = (ownerId: string, nowMs: number): ChargeInput => ({ ...chargeInput(ownerId), rate: { limit: 10, windowSeconds: 1 }, dailyQuota: null, monthlyCredits: null, cost: 0, nowMs });
    // Both scripts loaded first: a NOSCRIPT round trip would put A's give-back behind later charges
    // or them behind it, and the order below is the case.
    expect((await meter.charge(at("warm-up", t0))).allowed).toBe(true);
    expect(await lateCharge(meter, at("warm-up-late", t0))).toBeInstanceOf(ChargeAbandonedError);

    const ownerId = "give-back-rate-slot";
    // A: a Check at t0 on an empty bucket, answered UNAVAILABLE while its charge is in Redis.
    const late = lateCharge(meter, at(ownerId, t0));
    // Ten Checks 200 ms later, sent before A's answer comes back, so Redis runs them before A's
    // give-back. A's slot came back at t0 + 100 ms: each starts from its own now, and the ten fill
    // the bucket.
    const served = Array.from({ length: 10 }, async () => meter.charge(at(ownerId, t0 + 200)));
    expect(await late).toBeInstanceOf(ChargeAbandonedError);
    expect((await Promise.all(served)).map((c) => [c.allowed, c.rate.remaining])).toEqual([9, 8, 7, 6, 5, 4, 3, 2, 1, 0].map((remaining) => [true, remaining]));
    // A's give-back ran after the ten: an eleventh at the same instant is over the limit.
    const eleventh = await meter.charge(at(ownerId, t0 + 200));
    expect({ allowed: eleventh.allowed, reason: eleventh.reason, remaining: eleventh.rate.remaining }).toEqual({ allowed: false, reason: "RATE_LIMITED", remaining: 0 });
  });
});
