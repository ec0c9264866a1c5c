import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { stringify } from "yaml";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { loadTokensFile } from "../../src/admin/permissions.js";
import { TEST_POLICY, postJson, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

// Named admin tokens with permissions (KEYGATE_ADMIN_TOKENS_FILE): a backend that only reads
// usage or verifies keys holds no power to mint or revoke them.
const TOKENS = {
  "usage-reader": { token: "usage-reader-token-0123456789abcdef", permissions: ["usage:read"] },
  verifier: { token: "verifier-token-0123456789abcdefghijk", permissions: ["verify"] },
  billing: { token: "billing-token-0123456789abcdefghijklm", permissions: ["verify", "usage:write", "accounts:read"] },
  "key-admin": { token: "key-admin-token-0123456789abcdefghij", permissions: ["keys:write", "keys:read"] },
  "acme-only": { token: "acme-only-token-0123456789abcdefghij", permissions: ["keys:write", "keys:read", "accounts:read", "verify", "usage:write", "audit:read"], owners: ["acme"] },
} as const;

function tokensFile(entries: unknown): string {
  const dir = mkdtempSync(join(tmpdir(), "keygate-tokens-"));
  const path = join(dir, "admin-tokens.yaml");
  writeFileSync(path, stringify(entries));
  return path;
}

let kg: TestKeygate;
beforeAll(async () => {
  const path = tokensFile({ tokens: Object.entries(TOKENS).map(([name, entry]) => ({ name, ...entry })) });
  kg = await startKeygate({ policy: TEST_POLICY, env: { KEYGATE_ADMIN_TOKENS_FILE: path } });
});
afterAll(async () => {
  await kg.stop();
});

const as = (name: keyof typeof TOKENS, method: string, body: unknown) => postJson(kg.ports.admin, method, body, TOKENS[name].token);

describe("scoped admin tokens security", () => {
  it("a usage:read token cannot create a key: 403 permission_denied naming the permission, and nothing is written", async () => {
    const refused = await as("usage-reader", "CreateKey", { ownerId: "scoped-1", name: "nope" });
    expect(refused.status).toBe(403);
    expect(refused.json).toEqual({ code: "permission_denied", message: 'the admin token "usage-reader" lacks the "keys:write" permission, which CreateKey needs' });
    const listed = await kg.admin.listKeys({ ownerId: "scoped-1", includeRevoked: true });
    expect(listed.keys).toHaveLength(0);
    expect((await as("usage-reader", "GetUsage", { ownerId: "scoped-1", from: "2026-12-01", to: "2026-12-03" })).status).toBe(200);
  });

  it("each token can call what it lists and nothing else", async () => {
    const created = await kg.admin.createKey({ ownerId: "scoped-2", name: "k" });
    expect((await as("verifier", "VerifyKey", { secret: created.secret })).json["valid"]).toBe(true);
    expect((await as("verifier", "RevokeKey", { id: created.key?.id })).status).toBe(403);
    expect((await as("verifier", "GetAccount", { ownerId: "scoped-2" })).status).toBe(403);
    expect((await as("billing", "GetAccount", { ownerId: "scoped-2" })).status).toBe(200);
    expect((await as("billing", "UpsertAccount", { ownerId: "scoped-2", plan: "pro" })).status).toBe(403);
    expect((await as("key-admin", "ListAuditEvents", {})).status).toBe(403);
    expect((await kg.admin.getKey({ id: created.key?.id ?? "" })).key?.state).toBe("active");
  });

  it("VerifyKey with a cost also needs usage:write", async () => {
    const created = await kg.admin.createKey({ ownerId: "scoped-3", name: "k" });
    const refused = await as("verifier", "VerifyKey", { secret: created.secret, cost: "1", idempotencyKey: "v-1" });
    expect([refused.status, refused.json["message"]]).toEqual([403, 'the admin token "verifier" lacks the "usage:write" permission, which VerifyKey with a cost needs']);
    const charged = await as("billing", "VerifyKey", { secret: created.secret, cost: "1", idempotencyKey: "v-1" });
    expect([charged.status, charged.json["valid"], charged.json["charged"]]).toEqual([200, true, true]);
  });

  it("the audit trail names the token that made a change", async () => {
    const created = await as("key-admin", "CreateKey", { ownerId: "scoped-4", name: "audited" });
    expect(created.status).toBe(200);
    const events = await kg.admin.listAuditEvents({ ownerId: "scoped-4" });
    expect(events.events.map((e) => [e.action, e.actor])).toEqual([
      ["account.upsert", "key-admin"],
      ["key.create", "key-admin"],
    ]);
  });
});

describe("owner-limited admin tokens security", () => {
  it("acts for its listed owners only: another owner's account is refused, another owner's key reads as unknown, and nothing is charged or changed", async () => {
    await kg.admin.upsertAccount({ ownerId: "acme", plan: "business" });
    const mine = await kg.admin.createKey({ ownerId: "acme", name: "acme-key" });
    const theirs = await kg.admin.createKey({ ownerId: "globex", name: "globex-key" });
    expect((await as("acme-only", "CreateKey", { ownerId: "acme", name: "made" })).status).toBe(200);
    const otherAccount = await as("acme-only", "CreateKey", { ownerId: "globex", name: "nope" });
    expect([otherAccount.status, otherAccount.json["message"]]).toEqual([403, 'the admin token "acme-only" may not act for this owner_id']);
    expect((await as("acme-only", "GetAccount", { ownerId: "globex" })).status).toBe(403);
    const revokeTheirs = await as("acme-only", "RevokeKey", { id: theirs.key?.id });
    expect([revokeTheirs.status, revokeTheirs.json["code"], revokeTheirs.json["message"]]).toEqual([404, "not_found", `key ${theirs.key?.id} does not exist`]);
    expect((await kg.admin.getKey({ id: theirs.key?.id ?? "" })).key?.state).toBe("active");
    expect((await as("acme-only", "GetKey", { id: mine.key?.id })).status).toBe(200);
    // VerifyKey: another owner's key is an unknown key, and a cost is not charged for it.
    const verifyTheirs = await as("acme-only", "VerifyKey", { secret: theirs.secret, cost: "1", idempotencyKey: "x-1" });
    expect([verifyTheirs.json["valid"], verifyTheirs.json["code"], verifyTheirs.json["charged"], verifyTheirs.json["key"]]).toEqual([false, "UNAUTHENTICATED", undefined, undefined]);
    expect((await as("acme-only", "VerifyKey", { secret: mine.secret })).json["valid"]).toBe(true);
    expect((await as("acme-only", "ChargeUsage", { keyId: theirs.key?.id, cost: "0", idempotencyKey: "c-1" })).status).toBe(404);
    // Audit events: an owner must be named, and only a listed one.
    expect((await as("acme-only", "ListAuditEvents", {})).status).toBe(403);
    expect((await as("acme-only", "ListAuditEvents", { ownerId: "globex" })).status).toBe(403);
    expect((await as("acme-only", "ListAuditEvents", { ownerId: "acme" })).status).toBe(200);
    const globexEvents = await kg.admin.listAuditEvents({ ownerId: "globex" });
    expect(globexEvents.events.map((e) => e.action)).toEqual(["account.upsert", "key.create"]);
  });
});

describe("scoped admin tokens error", () => {
  it("a bad tokens file is refused naming the file and the problem, never a token", () => {
    const cases: Array<[unknown, RegExp]> = [
      [{ tokens: [{ name: "a", token: "short", permissions: ["verify"] }] }, /tokens\.0\.token: must be at least 24 characters/],
      [{ tokens: [{ name: "a", token: "x".repeat(30), permissions: ["keys:delete"] }] }, /tokens\.0\.permissions\.0/],
      [{ tokens: [{ name: "a", token: "x".repeat(30), permissions: ["verify"] }, { name: "a", token: "y".repeat(30), permissions: ["verify"] }] }, /the name "a" is used twice/],
      [{ tokens: [{ name: "a", token: "z".repeat(30), permissions: ["verify"] }, { name: "b", token: "z".repeat(30), permissions: ["verify"] }] }, /two entries \(one is "b"\) have the same token/],
      // A typo that makes a token part of a field's name: the problem names the place, not the field.
      [{ tokens: [{ name: "a", permissions: ["verify"], [`token; "${"x".repeat(30)}"`]: null }] }, /tokens\.0: unknown field \(allowed: name, token, permissions, owners\)$/],
      [{ [`tokens, "${"y".repeat(30)}"`]: null, tokens: [] }, /the file: unknown field \(allowed: tokens\)$/],
    ];
    for (const [entries, message] of cases) {
      const path = tokensFile(entries);
      let thrown: unknown;
      try {
        loadTokensFile(path);
      } catch (error) {
        thrown = error;
      }
      expect(thrown).toBeInstanceOf(Error);
      const text = (thrown as Error).message;
      expect(text).toMatch(message);
      expect(text).toContain(path);
      for (const secret of ["x".repeat(30), "y".repeat(30), "z".repeat(30)]) expect(text).not.toContain(secret);
    }
  });
});
