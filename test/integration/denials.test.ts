import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { DENIAL_CASES } from "../harness/denial-cases.js";
import type { EntryAnswer } from "../harness/denial-cases.js";
import { checkInit, httpCheck, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

interface ErrorBody {
  success: boolean;
  error: { title: string; message: string; retryable: boolean; statusCode: number; code: string };
  requestId: string;
}

let kg: TestKeygate;
let ownerSeq = 0;
beforeAll(async () => {
  kg = await startKeygate();
});
afterAll(async () => {
  await kg.stop();
});
afterEach(() => {
  kg.clock.offsetMs = 0;
});

function authHeaders(key: string | null): Record<string, string> {
  return key === null ? {} : { authorization: `Bearer ${key}` };
}

const entries: Record<string, (key: string | null, path: string, requiredScopes: string[], projectId: string) => Promise<EntryAnswer>> = {
  "gRPC Check": async (key, path) => {
    const response = await kg.check(checkInit(authHeaders(key), path));
    expect(response.httpResponse.case).toBe("deniedResponse");
    if (response.httpResponse.case !== "deniedResponse") throw new Error("not denied");
    const denied = response.httpResponse.value;
    const headers = Object.fromEntries(denied.headers.map((h) => [h.header?.key ?? "", h.header?.value ?? ""]));
    expect(headers["content-type"]).toBe("application/json");
    const body = JSON.parse(denied.body) as ErrorBody;
    expect(body.success).toBe(false);
    expect(body.requestId).toBe("req-1");
    expect(body.error.statusCode).toBe(denied.status?.code);
    expect(response.status?.code).not.toBe(0);
    if (denied.status?.code === 401) expect(headers["www-authenticate"]).toBe("Bearer");
    else expect(headers["www-authenticate"]).toBeUndefined();
    return { status: denied.status?.code ?? 0, code: body.error.code, message: body.error.message };
  },
  "HTTP mode": async (key, path) => {
    const res = await httpCheck(kg.ports.http, `/check${path}`, authHeaders(key));
    expect(res.headers.get("content-type")).toBe("application/json");
    const body = JSON.parse(res.body) as ErrorBody;
    expect(body.error.statusCode).toBe(res.status);
    expect(res.headers.get("x-keygate-owner-id")).toBeNull();
    if (res.status === 401) expect(res.headers.get("www-authenticate")).toBe("Bearer");
    else expect(res.headers.get("www-authenticate")).toBeNull();
    return { status: res.status, code: body.error.code, message: body.error.message };
  },
};

describe.each(Object.entries(entries))("denials via %s", (_entry, call) => {
  it.each(DENIAL_CASES.map((c) => [c.name, c] as const))("%s", async (_name, denial) => {
    const request = await denial.prepare(kg, `owner-deny-${++ownerSeq}`);
    const answer = await call(request.key, request.path, request.requiredScopes, request.projectId);
    expect(answer.status).toBe(denial.status);
    expect(answer.code).toBe(denial.code);
    expect(answer.message).toContain(denial.message);
  });
});

// The table stops at 403; a 429 is the other denial a client must not read as "sign in again".
describe.each(Object.entries(entries))("rate-limited denial via %s", (_entry, call) => {
  it("is 429 RATE_LIMITED without WWW-Authenticate", async () => {
    const owner = `owner-deny-${++ownerSeq}`;
    await kg.admin.upsertAccount({ ownerId: owner, plan: "business" });
    const created = await kg.admin.createKey({ ownerId: owner, name: "one a minute", rateLimit: { limit: 1, windowSeconds: 60 } });
    expect((await kg.check(checkInit(authHeaders(created.secret)))).status?.code).toBe(0);
    const answer = await call(created.secret, "/v1/things", [], "");
    expect(answer.status).toBe(429);
    expect(answer.code).toBe("RATE_LIMITED");
  });
});

describe("denials via VerifyKey", () => {
  it.each(DENIAL_CASES.filter((c) => c.name !== "no key").map((c) => [c.name, c] as const))("%s", async (_name, denial) => {
    const request = await denial.prepare(kg, `owner-verify-${++ownerSeq}`);
    if (request.key === null) throw new Error("case without a key");
    const answer = await kg.admin.verifyKey({ secret: request.key, requiredScopes: request.requiredScopes, projectId: request.projectId });
    expect(answer.valid).toBe(false);
    expect(answer.code).toBe(denial.code);
    expect(answer.message).toContain(denial.message);
  });

  it("no key is INVALID_ARGUMENT naming the secret field", async () => {
    await expect(kg.admin.verifyKey({ secret: "" })).rejects.toThrow(/secret: is required/);
  });
});
