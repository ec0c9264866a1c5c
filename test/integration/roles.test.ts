import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { CheckResponse } from "../../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import { TEST_POLICY, checkInit, httpCheck, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

// Keys inherit their account's role: the upstream is told it (x-keygate-role, and the "role"
// dynamic metadata), and a route can require a lowest role (standard < premium < admin).
let kg: TestKeygate;
beforeAll(async () => {
  kg = await startKeygate({ policy: { ...TEST_POLICY, routes: [...TEST_POLICY.routes, { method: "*", pathPrefix: "/v1/admin", minRole: "admin" }, { method: "*", pathPrefix: "/v1/premium", minRole: "premium" }] } });
});
afterAll(async () => {
  await kg.stop();
});

async function keyWithRole(ownerId: string, role: string): Promise<string> {
  await kg.admin.upsertAccount({ ownerId, plan: "business", role });
  return (await kg.admin.createKey({ ownerId, name: "roles" })).secret;
}

function upstream(response: CheckResponse): Record<string, string> {
  if (response.httpResponse.case !== "okResponse") throw new Error(`expected an allow, got ${response.httpResponse.case ?? "nothing"}`);
  return Object.fromEntries(response.httpResponse.value.headers.map((h) => [h.header?.key ?? "", h.header?.value ?? ""]));
}

function denial(response: CheckResponse): { status: number; code: string; message: string } {
  if (response.httpResponse.case !== "deniedResponse") throw new Error(`expected a denial, got ${response.httpResponse.case ?? "nothing"}`);
  const { error } = JSON.parse(response.httpResponse.value.body) as { error: { code: string; message: string } };
  return { status: response.httpResponse.value.status?.code ?? 0, code: error.code, message: error.message };
}

describe("roles happy", () => {
  it("an allow tells the upstream the account's role, in a header and in the dynamic metadata", async () => {
    const secret = await keyWithRole("roles-premium", "premium");
    const answer = await kg.check(checkInit({ authorization: `Bearer ${secret}`, "x-keygate-role": "admin" }, "/v1/things"));
    expect(upstream(answer)["x-keygate-role"]).toBe("premium");
    expect(answer.dynamicMetadata?.["role"]).toBe("premium");
    const http = await httpCheck(kg.ports.http, "/check/v1/things", { authorization: `Bearer ${secret}` });
    expect([http.status, http.headers.get("x-keygate-role")]).toEqual([200, "premium"]);
  });

  it("a route's lowest role admits that role and those above it, in both entry points", async () => {
    const admin = await keyWithRole("roles-admin", "admin");
    const premium = await keyWithRole("roles-premium-2", "premium");
    expect(upstream(await kg.check(checkInit({ authorization: `Bearer ${admin}` }, "/v1/admin/users")))["x-keygate-role"]).toBe("admin");
    expect(upstream(await kg.check(checkInit({ authorization: `Bearer ${admin}` }, "/v1/premium/x")))["x-keygate-role"]).toBe("admin");
    expect((await httpCheck(kg.ports.http, "/check/v1/premium/x", { authorization: `Bearer ${premium}` })).status).toBe(200);
  });
});

describe("roles sad", () => {
  it("a lower role is refused 403 FORBIDDEN naming the role needed and the role held, in both entry points", async () => {
    const standard = await keyWithRole("roles-standard", "standard");
    expect(denial(await kg.check(checkInit({ authorization: `Bearer ${standard}` }, "/v1/admin/users")))).toEqual({
      status: 403,
      code: "FORBIDDEN",
      message: 'This route needs the "admin" role; the API key\'s account has "standard".',
    });
    const http = await httpCheck(kg.ports.http, "/check/v1/premium/x", { authorization: `Bearer ${standard}` });
    expect(http.status).toBe(403);
    expect(JSON.parse(http.body).error.message).toBe('This route needs the "premium" role; the API key\'s account has "standard".');
  });

  it("context_extensions.min_role raises a route's lowest role; an unknown role is a 500 ROUTE_MISCONFIGURED", async () => {
    const premium = await keyWithRole("roles-premium-3", "premium");
    expect(denial(await kg.check(checkInit({ authorization: `Bearer ${premium}` }, "/v1/things", "GET", { min_role: "admin" }))).status).toBe(403);
    expect(denial(await kg.check(checkInit({ authorization: `Bearer ${premium}` }, "/v1/things", "GET", { min_role: "root" })))).toMatchObject({ status: 500, code: "ROUTE_MISCONFIGURED" });
  });
});
