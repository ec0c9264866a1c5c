import { create } from "@bufbuild/protobuf";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { DEFAULT_POLICY_INPUT } from "../../src/config.js";
import { HeaderMapSchema } from "../../src/gen/envoy/config/core/v3/base_pb.js";
import { checkInit, checkOutcome, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { sendRaw } from "../harness/raw-http.js";

// README "The decision": "A request that carries a repeated `Authorization` or `X-API-Key` header
// ... is refused as malformed (401): a proxy and an upstream could disagree about which one counts."
// Envoy hands ext_authz a repeated header joined with "," in the CheckRequest `headers` map
// (check_request_utils.cc: "Merge duplicate headers", append(",")), and its HTTP service copies
// that joined value into the one header it sends keygate. Two Authorization lines, the first of
// another scheme ("Basic …,Bearer …"), arrived as one value that does not start with a Bearer
// key, so keygate skipped it as "another scheme" and judged X-API-Key: allowed, where the same
// client request was refused 401 through Envoy's header_map form and through nginx / Caddy (two
// lines). A Bearer after a comma is now refused as the repeat it is.

const POLICY = {
  ...DEFAULT_POLICY_INPUT,
  defaultPlan: "standard",
  plans: { standard: { maxActiveKeys: 50, rateLimit: { limit: 10_000, windowSeconds: 60 }, dailyQuota: null, monthlyCredits: null } },
  scopes: { catalog: ["read"], default: ["read"] },
  routes: [],
};

let kg: TestKeygate;
let mine = "";
let other = "";

beforeAll(async () => {
  kg = await startKeygate({ policy: POLICY });
  await kg.admin.upsertAccount({ ownerId: "cred-a", plan: "standard" });
  await kg.admin.upsertAccount({ ownerId: "cred-b", plan: "standard" });
  mine = (await kg.admin.createKey({ ownerId: "cred-a", name: "mine" })).secret;
  other = (await kg.admin.createKey({ ownerId: "cred-b", name: "other" })).secret;
});
afterAll(async () => {
  await kg?.stop();
});

/** The client's header lines: Authorization twice (Basic, then a Bearer key), and X-API-Key. */
function lines(): Array<[string, string]> {
  return [
    ["authorization", "Basic dXNlcjpwYXNz"],
    ["authorization", `Bearer ${other}`],
    ["x-api-key", mine],
  ];
}

/** What Envoy's default encoding puts in CheckRequest.attributes.request.http.headers. */
function envoyMerged(headerLines: Array<[string, string]>): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [name, value] of headerLines) out[name] = name in out ? `${out[name]},${value}` : value;
  return out;
}

async function httpStatus(headerLines: Array<[string, string]>): Promise<number> {
  const answer = await sendRaw(kg.ports.http, "GET /check/v1/things HTTP/1.1", [["Host", "api.example.com"], ["Connection", "close"], ...headerLines]);
  return answer.status;
}

describe("a repeated Authorization is refused on every entry point", () => {
  it("control: Envoy's header_map form (encode_raw_headers) is refused 401", async () => {
    const headerMap = create(HeaderMapSchema, { headers: lines().map(([key, value]) => ({ key, rawValue: new TextEncoder().encode(value) })) });
    const response = await kg.check({ attributes: { request: { http: { id: "r", method: "GET", path: "/v1/things", host: "api.example.com", headerMap } } } });
    expect(checkOutcome(response)).toEqual({ status: 401, code: "UNAUTHENTICATED" });
  });

  it("control: the HTTP mode with two Authorization lines (nginx, Caddy) is refused 401", async () => {
    expect(await httpStatus(lines())).toBe(401);
  });

  it("gRPC Check with Envoy's default headers map (the two values joined with ',') is refused 401", async () => {
    const response = await kg.check(checkInit(envoyMerged(lines())));
    expect(checkOutcome(response)).toEqual({ status: 401, code: "UNAUTHENTICATED" });
  });

  it("the HTTP mode as Envoy's HTTP service sends it (one joined Authorization line) is refused 401", async () => {
    const merged = envoyMerged(lines());
    expect(await httpStatus(Object.entries(merged))).toBe(401);
  });

  it("a value of another scheme alone, commas in it included, is still not judged: X-API-Key decides", async () => {
    for (const authorization of ["Basic dXNlcjpwYXNz", 'Digest username="a", realm="b", nonce="c"', "Negotiate abc,def", "Basic x,bearerish y"]) {
      const response = await kg.check(checkInit({ authorization, "x-api-key": mine }));
      expect(checkOutcome(response), authorization).toEqual({ status: 200, code: null });
    }
  });
});
