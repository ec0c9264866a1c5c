import { describe, expect, it } from "vitest";
import { DEFAULT_POLICY_INPUT, parsePolicy } from "../../src/config.js";

// A field of the policy keygate does not know is refused, naming it: dropped, a misspelled
// requirement would be gone, and the route it was meant to guard would require nothing.

const ADMIN = { method: "*", pathPrefix: "/v1/admin" } as const;

describe("policy fields keygate does not know are refused, not dropped", () => {
  it("a misspelled route requirement (requiredScope, minrole) is an error naming it", () => {
    expect(() => parsePolicy({ ...DEFAULT_POLICY_INPUT, routes: [{ ...ADMIN, requiredScope: ["admin"] }] })).toThrow(/requiredScope/);
    expect(() => parsePolicy({ ...DEFAULT_POLICY_INPUT, routes: [{ ...ADMIN, minrole: "admin" }] })).toThrow(/minrole/);
  });

  it("a misspelled top-level section (route: instead of routes:) is an error naming it", () => {
    expect(() => parsePolicy({ ...DEFAULT_POLICY_INPUT, route: [{ ...ADMIN, requiredScopes: ["admin"] }] })).toThrow(/route/);
  });

  it("a misspelled plan limit (dailyquota) is an error, not an unlimited plan", () => {
    const plans = { ...DEFAULT_POLICY_INPUT.plans, basic: { ...DEFAULT_POLICY_INPUT.plans.basic, dailyQuota: undefined, dailyquota: 100 } };
    expect(() => parsePolicy({ ...DEFAULT_POLICY_INPUT, plans })).toThrow(/dailyquota/);
  });

  it("a route method that no request can carry (GTE, 'GET,POST') is an error, not a route that never matches", () => {
    expect(() => parsePolicy({ ...DEFAULT_POLICY_INPUT, routes: [{ ...ADMIN, method: "GET,POST", requiredScopes: ["admin"] }] })).toThrow(/method/);
  });
});
