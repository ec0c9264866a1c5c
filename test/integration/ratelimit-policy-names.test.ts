import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { CheckResponse } from "../../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import { DEFAULT_POLICY_INPUT } from "../../src/config.js";
import { TestClock } from "../harness/clock.js";
import { checkInit, httpCheck, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

// RateLimit's items refer to RateLimit-Policy's by name (draft-ietf-httpapi-ratelimit-headers), so
// the names must differ. A rate window of a day beside a daily quota (both "day"), or of a minute
// beside a quota named "minute", gave two entries of one name; the rate entry then takes its
// "<n>s" name, and the quota keeps its own. Both encoders (HTTP, and the gRPC one that writes
// from the numbers) answer alike.

const POLICY = {
  ...DEFAULT_POLICY_INPUT,
  defaultPlan: "daily",
  plans: {
    daily: { maxActiveKeys: 5, rateLimit: { limit: 1000, windowSeconds: 86400 }, dailyQuota: 5, monthlyCredits: null },
    perminute: { maxActiveKeys: 5, rateLimit: { limit: 100, windowSeconds: 60 }, dailyQuota: null, quotas: { minute: 1 }, monthlyCredits: null },
  },
  scopes: { catalog: ["read"], default: ["read"] },
  routes: [{ method: "*", pathPrefix: "/v1/m", quota: "minute" }],
};

function rateFields(response: CheckResponse): { policy?: string; state?: string } {
  const options = response.httpResponse.case === "okResponse" ? response.httpResponse.value.responseHeadersToAdd : response.httpResponse.case === "deniedResponse" ? response.httpResponse.value.headers : [];
  const added = Object.fromEntries(options.map((h) => [h.header?.key ?? "", h.header?.value ?? ""]));
  return { policy: added["ratelimit-policy"], state: added["ratelimit"] };
}

describe("RateLimit field names", () => {
  let kg: TestKeygate;
  const clock = new TestClock();
  beforeAll(async () => {
    clock.freeze("2026-12-03T12:00:00.000Z");
    kg = await startKeygate({ policy: POLICY, clock });
  });
  afterAll(async () => kg?.stop());

  async function secretOf(ownerId: string, plan: string): Promise<string> {
    await kg.admin.upsertAccount({ ownerId, plan });
    return (await kg.admin.createKey({ ownerId, name: "k" })).secret;
  }

  it("happy: a daily rate window beside the daily quota is \"86400s\", the quota \"day\"", async () => {
    const secret = await secretOf("daily-owner", "daily");
    const http = await httpCheck(kg.ports.http, "/check/v1/x", { "x-api-key": secret });
    expect([http.status, http.headers.get("ratelimit-policy"), http.headers.get("ratelimit")]).toEqual([
      200,
      '"86400s";q=1000;w=86400, "day";q=5;w=86400',
      '"86400s";r=999;t=87, "day";r=4;t=43200',
    ]);
    expect(rateFields(await kg.check(checkInit({ "x-api-key": secret }, "/v1/x")))).toEqual({
      policy: '"86400s";q=1000;w=86400, "day";q=5;w=86400',
      state: '"86400s";r=998;t=173, "day";r=3;t=43200',
    });
  });

  it("happy: a minute rate window beside a quota named \"minute\" is \"60s\"; on a route without that quota it is \"minute\"", async () => {
    const secret = await secretOf("minute-owner", "perminute");
    const http = await httpCheck(kg.ports.http, "/check/v1/m", { "x-api-key": secret });
    expect([http.status, http.headers.get("ratelimit-policy"), http.headers.get("ratelimit")]).toEqual([
      200,
      '"60s";q=100;w=60, "minute";q=1;w=86400',
      '"60s";r=99;t=1, "minute";r=0;t=43200',
    ]);
    expect(rateFields(await kg.check(checkInit({ "x-api-key": secret }, "/v1/other")))).toEqual({
      policy: '"minute";q=100;w=60',
      state: '"minute";r=98;t=2',
    });
  });

  it("error: a 402 past the quota names them the same way", async () => {
    const secret = await secretOf("minute-spent", "perminute");
    expect((await httpCheck(kg.ports.http, "/check/v1/m", { "x-api-key": secret })).status).toBe(200);
    const http = await httpCheck(kg.ports.http, "/check/v1/m", { "x-api-key": secret });
    expect([http.status, http.headers.get("ratelimit-policy"), http.headers.get("ratelimit")]).toEqual([
      402,
      '"60s";q=100;w=60, "minute";q=1;w=86400',
      '"60s";r=99;t=1, "minute";r=0;t=43200',
    ]);
    expect(rateFields(await kg.check(checkInit({ "x-api-key": secret }, "/v1/m")))).toEqual({
      policy: '"60s";q=100;w=60, "minute";q=1;w=86400',
      state: '"60s";r=99;t=1, "minute";r=0;t=43200',
    });
  });
});
