import { timestampFromMs, timestampMs } from "@bufbuild/protobuf/wkt";
import { afterAll, describe, expect, it } from "vitest";
import type { AuditEvent } from "../../src/gen/keygate/v1/key_admin_pb.js";
import { readAuditFrom, SETTLE_MARGIN_MS } from "../harness/audit-tail.js";
import { TestClock } from "../harness/clock.js";
import { startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

// Audit ids are monotonic along the service's clock (EventIds.next uses the last id's time when
// the clock went back), and a new record's time, which `since` filters on, is its id's: with the
// raw clock's time, after a step back longer than the settle margin README's tailing recipe
// (re-read from `since` = newest time seen minus the margin) never returned the records written
// after the step, though their ids sort after everything it had seen.

describe("audit trail tailing across a wall-clock step back", () => {
  let kg: TestKeygate;
  afterAll(async () => {
    await kg?.stop();
  });

  const readFrom = (ownerId: string, since: number): Promise<AuditEvent[]> => readAuditFrom(kg, ownerId, since);

  it("a record written after a 1 h step back is found by the exporter that re-reads from the newest time seen minus the margin", async () => {
    const clock = new TestClock();
    clock.freeze("2027-05-20T10:00:00.000Z");
    kg = await startKeygate({ clock });
    const ownerId = "audit-step";
    await kg.admin.upsertAccount({ ownerId, plan: "business" });
    await kg.admin.createKey({ ownerId, name: "before" });
    const seen = new Map<string, AuditEvent>();
    for (const e of await readFrom(ownerId, 0)) seen.set(e.id, e);
    const newestMs = Math.max(...[...seen.values()].map((e) => timestampMs(e.time ?? timestampFromMs(0))));

    // NTP steps the clock back one hour; an operator then creates a key.
    clock.freeze("2027-05-20T09:00:00.000Z");
    const after = await kg.admin.createKey({ ownerId, name: "after-step" });

    const fresh = (await readFrom(ownerId, newestMs - SETTLE_MARGIN_MS)).filter((e) => !seen.has(e.id));
    // Its id sorts after every id seen (ids stay monotonic) ...
    const all = await readFrom(ownerId, 0);
    const created = all.find((e) => e.action === "key.create" && e.keyId === after.key?.id);
    expect(created?.id !== undefined && [...seen.keys()].every((id) => id < (created?.id ?? ""))).toBe(true);
    // ... and the exporter re-reading from the newest time seen minus the margin gets it.
    expect(fresh.map((e) => [e.action, e.keyId])).toEqual([["key.create", after.key?.id]]);
  });
});
