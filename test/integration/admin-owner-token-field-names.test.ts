import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { stringify } from "yaml";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { TEST_POLICY, postJson, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

// A token limited to listed owners: a malformed key_id must be refused naming key_id (the field
// the caller sent), as it is for an unscoped token, not "id".
const ACME = { name: "acme-only", token: "owner-limited-acme-token-0123456789ab", permissions: ["usage:write", "audit:read"], owners: ["acme"] };
const FULL = { name: "full", token: "owner-limited-full-token-0123456789ab", permissions: ["usage:write", "audit:read"] };

let kg: TestKeygate;
beforeAll(async () => {
  const dir = mkdtempSync(join(tmpdir(), "keygate-tokens-"));
  const path = join(dir, "admin-tokens.yaml");
  writeFileSync(path, stringify({ tokens: [ACME, FULL] }));
  kg = await startKeygate({ policy: TEST_POLICY, env: { KEYGATE_ADMIN_TOKENS_FILE: path } });
});
afterAll(async () => {
  await kg.stop();
});

describe("scoped token: a malformed key_id is named key_id", () => {
  it("ChargeUsage", async () => {
    const body = { keyId: "not-a-key", cost: 1, idempotencyKey: "c-1" };
    const full = await postJson(kg.ports.admin, "ChargeUsage", body, FULL.token);
    expect([full.status, String(full.json["message"]).split(":")[0]]).toEqual([400, "key_id"]);
    const scoped = await postJson(kg.ports.admin, "ChargeUsage", body, ACME.token);
    expect([scoped.status, String(scoped.json["message"]).split(":")[0]]).toEqual([400, "key_id"]);
  });

  it("ListAuditEvents", async () => {
    const full = await postJson(kg.ports.admin, "ListAuditEvents", { keyId: "not-a-key" }, FULL.token);
    expect([full.status, String(full.json["message"]).split(":")[0]]).toEqual([400, "key_id"]);
    const scoped = await postJson(kg.ports.admin, "ListAuditEvents", { keyId: "not-a-key" }, ACME.token);
    expect([scoped.status, String(scoped.json["message"]).split(":")[0]]).toEqual([400, "key_id"]);
  });
});
