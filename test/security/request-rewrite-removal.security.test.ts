import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { DEFAULT_POLICY_INPUT } from "../../src/config.js";
import { OTHER_REQUEST_HEADERS } from "../../src/authz/identity.js";
import { checkInit, httpCheck, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

// The API must serve the method and path keygate judged, and never see a credential. Behind
// Istio keygate's answer is all that edits the request to the app (no proxy config of its own
// drops headers), and Istio lets header names with "_" through: so an allow removes a client's
// method-override, URL-rewrite and original-request headers, and every spelling an upstream could
// read as a credential header (CGI-style servers read X_Api_Key as X-Api-Key).

const POLICY = {
  ...DEFAULT_POLICY_INPUT,
  defaultPlan: "standard",
  plans: { standard: { maxActiveKeys: 10, rateLimit: { limit: 10_000, windowSeconds: 60 }, dailyQuota: null, monthlyCredits: null } },
  scopes: { catalog: ["read", "write", "admin"], default: ["read"] },
  // POST needs write; DELETE of the same resource needs admin.
  routes: [
    { method: "POST", pathPrefix: "/v1/things", requiredScopes: ["write"] },
    { method: "DELETE", pathPrefix: "/v1/things", requiredScopes: ["admin"] },
  ],
};

describe("an allow removes what would make the API serve another request, or see a credential", () => {
  let kg: TestKeygate;
  let writer = "";
  beforeAll(async () => {
    kg = await startKeygate({ policy: POLICY });
    await kg.admin.upsertAccount({ ownerId: "rewrite-writer", plan: "standard" });
    writer = (await kg.admin.createKey({ ownerId: "rewrite-writer", name: "w", scopes: ["read", "write"] })).secret;
  });
  afterAll(async () => {
    await kg?.stop();
  });

  it("gRPC Check: every method-override, rewrite and original-request header, in both spellings, and the credential's other spellings", async () => {
    const headers: Record<string, string> = { "x-api-key": writer, "x-request-id": "r1", "x-forwarded-for": "10.0.0.1" };
    for (const name of OTHER_REQUEST_HEADERS) {
      headers[name] = name.includes("method") ? "DELETE" : "/v1/things/1";
      headers[name.replaceAll("-", "_")] = name.includes("method") ? "DELETE" : "/v1/things/1";
    }
    for (const name of ["x_api_key", "x-api_key", "x_api-key", "authorization_"]) headers[name] = "kept-or-not";
    const answer = await kg.check(checkInit(headers, "/v1/things", "POST"));
    expect(answer.httpResponse.case).toBe("okResponse");
    const removed = answer.httpResponse.case === "okResponse" ? [...answer.httpResponse.value.headersToRemove].sort() : [];
    // The credential header the request carried (x-api-key), its other spellings, and the rest.
    const expected = ["x-api-key", "x_api_key", "x-api_key", "x_api-key", ...OTHER_REQUEST_HEADERS, ...OTHER_REQUEST_HEADERS.map((name) => name.replaceAll("-", "_"))];
    // "authorization_" is no credential header's spelling, nor are x-request-id and x-forwarded-for.
    expect(removed).toEqual(expected.sort());
  });

  it("Envoy's HTTP service: the same names in x-envoy-auth-headers-to-remove", async () => {
    const answer = await httpCheck(kg.ports.http, "/check/v1/things", { "x-api-key": writer, "x-http-method-override": "DELETE", x_rewrite_url: "/v1/things/1" });
    expect(answer.status).toBe(200);
    expect(answer.headers.get("x-envoy-auth-headers-to-remove")?.split(",").sort()).toEqual(["x-api-key", "x-http-method-override", "x_rewrite_url"]);
  });
});
