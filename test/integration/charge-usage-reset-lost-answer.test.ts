import type { Redis } from "ioredis";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Code } from "@connectrpc/connect";
import { DEFAULT_POLICY_INPUT } from "../../src/config.js";
import { adminRefusal } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { until } from "../harness/poll.js";
import { requireServer } from "../harness/ports.js";
import { startKeygateBehindRelay } from "../harness/redis-charge.js";
import type { KeygateBehindRelay } from "../harness/redis-charge.js";
import { redisAvailable } from "../harness/redis-server.js";

// README: a ChargeUsage whose charge script's answer a connection reset lost is UNAVAILABLE, "whose
// retry is answered from the charge Redis kept and records it once", under fail-closed and
// fail-open alike. Nothing is charged in-process: the first call's failure mark, refused on the
// connection that just reset (no offline queue), must still reach Redis, or the claim runs out and
// the retry, claiming the key afresh, replays the kept charge as another call's and records
// nothing. Under fail-open the call was answered `charged: true` with nothing recorded, and every
// retry replayed that (charge-usage-reset-fail-open.test.ts has the meter's side).

const ready = requireServer("redis-server", redisAvailable(), "apt-get install redis-server");

const policy = (onRedisError: "fail-closed" | "fail-open") => ({
  ...DEFAULT_POLICY_INPUT,
  defaultPlan: "metered",
  plans: { metered: { maxActiveKeys: 5, rateLimit: { limit: 1000, windowSeconds: 60 }, dailyQuota: 100, monthlyCredits: 10 } },
  scopes: { catalog: ["read"], default: ["read"] },
  routes: [{ method: "*", pathPrefix: "/v1", cost: 1 }],
  limits: { onRedisError },
});

describe.runIf(ready).each(["fail-closed", "fail-open"] as const)("ChargeUsage under %s whose charge answer a connection reset lost", (mode) => {
  let stack: KeygateBehindRelay;
  let kg: TestKeygate;
  let client: Redis;

  beforeAll(async () => {
    stack = await startKeygateBehindRelay(policy(mode));
    ({ kg, client } = stack);
  });
  afterAll(async () => {
    await stack?.stop();
  });

  it("is UNAVAILABLE, and the retry records the charge Redis made once", async () => {
    const ownerId = `${mode}-reset-owner`;
    await kg.admin.upsertAccount({ ownerId, plan: "metered" });
    const warm = await kg.admin.chargeUsage({ ownerId, cost: 1n, idempotencyKey: "warm" });
    expect(warm.charged).toBe(true);
    const scriptFor = `kg:cu:${ownerId} job-1`;
    const first = await stack.withAnswerLost(
      () => adminRefusal(kg.admin.chargeUsage({ ownerId, cost: 3n, idempotencyKey: "job-1" })),
      async () => (await client.exists(scriptFor)) === 1,
      scriptFor,
    );
    expect(first.code).toBe(Code.Unavailable);
    // The failure mark the reset kept from Redis is sent again once Redis answers: the key is
    // marked failed before its claim (30 s) could run out.
    const claim = `kg:idem:${ownerId} job-1`;
    await until(async () => (await client.get(claim)) === "failed", 10_000, "the failure mark in Redis", { intervalMs: 20 });
    const retry = await kg.admin.chargeUsage({ ownerId, cost: 3n, idempotencyKey: "job-1" });
    const day = new Date(kg.clock.now()).toISOString().slice(0, 10);
    const usage = await kg.admin.getUsage({ ownerId, from: day, to: day });
    expect({
      charged: retry.charged,
      replayed: retry.replayed,
      redisMonthlyUsed: await client.hget(`kg:c:${ownerId}`, "monthly_used"),
      allowed: usage.totals?.allowed,
      creditsUsed: usage.totals?.creditsUsed,
    }).toEqual({ charged: true, replayed: true, redisMonthlyUsed: "4", allowed: 2n, creditsUsed: 4n });
  }, 60_000);
});
