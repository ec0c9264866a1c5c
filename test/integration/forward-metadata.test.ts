import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { parsePolicy } from "../../src/config.js";
import type { CheckResponse } from "../../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import { TEST_POLICY, checkInit, httpCheck, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

// A policy can forward chosen key metadata to the upstream, as x-keygate-meta-<name>: "team" and
// "tier" here. Other entries stay in keygate; a client-sent x-keygate-meta-* never gets through.
const POLICY = { ...TEST_POLICY, forwardMetadata: ["team", "tier"] };

let kg: TestKeygate;
beforeAll(async () => {
  kg = await startKeygate({ policy: POLICY });
});
afterAll(async () => {
  await kg.stop();
});

async function key(metadata: Record<string, string>): Promise<string> {
  return (await kg.admin.createKey({ ownerId: "forward-metadata", name: "meta", metadata })).secret;
}

function allowOf(response: CheckResponse): { headers: Record<string, string>; removed: string[] } {
  if (response.httpResponse.case !== "okResponse") throw new Error(`expected an allow, got ${response.httpResponse.case ?? "nothing"}`);
  const ok = response.httpResponse.value;
  return { headers: Object.fromEntries(ok.headers.map((h) => [h.header?.key ?? "", h.header?.value ?? ""])), removed: ok.headersToRemove };
}

const metaHeaders = (headers: Record<string, string>) => Object.fromEntries(Object.entries(headers).filter(([name]) => name.startsWith("x-keygate-meta-")));

describe("forwarded metadata happy", () => {
  it("an allow carries the listed entries and no other, over gRPC (first from the store, then from L1) and HTTP", async () => {
    await kg.admin.upsertAccount({ ownerId: "forward-metadata", plan: "business" });
    const secret = await key({ team: "billing", tier: "gold", internal_note: "do not forward" });
    for (let i = 0; i < 2; i++) {
      expect(metaHeaders(allowOf(await kg.check(checkInit({ "x-api-key": secret }))).headers)).toEqual({ "x-keygate-meta-team": "billing", "x-keygate-meta-tier": "gold" });
    }
    const http = await httpCheck(kg.ports.http, "/check/v1/things", { "x-api-key": secret });
    expect([http.status, http.headers.get("x-keygate-meta-team"), http.headers.get("x-keygate-meta-tier"), http.headers.get("x-keygate-meta-internal_note")]).toEqual([200, "billing", "gold", null]);
  });
});

describe("forwarded metadata security", () => {
  it("a client-sent x-keygate-meta-* is overwritten when the key has the entry and removed when it has not", async () => {
    const secret = await key({ team: "billing" });
    const spoofed = { "x-api-key": secret, "x-keygate-meta-team": "evil", "X-Keygate-Meta-Tier": "platinum", "x_keygate_meta_tier": "platinum" };
    const grpc = allowOf(await kg.check(checkInit(spoofed)));
    expect(metaHeaders(grpc.headers)).toEqual({ "x-keygate-meta-team": "billing" });
    expect(grpc.removed).toEqual(["x-api-key", "x-keygate-meta-tier", "x_keygate_meta_tier"]);
    const http = await httpCheck(kg.ports.http, "/check/v1/things", spoofed);
    expect(http.headers.get("x-keygate-meta-team")).toBe("billing");
    expect(http.headers.get("x-envoy-auth-headers-to-remove")).toBe("x-api-key,x-keygate-meta-tier,x_keygate_meta_tier");
  });

  it("a value that is not printable ASCII (a line break above all) is not forwarded", async () => {
    const secret = await key({ team: "billing\r\nx-keygate-owner-id: evil", tier: " padded" });
    expect(metaHeaders(allowOf(await kg.check(checkInit({ "x-api-key": secret }))).headers)).toEqual({});
    const http = await httpCheck(kg.ports.http, "/check/v1/things", { "x-api-key": secret });
    // The HTTP answer carries every forwarded name, empty where nothing is forwarded (a proxy that
    // copies a fixed list, Caddy 2.6, would copy its placeholder text for a missing one).
    expect([http.status, http.headers.get("x-keygate-meta-team"), http.headers.get("x-keygate-meta-tier")]).toEqual([200, "", ""]);
  });

  it("the policy names entries as lowercase letters, digits and -, once each", () => {
    expect(parsePolicy({ ...TEST_POLICY, forwardMetadata: ["team", "cost-center", "tier2"] }).forwardMetadata).toEqual(["team", "cost-center", "tier2"]);
    for (const bad of [["Team"], ["team_x"], ["-team"], ["team", "team"], [""]]) {
      expect(() => parsePolicy({ ...TEST_POLICY, forwardMetadata: bad }), bad.join(",")).toThrow(/forwardMetadata/);
    }
  });
});
