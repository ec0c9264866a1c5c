import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { postJson, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

// A failed admin authentication is logged at warn. It logged `method`, the last segment of the
// request path, whatever the caller sent: whole, at any length the HTTP head allows (16 KiB), a
// caller with no token wrote lines of its choosing and size into keygate's log; then cut to 200
// characters, which could split an admin token the logger redacts only by its exact text
// (admin-log-method-token). A KeyAdmin method is now logged by its name (`method`), anything
// else by its length alone (`methodLength`).

/** The `method` and `methodLength` of the first "admin authentication failed" line logged after `from` lines. */
function loggedMethod(kg: TestKeygate, from: number): { method: unknown; methodLength: unknown } {
  const line = kg.logLines.slice(from).find((l) => l.includes("admin authentication failed"));
  if (line === undefined) throw new Error("no failed authentication was logged");
  const fields = JSON.parse(line) as Record<string, unknown>;
  return { method: fields["method"], methodLength: fields["methodLength"] };
}

describe("admin port security: an unauthenticated caller's method name is logged within bounds", () => {
  let kg: TestKeygate;
  beforeAll(async () => {
    kg = await startKeygate();
  });
  afterAll(async () => {
    await kg.stop();
  });

  it("a 12,000-character method name with no token: 401, and the log gives its length, none of its text", async () => {
    const from = kg.logLines.length;
    const answer = await postJson(kg.ports.admin, "X".repeat(12_000), {}, null);
    expect(answer.status).toBe(401);
    expect(loggedMethod(kg, from)).toEqual({ method: undefined, methodLength: 12_000 });
    expect(kg.logLines.slice(from).join("")).not.toContain("XXXX");
  });

  it("a short name that is no KeyAdmin method, with no token: its length only", async () => {
    const from = kg.logLines.length;
    const answer = await postJson(kg.ports.admin, "DropAllKeys", {}, null);
    expect(answer.status).toBe(401);
    expect(loggedMethod(kg, from)).toEqual({ method: undefined, methodLength: 11 });
    expect(kg.logLines.slice(from).join("")).not.toContain("DropAllKeys");
  });

  it("happy: a KeyAdmin method with a wrong token is logged by its name", async () => {
    const from = kg.logLines.length;
    const answer = await postJson(kg.ports.admin, "GetAccount", { ownerId: "o" }, "not-the-admin-token-0123456789abcdef");
    expect(answer.status).toBe(401);
    expect(loggedMethod(kg, from)).toEqual({ method: "GetAccount", methodLength: undefined });
  });
});
