import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { z } from "zod";
import type { CheckResponse } from "../../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import { checkInit, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

// The proxy's own mistakes fail closed. A malformed per-route setting (Envoy's
// context_extensions) is a CheckResponse denial with a 5xx status and a JSON body: a gRPC error
// instead would be turned into an allow by Envoy's failure_mode_allow. Blank values mean "not
// set", so the routes table (here TEST_POLICY: /v1/decks needs "decks") applies.

let kg: TestKeygate;
let seq = 0;
beforeAll(async () => {
  kg = await startKeygate();
});
afterAll(async () => {
  await kg.stop();
});

async function issue(scopes: string[] = [], projectId = ""): Promise<string> {
  const ownerId = `fail-closed-${++seq}`;
  await kg.admin.upsertAccount({ ownerId, plan: "basic" });
  return (await kg.admin.createKey({ ownerId, name: "fail closed", scopes, projectId })).secret;
}

const bodySchema = z.object({
  success: z.literal(false),
  error: z.object({ code: z.string(), statusCode: z.number(), retryable: z.boolean(), message: z.string() }),
  requestId: z.string(),
});

interface Denied {
  grpcCode: number;
  status: number;
  contentType: string | undefined;
  error: { code: string; statusCode: number; retryable: boolean; message: string };
}

function denied(response: CheckResponse): Denied {
  if (response.httpResponse.case !== "deniedResponse") throw new Error(`expected a denial, got ${response.httpResponse.case ?? "nothing"}`);
  const { status, headers, body } = response.httpResponse.value;
  const parsed = bodySchema.parse(JSON.parse(body));
  return {
    grpcCode: response.status?.code ?? 0,
    status: status?.code ?? 0,
    contentType: headers.find((h) => h.header?.key === "content-type")?.header?.value,
    error: { code: parsed.error.code, statusCode: parsed.error.statusCode, retryable: parsed.error.retryable, message: parsed.error.message },
  };
}

function remaining(response: CheckResponse): string | undefined {
  if (response.httpResponse.case !== "okResponse") throw new Error(`expected an allow, got ${response.httpResponse.case ?? "nothing"}`);
  return response.httpResponse.value.responseHeadersToAdd.find((h) => h.header?.key === "x-ratelimit-remaining")?.header?.value;
}

const BAD_SETTINGS: Array<[string, Record<string, string>, RegExp]> = [
  ['cost "abc"', { cost: "abc" }, /"cost"/],
  ['cost "-1"', { cost: "-1" }, /"cost"/],
  ['cost "1.5"', { cost: "1.5" }, /"cost"/],
  ['cost "1e3"', { cost: "1e3" }, /"cost"/],
  ['cost "12abc"', { cost: " 12abc " }, /"cost"/],
  ['required_scopes "read write" (spaces, not commas)', { required_scopes: "read write" }, /"required_scopes"/],
  ['required_scopes "Decks" (not a scope name)', { required_scopes: "Decks" }, /"required_scopes"/],
  ['required_scopes "deck" (not in scopes.catalog, so no key can hold it)', { required_scopes: "deck" }, /"required_scopes".*scopes\.catalog/],
];

describe("fail closed: malformed context_extensions", () => {
  it.each(BAD_SETTINGS)("%s is a 500 ROUTE_MISCONFIGURED denial with a JSON body, not a gRPC error", async (_name, extensions, names) => {
    const key = await issue(["decks"]);
    const answer = denied(await kg.check(checkInit({ authorization: `Bearer ${key}` }, "/v1/decks/1", "GET", extensions)));
    // CheckResponse.status is INTERNAL, not OK: Envoy denies with denied_response, whatever failure_mode_allow says.
    expect(answer).toMatchObject({ grpcCode: 13, status: 500, contentType: "application/json", error: { code: "ROUTE_MISCONFIGURED", statusCode: 500, retryable: false } });
    expect(answer.error.message).toMatch(names);
    expect(answer.error.message).toMatch(/gateway configuration error/);
  });

  it("the operator's log names the bad value; the client's answer does not echo it", async () => {
    const key = await issue(["decks"]);
    const answer = denied(await kg.check(checkInit({ authorization: `Bearer ${key}` }, "/v1/decks/1", "GET", { cost: "free-for-all" })));
    expect(answer.error.message).not.toContain("free-for-all");
    const logged = kg.logLines.filter((line) => line.includes("bad per-route settings from the proxy"));
    expect(logged.some((line) => line.includes('"cost":"free-for-all"'))).toBe(true);
  });

  it("nothing is charged for a refused setting or path", async () => {
    const key = await issue(["decks"]);
    const ok = () => kg.check(checkInit({ authorization: `Bearer ${key}` }, "/v1/decks/1"));
    expect(remaining(await ok())).toBe("99");
    for (const cost of ["abc", "-5"]) denied(await kg.check(checkInit({ authorization: `Bearer ${key}` }, "/v1/decks/1", "GET", { cost })));
    expect(denied(await kg.check(checkInit({ authorization: `Bearer ${key}` }, "/v1/decks;x=1"))).error.code).toBe("INVALID_REQUEST");
    expect(remaining(await ok())).toBe("98");
  });
});

describe("fail closed: blank context_extensions mean not set", () => {
  it.each(["", " ", "\t"])("required_scopes %j keeps the routes table's scopes", async (blank) => {
    const without = await issue(["tutor"]);
    const answer = denied(await kg.check(checkInit({ authorization: `Bearer ${without}` }, "/v1/decks/1", "GET", { required_scopes: blank })));
    expect(answer).toMatchObject({ status: 403, error: { code: "FORBIDDEN", message: 'This API key does not have the "decks" scope.' } });
    const withDecks = await issue(["decks"]);
    expect((await kg.check(checkInit({ authorization: `Bearer ${withDecks}` }, "/v1/decks/1", "GET", { required_scopes: blank }))).httpResponse.case).toBe("okResponse");
  });

  it("a blank cost keeps the route's cost, and a blank project_id the route's project", async () => {
    const key = await issue(["decks"]);
    expect(remaining(await kg.check(checkInit({ authorization: `Bearer ${key}` }, "/v1/decks/1", "GET", { cost: "" })))).toBe("99");
    expect(remaining(await kg.check(checkInit({ authorization: `Bearer ${key}` }, "/v1/decks/1", "GET", { cost: "  " })))).toBe("98");
    const locked = await issue([], "beta");
    const answer = denied(await kg.check(checkInit({ authorization: `Bearer ${locked}` }, "/v1/projects/alpha/x", "GET", { project_id: " " })));
    expect(answer).toMatchObject({ status: 403, error: { code: "FORBIDDEN", message: "This API key is locked to another project." } });
  });
});
