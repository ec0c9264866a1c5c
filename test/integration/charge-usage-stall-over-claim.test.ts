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

// As charge-usage-redis-stall.test.ts, but the stall (a partition, a paused VM) lasts longer than
// the claim's 30 s (forced here by expiring the claim from a direct connection while keygate's is
// held). The charge script reaches Redis when it answers again, then the failure mark, which must
// land where the claim ran out (and no other call took the key): else the retry claims the key
// afresh and is answered replayed from the kept charge, recording nothing (Redis spent 3 credits
// that GetUsage and the store would never see).

const ready = requireServer("redis-server", redisAvailable(), "apt-get install redis-server");

const POLICY = {
  ...TEST_POLICY,
  plans: {
    ...TEST_POLICY.plans,
    metered: { maxActiveKeys: 5, rateLimit: { limit: 1000, windowSeconds: 60 }, dailyQuota: null, monthlyCredits: 10 },
  },
  limits: { onRedisError: "fail-closed" },
};

describe.runIf(ready)("ChargeUsage, fail-closed, Redis stalling longer than the claim", () => {
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

  it("the retry records the late charge once", async () => {
    const ownerId = "fc-long";
    await kg.admin.upsertAccount({ ownerId, plan: "metered" });
    const warm = await kg.admin.chargeUsage({ ownerId, cost: 1n, idempotencyKey: "warm" });
    expect(warm.charged).toBe(true);
    relay.holdWhen = (chunk) => chunk.toLowerCase().includes("evalsha") && chunk.includes(`kg:c:${ownerId}`);
    const answer = await adminRefusal(kg.admin.chargeUsage({ ownerId, cost: 3n, idempotencyKey: "order-1" }));
    expect(answer.code).toBe(Code.Unavailable);
    const claim = `kg:idem:${ownerId} order-1`;
    expect(String(await redisCommand(redis.port, "GET", claim))).toMatch(/^running:/);
    // The stall outlasts the claim (30 s): it runs out in Redis meanwhile.
    await redisCommand(redis.port, "PEXPIRE", claim, "1");
    await until(async () => (await redisCommand(redis.port, "EXISTS", claim)) === 0, 5000, "claim ran out");
    relay.release();
    // The held charge script runs now (the kept reply appears).
    await until(async () => (await redisCommand(redis.port, "EXISTS", `kg:cu:${ownerId} order-1`)) === 1, 10_000, "the late charge ran", { intervalMs: 20 });
    const { value: retried } = await untilValue(
      () => kg.admin.chargeUsage({ ownerId, cost: 3n, idempotencyKey: "order-1" }),
      () => true,
      10_000,
      "a retried ChargeUsage answering",
      { retryErrors: true, intervalMs: 50 },
    );
    const day = new Date().toISOString().slice(0, 10);
    const usage = await kg.admin.getUsage({ ownerId, from: day, to: day });
    expect({
      charged: retried.charged,
      balance: (await kg.admin.getAccount({ ownerId })).account?.creditBalance,
      allowed: usage.totals?.allowed,
      creditsUsed: usage.totals?.creditsUsed,
    }).toEqual({ charged: true, balance: 6n, allowed: 2n, creditsUsed: 4n });
  });
});
