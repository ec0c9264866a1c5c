import { execFile } from "node:child_process";
import { promisify } from "node:util";
import { timestampMs } from "@bufbuild/protobuf/wkt";
import { ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-node";
import { KeyAdmin } from "../../src/gen/keygate/v1/key_admin_pb.js";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { TestClock } from "../harness/clock.js";
import { checkInit, postJson, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

const run = promisify(execFile);
let kg: TestKeygate;
let seq = 0;
const owner = (): string => `owner-admin-${++seq}`;

beforeAll(async () => {
  kg = await startKeygate();
});
afterAll(async () => {
  await kg.stop();
});

async function keyCount(ownerId: string): Promise<number> {
  const listed = await postJson(kg.ports.admin, "ListKeys", { ownerId, includeRevoked: true, pageSize: 100 });
  return Array.isArray(listed.json["keys"]) ? listed.json["keys"].length : 0;
}

describe("KeyAdmin happy (Connect JSON, as curl sends it)", () => {
  it("creates a key whose secret is shown once and verifies it", async () => {
    const ownerId = owner();
    const created = await postJson(kg.ports.admin, "CreateKey", { ownerId, name: "production", mode: "test" });
    expect(created.status).toBe(200);
    const secret = created.json["secret"];
    expect(typeof secret).toBe("string");
    expect(String(secret)).toMatch(/^kg_test_[0-9A-Za-z]{38}$/);
    const key = created.json["key"] as Record<string, unknown>;
    expect(key["id"]).toMatch(/^key_[0-9A-HJKMNP-TV-Z]{26}$/);
    expect(key["start"]).toBe(String(secret).slice(0, 12));
    expect(key["last4"]).toBe(String(secret).slice(-4));
    expect(key["scopes"]).toEqual(["tutor"]);
    expect(key["state"]).toBe("active");
    expect(JSON.stringify(key)).not.toContain(String(secret));

    const got = await postJson(kg.ports.admin, "GetKey", { id: key["id"] });
    expect(got.status).toBe(200);
    expect(JSON.stringify(got.json)).not.toContain(String(secret).slice(12, -4));
    expect(got.json["secret"]).toBeUndefined();

    const verified = await postJson(kg.ports.admin, "VerifyKey", { secret });
    expect(verified.json["valid"]).toBe(true);
    expect(verified.json["code"]).toBe("OK");
    expect((verified.json["account"] as Record<string, unknown>)["ownerId"]).toBe(ownerId);
    // A test-mode key counts toward the test keys' cap, not the live one (proto3 JSON leaves out a 0).
    expect((verified.json["account"] as Record<string, unknown>)["activeKeyCount"]).toBeUndefined();
    expect((verified.json["account"] as Record<string, unknown>)["activeTestKeyCount"]).toBe(1);
  });

  it("works through the real curl binary", async () => {
    const { stdout } = await run("curl", [
      "-sS",
      "-H",
      "content-type: application/json",
      "-H",
      `authorization: Bearer ${"kgadm_test_token_0123456789abcdefghij"}`,
      "-d",
      JSON.stringify({ ownerId: owner(), plan: "pro", role: "premium" }),
      `http://127.0.0.1:${kg.ports.admin}/keygate.v1.KeyAdmin/UpsertAccount`,
    ]);
    const account = (JSON.parse(stdout) as { account: Record<string, unknown> }).account;
    expect(account["plan"]).toBe("pro");
    expect(account["role"]).toBe("premium");
    expect(account["subscriptionStatus"]).toBe("active");
    expect(account["maxActiveKeys"]).toBe(3);
  });

  it("answers gRPC-Web on the same port", async () => {
    const web = createClient(
      KeyAdmin,
      createGrpcWebTransport({
        baseUrl: `http://127.0.0.1:${kg.ports.admin}`,
        httpVersion: "1.1",
        interceptors: [
          (next) => (req) => {
            req.header.set("authorization", "Bearer kgadm_test_token_0123456789abcdefghij");
            return next(req);
          },
        ],
      }),
    );
    const ownerId = owner();
    const upserted = await web.upsertAccount({ ownerId, plan: "business", subscriptionStatus: "none" });
    expect(upserted.account).toMatchObject({ ownerId, plan: "business", subscriptionStatus: "none", maxActiveKeys: 5, activeKeyCount: 0 });
  });

  it("lists with paging, renames, rescopes and revokes idempotently", async () => {
    const ownerId = owner();
    await kg.admin.upsertAccount({ ownerId, plan: "business" });
    const ids: string[] = [];
    for (let i = 0; i < 5; i++) {
      const created = await kg.admin.createKey({ ownerId, name: `k${i}`, projectId: i % 2 === 0 ? "even" : "" });
      ids.push(created.key?.id ?? "");
    }
    const first = await kg.admin.listKeys({ ownerId, pageSize: 2 });
    expect(first.keys.map((k) => k.id)).toEqual(ids.slice(0, 2));
    const second = await kg.admin.listKeys({ ownerId, pageSize: 2, pageToken: first.nextPageToken });
    expect(second.keys.map((k) => k.id)).toEqual(ids.slice(2, 4));
    const third = await kg.admin.listKeys({ ownerId, pageSize: 2, pageToken: second.nextPageToken });
    expect(third.keys.map((k) => k.id)).toEqual(ids.slice(4));
    expect(third.nextPageToken).toBe("");
    expect((await kg.admin.listKeys({ ownerId, projectId: "even" })).keys).toHaveLength(3);

    const renamed = await kg.admin.updateKey({ id: ids[0], name: "  renamed  " });
    expect(renamed.key?.name).toBe("renamed");
    expect(renamed.key?.scopes).toEqual(["tutor"]);
    const rescoped = await kg.admin.updateKey({ id: ids[0], scopes: ["decks", "progress", "decks"] });
    expect(rescoped.key?.scopes).toEqual(["decks", "progress"]);
    expect(rescoped.key?.name).toBe("renamed");

    const revoked = await kg.admin.revokeKey({ id: ids[1], reason: "leaked" });
    expect(revoked.key?.state).toBe("revoked");
    const again = await kg.admin.revokeKey({ id: ids[1], reason: "second time" });
    expect(again.key?.revokedAt).toEqual(revoked.key?.revokedAt);
    expect(again.key?.revokeReason).toBe("leaked");
    expect((await kg.admin.listKeys({ ownerId })).keys).toHaveLength(4);
    expect((await kg.admin.listKeys({ ownerId, includeRevoked: true })).keys).toHaveLength(5);
    expect((await kg.admin.getAccount({ ownerId })).account?.activeKeyCount).toBe(4);
  });

  it("records last use behind the hot path and flushes it on stop", async () => {
    const local = await startKeygate();
    const ownerId = owner();
    const created = await local.admin.createKey({ ownerId, name: "used" });
    const auth = { authorization: `Bearer ${created.secret}` };
    expect((await local.check(checkInit(auth))).status?.code).toBe(0);
    expect((await local.admin.getKey({ id: created.key?.id ?? "" })).key?.lastUsedAt).toBeUndefined();
    await local.stop({ keepData: true });
    const restarted = await startKeygate({ dataDir: local.dataDir });
    try {
      expect((await restarted.admin.getKey({ id: created.key?.id ?? "" })).key?.lastUsedAt).toBeDefined();
    } finally {
      await restarted.stop();
    }
  });
});

describe("KeyAdmin VerifyKey and last use", () => {
  it("records the use of a key VerifyKey answers valid for, charged or not, as a Check's; none for one it answers valid: false", async () => {
    const clock = new TestClock();
    clock.freeze("2026-06-01T12:00:00Z");
    const local = await startKeygate({ clock });
    const issue = async (name: string): Promise<{ id: string; secret: string }> => {
      const created = await local.admin.createKey({ ownerId: owner(), name });
      return { id: created.key?.id ?? "", secret: created.secret };
    };
    const [viaCheck, viaVerify, viaCharged, refused] = [await issue("proxy"), await issue("backend"), await issue("metered backend"), await issue("refused")];
    expect((await local.check(checkInit({ authorization: `Bearer ${viaCheck.secret}` }))).status?.code).toBe(0);
    const verified = await local.admin.verifyKey({ secret: viaVerify.secret });
    const charged = await local.admin.verifyKey({ secret: viaCharged.secret, cost: 1n, idempotencyKey: "req-1" });
    const wrongScope = await local.admin.verifyKey({ secret: refused.secret, requiredScopes: ["decks"] });
    expect([verified.valid, charged.valid, charged.charged, wrongScope.valid, wrongScope.code]).toEqual([true, true, true, false, "FORBIDDEN"]);
    await local.stop({ keepData: true });
    const restarted = await startKeygate({ dataDir: local.dataDir });
    try {
      const lastUsed = async (id: string): Promise<string | null> => {
        const at = (await restarted.admin.getKey({ id })).key?.lastUsedAt;
        return at === undefined ? null : new Date(timestampMs(at)).toISOString();
      };
      const used = "2026-06-01T12:00:00.000Z";
      expect([await lastUsed(viaCheck.id), await lastUsed(viaVerify.id), await lastUsed(viaCharged.id), await lastUsed(refused.id)]).toEqual([used, used, used, null]);
    } finally {
      await restarted.stop();
    }
  });
});

describe("KeyAdmin plan caps", () => {
  it("50 parallel CreateKey calls for a basic account yield exactly 1 key", async () => {
    const ownerId = owner();
    await kg.admin.upsertAccount({ ownerId, plan: "basic" });
    const results = await Promise.allSettled(Array.from({ length: 50 }, (_, i) => kg.admin.createKey({ ownerId, name: `race ${i}` })));
    const ok = results.filter((r) => r.status === "fulfilled");
    const refused = results.filter((r): r is PromiseRejectedResult => r.status === "rejected");
    expect(ok).toHaveLength(1);
    expect(refused).toHaveLength(49);
    for (const r of refused) {
      const error = ConnectError.from(r.reason);
      expect(error.code).toBe(8); // RESOURCE_EXHAUSTED
      expect(error.rawMessage).toBe('plan "basic" allows at most 1 active key');
    }
    expect(await keyCount(ownerId)).toBe(1);
  });

  it("the old key of a rotation does not count, so a basic account can rotate", async () => {
    const ownerId = owner();
    await kg.admin.upsertAccount({ ownerId, plan: "basic" });
    const created = await kg.admin.createKey({ ownerId, name: "only" });
    const rotated = await kg.admin.rotateKey({ id: created.key?.id ?? "" });
    expect(rotated.previous?.state).toBe("grace");
    const graceEnds = Number(rotated.previous?.graceEndsAt?.seconds ?? 0n) * 1000;
    expect(Math.round((graceEnds - kg.clock.now()) / 86_400_000)).toBe(7);
    expect((await kg.admin.getAccount({ ownerId })).account?.activeKeyCount).toBe(1);
    await expect(kg.admin.createKey({ ownerId, name: "second" })).rejects.toMatchObject({ code: 8 });
    await kg.admin.revokeKey({ id: rotated.key?.id ?? "" });
    const replacement = await kg.admin.createKey({ ownerId, name: "after revoke" });
    expect(replacement.key?.state).toBe("active");
  });

  it("a plan upgrade raises the cap", async () => {
    const ownerId = owner();
    await kg.admin.createKey({ ownerId, name: "a" });
    await expect(kg.admin.createKey({ ownerId, name: "b" })).rejects.toMatchObject({ code: 8 });
    await kg.admin.upsertAccount({ ownerId, plan: "pro" });
    await kg.admin.createKey({ ownerId, name: "b" });
    await kg.admin.createKey({ ownerId, name: "c" });
    await expect(kg.admin.createKey({ ownerId, name: "d" })).rejects.toThrow(/plan "pro" allows at most 3 active keys/);
  });
});

describe("KeyAdmin error: bad input is INVALID_ARGUMENT naming the field, and writes nothing", () => {
  const cases: Array<[string, string, string | Record<string, unknown>, RegExp]> = [
    ["empty name", "CreateKey", { ownerId: "bad-input", name: "" }, /name: must not be empty/],
    ["blank name", "CreateKey", { ownerId: "bad-input", name: "   " }, /name: must not be empty/],
    ["200-character name", "CreateKey", { ownerId: "bad-input", name: "x".repeat(200) }, /name: must be at most 100 characters/],
    ["unknown scope", "CreateKey", { ownerId: "bad-input", name: "n", scopes: ["tutor", "root"] }, /scopes\[1\]: unknown scope "root"/],
    ["bad mode", "CreateKey", { ownerId: "bad-input", name: "n", mode: "prod" }, /mode: must be one of live, test/],
    ["expiry in the past", "CreateKey", { ownerId: "bad-input", name: "n", expiresAt: "2001-01-01T00:00:00Z" }, /expires_at: must be in the future/],
    ["owner with spaces", "CreateKey", { ownerId: "bad input", name: "n" }, /owner_id: must be 1-128 printable ASCII/],
    ["$ne operator for owner", "CreateKey", '{"ownerId":{"$ne":null},"name":"n"}', /owner_id/],
    ["$gt operator for name", "CreateKey", '{"ownerId":"bad-input","name":{"$gt":""}}', /name/],
    ["__proto__ key", "CreateKey", '{"ownerId":"bad-input","name":"n","__proto__":{"admin":true}}', /__proto__/],
    ["constructor key", "CreateKey", '{"ownerId":"bad-input","name":"n","constructor":{"prototype":{}}}', /constructor/],
    ["operator in metadata key", "CreateKey", { ownerId: "bad-input", name: "n", metadata: { $where: "1" } }, /metadata\.\$where: keys are 1-64/],
    ["unknown plan", "UpsertAccount", { ownerId: "bad-input", plan: "platinum" }, /plan: must be one of basic, pro, business/],
    ["unknown subscription status", "UpsertAccount", { ownerId: "bad-input", subscriptionStatus: "trial" }, /subscription_status: must be one of/],
    ["unknown role", "UpsertAccount", { ownerId: "bad-input", role: "root" }, /role: must be one of standard, premium, admin/],
    ["malformed key id", "GetKey", { id: "key_123" }, /id: must be a key id/],
    ["malformed id on revoke", "RevokeKey", { id: "../../etc" }, /id: must be a key id/],
    ["grace_days 31", "RotateKey", { id: "key_01ARZ3NDEKTSV4RRFFQ69G5FAV", graceDays: 31 }, /grace_days: must be a whole number from 0 to 30; got 31/],
    ["grace_days -1", "RotateKey", { id: "key_01ARZ3NDEKTSV4RRFFQ69G5FAV", graceDays: -1 }, /grace_days: must be a whole number from 0 to 30; got -1/],
    ["page_size 1000", "ListKeys", { ownerId: "bad-input", pageSize: 1000 }, /page_size: must be between 0 and 100/],
    ["forged page token", "ListKeys", { ownerId: "bad-input", pageToken: "bm9wZQ" }, /page_token/],
    ["update with nothing to change", "UpdateKey", { id: "key_01ARZ3NDEKTSV4RRFFQ69G5FAV" }, /set name, scopes or rate_limit/],
    ["huge scope array", "CreateKey", { ownerId: "bad-input", name: "n", scopes: Array.from({ length: 5_000 }, () => "tutor") }, /scopes: at most 64 scopes/],
  ];

  it.each(cases)("%s", async (_name, method, body, message) => {
    const before = await keyCount("bad-input");
    const res = await postJson(kg.ports.admin, method, body);
    expect(res.status).toBe(400);
    expect(res.json["code"]).toBe("invalid_argument");
    expect(String(res.json["message"])).toMatch(message);
    expect(await keyCount("bad-input")).toBe(before);
    expect((await postJson(kg.ports.admin, "GetAccount", { ownerId: "bad-input" })).status).toBe(404);
  });

  it("rotating a revoked key is FAILED_PRECONDITION and issues nothing", async () => {
    const ownerId = owner();
    const created = await kg.admin.createKey({ ownerId, name: "k" });
    await kg.admin.revokeKey({ id: created.key?.id ?? "" });
    await expect(kg.admin.rotateKey({ id: created.key?.id ?? "" })).rejects.toMatchObject({ code: 9 });
    expect(await keyCount(ownerId)).toBe(1);
  });

  it("unknown ids are NOT_FOUND", async () => {
    await expect(kg.admin.getKey({ id: "key_01ARZ3NDEKTSV4RRFFQ69G5FAV" })).rejects.toMatchObject({ code: 5 });
    await expect(kg.admin.getAccount({ ownerId: "nobody-here" })).rejects.toMatchObject({ code: 5 });
  });
});

describe("KeyAdmin security: admin authentication", () => {
  it("refuses a missing token", async () => {
    const res = await postJson(kg.ports.admin, "GetAccount", { ownerId: "x" }, null);
    expect(res.status).toBe(401);
    expect(res.json["code"]).toBe("unauthenticated");
  });

  it("refuses a wrong token", async () => {
    const res = await postJson(kg.ports.admin, "GetAccount", { ownerId: "x" }, "kgadm_test_token_0123456789abcdefghiX");
    expect(res.status).toBe(401);
    expect(res.json["message"]).toBe("the admin token is not valid");
  });

  it("refuses an API key: keys cannot manage keys", async () => {
    const created = await kg.admin.createKey({ ownerId: owner(), name: "k" });
    const res = await postJson(kg.ports.admin, "CreateKey", { ownerId: "x", name: "y" }, created.secret);
    expect(res.status).toBe(401);
    expect(res.json["message"]).toBe("API keys cannot manage keys; use an admin token");
    expect(await keyCount("x")).toBe(0);
  });
});
