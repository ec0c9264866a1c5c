import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { shippedProxies, startEchoUpstream } from "../harness/proxies.js";
import type { EchoedRequest, RunningProxy } from "../harness/proxies.js";
import type { HttpAuthzProxy } from "../../src/config.js";
import { DEFAULT_POLICY_INPUT } from "../../src/config.js";

const PROXY_POLICY = {
  ...DEFAULT_POLICY_INPUT,
  defaultPlan: "standard",
  plans: {
    standard: { maxActiveKeys: 10, rateLimit: { limit: 100, windowSeconds: 60 }, dailyQuota: null, monthlyCredits: null },
    tiny: { maxActiveKeys: 10, rateLimit: { limit: 2, windowSeconds: 60 }, dailyQuota: null, monthlyCredits: null },
    quota: { maxActiveKeys: 10, rateLimit: { limit: 100, windowSeconds: 60 }, dailyQuota: 1, quotas: { exports: 1 }, monthlyCredits: null },
  },
  scopes: { catalog: ["read", "decks"], default: ["read"] },
  routes: [
    { method: "*", pathPrefix: "/v1/decks", requiredScopes: ["decks"] },
    { method: "*", pathPrefix: "/projects/{project}" },
    { method: "*", pathPrefix: "/v1/free", metered: false },
    { method: "*", pathPrefix: "/v1/admin", minRole: "admin" },
    { method: "*", pathPrefix: "/v1/export", quota: "exports" },
  ],
  testMode: { dailyQuota: 1 },
};

/** How each shipped config treats a client-sent x-keygate-* header keygate never sets. */
type UnknownIdentityHeaders = "dropped" | "passed (documented nginx limitation)";

const UNKNOWN_IDENTITY_HEADERS: Readonly<Record<"nginx" | "caddy", UnknownIdentityHeaders>> = {
  nginx: "passed (documented nginx limitation)",
  caddy: "dropped",
};

// Each proxy runs in front of a keygate set for it (KEYGATE_HTTP_AUTHZ_PROXY).
const proxies: Array<[string, boolean, (keygatePort: number, upstreamPort: number) => Promise<RunningProxy>, UnknownIdentityHeaders, HttpAuthzProxy]> = shippedProxies().map(
  (p) => [p.name, p.available, p.start, UNKNOWN_IDENTITY_HEADERS[p.name], p.setting],
);

/** A client's forged value for every identity header keygate sets. */
const SPOOFED_IDENTITY = {
  "x-keygate-key-id": "evil-key",
  "x-keygate-owner-id": "evil",
  "x-keygate-project-id": "evil-project",
  "x-keygate-scopes": "admin",
  "x-keygate-plan": "enterprise",
  "x-keygate-role": "admin",
  "x-keygate-mode": "live-evil",
} as const;

// A frozen instant, so Retry-After is exact: 12:00 UTC is 43200 s before the daily quota resets.
const FROZEN_AT = "2026-03-10T12:00:00.000Z";

interface ErrorBody {
  success: boolean;
  error: { code: string; message: string; statusCode: number };
}

