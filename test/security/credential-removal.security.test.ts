import { create } from "@bufbuild/protobuf";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { DEFAULT_POLICY_INPUT } from "../../src/config.js";
import { HeaderMapSchema } from "../../src/gen/envoy/config/core/v3/base_pb.js";
import type { CheckResponse } from "../../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import { checkInit, httpCheck, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { shippedProxies, startEchoUpstream } from "../harness/proxies.js";
import type { EchoedRequest, RunningProxy } from "../harness/proxies.js";

// Finding 3 of issue 12: with the same key in Authorization and X-API-Key only the header the key
// was read from was listed for removal, so the other copy reached the upstream behind Envoy and
// Istio; identity headers spelled with underscores (x_keygate_owner_id, which WSGI and PHP read as
// x-keygate-owner-id) were not stripped. And (finding 8) the strip list was built with a linear
// search per header: one Check with 150,000 x-keygate-* headers blocked the process for 29 s.

const POLICY = {
  ...DEFAULT_POLICY_INPUT,
  defaultPlan: "standard",
  plans: { standard: { maxActiveKeys: 50, rateLimit: { limit: 10_000, windowSeconds: 60 }, dailyQuota: null, monthlyCredits: null } },
  scopes: { catalog: ["read"], default: ["read"] },
  routes: [],
};

const IDENTITY_NAMES = ["x-keygate-key-id", "x-keygate-owner-id", "x-keygate-scopes", "x-keygate-plan", "x-keygate-role", "x-keygate-mode"];

let kg: TestKeygate;
let seq = 0;

beforeAll(async () => {
  kg = await startKeygate({ policy: POLICY });
});
afterAll(async () => {
  await kg?.stop();
});

async function issue(instance: TestKeygate = kg): Promise<{ id: string; ownerId: string; secret: string }> {
  const ownerId = `removal-${++seq}`;
  await instance.admin.upsertAccount({ ownerId, plan: "standard" });
  const created = await instance.admin.createKey({ ownerId, name: "removal" });
  return { id: created.key?.id ?? "", ownerId, secret: created.secret };
}

function okOf(response: CheckResponse) {
  if (response.httpResponse.case !== "okResponse") throw new Error(`expected an allow, got ${response.httpResponse.case ?? "nothing"} (${response.status?.message ?? ""})`);
  return response.httpResponse.value;
}

function upstreamHeaders(response: CheckResponse): Record<string, string> {
  return Object.fromEntries(okOf(response).headers.map((h) => [h.header?.key ?? "", h.header?.value ?? ""]));
}

/** Envoy's encode_raw_headers form: every header in header_map, the value in raw_value. */
function rawHeaders(headers: Array<[string, string]>, path = "/v1/things") {
  const headerMap = create(HeaderMapSchema, { headers: headers.map(([key, value]) => ({ key, rawValue: new TextEncoder().encode(value) })) });
  return { attributes: { request: { http: { id: "req-raw", method: "GET", path, host: "api.example.com", headerMap } } } };
}

