import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { stringify } from "yaml";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { PERMISSIONS } from "../../src/admin/permissions.js";
import { postJson, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

const ACME = "acme-only-token-0123456789abcdefghijk";
let kg: TestKeygate;
let dir: string;
beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), "keygate-tokens-"));
  const path = join(dir, "admin-tokens.yaml");
  writeFileSync(path, stringify({ tokens: [{ name: "acme-only", token: ACME, permissions: [...PERMISSIONS], owners: ["acme"] }] }));
  kg = await startKeygate({ env: { KEYGATE_ADMIN_TOKENS_FILE: path } });
});
afterAll(async () => {
  await kg.stop();
  rmSync(dir, { recursive: true, force: true });
});

describe("owner-limited token: another owner's key answers as a missing one everywhere", () => {
  it("every key-id call site", async () => {
    await kg.admin.upsertAccount({ ownerId: "globex", plan: "business" });
    const theirs = await kg.admin.createKey({ ownerId: "globex", name: "g" });
    const revoked = await kg.admin.createKey({ ownerId: "globex", name: "g2" });
    await kg.admin.revokeKey({ id: revoked.key?.id ?? "" });
    const mine = await kg.admin.createKey({ ownerId: "acme", name: "a" });
    const missing = "key_01ARZ3NDEKTSV4RRFFQ69G5FAV";
    const calls: Array<[string, (id: string) => unknown]> = [
      ["GetKey", (id) => ({ id })], ["UpdateKey", (id) => ({ id, name: "x" })], ["RevokeKey", (id) => ({ id })], ["RotateKey", (id) => ({ id })],
      ["DisableKey", (id) => ({ id })], ["EnableKey", (id) => ({ id })],
      ["ChargeUsage", (id) => ({ keyId: id, cost: "1", idempotencyKey: "c" })], ["ChargeUsage", (id) => ({ keyId: id, ownerId: "acme", cost: "1", idempotencyKey: "c2" })],
      ["ListAuditEvents", (id) => ({ keyId: id })], ["ListAuditEvents", (id) => ({ keyId: id, ownerId: "acme" })],
      ["UpdateKey", (id) => ({ id })], ["RotateKey", (id) => ({ id, graceDays: 99 })], ["DisableKey", (id) => ({ id, reason: "x".repeat(300) })],
    ];
    const diffs: string[] = [];
    for (const [method, body] of calls) {
      const norm = (r: { status: number; json: Record<string, unknown> }, id: string) => JSON.stringify([r.status, r.json["code"], String(r.json["message"]).replaceAll(id, "ID")]);
      const a = norm(await postJson(kg.ports.admin, method, body(theirs.key?.id ?? ""), ACME), theirs.key?.id ?? "");
      const r = norm(await postJson(kg.ports.admin, method, body(revoked.key?.id ?? ""), ACME), revoked.key?.id ?? "");
      const b = norm(await postJson(kg.ports.admin, method, body(missing), ACME), missing);
      if (a !== b || r !== b) diffs.push(`${method} ${JSON.stringify(body("ID"))}: theirs ${a} revoked ${r} missing ${b}`);
    }
    const v = await postJson(kg.ports.admin, "VerifyKey", { secret: revoked.secret }, ACME);
    diffs.push(...(v.json["code"] === "UNAUTHENTICATED" ? [] : [`VerifyKey revoked theirs: ${JSON.stringify(v.json)}`]));
    expect(diffs).toEqual([]);
    expect((await kg.admin.getKey({ id: theirs.key?.id ?? "" })).key?.state).toBe("active");
    expect(mine.key?.id).toBeDefined();
  });
});
