import { DEFAULT_POLICY_INPUT } from "../../src/config.js";

/** Plans with small numbers, so tests can reach every limit. */
export const LIMITS_POLICY = {
  ...DEFAULT_POLICY_INPUT,
  defaultPlan: "small",
  plans: {
    small: { maxActiveKeys: 5, rateLimit: { limit: 10, windowSeconds: 60 }, dailyQuota: null, monthlyCredits: null },
    quota: { maxActiveKeys: 5, rateLimit: { limit: 100, windowSeconds: 60 }, dailyQuota: 5, monthlyCredits: null },
    metered: { maxActiveKeys: 5, rateLimit: { limit: 100, windowSeconds: 60 }, dailyQuota: null, monthlyCredits: 3 },
    // Refills one request every 15 minutes, so tests on a real clock hit 429 deterministically.
    hourly: { maxActiveKeys: 5, rateLimit: { limit: 4, windowSeconds: 3600 }, dailyQuota: null, monthlyCredits: null },
  },
  scopes: { catalog: ["read", "write"], default: ["read"] },
  routes: [
    { method: "*", pathPrefix: "/write", requiredScopes: ["write"] },
    { method: "*", pathPrefix: "/expensive", cost: 2 },
    { method: "*", pathPrefix: "/free", cost: 0 },
  ],
  limits: { roleRateLimits: { admin: { limit: 20, windowSeconds: 60 } } },
};

/**
 * One metered plan of 10 credits and a `/v1/scrape` route costing 1: a balance two keygates on
 * one data directory must not both spend.
 */
export const TEN_CREDITS_POLICY = {
  defaultPlan: "metered",
  plans: { metered: { maxActiveKeys: 5, rateLimit: { limit: 100000, windowSeconds: 60 }, dailyQuota: null, monthlyCredits: 10 } },
  scopes: { catalog: ["scrape"], default: ["scrape"] },
  routes: [{ method: "*", pathPrefix: "/v1/scrape", requiredScopes: ["scrape"], cost: 1 }],
};
