import { resolve } from "node:path";
import { describe, expect, it } from "vitest";
import { ConfigError, loadConfig, loadPolicyFile, parsePolicy } from "../../src/config.js";

describe("config", () => {
  it("has working defaults with no environment", () => {
    const config = loadConfig({});
    expect(config).toMatchObject({ dataDir: "./data", keyPrefix: "kg", host: "0.0.0.0", grpcPort: 9191, httpAuthzPort: 8181, adminPort: 8080, gcThreadNice: 0 });
    expect(config.policy.plans["basic"]?.maxActiveKeys).toBe(1);
    expect(config.policy.plans["pro"]?.rateLimit.limit).toBe(500);
    expect(config.policy.plans["business"]?.maxActiveKeys).toBe(5);
  });

  it("names the variable that is wrong", () => {
    expect(() => loadConfig({ KEYGATE_ADMIN_PORT: "99999" })).toThrow(/KEYGATE_ADMIN_PORT/);
    expect(() => loadConfig({ KEYGATE_PEPPER: "short" })).toThrow(/KEYGATE_PEPPER: must be at least 32 characters/);
    expect(() => loadConfig({ KEYGATE_KEY_PREFIX: "KG" })).toThrow(/KEYGATE_KEY_PREFIX/);
    expect(() => loadConfig({ KEYGATE_CHECK_BUDGET_MS: "5" })).toThrow(/KEYGATE_CHECK_BUDGET_MS/);
    expect(() => loadConfig({ KEYGATE_CHECK_BUDGET_MS: "fast" })).toThrow(/KEYGATE_CHECK_BUDGET_MS/);
    for (const nice of ["20", "-1", "1.5", "low"]) {
      expect(() => loadConfig({ KEYGATE_GC_THREAD_NICE: nice })).toThrow(/KEYGATE_GC_THREAD_NICE: must be a whole number from 0 to 19/);
    }
    expect(loadConfig({ KEYGATE_GC_THREAD_NICE: "0" }).gcThreadNice).toBe(0);
    expect(loadConfig({ KEYGATE_GC_THREAD_NICE: "10" }).gcThreadNice).toBe(10);
    expect(() => loadConfig({ KEYGATE_ADMIN_TOKENS: "tooshort" })).toThrow(/KEYGATE_ADMIN_TOKENS/);
    expect(() => loadConfig({ KEYGATE_CONFIG: "/nonexistent.yaml" })).toThrow(ConfigError);
  });

  it("loads the shipped example policy", () => {
    const policy = loadPolicyFile(resolve(import.meta.dirname, "../../deploy/config/keygate.example.yaml"));
    expect(policy.routes).toHaveLength(4);
    expect(policy.routeMatching).toEqual({ caseInsensitive: false });
    expect(policy.scopes.default).toEqual(["read"]);
  });

  it("names the policy field that is wrong", () => {
    const base = { plans: { basic: { maxActiveKeys: 1, rateLimit: { limit: 1, windowSeconds: 1 } } }, scopes: { catalog: ["a"], default: ["a"] } };
    expect(parsePolicy(base).defaultPlan).toBe("basic");
    expect(() => parsePolicy({ ...base, defaultPlan: "gold" })).toThrow(/defaultPlan: unknown plan "gold"/);
    expect(() => parsePolicy({ ...base, scopes: { catalog: ["a"], default: ["b"] } })).toThrow(/scopes.default.0: "b" is not in scopes.catalog/);
    expect(() => parsePolicy({ ...base, routes: [{ pathPrefix: "/x", requiredScopes: ["zz"] }] })).toThrow(/routes.0.requiredScopes.0/);
  });

  it("caps the flush intervals at one day, below where Node timers overflow and fire every 1 ms", () => {
    const base = { plans: { basic: { maxActiveKeys: 1, rateLimit: { limit: 1, windowSeconds: 1 } } }, scopes: { catalog: ["a"], default: ["a"] } };
    const overflow = 2_147_484; // seconds: just past 2^31 - 1 ms
    expect(parsePolicy({ ...base, lastUsedFlushSeconds: 86_400, limits: { usageFlushSeconds: 86_400 } })).toMatchObject({
      lastUsedFlushSeconds: 86_400,
      limits: { usageFlushSeconds: 86_400 },
    });
    for (const seconds of [86_401, overflow]) {
      expect(() => parsePolicy({ ...base, lastUsedFlushSeconds: seconds })).toThrow(/lastUsedFlushSeconds: must be at most 86400 \(one day\); it is in seconds/);
      expect(() => parsePolicy({ ...base, limits: { usageFlushSeconds: seconds } })).toThrow(/limits.usageFlushSeconds: must be at most 86400 \(one day\); it is in seconds/);
    }
    expect(() => parsePolicy({ ...base, lastUsedFlushSeconds: 0 })).toThrow(/lastUsedFlushSeconds/);
  });

  it("keeps last use to the minute unless told otherwise: whole seconds from 0 (every use) to one day", () => {
    const base = { plans: { basic: { maxActiveKeys: 1, rateLimit: { limit: 1, windowSeconds: 1 } } }, scopes: { catalog: ["a"], default: ["a"] } };
    expect(parsePolicy(base).lastUsedResolutionSeconds).toBe(60);
    expect(parsePolicy({ ...base, lastUsedResolutionSeconds: 0 }).lastUsedResolutionSeconds).toBe(0);
    expect(parsePolicy({ ...base, lastUsedResolutionSeconds: 86_400 }).lastUsedResolutionSeconds).toBe(86_400);
    expect(() => parsePolicy({ ...base, lastUsedResolutionSeconds: 86_401 })).toThrow(/lastUsedResolutionSeconds: must be at most 86400 \(one day\); it is in seconds/);
    expect(() => parsePolicy({ ...base, lastUsedResolutionSeconds: -1 })).toThrow(/lastUsedResolutionSeconds/);
    expect(() => parsePolicy({ ...base, lastUsedResolutionSeconds: 1.5 })).toThrow(/lastUsedResolutionSeconds/);
    expect(() => parsePolicy({ ...base, lastUsedResolutionSeconds: "60" })).toThrow(/lastUsedResolutionSeconds/);
  });
});