describe.each(proxies)("behind %s (the shipped config)", (_name, available, start, unknownIdentityHeaders, httpAuthzProxy) => {
  let kg: TestKeygate;
  let upstream: { port: number; stop(): Promise<void> };
  let proxy: RunningProxy;
  let seq = 0;

  beforeAll(async () => {
    if (!available) return;
    kg = await startKeygate({ policy: PROXY_POLICY, httpAuthzProxy });
    upstream = await startEchoUpstream();
    proxy = await start(kg.ports.http, upstream.port);
  });
  afterAll(async () => {
    if (!available) return;
    await proxy?.stop();
    await upstream?.stop();
    await kg?.stop();
  });

  async function issue(plan = "standard", scopes: string[] = [], projectId = ""): Promise<{ ownerId: string; id: string; secret: string }> {
    const ownerId = `proxy-${_name}-${++seq}`;
    await kg.admin.upsertAccount({ ownerId, plan });
    const created = await kg.admin.createKey({ ownerId, name: "proxy", scopes, projectId });
    return { ownerId, id: created.key?.id ?? "", secret: created.secret };
  }

  const call = async (path: string, headers: Record<string, string>) => {
    const res = await fetch(`http://127.0.0.1:${proxy.port}${path}`, { headers });
    return { status: res.status, headers: res.headers, text: await res.text() };
  };

  it.runIf(available)("an allowed request reaches the upstream with identity headers and without the key", async () => {
    const key = await issue();
    const res = await call("/v1/things?x=1", { authorization: `Bearer ${key.secret}` });
    expect(res.status).toBe(200);
    const seen = JSON.parse(res.text) as EchoedRequest;
    expect(seen.url).toBe("/v1/things?x=1");
    expect(seen.headers["x-keygate-key-id"]).toBe(key.id);
    expect(seen.headers["x-keygate-owner-id"]).toBe(key.ownerId);
    expect(seen.headers["x-keygate-scopes"]).toBe("read");
    expect(seen.headers["x-keygate-plan"]).toBe("standard");
    expect(seen.headers["x-keygate-role"]).toBe("standard");
    expect(seen.headers["x-keygate-mode"]).toBe("live");
    expect(seen.headers["authorization"]).toBeUndefined();
    expect(seen.headers["x-api-key"]).toBeUndefined();
    const viaApiKey = JSON.parse((await call("/v1/things", { "x-api-key": key.secret })).text) as EchoedRequest;
    expect(viaApiKey.headers["x-api-key"]).toBeUndefined();
    expect(viaApiKey.headers["x-keygate-key-id"]).toBe(key.id);
  });

  it.runIf(available)("every client-sent identity header is replaced by keygate's value or dropped", async () => {
    for (const projectId of ["proj-1", ""]) {
      const key = await issue("standard", [], projectId);
      const res = await call("/v1/things", { "x-api-key": key.secret, ...SPOOFED_IDENTITY });
      expect(res.status).toBe(200);
      const seen = JSON.parse(res.text) as EchoedRequest;
      expect(seen.headers["x-keygate-key-id"]).toBe(key.id);
      expect(seen.headers["x-keygate-owner-id"]).toBe(key.ownerId);
      // Unlocked key: no project id, or an empty one (Caddy copies the header keygate always sends).
      expect(seen.headers["x-keygate-project-id"] ?? "").toBe(projectId);
      expect(seen.headers["x-keygate-scopes"]).toBe("read");
      expect(seen.headers["x-keygate-plan"]).toBe("standard");
      expect(seen.headers["x-keygate-role"]).toBe("standard");
      expect(seen.headers["x-keygate-mode"]).toBe("live");
    }
  });

  it.runIf(available)("a key locked to a project reaches that project's paths only; the project comes from the path", async () => {
    const locked = await issue("standard", [], "proj_a");
    const own = await call("/projects/proj_a/jobs?page=2", { "x-api-key": locked.secret });
    expect(own.status).toBe(200);
    expect((JSON.parse(own.text) as EchoedRequest).headers["x-keygate-project-id"]).toBe("proj_a");
    const other = await call("/projects/proj_b/jobs", { "x-api-key": locked.secret });
    expect(other.status).toBe(403);
    expect((JSON.parse(other.text) as ErrorBody).error).toMatchObject({ code: "FORBIDDEN", message: "This API key is locked to another project." });
    // The same project spelled with an escape is the same project; a path that dot-segments or
    // escapes a slash into another project is refused before anything is looked up.
    expect((await call("/projects/proj%5Fa/jobs", { "x-api-key": locked.secret })).status).toBe(200);
    expect((await call("/projects/proj_a%2F..%2Fproj_b/jobs", { "x-api-key": locked.secret })).status).toBe(400);
    const unlocked = await issue();
    expect((await call("/projects/proj_b/jobs", { "x-api-key": unlocked.secret })).status).toBe(200);
  });

  it.runIf(available)(`a client-sent x-keygate-* header keygate never sets is ${unknownIdentityHeaders}`, async () => {
    const key = await issue();
    const res = await call("/v1/things", { "x-api-key": key.secret, "x-keygate-tenant": "evil", "X-KEYGATE-TIER": "gold" });
    expect(res.status).toBe(200);
    const seen = JSON.parse(res.text) as EchoedRequest;
    if (unknownIdentityHeaders === "dropped") {
      expect(Object.keys(seen.headers).filter((name) => name.startsWith("x-keygate-")).sort()).toEqual(
        Object.keys(SPOOFED_IDENTITY).sort(),
      );
    } else {
      // nginx cannot remove request headers by prefix; keygate.conf.template and the README say
      // so. If this starts failing, nginx drops them now: update both.
      expect(seen.headers["x-keygate-tenant"]).toBe("evil");
      expect(seen.headers["x-keygate-tier"]).toBe("gold");
    }
  });

  it.runIf(available)("an underscore spelling of an identity header never reaches the upstream", async () => {
    const key = await issue();
    const res = await call("/v1/things", { "x-api-key": key.secret, x_keygate_owner_id: "evil", x_keygate_tenant: "evil" });
    expect(res.status).toBe(200);
    const seen = JSON.parse(res.text) as EchoedRequest;
    expect(Object.keys(seen.headers).filter((name) => /^x.keygate/i.test(name) && name.includes("_"))).toEqual([]);
    expect(seen.headers["x-keygate-owner-id"]).toBe(key.ownerId);
  });

  it.runIf(available)("rate-limit headers reach the client", async () => {
    const key = await issue();
    const res = await call("/v1/things", { "x-api-key": key.secret });
    expect(res.status).toBe(200);
    expect(res.headers.get("x-ratelimit-limit")).toBe("100");
    expect(res.headers.get("x-ratelimit-remaining")).toBe("99");
    expect(res.headers.get("ratelimit-policy")).toBe('"minute";q=100;w=60');
    expect(res.headers.get("ratelimit")).toBe('"minute";r=99;t=1');
    expect(res.headers.get("x-credits-remaining")).toBeNull();
  });

  it.runIf(available)("an unmetered route stays open past the daily quota, which metered routes use up", async () => {
    const key = await issue("quota");
    kg.clock.freeze(FROZEN_AT);
    try {
      for (let i = 0; i < 3; i++) expect((await call("/v1/free/decks", { "x-api-key": key.secret })).status).toBe(200);
      expect((await call("/v1/things", { "x-api-key": key.secret })).status).toBe(200);
      const exceeded = await call("/v1/things", { "x-api-key": key.secret });
      expect([exceeded.status, (JSON.parse(exceeded.text) as ErrorBody).error.code]).toEqual([402, "QUOTA_EXCEEDED"]);
      expect((await call("/v1/free/decks", { "x-api-key": key.secret })).status).toBe(200);
    } finally {
      kg.clock.unfreeze();
    }
  });

  it.runIf(available)("a route's lowest role: 403 naming the role below it, the role reaches the upstream above it", async () => {
    const standard = await issue();
    const refused = await call("/v1/admin/users", { "x-api-key": standard.secret });
    expect(refused.status).toBe(403);
    expect((JSON.parse(refused.text) as ErrorBody).error.message).toBe('This route needs the "admin" role; the API key\'s account has "standard".');
    const admin = await issue();
    await kg.admin.upsertAccount({ ownerId: admin.ownerId, role: "admin" });
    const allowed = await call("/v1/admin/users", { "x-api-key": admin.secret, "x-keygate-role": "standard" });
    expect(allowed.status).toBe(200);
    expect((JSON.parse(allowed.text) as EchoedRequest).headers["x-keygate-role"]).toBe("admin");
  });

  it.runIf(available)("a named quota runs out on its own routes, named in the 402, and leaves the plan's daily quota whole", async () => {
    const key = await issue("quota");
    kg.clock.freeze(FROZEN_AT);
    try {
      expect((await call("/v1/export/csv", { "x-api-key": key.secret })).status).toBe(200);
      const exceeded = await call("/v1/export/csv", { "x-api-key": key.secret });
      expect(exceeded.status).toBe(402);
      expect((JSON.parse(exceeded.text) as ErrorBody).error.message).toBe('The daily "exports" quota of 1 is used up. It resets at 2026-03-11T00:00:00.000Z.');
      expect((await call("/v1/things", { "x-api-key": key.secret })).status).toBe(200);
    } finally {
      kg.clock.unfreeze();
    }
  });

  it.runIf(available)("a test-mode key has its own daily quota and leaves the live one whole", async () => {
    const ownerId = `proxy-${_name}-${++seq}`;
    await kg.admin.upsertAccount({ ownerId, plan: "quota" });
    const test = (await kg.admin.createKey({ ownerId, name: "test", mode: "test" })).secret;
    const live = (await kg.admin.createKey({ ownerId, name: "live" })).secret;
    kg.clock.freeze(FROZEN_AT);
    try {
      expect((await call("/v1/things", { "x-api-key": test })).status).toBe(200);
      expect((await call("/v1/things", { "x-api-key": test })).status).toBe(402);
      const liveAnswer = await call("/v1/things", { "x-api-key": live });
      expect(liveAnswer.status).toBe(200);
      expect((JSON.parse(liveAnswer.text) as EchoedRequest).headers["x-keygate-mode"]).toBe("live");
    } finally {
      kg.clock.unfreeze();
    }
  });

  it.runIf(available)("401 with keygate's JSON body and WWW-Authenticate", async () => {
    const res = await call("/v1/things", {});
    expect(res.status).toBe(401);
    expect(res.headers.get("content-type")).toBe("application/json");
    expect(res.headers.get("www-authenticate")).toBe("Bearer");
    const body = JSON.parse(res.text) as ErrorBody;
    expect(body).toMatchObject({ success: false, error: { code: "UNAUTHENTICATED", statusCode: 401 } });
  });

  it.runIf(available)("403 naming the missing scope", async () => {
    const key = await issue();
    const res = await call("/v1/decks/1", { "x-api-key": key.secret });
    expect(res.status).toBe(403);
    const body = JSON.parse(res.text) as ErrorBody;
    expect(body.error).toMatchObject({ code: "FORBIDDEN", message: 'This API key does not have the "decks" scope.' });
  });

  it.runIf(available)("402 PLAN_REQUIRED and 402 QUOTA_EXCEEDED keep keygate's status, body and Retry-After", async () => {
    const unpaid = await issue();
    await kg.admin.upsertAccount({ ownerId: unpaid.ownerId, subscriptionStatus: "canceled" });
    const planRequired = await call("/v1/things", { "x-api-key": unpaid.secret });
    expect(planRequired.status).toBe(402);
    expect(planRequired.headers.get("content-type")).toBe("application/json");
    expect((JSON.parse(planRequired.text) as ErrorBody).error).toMatchObject({ code: "PLAN_REQUIRED", statusCode: 402 });
    expect(planRequired.headers.get("retry-after")).toBeNull();

    const quota = await issue("quota");
    kg.clock.freeze(FROZEN_AT);
    try {
      expect((await call("/v1/things", { "x-api-key": quota.secret })).status).toBe(200);
      const exceeded = await call("/v1/things", { "x-api-key": quota.secret });
      expect(exceeded.status).toBe(402);
      expect(exceeded.headers.get("content-type")).toBe("application/json");
      expect((JSON.parse(exceeded.text) as ErrorBody).error).toMatchObject({ code: "QUOTA_EXCEEDED", statusCode: 402 });
      // Seconds from the frozen noon to the next UTC midnight, when the daily quota resets.
      expect(exceeded.headers.get("retry-after")).toBe(String((Date.parse("2026-03-11T00:00:00.000Z") - Date.parse(FROZEN_AT)) / 1000));
      expect(exceeded.headers.get("ratelimit-policy")).toBe('"minute";q=100;w=60, "day";q=1;w=86400');
    } finally {
      kg.clock.unfreeze();
    }
  });

  it.runIf(available)("429 with an exact Retry-After, rate-limit headers and keygate's body", async () => {
    const key = await issue("tiny");
    kg.clock.freeze(FROZEN_AT);
    try {
      expect((await call("/v1/things", { "x-api-key": key.secret })).status).toBe(200);
      expect((await call("/v1/things", { "x-api-key": key.secret })).status).toBe(200);
      const limited = await call("/v1/things", { "x-api-key": key.secret });
      expect(limited.status).toBe(429);
      expect(limited.headers.get("content-type")).toBe("application/json");
      // 2 requests per 60 s: one slot frees every 30 s, and the clock has not moved.
      expect(limited.headers.get("retry-after")).toBe("30");
      expect(limited.headers.get("x-ratelimit-limit")).toBe("2");
      expect(limited.headers.get("x-ratelimit-remaining")).toBe("0");
      expect((JSON.parse(limited.text) as ErrorBody).error).toMatchObject({ code: "RATE_LIMITED", statusCode: 429 });
    } finally {
      kg.clock.unfreeze();
    }
  });
});
