import { Redis } from "ioredis";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Code } from "@connectrpc/connect";
import { pino } from "pino";
import { DEFAULT_POLICY_INPUT } from "../../src/config.js";
import { MeterUnavailableError } from "../../src/limits/limits.js";
import { MemoryMeter } from "../../src/limits/memory.js";
import { RedisMeter } from "../../src/limits/redis.js";
import { UsageRecorder } from "../../src/limits/usage.js";
import { adminRefusal, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { until } from "../harness/poll.js";
import { requireServer } from "../harness/ports.js";
import { redisAvailable, startRedis } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";
import { startTcpRelay } from "../harness/tcp-relay.js";
import type { TcpRelay } from "../harness/tcp-relay.js";

// limits.onRedisError: fail-open lets Checks through uncharged, but never a charge with an
// idempotency key (ChargeUsage, VerifyKey with a cost): its answer is kept under the key, so a
// charge Redis made whose answer a connection reset lost was answered `charged: true` with
// nothing recorded, and every retry replayed that. It is UNAVAILABLE, as under fail-closed
// (charge-usage-reset-fail-closed.test.ts), and the retry records the kept charge once.

const ready = requireServer("redis-server", redisAvailable(), "apt-get install redis-server");

const POLICY = {
  ...DEFAULT_POLICY_INPUT,
  defaultPlan: "metered",
  plans: { metered: { maxActiveKeys: 5, rateLimit: { limit: 1000, windowSeconds: 60 }, dailyQuota: 100, monthlyCredits: 10 } },
  scopes: { catalog: ["read"], default: ["read"] },
  routes: [{ method: "*", pathPrefix: "/v1", cost: 1 }],
  limits: { onRedisError: "fail-open" },
};

describe.runIf(ready)("error: ChargeUsage under fail-open whose charge answer a connection reset lost", () => {
  let redis: RedisServer;
  let relay: TcpRelay;
  let kg: TestKeygate;
  let client: Redis;
  let delayAnswers = false;

  beforeAll(async () => {
    const started = await startRedis();
    if (started === null) throw new Error("redis-server is not on PATH");
    redis = started;
    relay = await startTcpRelay(redis.port, { answerDelayMs: () => (delayAnswers ? 3000 : 0) });
    kg = await startKeygate({ policy: POLICY, env: { KEYGATE_REDIS_URL: `redis://127.0.0.1:${relay.port}` } });
    client = new Redis(redis.url);
  });
  afterAll(async () => {
    client?.disconnect();
    await kg?.stop();
    await relay?.close();
    await redis?.stop();
  });

  it("is UNAVAILABLE, not charged with nothing recorded, and the retry records the charge Redis made once", async () => {
    const ownerId = "fo-reset-owner";
    await kg.admin.upsertAccount({ ownerId, plan: "metered" });
    const warm = await kg.admin.chargeUsage({ ownerId, cost: 1n, idempotencyKey: "warm" });
    expect(warm.charged).toBe(true);
    const scriptFor = `kg:cu:${ownerId} job-1`;
    relay.holdWhen = (chunk) => chunk.toLowerCase().includes("evalsha") && chunk.includes(scriptFor);
    const heldBefore = relay.heldChunks;
    const pending = adminRefusal(kg.admin.chargeUsage({ ownerId, cost: 3n, idempotencyKey: "job-1" }));
    await until(() => relay.heldChunks > heldBefore, 5000, "the charge script sent", { intervalMs: 1 });
    delayAnswers = true;
    relay.release();
    await until(async () => (await client.exists(scriptFor)) === 1, 5000, "Redis ran the charge", { intervalMs: 5 });
    relay.dropAll();
    delayAnswers = false;
    const first = await pending;
    expect(first.code).toBe(Code.Unavailable);
    await until(() => kg.admin.upsertAccount({ ownerId: "reconnected", plan: "metered" }).then(() => true), 10_000, "Redis answering keygate again", { intervalMs: 50, retryErrors: true });
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

describe.runIf(ready)("error: fail-open while Redis is known not to answer (its heartbeats stopped)", () => {
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

  it("refuses a charge with an idempotency key as unavailable, sending nothing, and lets a Check through uncharged", async () => {
    const logger = pino({ level: "silent" });
    const store = {
      getCredits: async () => ({ period: "", monthlyUsed: 0, topupBalance: 0, topupTotal: 0 }),
      listUsage: async () => [],
      applyUsage: async () => undefined,
    };
    const usage = new UsageRecorder(store, logger, 5000);
    // The connection itself still answers (the idempotency ledger's calls go through), but the
    // invalidation bus has reported Redis lost.
    const meter = new RedisMeter(client, store, usage, new MemoryMeter(store, usage), "fail-open", logger, undefined, "kg:", undefined, () => true);
    const input = {
      ownerId: "lost-owner",
      bucketKind: "u" as const,
      bucketId: "lost-owner",
      rate: { limit: 1000, windowSeconds: 60 },
      dailyQuota: 100,
      countsDaily: true,
      monthlyCredits: 10,
      cost: 3,
      nowMs: Date.parse("2026-12-03T12:00:00Z"),
      meter: "live" as const,
      quota: null,
      budgetExpired: false,
    };
    let confirmed = 0;
    const charge = meter.charge({ ...input, idempotencyKey: "job-1", confirmClaim: async () => void confirmed++ });
    await expect(charge).rejects.toBeInstanceOf(MeterUnavailableError);
    const check = await meter.charge({ ...input, bucketKind: "a" });
    expect({ confirmed, allowed: check.allowed, spent: check.spent, keys: await client.dbsize() }).toEqual({ confirmed: 0, allowed: true, spent: null, keys: 0 });
    await meter.close();
  });
});
