import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Redis } from "ioredis";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { TestClock } from "../harness/clock.js";
import { checkInit, checkOutcome, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { LIMITS_POLICY } from "../harness/limits-policy.js";
import { requireServer } from "../harness/ports.js";
import { redisAvailable, startRedis } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";

// A plan's burst is its whole limit at one instant, in both meters: a limit whose interval is not
// a whole number of milliseconds (9 a minute: 6,666.67 ms) used to come out one short at some
// instants, this one among them, from float rounding near epoch milliseconds.
const T0 = "2026-12-03T12:00:00.000Z";
const LIMIT = 9;
const POLICY = {
  ...LIMITS_POLICY,
  plans: { ...LIMITS_POLICY.plans, nine: { maxActiveKeys: 5, rateLimit: { limit: LIMIT, windowSeconds: 60 }, dailyQuota: null, monthlyCredits: null } },
};

/** Statuses of `count` Checks of a new key on the plan, and each allow's X-RateLimit-Remaining. */
async function burst(kg: TestKeygate, ownerId: string, count: number): Promise<{ statuses: number[]; remaining: string[] }> {
  await kg.admin.upsertAccount({ ownerId, plan: "nine" });
  const { secret } = await kg.admin.createKey({ ownerId, name: "burst" });
  const statuses: number[] = [];
  const remaining: string[] = [];
  for (let i = 0; i < count; i++) {
    const answer = await kg.check(checkInit({ "x-api-key": secret }, "/v1/things"));
    statuses.push(checkOutcome(answer).status);
    if (answer.httpResponse.case === "okResponse") {
      remaining.push(answer.httpResponse.value.responseHeadersToAdd.find((h) => h.header?.key === "x-ratelimit-remaining")?.header?.value ?? "none");
    }
  }
  return { statuses, remaining };
}

const FULL_BURST = {
  statuses: [...Array.from({ length: LIMIT }, () => 200), 429],
  remaining: Array.from({ length: LIMIT }, (_, i) => String(LIMIT - 1 - i)),
};

describe("rate limit burst, in-process meter", () => {
  let kg: TestKeygate;
  beforeAll(async () => {
    const clock = new TestClock();
    clock.freeze(T0);
    kg = await startKeygate({ policy: POLICY, clock });
  });
  afterAll(async () => {
    await kg.stop();
  });

  it(`a plan of ${LIMIT} a minute lets ${LIMIT} Checks through at one instant, then 429`, async () => {
    expect(await burst(kg, "exact-memory", LIMIT + 1)).toEqual(FULL_BURST);
  });
});

const redisReady = requireServer("redis-server", redisAvailable(), "apt-get install redis-server");

describe.runIf(redisReady)("rate limit burst, Redis meter", () => {
  let redis: RedisServer;
  let kg: TestKeygate;
  let dataDir: string;
  let clock: TestClock;
  beforeAll(async () => {
    const started = await startRedis();
    if (started === null) throw new Error("redis-server is not on PATH");
    redis = started;
    dataDir = mkdtempSync(join(tmpdir(), "keygate-rate-exact-"));
    clock = new TestClock();
    clock.freeze(T0);
    kg = await startKeygate({ dataDir, policy: POLICY, clock, env: { KEYGATE_REDIS_URL: redis.url } });
  });
  afterAll(async () => {
    await kg?.stop();
    await redis?.stop();
    rmSync(dataDir, { recursive: true, force: true });
  });

  it(`a plan of ${LIMIT} a minute lets ${LIMIT} Checks through at one instant, then 429`, async () => {
    expect(await burst(kg, "exact-redis", LIMIT + 1)).toEqual(FULL_BURST);
  });

  it("reads a bucket time an earlier version wrote (four decimals) as its nearest", async () => {
    const ownerId = "exact-redis-earlier";
    await kg.admin.upsertAccount({ ownerId, plan: "nine" });
    const { secret } = await kg.admin.createKey({ ownerId, name: "earlier" });
    // Three requests' worth of the bucket used, as "%.4f" wrote it: 3 × 6,666.6667 ms ahead.
    const client = new Redis(redis.url);
    try {
      await client.set(`kg:rl:a:${ownerId}`, (Date.parse(T0) + 20_000).toFixed(4), "PX", 60_000);
    } finally {
      client.disconnect();
    }
    const answer = await kg.check(checkInit({ "x-api-key": secret }, "/v1/things"));
    expect(checkOutcome(answer).status).toBe(200);
    expect(answer.httpResponse.case === "okResponse" && answer.httpResponse.value.responseHeadersToAdd.find((h) => h.header?.key === "x-ratelimit-remaining")?.header?.value).toBe(String(LIMIT - 4));
  });
});