describe("credential removal security: gRPC Check (headers_to_remove)", () => {
  it("the same key in Authorization and X-API-Key: both headers are removed", async () => {
    const key = await issue();
    const response = await kg.check(checkInit({ authorization: `Bearer ${key.secret}`, "x-api-key": key.secret }));
    expect(okOf(response).headersToRemove).toEqual(["authorization", "x-api-key"]);
  });

  it("the same, with Envoy's raw header_map", async () => {
    const key = await issue();
    const response = await kg.check(rawHeaders([["x-api-key", key.secret], ["authorization", `Bearer ${key.secret}`]]));
    expect(okOf(response).headersToRemove).toEqual(["authorization", "x-api-key"]);
  });

  it("an Authorization of another scheme beside the key in X-API-Key is removed too", async () => {
    const key = await issue();
    const response = await kg.check(checkInit({ authorization: "Basic dXNlcjpwYXNz", "x-api-key": key.secret }));
    expect(okOf(response).headersToRemove).toEqual(["authorization", "x-api-key"]);
  });

  it("a key in one header lists that header alone, as before", async () => {
    const key = await issue();
    const response = await kg.check(checkInit({ "x-api-key": key.secret, accept: "*/*" }));
    expect(okOf(response).headersToRemove).toEqual(["x-api-key"]);
  });

  it("a credential header under `_` spellings (which CGI-style servers read as X-Api-Key) is removed too, never read as the key", async () => {
    const key = await issue();
    const spellings = { x_api_key: "kg_other_secret", "x-api_key": "kg_other_secret", "x_api-key": "kg_other_secret" };
    const response = await kg.check(checkInit({ authorization: `Bearer ${key.secret}`, ...spellings }));
    expect(okOf(response).headersToRemove).toEqual(["authorization", "x_api-key", "x-api_key", "x_api_key"]);
    // Alone, an underscore spelling is no credential: the Check has none.
    const alone = await kg.check(checkInit({ x_api_key: key.secret }));
    expect(alone.httpResponse.case).toBe("deniedResponse");
  });

  it("identity spoofs in underscore and mixed-case spellings are stripped or overwritten", async () => {
    const key = await issue();
    const response = await kg.check(
      rawHeaders([
        ["x-api-key", key.secret],
        ["x_keygate_owner_id", "evil"],
        ["X-KEYGATE-Owner-Id", "evil"],
        ["X_KEYGATE_PLAN", "enterprise"],
        ["x-keygate_tenant", "evil"],
      ]),
    );
    // X-KEYGATE-Owner-Id is x-keygate-owner-id to Envoy, which the allow overwrites; the others
    // are other names to Envoy and the same name to a CGI-style upstream, so they go.
    expect(okOf(response).headersToRemove).toEqual(["x-api-key", "x_keygate_owner_id", "x_keygate_plan", "x-keygate_tenant"]);
    expect(upstreamHeaders(response)).toMatchObject({ "x-keygate-owner-id": key.ownerId, "x-keygate-plan": "standard", "x-keygate-key-id": key.id });
  });

  it("a header named __proto__ in header_map is a header like any other, and the Check is decided", async () => {
    const key = await issue();
    const response = await kg.check(rawHeaders([["__proto__", "x"], ["x-api-key", key.secret], ["__proto__", "y"], ["x_keygate_owner_id", "evil"]]));
    expect(response.status?.code).toBe(0);
    expect(okOf(response).headersToRemove).toEqual(["x-api-key", "x_keygate_owner_id"]);
  });
});

describe("credential removal security: HTTP mode (x-envoy-auth-headers-to-remove)", () => {
  it("the same key in Authorization and X-API-Key: both headers are listed", async () => {
    const key = await issue();
    const res = await httpCheck(kg.ports.http, "/check/v1/things", { authorization: `Bearer ${key.secret}`, "x-api-key": key.secret });
    expect(res.status).toBe(200);
    expect(res.headers.get("x-envoy-auth-headers-to-remove")).toBe("authorization,x-api-key");
  });

  it("an Authorization of another scheme beside the key in X-API-Key is listed too", async () => {
    const key = await issue();
    const res = await httpCheck(kg.ports.http, "/check/v1/things", { authorization: "Basic dXNlcjpwYXNz", "x-api-key": key.secret });
    expect(res.status).toBe(200);
    expect(res.headers.get("x-envoy-auth-headers-to-remove")).toBe("authorization,x-api-key");
  });

  it("a credential header under a `_` spelling is listed too", async () => {
    const key = await issue();
    const res = await httpCheck(kg.ports.http, "/check/v1/things", { authorization: `Bearer ${key.secret}`, x_api_key: "kg_other_secret" });
    expect(res.status).toBe(200);
    expect(res.headers.get("x-envoy-auth-headers-to-remove")).toBe("authorization,x_api_key");
  });

  it("identity spoofs in underscore and mixed-case spellings are listed or overwritten", async () => {
    const key = await issue();
    const res = await httpCheck(kg.ports.http, "/check/v1/things", {
      "x-api-key": key.secret,
      x_keygate_owner_id: "evil",
      "X-KEYGATE-Owner-Id": "evil",
      X_Keygate_Tenant: "evil",
    });
    expect(res.status).toBe(200);
    expect(res.headers.get("x-envoy-auth-headers-to-remove")).toBe("x-api-key,x_keygate_owner_id,x_keygate_tenant");
    expect(res.headers.get("x-keygate-owner-id")).toBe(key.ownerId);
  });
});

