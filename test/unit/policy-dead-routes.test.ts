import { describe, expect, it } from "vitest";
import { ConfigError, DEFAULT_POLICY_INPUT, parsePolicy } from "../../src/config.js";

// At equal prefixes the route listed first wins. A route that can therefore never match (its
// scopes, role and cost never applied: a POST route after a "*" one charged 1 credit with the
// "read" scope where it said 10 with "crawl"), and a quota or cost on an unmetered route (both
// ignored), used to load without a word; they are refused, naming the route.

const BASE = {
  ...DEFAULT_POLICY_INPUT,
  plans: { ...DEFAULT_POLICY_INPUT.plans, basic: { ...DEFAULT_POLICY_INPUT.plans.basic, monthlyCredits: 100, quotas: { messages: 5 } } },
  scopes: { catalog: ["read", "crawl"], default: ["read"] },
};

function refusal(routes: unknown[], extra: Record<string, unknown> = {}): string {
  try {
    parsePolicy({ ...BASE, ...extra, routes });
  } catch (error) {
    expect(error).toBeInstanceOf(ConfigError);
    return (error as Error).message;
  }
  return "loaded";
}

describe("routes that can never match", () => {
  it("a POST route after a \"*\" route with the same prefix is refused, naming both", () => {
    const message = refusal([
      { method: "*", pathPrefix: "/v1/crawl", requiredScopes: ["read"], cost: 1 },
      { method: "POST", pathPrefix: "/v1/crawl", requiredScopes: ["crawl"], cost: 10 },
    ]);
    expect(message).toContain("routes.1");
    expect(message).toContain("never matches: routes.0 (* /v1/crawl) comes first for the same path prefix and method POST");
  });

  it("the same prefix twice, once with a trailing slash, is refused", () => {
    expect(refusal([
      { method: "*", pathPrefix: "/v1/crawl", cost: 1 },
      { method: "*", pathPrefix: "/v1/crawl/", requiredScopes: ["crawl"], cost: 10 },
    ])).toContain("never matches: routes.0 (* /v1/crawl)");
  });

  it("the same method twice at one prefix is refused", () => {
    expect(refusal([
      { method: "GET", pathPrefix: "/v1/a" },
      { method: "get", pathPrefix: "/v1/a", cost: 5 },
    ])).toContain("never matches: routes.0 (GET /v1/a)");
  });

  it("prefixes differing in letter case only are one prefix when matching ignores case", () => {
    const routes = [
      { method: "*", pathPrefix: "/v1/Crawl" },
      { method: "*", pathPrefix: "/v1/crawl", requiredScopes: ["crawl"] },
    ];
    expect(refusal(routes, { routeMatching: { caseInsensitive: true } })).toContain("never matches: routes.0 (* /v1/Crawl)");
    expect(refusal(routes)).toBe("loaded");
  });

  it("routes that can each match load: a method before \"*\", different methods, HEAD beside GET, different prefixes", () => {
    expect(refusal([
      { method: "POST", pathPrefix: "/v1/crawl", requiredScopes: ["crawl"], cost: 10 },
      { method: "GET", pathPrefix: "/v1/crawl" },
      { method: "HEAD", pathPrefix: "/v1/a", cost: 0 },
      { method: "GET", pathPrefix: "/v1/a" },
      // HEAD after GET is judged as GET (the shipped example lists both): it loads.
      { method: "GET", pathPrefix: "/v1/b" },
      { method: "HEAD", pathPrefix: "/v1/b" },
      { method: "*", pathPrefix: "/v1/crawl" },
      { method: "*", pathPrefix: "/v1/crawler" },
      { method: "*", pathPrefix: "/" },
    ])).toBe("loaded");
  });
});

describe("unmetered routes", () => {
  it("a quota on an unmetered route is refused", () => {
    expect(refusal([{ method: "*", pathPrefix: "/v1/chat", metered: false, quota: "messages" }])).toContain(
      "routes.0.quota: an unmetered route counts toward no quota; remove quota or set metered: true",
    );
  });

  it("a cost above 1 on an unmetered route is refused; 0 and the default load", () => {
    expect(refusal([{ method: "*", pathPrefix: "/v1/health", metered: false, cost: 10 }])).toContain(
      "routes.0.cost: an unmetered route spends no credits; remove cost or set metered: true",
    );
    expect(refusal([{ method: "*", pathPrefix: "/v1/health", metered: false, cost: 0 }, { method: "*", pathPrefix: "/v1/ping", metered: false }])).toBe("loaded");
  });
});
