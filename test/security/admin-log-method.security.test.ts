import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { postJson, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

// A failed admin authentication is logged at warn with `method`: the last segment of the request
// path, whatever the caller sent. It was logged whole, at any length the HTTP head allows (16 KiB):
// a caller with no token wrote lines of its choosing and size into keygate's log. It is now cut as
// the gRPC port cuts a client-sent path in an error (README "Bounds on unauthenticated work").

/** The `method` of the first "admin authentication failed" line logged after `from` lines. */
function loggedMethod(kg: TestKeygate, from: number): unknown {
  const line = kg.logLines.slice(from).find((l) => l.includes("admin authentication failed"));
  if (line === undefined) throw new Error("no failed authentication was logged");
  return (JSON.parse(line) as Record<string, unknown>)["method"];
}

describe("admin port security: an unauthenticated caller's method name is logged within bounds", () => {
  let kg: TestKeygate;
  beforeAll(async () => {
    kg = await startKeygate();
  });
  afterAll(async () => {
    await kg.stop();
  });

  it("a 12,000-character method name with no token: 401, and the log quotes its first 200 characters and its length", async () => {
    const from = kg.logLines.length;
    const answer = await postJson(kg.ports.admin, "X".repeat(12_000), {}, null);
    expect(answer.status).toBe(401);
    expect(loggedMethod(kg, from)).toBe(`${"X".repeat(200)}… (12000 characters)`);
  });

  it("happy: a KeyAdmin method with a wrong token is logged by its name", async () => {
    const from = kg.logLines.length;
    const answer = await postJson(kg.ports.admin, "GetAccount", { ownerId: "o" }, "not-the-admin-token-0123456789abcdef");
    expect(answer.status).toBe(401);
    expect(loggedMethod(kg, from)).toBe("GetAccount");
  });
});
