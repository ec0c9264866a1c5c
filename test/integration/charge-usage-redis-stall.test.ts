import { Code } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { TEST_POLICY, adminRefusal, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { until, untilValue } from "../harness/poll.js";
import { requireServer } from "../harness/ports.js";
import { redisAvailable, redisCommand, startRedis } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";
import { startTcpRelay } from "../harness/tcp-relay.js";
import type { TcpRelay } from "../harness/tcp-relay.js";

// ChargeUsage with `limits.onRedisError: fail-closed` when Redis stalls right after the
// idempotency key was claimed (a frozen Redis, a partition, a long command ahead of the charge):
// the call answers UNAVAILABLE, the charge script it sent runs when Redis answers again, and the
// caller's retry with the same idempotency_key is answered from that charge (kept beside the
// counters) instead of charging a second time (README, "KeyAdmin API reference", ChargeUsage).
// A relay between keygate and Redis holds the charge script (and everything after it on that
// connection) until the test lets it through, as a SIGSTOP/SIGCONT would, but at a chosen point.

const ready = requireServer("redis-server", redisAvailable(), "apt-get install redis-server");

const POLICY = {
  ...TEST_POLICY,
  plans: {
    ...TEST_POLICY.plans,
    metered: { maxActiveKeys: 5, rateLimit: { limit: 1000, windowSeconds: 60 }, dailyQuota: null, monthlyCredits: 10 },
  },
  limits: { onRedisError: "fail-closed" },
};

describe.runIf(ready)("ChargeUsage, fail-closed, Redis stalling after the idempotency claim", () => {
  let redis: RedisServer;
  let relay: TcpRelay;
  let kg: TestKeygate;

  beforeAll(async () => {
    const started = await startRedis();
    if (started === null) throw new Error("redis-server is not on PATH");
    redis = started;
    relay = await startTcpRelay(redis.port);
    kg = await startKeygate({ policy: POLICY, env: { KEYGATE_REDIS_URL: `redis://127.0.0.1:${relay.port}` } });
  });

  afterAll(async () => {
    relay?.release();
    await kg?.stop();
    await relay?.close();
    await redis?.stop();
  });

  const balance = async (ownerId: string): Promise<bigint | undefined> => (await kg.admin.getAccount({ ownerId })).account?.creditBalance;

  async function stalledCharge(ownerId: string, idempotencyKey: string): Promise<{ code: Code; message: string }> {
    await kg.admin.upsertAccount({ ownerId, plan: "metered" });
    // Loads the balance into Redis: 10 - 1.
    const warm = await kg.admin.chargeUsage({ ownerId, cost: 1n, idempotencyKey: "warm" });
    expect(warm.charged).toBe(true);
    expect(await balance(ownerId)).toBe(9n);
    // Hold the charge script for this owner (the claim SET NX has gone through and been answered).
    relay.holdWhen = (chunk) => chunk.toLowerCase().includes("evalsha") && chunk.includes(`kg:c:${ownerId}`);
    const answer = await adminRefusal(kg.admin.chargeUsage({ ownerId, cost: 3n, idempotencyKey }));
    expect(relay.heldChunks).toBeGreaterThan(0);
    // Redis answers again (SIGCONT): what was sent reaches it.
    relay.release();
    // The claim is not deleted but marked failed (its retry then records what the late charge did).
    await until(async () => (await redisCommand(redis.port, "GET", `kg:idem:${ownerId} ${idempotencyKey}`)) === "failed", 10_000, "the claim's failure mark reaching Redis", { intervalMs: 20 });
    return answer;
  }

  it("answers UNAVAILABLE, not INTERNAL", async () => {
    const answer = await stalledCharge("fc-code", "order-1");
    expect(answer.code).toBe(Code.Unavailable);
    expect(answer.message).toBe(
      "usage cannot be charged: Redis is unavailable; retry shortly with the same idempotency_key (a charge Redis received before failing is not made twice)",
    );
  });

  it("a retry with the same idempotency_key after Redis answers again charges the 3 credits once", async () => {
    const ownerId = "fc-twice";
    await stalledCharge(ownerId, "order-1");
    // The caller was told nothing was charged, so it retries with the same key.
    const { value: retried } = await untilValue(
      () => kg.admin.chargeUsage({ ownerId, cost: 3n, idempotencyKey: "order-1" }),
      () => true,
      10_000,
      "a retried ChargeUsage answering",
      { retryErrors: true, intervalMs: 50 },
    );
    expect([retried.charged, retried.replayed]).toEqual([true, true]);
    // One charge of 3 for order-1 after the warm-up's 1: 10 - 1 - 3.
    expect(await balance(ownerId)).toBe(6n);
    // The first call failed having recorded nothing, so the retry records the charge Redis made
    // when it thawed, once: usage and the store's spend say what Redis says (they said 1 and 1).
    const day = new Date().toISOString().slice(0, 10);
    const usage = await kg.admin.getUsage({ ownerId, from: day, to: day });
    expect({ allowed: usage.totals?.allowed, creditsUsed: usage.totals?.creditsUsed }).toEqual({ allowed: 2n, creditsUsed: 4n });
    const { value: stored } = await untilValue(() => kg.app.store.getCredits(ownerId), (credits) => credits.monthlyUsed >= 4, 15_000, "the spend flushed", { intervalMs: 100 });
    expect(stored.monthlyUsed).toBe(4);
  });
});
