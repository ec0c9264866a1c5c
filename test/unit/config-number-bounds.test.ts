import { describe, expect, it } from "vitest";
import { ConfigError, MAX_AMOUNT, MAX_CACHE_ENTRIES, MAX_CACHE_TTL_SECONDS, MAX_INT32, MAX_ROUTE_COST, loadConfig, parsePolicy } from "../../src/config.js";

// Numbers the policy and the environment took that keygate could not carry out, each refused at
// validation now, naming the field or variable:
// - plan key caps and rate limits past 2^31 - 1: KeyAdmin's Account and RateLimit fields are
//   int32, so every Account answer about such a plan failed INTERNAL over gRPC after the write
//   was made, and a VerifyKey with a cost charged and then answered INTERNAL;
// - credit allowances and quotas near 2^53: ioredis reads Redis's integer replies digit by digit
//   in a double, so the Redis meter's balances came back off by one from the in-process meter's;
// - cache bounds lru-cache cannot allocate: past 2^32 - 1 an unnamed RangeError at start, and
//   from about 10^8 gigabytes allocated up front;
// - listener timeouts under 1 ms: rounded to 0 ms, which Node's HTTP server reads as no timeout.

const BASE = {
  defaultPlan: "basic",
  plans: { basic: { maxActiveKeys: 1, rateLimit: { limit: 1, windowSeconds: 1 } } },
  scopes: { catalog: ["a"], default: ["a"] },
};

/** The message parsePolicy refuses `input` with; fails the test when it is accepted. */
function policyRefusal(input: unknown): string {
  try {
    parsePolicy(input, "KEYGATE_CONFIG (policy.yaml)");
  } catch (error) {
    if (error instanceof ConfigError) return error.message;
    throw error;
  }
  throw new Error("accepted");
}

/** BASE with one plan `p` of these fields beside the base plan's. */
function withPlan(fields: Record<string, unknown>): Record<string, unknown> {
  return { ...BASE, plans: { ...BASE.plans, p: { ...BASE.plans.basic, ...fields } } };
}

const INT32 = `must be at most ${MAX_INT32} (KeyAdmin sends it as a 32-bit integer)`;
const AMOUNT = `must be at most ${MAX_AMOUNT} (10^15)`;

describe("policy numbers KeyAdmin sends as int32.error", () => {
  it.each([
    ["plans.p.maxActiveKeys", withPlan({ maxActiveKeys: MAX_INT32 + 1 })],
    ["plans.p.rateLimit.limit", withPlan({ rateLimit: { limit: MAX_INT32 + 1, windowSeconds: 1 } })],
    ["plans.p.rateLimit.windowSeconds", withPlan({ rateLimit: { limit: 1, windowSeconds: MAX_INT32 + 1 } })],
    ["testMode.maxActiveKeys", { ...BASE, testMode: { maxActiveKeys: MAX_INT32 + 1 } }],
    ["testMode.rateLimit.limit", { ...BASE, testMode: { rateLimit: { limit: MAX_INT32 + 1, windowSeconds: 1 } } }],
    ["limits.roleRateLimits.premium.limit", { ...BASE, limits: { roleRateLimits: { premium: { limit: MAX_INT32 + 1, windowSeconds: 1 } } } }],
  ])("%s past 2^31 - 1 is refused naming it", (field, input) => {
    expect(policyRefusal(input)).toBe(`invalid KEYGATE_CONFIG (policy.yaml): ${field}: ${INT32}`);
  });
});

describe("policy numbers KeyAdmin sends as int32.happy", () => {
  it("2^31 - 1 itself is taken wherever the rate rule's own bound allows it", () => {
    const policy = parsePolicy({
      ...withPlan({ maxActiveKeys: MAX_INT32, rateLimit: { limit: MAX_INT32, windowSeconds: 1 } }),
      testMode: { maxActiveKeys: MAX_INT32, rateLimit: { limit: 1, windowSeconds: MAX_INT32 } },
    });
    expect(policy.plans["p"]).toMatchObject({ maxActiveKeys: MAX_INT32, rateLimit: { limit: MAX_INT32, windowSeconds: 1 } });
    expect(policy.testMode).toMatchObject({ maxActiveKeys: MAX_INT32, rateLimit: { limit: 1, windowSeconds: MAX_INT32 } });
  });
});

