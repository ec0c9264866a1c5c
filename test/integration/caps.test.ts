import { Code, ConnectError } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { CheckResponse } from "../../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import { checkInit, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

// A plan's cap on keys holds: chained rotations keep one key in grace, not one per rotation, and
// a downgrade below the keys an account holds refuses new keys, says so, and breaks none.
let kg: TestKeygate;
beforeAll(async () => {
  kg = await startKeygate();
});
afterAll(async () => {
  await kg.stop();
});

function status(response: CheckResponse): number {
  if (response.httpResponse.case === "okResponse") return 200;
  return response.httpResponse.case === "deniedResponse" ? (response.httpResponse.value.status?.code ?? 0) : 0;
}

async function working(secrets: readonly string[]): Promise<number> {
  let n = 0;
  for (const secret of secrets) if (status(await kg.check(checkInit({ authorization: `Bearer ${secret}` }))) === 200) n += 1;
  return n;
}

async function refusal(call: Promise<unknown>): Promise<Code | "fulfilled"> {
  try {
    await call;
    return "fulfilled";
  } catch (error) {
    return ConnectError.from(error).code;
  }
}

describe("plan caps happy", () => {
  it("five chained rotations with 30 days' grace leave a one-key plan with two working keys: the newest and the one it replaced", async () => {
    const ownerId = "caps-chain";
    await kg.admin.upsertAccount({ ownerId, plan: "basic" });
    const first = await kg.admin.createKey({ ownerId, name: "chain" });
    const secrets = [first.secret];
    let id = first.key?.id ?? "";
    for (let i = 0; i < 5; i++) {
      const rotated = await kg.admin.rotateKey({ id, graceDays: 30 });
      secrets.push(rotated.secret);
      id = rotated.key?.id ?? "";
    }
    expect(await working(secrets)).toBe(2);
    expect(await working(secrets.slice(-2))).toBe(2);
    const listed = await kg.admin.listKeys({ ownerId, includeRevoked: true });
    expect(listed.keys.map((k) => k.state)).toEqual(["revoked", "revoked", "revoked", "revoked", "grace", "active"]);
    expect(listed.keys.slice(0, 4).map((k) => k.revokeReason)).toEqual(Array(4).fill("a later rotation ended its grace period"));
    const { events } = await kg.admin.listAuditEvents({ keyId: listed.keys[0]?.id ?? "" });
    expect(events.map((e) => e.action)).toEqual(["key.create", "key.rotate", "key.revoke"]);
  });

  it("a downgrade below the keys held keeps them working, refuses a new key, and GetAccount shows active over allowed", async () => {
    const ownerId = "caps-downgrade";
    await kg.admin.upsertAccount({ ownerId, plan: "business" });
    const secrets: string[] = [];
    for (let i = 0; i < 3; i++) secrets.push((await kg.admin.createKey({ ownerId, name: `k${i}` })).secret);
    await kg.admin.upsertAccount({ ownerId, plan: "basic" });
    expect(await working(secrets)).toBe(3);
    expect(await refusal(kg.admin.createKey({ ownerId, name: "one more" }))).toBe(Code.ResourceExhausted);
    const account = await kg.admin.getAccount({ ownerId });
    expect([account.account?.activeKeyCount, account.account?.maxActiveKeys]).toEqual([3, 1]);
  });
});
