import { Redis } from "ioredis";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { RedisIdempotencyLedger } from "../../src/limits/idempotency.js";
import { until } from "../harness/poll.js";
import { requireServer } from "../harness/ports.js";
import { redisAvailable, startRedis } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";

// A failure mark Redis did not take is kept in memory and sent again every second, but only over
// the failed call's own claim, and only while that claim surely lives. An empty key is also what a
// key holds after a later call (another replica) charged, recorded, could not store its answer,
// and let its claim run out: a retry is then answered from the charge Redis kept, replayed and not
// recorded. A stale mark landing there would turn that retry into "after a failure", and
// ChargeUsage would record the kept charge a second time.
//
// The meter is modelled as pipeline.chargeUsage and the CHARGE script behave: a charge kept under
// the key is replayed, and recorded only after a failure.

const ready = requireServer("redis-server", redisAvailable(), "apt-get install redis-server");

/** A client whose commands fail while `cut` (a partition between this replica and Redis). */
function partitionable(real: Redis): { client: Redis; cut: { on: boolean } } {
  const cut = { on: false };
  const client = new Proxy(real, {
    get(target, prop, receiver) {
      const value: unknown = Reflect.get(target, prop, receiver);
      if (typeof value !== "function" || !["eval", "get", "set"].includes(String(prop))) return value;
      return (...args: unknown[]) => (cut.on ? Promise.reject(new Error("read ECONNRESET")) : (value as (...a: unknown[]) => unknown).apply(target, args));
    },
  });
  return { client, cut };
}

describe.runIf(ready)("a stale failure mark resent by the ledger", () => {
  let redis: RedisServer;
  let raw1: Redis;
  let raw2: Redis;
  let admin: Redis;

  beforeAll(async () => {
    const started = await startRedis();
    if (started === null) throw new Error("redis-server is not on PATH");
    redis = started;
    raw1 = new Redis(redis.url);
    raw2 = new Redis(redis.url);
    admin = new Redis(redis.url);
  });
  afterAll(async () => {
    raw1?.disconnect();
    raw2?.disconnect();
    admin?.disconnect();
    await redis?.stop();
  });

  it("a retry after another call's charge and lost answer is not told afterFailure (no second record)", async () => {
    const r1 = partitionable(raw1);
    const r2 = partitionable(raw2);
    const ledger1 = new RedisIdempotencyLedger(r1.client as never);
    const ledger2 = new RedisIdempotencyLedger(r2.client as never);
    const name = "kg:idem:owner job-7";
    const receipt = "test:receipt owner job-7";
    let recorded = 0;
    /** The meter and pipeline: a kept charge is replayed, and recorded only after a failure. */
    const meterRun = async (afterFailure: boolean): Promise<{ charged: boolean }> => {
      const kept = await admin.get(receipt);
      if (kept !== null) {
        if (afterFailure) recorded += 1;
        return { charged: true };
      }
      await admin.set(receipt, "1");
      recorded += 1;
      return { charged: true };
    };

    // 1. Call A on replica 1: its charge's connection resets (nothing made), and replica 1 stays
    //    cut off from Redis, so its failure mark waits in the resend queue.
    await expect(
      ledger1.once("owner job-7", async () => {
        r1.cut.on = true;
        throw new Error("read ECONNRESET");
      }),
    ).rejects.toThrow("ECONNRESET");
    // 2. A's 30 s claim runs out (replica 1 still cut off).
    await admin.del(name);
    // 3. The job is redelivered to replica 2: call B charges and records; then replica 2 loses
    //    Redis before it can store its answer (tried twice), and B's claim runs out in turn.
    const b = await ledger2.once("owner job-7", async (afterFailure) => {
      const answer = await meterRun(afterFailure);
      r2.cut.on = true;
      return answer;
    });
    expect(b.value.charged).toBe(true);
    r2.cut.on = false;
    expect(recorded).toBe(1);
    await admin.del(name);
    // 4. Replica 1 reaches Redis again: its queued mark from step 1 is resent.
    r1.cut.on = false;
    await until(async () => (await admin.get(name)) !== null, 3000, "the resent mark").catch(() => undefined);
    const held = await admin.get(name);
    // 5. The job is redelivered once more: README's promise is a replay that records nothing.
    let toldAfterFailure: boolean | undefined;
    await ledger2.once("owner job-7", (afterFailure) => ((toldAfterFailure = afterFailure), meterRun(afterFailure)));
    expect({ held, toldAfterFailure, recorded }).toEqual({ held: null, toldAfterFailure: false, recorded: 1 });
  });
});
