import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { checkInit, checkOutcome, postJson, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

// README "The decision": the key-state steps run in the order revoked, expired, rotation grace
// over (401 KEY_REVOKED / KEY_EXPIRED), then disabled (401 KEY_DISABLED). A rotation's old key
// whose grace is over is dead for good; one that was also disabled was answered KEY_DISABLED (a
// pause, which EnableKey ends), and EnableKey on it answered OK and audited a key.enable that
// brought nothing back.
let kg: TestKeygate;
beforeAll(async () => { kg = await startKeygate(); });
afterAll(async () => { await kg.stop(); });

describe("a rotated key past its grace, also disabled", () => {
  it("is refused KEY_REVOKED (grace over comes before disabled), by Check and VerifyKey alike", async () => {
    await kg.admin.upsertAccount({ ownerId: "owner-grace-over-disabled", plan: "business" });
    const created = await kg.admin.createKey({ ownerId: "owner-grace-over-disabled", name: "k" });
    await kg.admin.rotateKey({ id: created.key?.id ?? "", graceDays: 1 });
    await kg.admin.disableKey({ id: created.key?.id ?? "", reason: "investigation" });
    kg.clock.advanceMs(2 * 86_400_000);
    const check = checkOutcome(await kg.check(checkInit({ authorization: `Bearer ${created.secret}` })));
    const verified = await postJson(kg.ports.admin, "VerifyKey", { secret: created.secret });
    expect({ check, verify: verified.json["code"] }).toEqual({ check: { status: 401, code: "KEY_REVOKED" }, verify: "KEY_REVOKED" });
    // Nothing to pause or bring back: refused, and nothing audited.
    const enabled = await postJson(kg.ports.admin, "EnableKey", { id: created.key?.id ?? "" });
    const trail = await postJson(kg.ports.admin, "ListAuditEvents", { keyId: created.key?.id ?? "" });
    const actions = ((trail.json["events"] as Array<{ action: string }> | undefined) ?? []).map((e) => e.action);
    expect({ status: enabled.status, code: enabled.json["code"], enables: actions.filter((a) => a === "key.enable").length }).toEqual({ status: 400, code: "failed_precondition", enables: 0 });
  });
});
