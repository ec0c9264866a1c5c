import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { DEFAULT_POLICY_INPUT } from "../../src/config.js";
import { httpCheck, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { shippedProxies, startEchoUpstream, startNginx } from "../harness/proxies.js";
import type { EchoedRequest, RunningProxy } from "../harness/proxies.js";

// An allow's answer headers grow with what KeyAdmin lets a key hold: up to 64 scopes from the
// catalog, and up to 16 metadata values of 512 characters, forwarded when the policy names them.
// The largest such key is served through every shipped proxy config (nginx reads the auth
// answer's headers into buffers sized for it), not failed on every request.

const FORWARDED = Array.from({ length: 16 }, (_, i) => `m${i + 1}`);
// 64 scope names of 64 characters (SCOPE_NAME_PATTERN's maximum).
const LONG_SCOPES = Array.from({ length: 64 }, (_, i) => `s${String(i).padStart(2, "0")}${"x".repeat(61)}`);

const POLICY = {
  ...DEFAULT_POLICY_INPUT,
  defaultPlan: "standard",
  plans: { standard: { maxActiveKeys: 10, rateLimit: { limit: 10_000, windowSeconds: 60 }, dailyQuota: null, monthlyCredits: null } },
  scopes: { catalog: ["read", ...LONG_SCOPES], default: ["read"] },
  routes: [],
  forwardMetadata: FORWARDED,
};

function answerHeaderBytes(headers: Headers): number {
  let total = 0;
  headers.forEach((value, name) => (total += name.length + 2 + value.length + 2));
  return total;
}

describe.each(shippedProxies())("an allow's answer size behind $name (shipped config)", ({ available, name, setting, start }) => {
  let kg: TestKeygate;
  let upstream: Awaited<ReturnType<typeof startEchoUpstream>>;
  let proxy: RunningProxy;
  let largest = "";
  beforeAll(async () => {
    if (!available) return;
    kg = await startKeygate({ policy: POLICY, httpAuthzProxy: setting });
    upstream = await startEchoUpstream();
    proxy = name === "nginx" ? await startNginx(kg.ports.http, upstream.port, { forwardMetadata: FORWARDED }) : await start(kg.ports.http, upstream.port);
    await kg.admin.upsertAccount({ ownerId: `size-${name}`, plan: "standard" });
    const metadata = Object.fromEntries(FORWARDED.map((m) => [m, "v".repeat(512)]));
    largest = (await kg.admin.createKey({ ownerId: `size-${name}`, name: "largest", metadata, scopes: LONG_SCOPES })).secret;
  }, 60_000);
  afterAll(async () => {
    if (!available) return;
    await proxy?.stop();
    await upstream?.stop();
    await kg?.stop();
  });

  async function through(secret: string): Promise<{ status: number; body: string }> {
    const res = await fetch(`http://127.0.0.1:${proxy.port}/v1/things`, { headers: { "x-api-key": secret } });
    return { status: res.status, body: await res.text() };
  }

  it.runIf(available)("the largest key KeyAdmin allows (64 scopes of 64 characters, 16 forwarded metadata values of 512) is served, its identity reaching the API", async () => {
    const direct = await httpCheck(kg.ports.http, "/check", { "x-api-key": largest, "x-original-uri": "/v1/things", "x-original-method": "GET", "x-forwarded-uri": "/v1/things", "x-forwarded-method": "GET" });
    expect(direct.status).toBe(200);
    // Well past nginx's default 4 KiB buffer for an upstream's headers.
    expect(answerHeaderBytes(direct.headers)).toBeGreaterThan(12_000);
    const before = upstream.requests.length;
    const res = await through(largest);
    expect(res.status).toBe(200);
    expect(upstream.requests.length).toBe(before + 1);
    const seen = (JSON.parse(res.body) as EchoedRequest).headers;
    expect(seen["x-keygate-scopes"]).toBe(LONG_SCOPES.join(","));
    if (name === "nginx") expect(seen["x-keygate-meta-m16"]).toBe("v".repeat(512));
  });
});