describe.each(shippedProxies())("credential removal security: behind $name (the shipped config)", ({ available, start, setting }) => {
  let behind: TestKeygate;
  let upstream: Awaited<ReturnType<typeof startEchoUpstream>>;
  let proxy: RunningProxy;

  beforeAll(async () => {
    if (!available) return;
    behind = await startKeygate({ policy: POLICY, httpAuthzProxy: setting });
    upstream = await startEchoUpstream();
    proxy = await start(behind.ports.http, upstream.port);
  });
  afterAll(async () => {
    if (!available) return;
    await proxy?.stop();
    await upstream?.stop();
    await behind?.stop();
  });

  const through = async (headers: Record<string, string>): Promise<EchoedRequest> => {
    const res = await fetch(`http://127.0.0.1:${proxy.port}/v1/things`, { headers });
    const text = await res.text();
    expect(res.status, text).toBe(200);
    return JSON.parse(text) as EchoedRequest;
  };

  /** No header the upstream saw names a credential header or carries the key, in any form. */
  function expectNoCredential(seen: EchoedRequest, secret: string): void {
    expect(Object.keys(seen.headers).filter((name) => /^(authorization|x[-_]api[-_]key)$/i.test(name))).toEqual([]);
    const values = Object.values(seen.headers).flatMap((v) => (v === undefined ? [] : Array.isArray(v) ? v : [v]));
    expect(values.filter((v) => v.includes(secret) || v.includes(secret.slice(-12)))).toEqual([]);
  }

  it.runIf(available)("the same key in Authorization and X-API-Key: neither reaches the upstream", async () => {
    const key = await issue(behind);
    const seen = await through({ authorization: `Bearer ${key.secret}`, "x-api-key": key.secret });
    expectNoCredential(seen, key.secret);
    expect(seen.headers["x-keygate-key-id"]).toBe(key.id);
  });

  it.runIf(available)("an Authorization of another scheme beside the key: neither reaches the upstream", async () => {
    const key = await issue(behind);
    const seen = await through({ authorization: "Basic dXNlcjpwYXNz", "x-api-key": key.secret });
    expectNoCredential(seen, key.secret);
    expect(seen.headers["authorization"]).toBeUndefined();
  });

  it.runIf(available)("x_keygate_owner_id and X-KEYGATE-Owner-Id spoofs: the upstream sees only keygate's owner id", async () => {
    const key = await issue(behind);
    const seen = await through({ "x-api-key": key.secret, x_keygate_owner_id: "evil", "X-KEYGATE-Owner-Id": "evil", "X_KEYGATE_SCOPES": "admin" });
    const identity = Object.entries(seen.headers).filter(([name]) => /^x[-_]keygate[-_]/i.test(name));
    expect(Object.fromEntries(identity)).toMatchObject({ "x-keygate-owner-id": key.ownerId, "x-keygate-scopes": "read" });
    // Every identity header the upstream saw is one keygate set (and no underscore spelling).
    expect(identity.map(([name]) => name).filter((name) => ![...IDENTITY_NAMES, "x-keygate-project-id"].includes(name))).toEqual([]);
    expectNoCredential(seen, key.secret);
  });
});

