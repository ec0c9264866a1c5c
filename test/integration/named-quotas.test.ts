import { Code, ConnectError } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { CheckResponse } from "../../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import { TestClock } from "../harness/clock.js";
import { checkInit, httpCheck, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { LIMITS_POLICY } from "../harness/limits-policy.js";

// Several daily quotas per plan, counted apart: chat messages and exports each have their own,
// and routes that name neither count toward the plan's dailyQuota.
const POLICY = {
  ...LIMITS_POLICY,
  plans: {
    ...LIMITS_POLICY.plans,
    tiers: { maxActiveKeys: 5, rateLimit: { limit: 1000, windowSeconds: 60 }, dailyQuota: 2, quotas: { messages: 3, exports: 1 }, monthlyCredits: null },
    open: { maxActiveKeys: 5, rateLimit: { limit: 1000, windowSeconds: 60 }, dailyQuota: null, monthlyCredits: null },
  },
  routes: [
    { method: "*", pathPrefix: "/v1/chat", quota: "messages" },
    { method: "*", pathPrefix: "/v1/export", quota: "exports" },
  ],
};

function outcome(response: CheckResponse): { status: number; message?: string; policy?: string } {
  if (response.httpResponse.case === "okResponse") {
    const added = Object.fromEntries(response.httpResponse.value.responseHeadersToAdd.map((h) => [h.header?.key ?? "", h.header?.value ?? ""]));
    return { status: 200, policy: added["ratelimit-policy"] };
  }
  if (response.httpResponse.case !== "deniedResponse") throw new Error("no answer");
  const { error } = JSON.parse(response.httpResponse.value.body) as { error: { message: string } };
  return { status: response.httpResponse.value.status?.code ?? 0, message: error.message };
}

describe("named daily quotas", () => {
  let kg: TestKeygate;
  const clock = new TestClock();
  beforeAll(async () => {
    clock.freeze("2026-12-03T12:00:00.000Z");
    kg = await startKeygate({ policy: POLICY, clock });
  });
  afterAll(async () => {
    await kg.stop();
  });

  it("each named quota runs out on its own routes only, with its name in the headers and the message; a restart reseeds each", async () => {
    const ownerId = "named-quotas";
    await kg.admin.upsertAccount({ ownerId, plan: "tiers" });
    const secret = (await kg.admin.createKey({ ownerId, name: "app" })).secret;
    const check = async (path: string) => outcome(await kg.check(checkInit({ "x-api-key": secret }, path)));
    for (let i = 0; i < 3; i++) expect(await check("/v1/chat/send")).toEqual({ status: 200, policy: '"minute";q=1000;w=60, "messages";q=3;w=86400' });
    expect(await check("/v1/chat/send")).toEqual({ status: 402, message: 'The daily "messages" quota of 3 is used up. It resets at 2026-12-04T00:00:00.000Z.' });
    expect(await check("/v1/export/csv")).toEqual({ status: 200, policy: '"minute";q=1000;w=60, "exports";q=1;w=86400' });
    expect((await check("/v1/export/csv")).status).toBe(402);
    // The plan's dailyQuota (2) is untouched by both.
    expect(await check("/v1/other")).toEqual({ status: 200, policy: '"minute";q=1000;w=60, "day";q=2;w=86400' });
    expect((await httpCheck(kg.ports.http, "/check/v1/other", { "x-api-key": secret })).status).toBe(200);
    expect((await check("/v1/other")).status).toBe(402);
    // A backend charge names the quota it counts toward.
    const charge = await kg.admin.chargeUsage({ ownerId, cost: 0n, idempotencyKey: "msg-1", quota: "messages" });
    expect([charge.charged, charge.code, charge.message]).toEqual([false, "QUOTA_EXCEEDED", 'The daily "messages" quota of 3 is used up. It resets at 2026-12-04T00:00:00.000Z.']);
    const usage = await kg.admin.getUsage({ ownerId, from: "2026-12-03", to: "2026-12-03" });
    expect(usage.totals?.allowed).toBe(6n);
    // After a restart (which writes the pending usage) each quota is reseeded from its own requests.
    const dataDir = kg.dataDir;
    await kg.stop({ keepData: true });
    kg = await startKeygate({ dataDir, policy: POLICY, clock });
    expect((await check("/v1/chat/send")).status).toBe(402);
    expect((await check("/v1/export/csv")).status).toBe(402);
    expect((await check("/v1/other")).status).toBe(402);
  });

  it("a quota the account's plan does not list is unlimited on it", async () => {
    const ownerId = "named-quotas-open";
    await kg.admin.upsertAccount({ ownerId, plan: "open" });
    const secret = (await kg.admin.createKey({ ownerId, name: "app" })).secret;
    for (let i = 0; i < 5; i++) expect(outcome(await kg.check(checkInit({ "x-api-key": secret }, "/v1/chat/send")))).toEqual({ status: 200, policy: '"minute";q=1000;w=60' });
  });

  it("ChargeUsage with a quota no plan lists is INVALID_ARGUMENT naming the plans' quotas", async () => {
    await kg.admin.upsertAccount({ ownerId: "named-quotas-bad", plan: "tiers" });
    const error = await kg.admin.chargeUsage({ ownerId: "named-quotas-bad", cost: 0n, idempotencyKey: "x", quota: "mesages" }).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(ConnectError);
    expect([(error as ConnectError).code, (error as ConnectError).rawMessage]).toEqual([Code.InvalidArgument, 'quota: unknown quota "mesages"; the plans\' quotas: messages, exports']);
  });

  it("context_extensions.quota naming a quota no plan has (a typo, or an Object property) is 500 ROUTE_MISCONFIGURED, never an uncapped route", async () => {
    const ownerId = "named-quotas-typo";
    await kg.admin.upsertAccount({ ownerId, plan: "tiers" });
    const secret = (await kg.admin.createKey({ ownerId, name: "app" })).secret;
    for (const quota of ["mesages", "constructor"]) {
      const answer = outcome(await kg.check(checkInit({ "x-api-key": secret }, "/v1/other", "GET", { quota })));
      expect(answer, quota).toEqual({ status: 500, message: 'The gateway\'s per-route "quota" (context_extensions) names a quota no plan has. This is a gateway configuration error.' });
    }
    // The plan's dailyQuota (2) was not spent by the refusals.
    for (let i = 0; i < 2; i++) expect(outcome(await kg.check(checkInit({ "x-api-key": secret }, "/v1/other"))).status).toBe(200);
  });
});
