import { Code, ConnectError } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

// README: "A revoke is final." DisableKey and EnableKey on a revoked key answer FAILED_PRECONDITION
// and write nothing; UpdateKey on a revoked key rewrote its name and scopes and appended key.update,
// so the record no longer showed what the key held when it was revoked.
let kg: TestKeygate;
beforeAll(async () => { kg = await startKeygate(); });
afterAll(async () => { await kg.stop(); });

describe("UpdateKey on a revoked key", () => {
  it("is refused FAILED_PRECONDITION, the revoked key is unchanged, and nothing is audited", async () => {
    await kg.admin.upsertAccount({ ownerId: "owner-update-revoked", plan: "business" });
    const created = await kg.admin.createKey({ ownerId: "owner-update-revoked", name: "prod", scopes: ["tutor"] });
    const id = created.key?.id ?? "";
    await kg.admin.revokeKey({ id, reason: "leaked" });
    let code: Code | null = null;
    try {
      await kg.admin.updateKey({ id, name: "renamed", scopes: ["tutor", "decks", "webhooks"] });
    } catch (error) {
      code = ConnectError.from(error).code;
    }
    const after = (await kg.admin.getKey({ id })).key;
    const actions = (await kg.admin.listAuditEvents({ keyId: id, pageSize: 100 })).events.map((e) => e.action);
    expect({ code, name: after?.name, scopes: after?.scopes, actions }).toEqual({
      code: Code.FailedPrecondition,
      name: "prod",
      scopes: ["tutor"],
      actions: ["key.create", "key.revoke"],
    });
  });
});
