import { Code, ConnectError } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { checkInit, checkOutcome, postJson, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

// DisableKey / EnableKey: a reversible refusal (Unkey's "disable"), where RevokeKey is final.
let kg: TestKeygate;
let seq = 0;
const owner = (): string => `owner-disable-${++seq}`;

beforeAll(async () => {
  kg = await startKeygate();
});
afterAll(async () => {
  await kg.stop();
});

async function newKey(ownerId: string, plan = "business"): Promise<{ id: string; secret: string }> {
  await kg.admin.upsertAccount({ ownerId, plan });
  const created = await kg.admin.createKey({ ownerId, name: "disable test" });
  if (created.key === undefined) throw new Error("CreateKey answered no key");
  return { id: created.key.id, secret: created.secret };
}

const check = async (secret: string): Promise<{ status: number; code: string | null }> =>
  checkOutcome(await kg.check(checkInit({ authorization: `Bearer ${secret}` })));

async function failure(call: Promise<unknown>): Promise<{ code: Code; message: string }> {
  try {
    await call;
  } catch (error) {
    const connect = ConnectError.from(error);
    return { code: connect.code, message: connect.rawMessage };
  }
  throw new Error("the call succeeded");
}

describe("DisableKey and EnableKey happy", () => {
  it("a disabled key is refused 401 KEY_DISABLED at once, and allowed again once enabled", async () => {
    const key = await newKey(owner());
    expect(await check(key.secret)).toEqual({ status: 200, code: null });
    const disabled = await kg.admin.disableKey({ id: key.id, reason: "card declined" });
    expect(disabled.key?.state).toBe("disabled");
    expect(disabled.key?.disabledAt).toBeDefined();
    expect(await check(key.secret)).toEqual({ status: 401, code: "KEY_DISABLED" });
    const enabled = await kg.admin.enableKey({ id: key.id });
    expect(enabled.key?.state).toBe("active");
    expect(enabled.key?.disabledAt).toBeUndefined();
    expect(await check(key.secret)).toEqual({ status: 200, code: null });
  });

  it("rotating a disabled key issues a disabled successor: the new secret is refused KEY_DISABLED until it is enabled", async () => {
    const key = await newKey(owner());
    await kg.admin.disableKey({ id: key.id, reason: "card declined" });
    const rotated = await kg.admin.rotateKey({ id: key.id, graceDays: 0 });
    expect(rotated.key?.state).toBe("disabled");
    expect(await check(rotated.secret)).toEqual({ status: 401, code: "KEY_DISABLED" });
    expect(await check(key.secret)).toEqual({ status: 401, code: "KEY_REVOKED" });
    await kg.admin.enableKey({ id: rotated.key?.id ?? "" });
    expect(await check(rotated.secret)).toEqual({ status: 200, code: null });
  });

  it("disabling twice keeps the first time; enabling an enabled key changes nothing", async () => {
    const key = await newKey(owner());
    const first = await kg.admin.disableKey({ id: key.id, reason: "" });
    kg.clock.advanceMs(60_000);
    const second = await kg.admin.disableKey({ id: key.id, reason: "" });
    expect(second.key?.disabledAt).toEqual(first.key?.disabledAt);
    await kg.admin.enableKey({ id: key.id });
    const again = await kg.admin.enableKey({ id: key.id });
    expect(again.key?.state).toBe("active");
  });

  it("VerifyKey reports a disabled key as KEY_DISABLED, and Connect JSON works as curl sends it", async () => {
    const key = await newKey(owner());
    const disabled = await postJson(kg.ports.admin, "DisableKey", { id: key.id, reason: "paused" });
    expect(disabled.status).toBe(200);
    expect((disabled.json["key"] as { state: string }).state).toBe("disabled");
    const verified = await postJson(kg.ports.admin, "VerifyKey", { secret: key.secret });
    expect(verified.json["code"]).toBe("KEY_DISABLED");
    // `valid` has field presence: JSON carries it when false too.
    expect(verified.json["valid"]).toBe(false);
  });

  it("records key.disable with its reason and key.enable in the audit trail", async () => {
    const ownerId = owner();
    const key = await newKey(ownerId);
    await kg.admin.disableKey({ id: key.id, reason: "card declined" });
    await kg.admin.enableKey({ id: key.id });
    const { events } = await kg.admin.listAuditEvents({ keyId: key.id });
    expect(events.map((e) => [e.action, e.ownerId, e.keyId])).toEqual([
      ["key.create", ownerId, key.id],
      ["key.disable", ownerId, key.id],
      ["key.enable", ownerId, key.id],
    ]);
    // Each change's value is JSON.
    expect(events[1]?.changes).toEqual({ reason: JSON.stringify("card declined") });
    expect(events[2]?.changes).toEqual({});
  });

  it("a disabled key keeps its slot under the plan's cap, so enabling it never exceeds the cap", async () => {
    const ownerId = owner();
    const only = await newKey(ownerId, "basic");
    await kg.admin.disableKey({ id: only.id, reason: "" });
    expect(await failure(kg.admin.createKey({ ownerId, name: "second" }))).toMatchObject({ code: Code.ResourceExhausted });
    const account = await kg.admin.getAccount({ ownerId });
    expect(account.account?.activeKeyCount).toBe(1);
  });
});

describe("DisableKey and EnableKey sad", () => {
  it("a revoked key can be neither disabled nor enabled (a revoke is final), and stays revoked", async () => {
    const key = await newKey(owner());
    await kg.admin.revokeKey({ id: key.id, reason: "leaked" });
    expect(await failure(kg.admin.disableKey({ id: key.id, reason: "" }))).toEqual({ code: Code.FailedPrecondition, message: `key ${key.id} is revoked; a revoked key cannot be disabled or enabled` });
    expect(await failure(kg.admin.enableKey({ id: key.id }))).toEqual({ code: Code.FailedPrecondition, message: `key ${key.id} is revoked; a revoked key cannot be disabled or enabled` });
    expect((await kg.admin.getKey({ id: key.id })).key?.state).toBe("revoked");
    expect(await check(key.secret)).toEqual({ status: 401, code: "KEY_REVOKED" });
  });

  it("refuses an unknown key, a malformed id and an over-long reason by name, and writes nothing", async () => {
    const key = await newKey(owner());
    expect((await failure(kg.admin.disableKey({ id: "key_01ARZ3NDEKTSV4RRFFQ69G5FAV", reason: "" }))).code).toBe(Code.NotFound);
    const malformed = await failure(kg.admin.enableKey({ id: "not-a-key" }));
    expect(malformed.code).toBe(Code.InvalidArgument);
    expect(malformed.message).toContain("id");
    const long = await failure(kg.admin.disableKey({ id: key.id, reason: "x".repeat(201) }));
    expect(long).toEqual({ code: Code.InvalidArgument, message: "reason: must be at most 200 characters" });
    expect((await kg.admin.getKey({ id: key.id })).key?.state).toBe("active");
    const { events } = await kg.admin.listAuditEvents({ keyId: key.id });
    expect(events.map((e) => e.action)).toEqual(["key.create"]);
  });
});
