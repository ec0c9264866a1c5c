import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { stringify } from "yaml";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { TEST_POLICY, postJson, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

// A rotation with grace_days 0 revokes the old key at once (revoke_reason "rotated") and records
// only key.rotate. A later RevokeKey on that key changes nothing, so by README ("neither is a call
// that changes nothing (revoking again ...): it appends no record") it must append nothing. It
// must not take itself for "the retry of a revoke whose record the trail lacks" and append a key.revoke
// under its own token, dated at the rotation's time (the trail would then say the cleanup token revoked
// the key, before the rotation).

const TOKENS = [
  { name: "rotator", token: "rotator-token-0123456789abcdefghijkl", permissions: ["keys:write", "keys:read", "audit:read"] },
  { name: "cleanup", token: "cleanup-token-0123456789abcdefghijkl", permissions: ["keys:write", "keys:read", "audit:read"] },
];

let kg: TestKeygate;
beforeAll(async () => {
  const dir = mkdtempSync(join(tmpdir(), "keygate-tokens-"));
  const path = join(dir, "admin-tokens.yaml");
  writeFileSync(path, stringify({ tokens: TOKENS }));
  kg = await startKeygate({ policy: TEST_POLICY, env: { KEYGATE_ADMIN_TOKENS_FILE: path } });
});
afterAll(async () => {
  await kg.stop();
});

const as = (i: 0 | 1, method: string, body: unknown) => postJson(kg.ports.admin, method, body, TOKENS[i]?.token ?? "");

describe("audit: RevokeKey of a key a grace-0 rotation revoked", () => {
  it("changes nothing and appends nothing, whatever reason it gives", async () => {
    const ownerId = "audit-rot0";
    const created = await as(0, "CreateKey", { ownerId, name: "old" });
    const oldId = String((created.json["key"] as Record<string, unknown>)["id"]);
    const rotated = await as(0, "RotateKey", { id: oldId, graceDays: 0 });
    expect((rotated.json["previous"] as Record<string, unknown>)["state"]).toBe("revoked");

    // A cleanup job revokes the replaced key "to be sure", giving the obvious reason.
    const again = await as(1, "RevokeKey", { id: oldId, reason: "rotated" });
    expect(again.status).toBe(200);
    // The answer is the key as it was: nothing changed.
    expect((again.json["key"] as Record<string, unknown>)["revokedAt"]).toBe((rotated.json["previous"] as Record<string, unknown>)["revokedAt"]);

    const events = await as(0, "ListAuditEvents", { keyId: oldId, pageSize: 100 });
    const trail = (events.json["events"] as Array<Record<string, unknown>>).map((e) => [e["action"], e["actor"]]);
    // The create and the rotation, both by "rotator"; no key.revoke by "cleanup"
    // between them, dated at the rotation.
    expect(trail).toEqual([
      ["key.create", "rotator"],
      ["key.rotate", "rotator"],
    ]);
  });
});
