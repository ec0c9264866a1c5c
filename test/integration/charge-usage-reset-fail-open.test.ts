import { describe, expect, it } from "vitest";
import { MeterUnavailableError } from "../../src/limits/limits.js";
import { MemoryMeter } from "../../src/limits/memory.js";
import { RedisMeter } from "../../src/limits/redis.js";
import { requireServer } from "../harness/ports.js";
import { chargeInput, stubMeterDeps, suiteRedisClient } from "../harness/redis-charge.js";
import { redisAvailable } from "../harness/redis-server.js";

// limits.onRedisError: fail-open lets Checks through uncharged, but never a charge with an
// idempotency key (ChargeUsage, VerifyKey with a cost): its answer is kept under the key, so a
// charge let through uncharged would be replayed by every retry. Through KeyAdmin, with a reset
// that lost Redis's answer: charge-usage-reset-lost-answer.test.ts (both modes).

const ready = requireServer("redis-server", redisAvailable(), "apt-get install redis-server");

describe.runIf(ready)("error: fail-open while Redis is known not to answer (its heartbeats stopped)", () => {
  const redisClient = suiteRedisClient();

  it("refuses a charge with an idempotency key as unavailable, sending nothing, and lets a Check through uncharged", async () => {
    const client = redisClient();
    const { logger, store, usage } = stubMeterDeps();
    // The connection itself still answers (the idempotency ledger's calls go through), but the
    // invalidation bus has reported Redis lost.
    const meter = new RedisMeter(client, store, usage, new MemoryMeter(store, usage), "fail-open", logger, undefined, "kg:", undefined, () => true);
    const input = chargeInput("lost-owner");
    let confirmed = 0;
    const charge = meter.charge({ ...input, idempotencyKey: "job-1", confirmClaim: async () => void confirmed++ });
    await expect(charge).rejects.toBeInstanceOf(MeterUnavailableError);
    const check = await meter.charge({ ...input, bucketKind: "a" });
    expect({ confirmed, allowed: check.allowed, spent: check.spent, keys: await client.dbsize() }).toEqual({ confirmed: 0, allowed: true, spent: null, keys: 0 });
    await meter.close();
  });
});
