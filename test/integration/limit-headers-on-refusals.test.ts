import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { DEFAULT_POLICY_INPUT } from "../../src/config.js";
import { TestClock } from "../harness/clock.js";
import { httpCheck, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { requireServer } from "../harness/ports.js";
import { redisAvailable, startRedis } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";

// README, "Plans, rate limits, quotas, credits and usage", Headers: every answer about a known key
// (allow, 429, 402, and the 401/403 refusals before the limits step) says where the caller stands:
// the rate bucket, a "day" entry when a daily quota applies, and X-Credits-Remaining on metered
// plans. A 429 and a 402 QUOTA_EXCEEDED must carry the quota and balance as they stand (charging
// nothing), as a 403 of the same key at the same instant does. Both meters.

const POLICY = {
  ...DEFAULT_POLICY_INPUT,
  defaultPlan: "both",
  plans: { both: { maxActiveKeys: 5, rateLimit: { limit: 2, windowSeconds: 60 }, dailyQuota: 3, monthlyCredits: 100 } },
  scopes: { catalog: ["read", "write"], default: ["read"] },
  routes: [{ method: "*", pathPrefix: "/write", requiredScopes: ["write"] }],
};

/** The limit headers of an answer, and its status. */
async function limitsOf(kg: TestKeygate, secret: string, path = "/check/v1/x") {
  const answer = await httpCheck(kg.ports.http, path, { "x-api-key": secret });
  const h = answer.headers;
  return { status: answer.status, policy: h.get("ratelimit-policy"), ratelimit: h.get("ratelimit"), credits: h.get("x-credits-remaining") };
}

const FULL_POLICY = '"minute";q=2;w=60, "day";q=3;w=86400';

function refusalHeaderCases(start: () => Promise<TestKeygate>): void {
  let kg: TestKeygate;
  beforeAll(async () => {
    kg = await start();
  });
  afterAll(async () => kg?.stop());

  it("a 429 carries the day's quota and the balance, as a 403 at the same instant does; a 402 for the quota carries the balance", async () => {
    const { secret } = await kg.admin.createKey({ ownerId: `headers-${kg.ports.http}`, name: "k" });
    expect(await limitsOf(kg, secret)).toEqual({ status: 200, policy: FULL_POLICY, ratelimit: '"minute";r=1;t=30, "day";r=2;t=43200', credits: "99" });
    expect(await limitsOf(kg, secret)).toEqual({ status: 200, policy: FULL_POLICY, ratelimit: '"minute";r=0;t=60, "day";r=1;t=43200', credits: "98" });
    expect(await limitsOf(kg, secret, "/check/write")).toEqual({ status: 403, policy: FULL_POLICY, ratelimit: '"minute";r=0;t=60, "day";r=1;t=43200', credits: "98" });
    expect(await limitsOf(kg, secret)).toEqual({ status: 429, policy: FULL_POLICY, ratelimit: '"minute";r=0;t=60, "day";r=1;t=43200', credits: "98" });
    // One interval (60 s / 2) later the bucket has room for one: the quota's last request.
    kg.clock.advanceMs(30_000);
    expect(await limitsOf(kg, secret)).toEqual({ status: 200, policy: FULL_POLICY, ratelimit: '"minute";r=0;t=60, "day";r=0;t=43170', credits: "97" });
    kg.clock.advanceMs(30_000);
    expect(await limitsOf(kg, secret)).toEqual({ status: 402, policy: FULL_POLICY, ratelimit: '"minute";r=1;t=30, "day";r=0;t=43140', credits: "97" });
  });
}

function startedClock(): TestClock {
  const clock = new TestClock();
  clock.freeze("2026-12-03T12:00:00.000Z");
  return clock;
}

describe("limit headers on refusals, in-process meter", () => {
  refusalHeaderCases(() => startKeygate({ policy: POLICY, clock: startedClock() }));
});

const redisReady = requireServer("redis-server", redisAvailable(), "apt-get install redis-server");

describe.runIf(redisReady)("limit headers on refusals, Redis meter", () => {
  let redis: RedisServer;
  afterAll(async () => redis?.stop());
  refusalHeaderCases(async () => {
    const started = await startRedis();
    if (started === null) throw new Error("redis-server is not on PATH");
    redis = started;
    return startKeygate({ policy: POLICY, clock: startedClock(), env: { KEYGATE_REDIS_URL: redis.url } });
  });
});
