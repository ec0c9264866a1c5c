import { readFileSync } from "node:fs";
import { resolve } from "node:path";
import { create } from "@bufbuild/protobuf";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { parse } from "yaml";
import { z } from "zod";
import { HeaderMapSchema } from "../../src/gen/envoy/config/core/v3/base_pb.js";
import { CheckRequestSchema } from "../../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import type { CheckResponse } from "../../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import { KeyFormat } from "../../src/keys/key-format.js";
import { checkInit, httpCheck, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

let kg: TestKeygate;
let seq = 0;
beforeAll(async () => {
  kg = await startKeygate();
});
afterAll(async () => {
  await kg.stop();
});

async function issue(options: { scopes?: string[]; projectId?: string; plan?: string } = {}): Promise<{ id: string; secret: string; owner: string }> {
  const owner = `owner-check-${++seq}`;
  await kg.admin.upsertAccount({ ownerId: owner, plan: options.plan ?? "business" });
  const created = await kg.admin.createKey({ ownerId: owner, name: "check", scopes: options.scopes ?? [], projectId: options.projectId ?? "" });
  if (created.key === undefined) throw new Error("no key");
  return { id: created.key.id, secret: created.secret, owner };
}

function okOf(response: CheckResponse) {
  if (response.httpResponse.case !== "okResponse") throw new Error(`expected ok, got ${response.httpResponse.case ?? "nothing"}`);
  return response.httpResponse.value;
}

function headerMap(response: CheckResponse): Record<string, string> {
  return Object.fromEntries(okOf(response).headers.map((h) => [h.header?.key ?? "", h.header?.value ?? ""]));
}

function deniedStatus(response: CheckResponse): number {
  if (response.httpResponse.case !== "deniedResponse") throw new Error(`expected denial, got ${response.httpResponse.case ?? "nothing"}`);
  return response.httpResponse.value.status?.code ?? 0;
}

const errorBodySchema = z.object({ error: z.object({ code: z.string(), message: z.string() }) });

/** A denial's HTTP status, error code and message. */
function denial(response: CheckResponse): { status: number; code: string; message: string } {
  if (response.httpResponse.case !== "deniedResponse") throw new Error(`expected denial, got ${response.httpResponse.case ?? "nothing"}`);
  const { error } = errorBodySchema.parse(JSON.parse(response.httpResponse.value.body));
  return { status: response.httpResponse.value.status?.code ?? 0, ...error };
}

describe("gRPC Check happy", () => {
  it("allows a valid bearer key with identity headers, removals and dynamic metadata", async () => {
    const key = await issue({ scopes: ["tutor", "decks"] });
    const response = await kg.check(
      checkInit({ authorization: `Bearer ${key.secret}`, "x-keygate-owner-id": "spoofed", "x-keygate-extra": "spoofed", accept: "*/*" }, "/v1/decks/7"),
    );
    expect(response.status?.code).toBe(0);
    const ok = okOf(response);
    expect(headerMap(response)).toEqual({
      "x-keygate-key-id": key.id,
      "x-keygate-owner-id": key.owner,
      "x-keygate-scopes": "tutor,decks",
      "x-keygate-plan": "business",
      "x-keygate-role": "standard",
      "x-keygate-mode": "live",
    });
    // Identity headers are overwritten, not appended, so a client value cannot survive.
    expect(ok.headers.every((h) => h.appendAction === 2)).toBe(true);
    expect(ok.headersToRemove).toEqual(["authorization", "x-keygate-extra"]);
    expect(response.dynamicMetadata).toEqual({
      key_id: key.id,
      owner_id: key.owner,
      project_id: "",
      plan: "business",
      role: "standard",
      mode: "live",
      scopes: "tutor,decks",
    });
  });

  it("reads X-API-Key and removes that header", async () => {
    const key = await issue();
    const response = await kg.check(checkInit({ "x-api-key": key.secret }));
    expect(okOf(response).headersToRemove).toEqual(["x-api-key"]);
  });

  it("accepts Bearer in any case and with extra spacing", async () => {
    const key = await issue();
    const response = await kg.check(checkInit({ authorization: `bEaReR \t ${key.secret}  ` }));
    expect(response.status?.code).toBe(0);
  });

  it("reads headers from header_map raw_value when Envoy encodes raw headers", async () => {
    const key = await issue();
    const encoder = new TextEncoder();
    const request = create(CheckRequestSchema, {
      attributes: {
        request: {
          http: {
            method: "GET",
            path: "/v1/things",
            headerMap: create(HeaderMapSchema, {
              headers: [
                { key: "authorization", rawValue: encoder.encode(`Bearer ${key.secret}`) },
                { key: ":path", rawValue: encoder.encode("/v1/things") },
              ],
            }),
          },
        },
      },
    });
    const response = await kg.checkRaw(request);
    expect(response.status?.code).toBe(0);
    expect(headerMap(response)["x-keygate-key-id"]).toBe(key.id);
  });

  it("sets x-keygate-project-id for a project-locked key on its own project", async () => {
    const key = await issue({ projectId: "alpha" });
    const response = await kg.check(checkInit({ authorization: `Bearer ${key.secret}` }, "/v1/projects/alpha/jobs"));
    expect(headerMap(response)["x-keygate-project-id"]).toBe("alpha");
  });

  it("context_extensions override the routes table", async () => {
    const key = await issue({ scopes: ["tutor"] });
    // The routes table asks nothing of /v1/things; the extension asks for "progress".
    const denied = await kg.check(checkInit({ authorization: `Bearer ${key.secret}` }, "/v1/things", "GET", { required_scopes: "tutor, progress" }));
    expect(deniedStatus(denied)).toBe(403);
    if (denied.httpResponse.case !== "deniedResponse") throw new Error("unreachable");
    expect(JSON.parse(denied.httpResponse.value.body).error.message).toBe('This API key does not have the "progress" scope.');
    // The table asks for "decks" on /v1/decks; an extension of "tutor" replaces it.
    const allowed = await kg.check(checkInit({ authorization: `Bearer ${key.secret}` }, "/v1/decks", "GET", { required_scopes: "tutor" }));
    expect(allowed.status?.code).toBe(0);
    const locked = await kg.check(checkInit({ authorization: `Bearer ${(await issue({ projectId: "beta" })).secret}` }, "/x", "GET", { project_id: "gamma" }));
    expect(deniedStatus(locked)).toBe(403);
  });

  it("route matching survives path tricks: judged as the route, or refused", async () => {
    const key = await issue({ scopes: ["tutor"] });
    for (const path of ["/v1/decks", "/v1/decks/1?y=/../x", "/v1/%64ecks/2"]) {
      const response = await kg.check(checkInit({ authorization: `Bearer ${key.secret}` }, path));
      expect(deniedStatus(response), path).toBe(403);
    }
    // Servers that do not normalize route these elsewhere (test/security/paths.security.test.ts).
    for (const path of ["/v1//decks/1", "/v1/./decks", "/v1/x/../decks?y=1"]) {
      const response = await kg.check(checkInit({ authorization: `Bearer ${key.secret}` }, path));
      expect(deniedStatus(response), path).toBe(400);
    }
    const response = await kg.check(checkInit({ authorization: `Bearer ${key.secret}` }, "/v1/decksandmore"));
    expect(response.status?.code).toBe(0);
  });

  it("method-specific routes apply only to that method", async () => {
    const key = await issue({ scopes: ["tutor"] });
    expect((await kg.check(checkInit({ authorization: `Bearer ${key.secret}` }, "/v1/webhooks", "GET"))).status?.code).toBe(0);
    expect(deniedStatus(await kg.check(checkInit({ authorization: `Bearer ${key.secret}` }, "/v1/webhooks", "POST")))).toBe(403);
  });
});

describe("gRPC Check error", () => {
  it("refuses two different keys in Authorization and X-API-Key", async () => {
    const a = await issue();
    const b = await issue();
    const response = await kg.check(checkInit({ authorization: `Bearer ${a.secret}`, "x-api-key": b.secret }));
    expect(deniedStatus(response)).toBe(401);
  });

  it("refuses a repeated credential header in header_map", async () => {
    const key = await issue();
    const encoder = new TextEncoder();
    const response = await kg.checkRaw(
      create(CheckRequestSchema, {
        attributes: {
          request: {
            http: {
              method: "GET",
              path: "/",
              headerMap: {
                headers: [
                  { key: "x-api-key", rawValue: encoder.encode(key.secret) },
                  { key: "x-api-key", rawValue: encoder.encode(key.secret) },
                ],
              },
            },
          },
        },
      }),
    );
    expect(deniedStatus(response)).toBe(401);
  });

  it("answers a 500 denial, not a gRPC error, for a cost extension that is not a number", async () => {
    const key = await issue();
    expect(deniedStatus(await kg.check(checkInit({ authorization: `Bearer ${key.secret}` }, "/", "GET", { cost: "free" })))).toBe(500);
  });

  it("context_extensions.required_scopes naming a scope outside scopes.catalog is 500 ROUTE_MISCONFIGURED for every key, before the lookup, charging nothing", async () => {
    const key = await issue({ scopes: ["tutor", "decks", "progress", "webhooks"] });
    const remaining = async () => okOf(await kg.check(checkInit({ authorization: `Bearer ${key.secret}` }, "/v1/things", "GET", { required_scopes: "decks" }))).responseHeadersToAdd.find((h) => h.header?.key === "x-ratelimit-remaining")?.header?.value;
    expect(await remaining()).toBe("999");
    // A key holding every catalog scope, and a well-formed key that was never issued: the typo is the proxy's, not theirs.
    for (const secret of [key.secret, new KeyFormat("kg").generate("live")]) {
      for (const scopes of ["deck", "decks, deck"]) {
        expect(denial(await kg.check(checkInit({ authorization: `Bearer ${secret}` }, "/v1/things", "GET", { required_scopes: scopes }))), scopes).toEqual({
          status: 500,
          code: "ROUTE_MISCONFIGURED",
          message: 'The gateway\'s per-route "required_scopes" (context_extensions) names a scope that is not in the policy\'s scopes.catalog, so no key can hold it. This is a gateway configuration error.',
        });
      }
    }
    expect(await remaining()).toBe("998");
  });
});

// Servers answer HEAD with the GET handler, so HEAD must never need less than GET on the same path.
describe("HEAD under a GET-only route", () => {
  const reportsPolicy = {
    defaultPlan: "basic",
    plans: { basic: { maxActiveKeys: 5, rateLimit: { limit: 1000, windowSeconds: 60 }, dailyQuota: null, monthlyCredits: null } },
    scopes: { catalog: ["read", "reports"], default: ["read"] },
    // A GET-only prefix under the catch-all `/` route the README recommends.
    routes: [
      { method: "GET", pathPrefix: "/v1/reports", requiredScopes: ["reports"] },
      { method: "*", pathPrefix: "/", requiredScopes: ["read"] },
    ],
  };
  const missing = (scope: string) => ({ status: 403, code: "FORBIDDEN", message: `This API key does not have the "${scope}" scope.` });
  let head: TestKeygate;
  let readOnly: string;
  let reports: string;
  beforeAll(async () => {
    head = await startKeygate({ policy: reportsPolicy });
    readOnly = (await head.admin.createKey({ ownerId: "head-read", name: "read", scopes: ["read"] })).secret;
    reports = (await head.admin.createKey({ ownerId: "head-reports", name: "reports", scopes: ["reports"] })).secret;
  });
  afterAll(async () => {
    await head.stop();
  });

  it("gRPC: HEAD needs the GET route's scope, not the shorter catch-all's", async () => {
    for (const method of ["GET", "HEAD"]) {
      expect(denial(await head.check(checkInit({ authorization: `Bearer ${readOnly}` }, "/v1/reports/q3", method))), method).toEqual(missing("reports"));
      expect((await head.check(checkInit({ authorization: `Bearer ${reports}` }, "/v1/reports/q3", method))).status?.code, method).toBe(0);
    }
    // Elsewhere the catch-all decides for both.
    expect((await head.check(checkInit({ authorization: `Bearer ${readOnly}` }, "/v1/other", "HEAD"))).status?.code).toBe(0);
    expect(denial(await head.check(checkInit({ authorization: `Bearer ${reports}` }, "/v1/other", "HEAD")))).toEqual(missing("read"));
  });

  it("HTTP mode: HEAD needs the GET route's scope, not the shorter catch-all's", async () => {
    const ask = (method: string, secret: string) => fetch(`http://127.0.0.1:${head.ports.http}/check/v1/reports/q3`, { method, headers: { authorization: `Bearer ${secret}` } });
    for (const method of ["GET", "HEAD"]) {
      const refused = await ask(method, readOnly);
      expect([refused.status, refused.headers.get("x-keygate-owner-id")], method).toEqual([403, null]);
      expect((await ask(method, reports)).status, method).toBe(200);
    }
    // GET's body names the scope (a HEAD answer has none).
    expect(errorBodySchema.parse(await (await ask("GET", readOnly)).json()).error.message).toBe(missing("reports").message);
  });

  it("deploy/config/keygate.example.yaml with a GET-only route under /v1: HEAD needs that route's scope, not the HEAD /v1 route's", async () => {
    const example = z.object({ scopes: z.object({ catalog: z.array(z.string()) }).passthrough(), routes: z.array(z.unknown()) }).passthrough().parse(
      parse(readFileSync(resolve(import.meta.dirname, "../../deploy/config/keygate.example.yaml"), "utf8")),
    );
    const policy = {
      ...example,
      scopes: { ...example.scopes, catalog: [...example.scopes.catalog, "billing"] },
      routes: [{ method: "GET", pathPrefix: "/v1/billing", requiredScopes: ["billing"] }, ...example.routes],
    };
    const instance = await startKeygate({ policy });
    try {
      const reader = (await instance.admin.createKey({ ownerId: "head-example", name: "read", scopes: ["read"] })).secret;
      for (const method of ["GET", "HEAD"]) {
        expect(denial(await instance.check(checkInit({ authorization: `Bearer ${reader}` }, "/v1/billing/invoices", method))), method).toEqual(missing("billing"));
        expect((await instance.check(checkInit({ authorization: `Bearer ${reader}` }, "/v1/decks", method))).status?.code, method).toBe(0);
      }
      const res = await fetch(`http://127.0.0.1:${instance.ports.http}/check/v1/billing/invoices`, { method: "HEAD", headers: { authorization: `Bearer ${reader}` } });
      expect(res.status).toBe(403);
    } finally {
      await instance.stop();
    }
  });
});

describe("HTTP mode", () => {
  it("allows with identity headers and x-envoy-auth-headers-to-remove", async () => {
    const key = await issue({ scopes: ["decks"] });
    const res = await httpCheck(kg.ports.http, "/check/v1/decks/1", { authorization: `Bearer ${key.secret}`, "x-keygate-plan": "spoofed", "x-keygate-foo": "x" });
    expect(res.status).toBe(200);
    expect(res.headers.get("x-keygate-key-id")).toBe(key.id);
    expect(res.headers.get("x-keygate-owner-id")).toBe(key.owner);
    expect(res.headers.get("x-keygate-plan")).toBe("business");
    expect(res.headers.get("x-keygate-scopes")).toBe("decks");
    expect(res.headers.get("x-envoy-auth-headers-to-remove")).toBe("authorization,x-keygate-foo");
  });

  it("judges the path below /check and the request's own method, as Envoy's HTTP service sends them (the default)", async () => {
    const key = await issue({ scopes: ["tutor"] });
    // POST /v1/webhooks needs "webhooks"; GET /v1/webhooks needs nothing.
    const post = await fetch(`http://127.0.0.1:${kg.ports.http}/check/v1/webhooks`, { method: "POST", headers: { "x-api-key": key.secret } });
    expect(post.status).toBe(403);
    expect(((await post.json()) as { error: { message: string } }).error.message).toBe('This API key does not have the "webhooks" scope.');
    expect((await httpCheck(kg.ports.http, "/check/v1/webhooks", { "x-api-key": key.secret })).status).toBe(200);
    // Headers another proxy sends are not a second source: test/security/proxy-trust.security.test.ts.
  });

  it("serves /healthz and 404 outside /check", async () => {
    expect((await httpCheck(kg.ports.http, "/healthz", {})).status).toBe(200);
    expect((await httpCheck(kg.ports.http, "/other", {})).status).toBe(404);
  });
});

describe("revocation and rotation", () => {
  it("the very next Check after RevokeKey returns is refused, on both entry points", async () => {
    const key = await issue();
    const auth = { authorization: `Bearer ${key.secret}` };
    expect((await kg.check(checkInit(auth))).status?.code).toBe(0);
    expect((await httpCheck(kg.ports.http, "/check", auth)).status).toBe(200);
    await kg.admin.revokeKey({ id: key.id });
    expect(deniedStatus(await kg.check(checkInit(auth)))).toBe(401);
    expect((await httpCheck(kg.ports.http, "/check", auth)).status).toBe(401);
  });

  it("both keys work during grace, the old one fails after it", async () => {
    const key = await issue({ plan: "basic" });
    const rotated = await kg.admin.rotateKey({ id: key.id, graceDays: 3 });
    expect(rotated.previous?.state).toBe("grace");
    expect(rotated.previous?.rotatedToId).toBe(rotated.key?.id);
    const old = { authorization: `Bearer ${key.secret}` };
    const fresh = { authorization: `Bearer ${rotated.secret}` };
    expect((await kg.check(checkInit(old))).status?.code).toBe(0);
    expect((await kg.check(checkInit(fresh))).status?.code).toBe(0);
    kg.clock.advanceDays(2.9);
    expect((await kg.check(checkInit(old))).status?.code).toBe(0);
    kg.clock.advanceDays(0.2);
    expect(deniedStatus(await kg.check(checkInit(old)))).toBe(401);
    expect((await kg.check(checkInit(fresh))).status?.code).toBe(0);
    kg.clock.offsetMs = 0;
  });

  it("grace_days 0 refuses the old key at once", async () => {
    const key = await issue();
    const old = { authorization: `Bearer ${key.secret}` };
    expect((await kg.check(checkInit(old))).status?.code).toBe(0);
    const rotated = await kg.admin.rotateKey({ id: key.id, graceDays: 0 });
    expect(rotated.previous?.state).toBe("revoked");
    expect(deniedStatus(await kg.check(checkInit(old)))).toBe(401);
    expect((await kg.check(checkInit({ authorization: `Bearer ${rotated.secret}` }))).status?.code).toBe(0);
  });

  it("a rescope takes effect on the next Check", async () => {
    const key = await issue({ scopes: ["tutor"] });
    const auth = { authorization: `Bearer ${key.secret}` };
    expect(deniedStatus(await kg.check(checkInit(auth, "/v1/decks")))).toBe(403);
    await kg.admin.updateKey({ id: key.id, scopes: ["tutor", "decks"] });
    expect((await kg.check(checkInit(auth, "/v1/decks"))).status?.code).toBe(0);
  });

  it("a subscription change takes effect on the next Check", async () => {
    const key = await issue();
    const auth = { authorization: `Bearer ${key.secret}` };
    expect((await kg.check(checkInit(auth))).status?.code).toBe(0);
    await kg.admin.upsertAccount({ ownerId: key.owner, subscriptionStatus: "canceled" });
    expect(deniedStatus(await kg.check(checkInit(auth)))).toBe(402);
    await kg.admin.upsertAccount({ ownerId: key.owner, subscriptionStatus: "active" });
    expect((await kg.check(checkInit(auth))).status?.code).toBe(0);
  });
});