// ---- header handling is linear ------------------------------------------------------------------

/** The Array.prototype searches whose cost grows with the array searched. */
const SEARCHES = ["includes", "indexOf", "lastIndexOf", "some", "every", "find", "findIndex", "findLast", "findLastIndex", "filter"] as const;

/**
 * Runs `work` with every Array.prototype search counting the elements of the array it was called
 * on: a deterministic measure of the work a linear scan inside a loop does (n such scans over a
 * growing list cost n²/2), which no machine load can change.
 */
async function countArraySearchWork<T>(work: () => Promise<T>): Promise<{ result: T; elements: number }> {
  let elements = 0;
  const originals = SEARCHES.map((name) => [name, Object.getOwnPropertyDescriptor(Array.prototype, name)] as const);
  for (const [name, descriptor] of originals) {
    const original: unknown = descriptor?.value;
    if (typeof original !== "function") throw new Error(`Array.prototype.${name} is not a function`);
    Object.defineProperty(Array.prototype, name, {
      ...descriptor,
      value(this: ArrayLike<unknown>, ...args: unknown[]): unknown {
        elements += typeof this.length === "number" ? this.length : 0;
        return Reflect.apply(original, this, args) as unknown;
      },
    });
  }
  try {
    const result = await work();
    return { result, elements };
  } finally {
    for (const [name, descriptor] of originals) if (descriptor !== undefined) Object.defineProperty(Array.prototype, name, descriptor);
  }
}

describe("credential removal security: header handling is linear", () => {
  it("removal list of 20,000 spoofed identity headers: one pass over the names, a bounded search per name, the exact list", async () => {
    const identity = await import("../../src/authz/identity.js");
    const names = Array.from({ length: 20_000 }, (_, i) => `x-keygate-s${i}`);
    let steps = 0;
    const counted: Iterable<string> = {
      *[Symbol.iterator]() {
        for (const name of names) {
          steps++;
          yield name;
        }
      },
    };
    const { result, elements } = await countArraySearchWork(async () => identity.headersToRemove(counted, IDENTITY_NAMES, ["authorization"]));
    expect(steps).toBe(names.length);
    // At most the granted names (5) and the credential headers (1) searched per name; a linear
    // search of the list being built would be 20,000² / 2 = 200,000,000.
    expect(elements).toBeLessThanOrEqual(6 * names.length);
    expect(result).toEqual(["authorization", ...names]);
  });

  it(
    "a gRPC Check with 150,000 x-keygate-* headers gets the exact answer, with bounded search work per header",
    async () => {
      const key = await issue();
      const names = Array.from({ length: 150_000 }, (_, i) => `x-keygate-${i.toString(36)}`);
      const headers: Record<string, string> = { authorization: `Bearer ${key.secret}` };
      for (const name of names) headers[name] = "1";
      const { result: response, elements } = await countArraySearchWork(() => kg.check(checkInit(headers)));
      expect(response.status?.code).toBe(0);
      const ok = okOf(response);
      expect(ok.headersToRemove.length).toBe(names.length + 1);
      expect(ok.headersToRemove).toEqual(["authorization", ...names]);
      expect(upstreamHeaders(response)).toEqual({
        "x-keygate-key-id": key.id,
        "x-keygate-owner-id": key.ownerId,
        "x-keygate-scopes": "read",
        "x-keygate-plan": "standard",
        "x-keygate-role": "standard",
        "x-keygate-mode": "live",
      });
      expect(response.dynamicMetadata?.["owner_id"]).toBe(key.ownerId);
      // Everything in the process during the call counts (grpc-js, protobuf-es, keygate): the
      // bound is per header. The quadratic strip list alone was 150,000² / 2 ≈ 1.1e10.
      expect(elements).toBeLessThanOrEqual(10 * names.length);
    },
    // Time to build and encode 3 MB of headers on a loaded machine; nothing here measures time.
    120_000,
  );
});
