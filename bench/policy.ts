import { writeFileSync } from "node:fs";
import { stringify } from "yaml";
import { parsePolicy } from "../src/config.js";
import type { Policy } from "../src/config.js";

/** The plan of accounts whose keys drive hot, cold and flood: limits that never refuse. */
export const UNLIMITED_PLAN = "unlimited";
/** The plan of the mixed scenario's accounts: the built-in business plan's realistic rate limit. */
export const METERED_PLAN = "metered";
/** The L1 bounds every benchmarked keygate runs with. */
export const BENCH_CACHE = {
  // The default bound, stated in the results.
  maxEntries: 100_000,
  // Longer than the default 30 s so that "hot" stays all-cached across its warm-up and both runs.
  ttlSeconds: 600,
  negativeMaxEntries: 100_000,
  negativeTtlSeconds: 5,
} as const;

/** The policy the bench runs keygate with; `maxActiveKeys` must admit every seeded key of an account. */
export function benchPolicyInput(maxActiveKeys: number): Record<string, unknown> {
  return {
    defaultPlan: UNLIMITED_PLAN,
    plans: {
      [UNLIMITED_PLAN]: { maxActiveKeys, rateLimit: { limit: 1_000_000_000, windowSeconds: 60 }, dailyQuota: null, monthlyCredits: null },
      [METERED_PLAN]: { maxActiveKeys, rateLimit: { limit: 1000, windowSeconds: 60 }, dailyQuota: null, monthlyCredits: null },
    },
    scopes: { catalog: ["read", "write"], default: ["read"] },
    // One real scope requirement, so the scope step does work on every allowed Check.
    routes: [{ method: "*", pathPrefix: "/v1", requiredScopes: ["read"] }],
    cache: { ...BENCH_CACHE },
  };
}

/** Validates the bench policy with keygate's own schema and writes it as YAML. */
export function writeBenchPolicy(path: string, maxActiveKeys: number): Policy {
  const input = benchPolicyInput(maxActiveKeys);
  const policy = parsePolicy(input, "bench policy");
  writeFileSync(path, stringify(input));
  return policy;
}