describe("credit and quota amounts.error", () => {
  it.each([
    ["plans.p.monthlyCredits", withPlan({ monthlyCredits: MAX_AMOUNT + 1 })],
    ["plans.p.dailyQuota", withPlan({ dailyQuota: MAX_AMOUNT + 1 })],
    ["plans.p.quotas.messages", withPlan({ quotas: { messages: MAX_AMOUNT + 1 } })],
    ["testMode.dailyQuota", { ...BASE, testMode: { dailyQuota: MAX_AMOUNT + 1 } }],
  ])("%s past 10^15 is refused naming it", (field, input) => {
    expect(policyRefusal(input)).toBe(`invalid KEYGATE_CONFIG (policy.yaml): ${field}: ${AMOUNT}`);
  });

  it("an allowance of 2^53 - 1, an 'unlimited' an operator may write, is refused", () => {
    expect(policyRefusal(withPlan({ monthlyCredits: Number.MAX_SAFE_INTEGER }))).toBe(`invalid KEYGATE_CONFIG (policy.yaml): plans.p.monthlyCredits: ${AMOUNT}`);
  });

  it("a route cost past 10^9 (ChargeUsage's largest) is refused naming it", () => {
    expect(policyRefusal({ ...BASE, routes: [{ pathPrefix: "/x", cost: MAX_ROUTE_COST + 1 }] })).toBe(
      `invalid KEYGATE_CONFIG (policy.yaml): routes.0.cost: must be at most ${MAX_ROUTE_COST} (10^9), as a ChargeUsage cost`,
    );
  });
});

describe("credit and quota amounts.happy", () => {
  it("10^15 and a cost of 10^9 are taken", () => {
    const policy = parsePolicy({
      ...withPlan({ monthlyCredits: MAX_AMOUNT, dailyQuota: MAX_AMOUNT, quotas: { messages: MAX_AMOUNT } }),
      testMode: { dailyQuota: MAX_AMOUNT },
      routes: [{ pathPrefix: "/x", cost: MAX_ROUTE_COST }],
    });
    expect(policy.plans["p"]).toMatchObject({ monthlyCredits: MAX_AMOUNT, dailyQuota: MAX_AMOUNT, quotas: { messages: MAX_AMOUNT } });
    expect([policy.testMode.dailyQuota, policy.routes[0]?.cost]).toEqual([MAX_AMOUNT, MAX_ROUTE_COST]);
  });
});

describe("cache bounds", () => {
  it.each(["maxEntries", "negativeMaxEntries"])("cache.%s past 10^7 is refused naming it; 10^7 is taken", (field) => {
    for (const entries of [MAX_CACHE_ENTRIES + 1, 5_000_000_000]) {
      expect(policyRefusal({ ...BASE, cache: { [field]: entries } })).toBe(
        `invalid KEYGATE_CONFIG (policy.yaml): cache.${field}: must be at most ${MAX_CACHE_ENTRIES} (the cache allocates its table for the whole bound at start)`,
      );
    }
    expect(parsePolicy({ ...BASE, cache: { [field]: MAX_CACHE_ENTRIES } }).cache).toMatchObject({ [field]: MAX_CACHE_ENTRIES });
  });

  // Redis refuses an expiry past its range (1e20 s failed every L2 fill), and a lifetime past a
  // year bounds no revocation.
  it.each(["ttlSeconds", "negativeTtlSeconds"])("cache.%s past a year is refused naming it; a year is taken", (field) => {
    for (const seconds of [MAX_CACHE_TTL_SECONDS + 1, 1e20]) {
      expect(policyRefusal({ ...BASE, cache: { [field]: seconds } })).toBe(`invalid KEYGATE_CONFIG (policy.yaml): cache.${field}: must be at most ${MAX_CACHE_TTL_SECONDS} (a year)`);
    }
    expect(parsePolicy({ ...BASE, cache: { [field]: MAX_CACHE_TTL_SECONDS } }).cache).toMatchObject({ [field]: MAX_CACHE_TTL_SECONDS });
  });
});

const TIMEOUTS = [
  ["KEYGATE_HEADERS_TIMEOUT_SECONDS", "headersTimeoutMs"],
  ["KEYGATE_REQUEST_TIMEOUT_SECONDS", "requestTimeoutMs"],
  ["KEYGATE_IDLE_TIMEOUT_SECONDS", "idleTimeoutMs"],
] as const;

describe("listener timeouts under 1 ms", () => {
  it.each(TIMEOUTS)("%s=0.0004 (0 ms once rounded) is refused naming it; 0.001 is 1 ms", (name, field) => {
    // The headers timeout may not exceed the request timeout: the others keep theirs above it.
    const others = name === "KEYGATE_HEADERS_TIMEOUT_SECONDS" ? {} : { KEYGATE_HEADERS_TIMEOUT_SECONDS: "0.001" };
    let message = "accepted";
    try {
      loadConfig({ ...others, [name]: "0.0004" });
    } catch (error) {
      message = error instanceof ConfigError ? error.message : String(error);
    }
    expect(message).toBe(`invalid environment: ${name}: must be at least 0.001 (1 ms); a timeout of 0 ms is no timeout`);
    expect(loadConfig({ ...others, [name]: "0.001" }).listeners[field]).toBe(1);
  });
});
