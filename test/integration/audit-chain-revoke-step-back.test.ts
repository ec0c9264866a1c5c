import { afterEach, describe, expect, it } from "vitest";
import { newestMs, readAuditFrom, SETTLE_MARGIN_MS } from "../harness/audit-tail.js";
import { TestClock } from "../harness/clock.js";
import { startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

// A rotation's revoke of a chain's earlier key is named after the revocation's time. Taken from
// the raw clock, after a clock step back its record sorted before the trail's newest, and the
// README's tailing exporter (re-read from newest seen − 5 min, or by page token) missed it. The
// rotation's time is now never before the trail's newest, as a revoke's is.

let kg: TestKeygate | undefined;
afterEach(async () => {
  await kg?.stop();
  kg = undefined;
});

describe("a chain revoke after a 1 h clock step back", () => {
  it("is found by the exporter re-reading from the newest time seen minus the margin", async () => {
    const clock = new TestClock();
    clock.freeze("2027-05-20T10:00:00.000Z");
    kg = await startKeygate({ clock });
    const ownerId = "chain-revoke-step-back";
    await kg.admin.upsertAccount({ ownerId, plan: "business" });
    const a = await kg.admin.createKey({ ownerId, name: "k" });
    const b = await kg.admin.rotateKey({ id: a.key?.id ?? "", graceDays: 3 });
    const before = await readAuditFrom(kg, ownerId, 0);
    const seen = new Set(before.map((e) => e.id));
    const newest = newestMs(before);

    clock.freeze("2027-05-20T09:00:00.000Z");
    await kg.admin.rotateKey({ id: b.key?.id ?? "", graceDays: 3 });
    const all = await readAuditFrom(kg, ownerId, 0);
    expect(all.filter((e) => e.action === "key.revoke").map((e) => e.keyId)).toEqual([a.key?.id]);

    const fresh = (await readAuditFrom(kg, ownerId, newest - SETTLE_MARGIN_MS)).filter((e) => !seen.has(e.id));
    expect(fresh.map((e) => [e.action, e.keyId]).sort()).toEqual(
      [["key.rotate", b.key?.id], ["key.create", expect.any(String)], ["key.revoke", a.key?.id]].sort(),
    );
    // And the id order is the order written: every new record sorts after every record seen.
    const newIds = all.filter((e) => !seen.has(e.id)).map((e) => e.id);
    expect(newIds.every((id) => [...seen].every((old) => old < id))).toBe(true);
  });
});
