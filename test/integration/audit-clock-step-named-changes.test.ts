import { timestampFromMs, timestampMs } from "@bufbuild/protobuf/wkt";
import { afterEach, describe, expect, it } from "vitest";
import { newestMs, readAuditFrom, SETTLE_MARGIN_MS } from "../harness/audit-tail.js";
import { TestClock } from "../harness/clock.js";
import { startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

// README "Tailing the trail": an exporter re-reads from `since` = the newest time seen minus a
// settle margin (5 minutes) and drops the ids it has. audit-clock-step.test.ts holds that for
// records under a new id (EventIds.next keeps the last id's time). A RevokeKey and a keyed
// AddCredits name their record after the change's time (EventIds.derived), which was the raw
// clock: after a step back longer than the margin the exporter never read them. Such a change now
// takes its time no earlier than the last id's. And a process started after the step back seeds
// its ids from the trail's newest, so its records still sort after the earlier ones.

let kg: TestKeygate | undefined;
afterEach(async () => {
  await kg?.stop();
  kg = undefined;
});

describe("audit tailing across a wall-clock step back: records named after their change", () => {
  it("a RevokeKey after a 1 h step back is found by the exporter re-reading from newest seen minus the margin", async () => {
    const clock = new TestClock();
    clock.freeze("2027-05-20T10:00:00.000Z");
    kg = await startKeygate({ clock });
    const ownerId = "audit-back-revoke";
    await kg.admin.upsertAccount({ ownerId, plan: "business" });
    const created = await kg.admin.createKey({ ownerId, name: "k" });
    const seen = new Set((await readAuditFrom(kg, ownerId, 0)).map((e) => e.id));
    const newest = newestMs(await readAuditFrom(kg, ownerId, 0));

    clock.freeze("2027-05-20T09:00:00.000Z");
    await kg.admin.revokeKey({ id: created.key?.id ?? "", reason: "leaked" });
    // The revocation (the key's revoked_at and its record) takes the last record's time, not 09:00.
    const revoke = (await readAuditFrom(kg, ownerId, 0)).find((e) => e.action === "key.revoke");
    expect(revoke === undefined ? null : new Date(timestampMs(revoke.time ?? timestampFromMs(0))).toISOString()).toBe("2027-05-20T10:00:00.000Z");
    expect((await kg.admin.getKey({ id: created.key?.id ?? "" })).key?.revokedAt).toEqual(timestampFromMs(newest));

    const fresh = (await readAuditFrom(kg, ownerId, newest - SETTLE_MARGIN_MS)).filter((e) => !seen.has(e.id));
    expect(fresh.map((e) => [e.action, e.keyId])).toEqual([["key.revoke", created.key?.id]]);
  });

  it("a keyed AddCredits after a 1 h step back is found the same way", async () => {
    const clock = new TestClock();
    clock.freeze("2027-05-20T10:00:00.000Z");
    kg = await startKeygate({ clock });
    const ownerId = "audit-back-topup";
    await kg.admin.upsertAccount({ ownerId, plan: "business" });
    const seen = new Set((await readAuditFrom(kg, ownerId, 0)).map((e) => e.id));
    const newest = newestMs(await readAuditFrom(kg, ownerId, 0));

    clock.freeze("2027-05-20T09:00:00.000Z");
    await kg.admin.addCredits({ ownerId, amount: 100n, reason: "order 1", idempotencyKey: "order-1" });
    // A retry finds the stored top-up and its time, so names the same record: still one.
    await kg.admin.addCredits({ ownerId, amount: 100n, reason: "order 1", idempotencyKey: "order-1" });
    expect((await readAuditFrom(kg, ownerId, 0)).filter((e) => e.action === "credits.add")).toHaveLength(1);

    const fresh = (await readAuditFrom(kg, ownerId, newest - SETTLE_MARGIN_MS)).filter((e) => !seen.has(e.id));
    expect(fresh.map((e) => [e.action, e.changes["idempotency_key"]])).toEqual([["credits.add", '"order-1"']]);
  });

  it("a restart after a 1 h step back: the next page token and the since-margin re-read both find the new record", async () => {
    const clock = new TestClock();
    clock.freeze("2027-05-20T10:00:00.000Z");
    const first = await startKeygate({ clock });
    const dataDir = first.dataDir;
    const ownerId = "audit-back-restart";
    await first.admin.upsertAccount({ ownerId, plan: "business" });
    await first.admin.createKey({ ownerId, name: "before" });
    const before = await readAuditFrom(first, ownerId, 0);
    const seen = new Set(before.map((e) => e.id));
    const newest = newestMs(before);
    await first.stop({ keepData: true });

    clock.freeze("2027-05-20T09:00:00.000Z");
    kg = await startKeygate({ clock, dataDir });
    const after = await kg.admin.createKey({ ownerId, name: "after-restart" });

    const fresh = (await readAuditFrom(kg, ownerId, newest - SETTLE_MARGIN_MS)).filter((e) => !seen.has(e.id));
    expect(fresh.map((e) => [e.action, e.keyId])).toEqual([["key.create", after.key?.id]]);
    // And the id order still is the order written: the new record sorts after every earlier one.
    const all = await readAuditFrom(kg, ownerId, 0);
    expect(all.at(-1)?.keyId).toBe(after.key?.id);
  });
});
