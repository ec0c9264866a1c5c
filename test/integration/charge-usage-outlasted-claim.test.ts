import { Redis } from "ioredis";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Code } from "@connectrpc/connect";
import { TEST_POLICY, adminRefusal, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { until } from "../harness/poll.js";
import { requireServer } from "../harness/ports.js";
import { redisAvailable, startRedis } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";

// A ChargeUsage call A that outlasts its idempotency claim (its claim ran out: here by hand, as when
// Redis could not be reached to renew it for 30 s; A's cold balance's store read hangs, then fails)
// while a retry B with the same idempotency_key claims the key, charges and keeps its answer. A
// must then write nothing under the key (not "failed" over B's answer, not its own answer) and
// charge nothing anywhere (in fallback mode, not in-process either): it answers UNAVAILABLE, and
// the next retry C is B's answer again, recorded once (README, "Charges from a backend").

const ready = requireServer("redis-server", redisAvailable(), "apt-get install redis-server");

function policy(onRedisError: string): unknown {
  return {
    ...TEST_POLICY,
    plans: { ...TEST_POLICY.plans, metered: { maxActiveKeys: 5, rateLimit: { limit: 1000, windowSeconds: 60 }, dailyQuota: null, monthlyCredits: 10 } },
    limits: { onRedisError },
  };
}

async function scenario(kg: TestKeygate, client: Redis, ownerId: string): Promise<void> {
  await kg.admin.upsertAccount({ ownerId, plan: "metered" });
  const store = kg.app.store;
  const realGetCredits = store.getCredits.bind(store);
  let releaseA: (() => void) | undefined;
  let calls = 0;
  // A's first store read of the cold balance hangs until released, then fails (a MongoDB socket timeout).
  store.getCredits = async (owner: string) => {
    calls += 1;
    if (owner === ownerId && calls === 1) {
      await new Promise<void>((resolve) => {
        releaseA = resolve;
      });
      throw new Error("injected: store read timed out");
    }
    return realGetCredits(owner);
  };
  const claim = `kg:idem:${ownerId} job-1`;
  const a = adminRefusal(kg.admin.chargeUsage({ ownerId, cost: 3n, idempotencyKey: "job-1" }));
  await until(() => releaseA !== undefined, 10_000, "A waiting on the store");
  // A has run longer than its claim (30 s): let the claim run out now.
  expect(await client.get(claim)).toMatch(/^running:/);
  await client.pexpire(claim, 1);
  await until(async () => (await client.exists(claim)) === 0, 5000, "the claim ran out");
  // B, the caller's retry, claims the key, charges 3 and stores its answer.
  const b = await kg.admin.chargeUsage({ ownerId, cost: 3n, idempotencyKey: "job-1" });
  expect([b.charged, b.code, b.replayed, b.headers["x-credits-remaining"]]).toEqual([true, "OK", false, "7"]);
  expect((await client.get(claim))?.startsWith("{")).toBe(true);
  // A fails now.
  releaseA?.();
  expect((await a).code).toBe(Code.Unavailable);
  store.getCredits = realGetCredits;
  // B's answer must still be what the key holds (A's claim was gone before A ended).
  const afterA = await client.get(claim).then((v) => (v === null ? null : v.startsWith("{") ? "answer" : v));
  // C, another retry with the key: it must be B's answer again, and nothing more recorded.
  const c = await kg.admin.chargeUsage({ ownerId, cost: 3n, idempotencyKey: "job-1" });
  expect([c.charged, c.replayed]).toEqual([true, true]);
  const day = new Date(kg.clock.now()).toISOString().slice(0, 10);
  const usage = await kg.admin.getUsage({ ownerId, from: day, to: day });
  const stored = await kg.app.store.getCredits(ownerId);
  expect({
    afterA,
    ledger: await client.get(claim).then((v) => (v === null ? null : v.startsWith("{") ? "answer" : v)),
    allowed: usage.totals?.allowed,
    creditsUsed: usage.totals?.creditsUsed,
    storedMonthlyUsed: stored.monthlyUsed,
    balance: (await kg.admin.getAccount({ ownerId })).account?.creditBalance,
  }).toEqual({ afterA: "answer", ledger: "answer", allowed: 1n, creditsUsed: 3n, storedMonthlyUsed: 3, balance: 7n });
}

describe.runIf(ready)("error: a ChargeUsage that outlasted its idempotency claim, then failed", () => {
  let redis: RedisServer;
  let client: Redis;
  beforeAll(async () => {
    const started = await startRedis();
    if (started === null) throw new Error("redis-server is not on PATH");
    redis = started;
    client = new Redis(redis.url);
  });
  afterAll(async () => {
    client?.disconnect();
    await redis?.stop();
  });

  it("fail-closed: leaves the retry's answer under the key, and the charge is recorded once", async () => {
    const kg = await startKeygate({ policy: policy("fail-closed"), env: { KEYGATE_REDIS_URL: redis.url } });
    try {
      await scenario(kg, client, "fc-owner");
    } finally {
      await kg.stop();
    }
  });

  it("fallback: charges nothing in-process, leaves the retry's answer, and the charge is recorded once", async () => {
    const kg = await startKeygate({ policy: policy("fallback"), env: { KEYGATE_REDIS_URL: redis.url } });
    try {
      await scenario(kg, client, "fb-owner");
    } finally {
      await kg.stop();
    }
  });
});
