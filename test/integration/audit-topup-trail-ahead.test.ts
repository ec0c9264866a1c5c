import { afterEach, describe, expect, it } from "vitest";
import { TestClock } from "../harness/clock.js";
import { startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

// A keyed top-up's time never runs before the trail's newest record (seeded at start). An id from
// a replica whose clock ran ahead (here 2 days) became the "now" of every keyed top-up of a
// correctly clocked replica, and the ledger was pruned at that time − 24 h: a top-up made an hour
// ago was forgotten and its retry credited again. Records now expire by the clock, and a trail
// more than a day ahead of it does not carry the next records' times.

let kg: TestKeygate | undefined;
afterEach(async () => {
  await kg?.stop();
  kg = undefined;
});

describe("keyed top-up retry after the trail holds an id ahead of the clock", () => {
  it("a retry within 24 h is replayed, not credited a second time (SQLite)", async () => {
    const clock = new TestClock();
    clock.freeze("2027-05-20T10:00:00.000Z");
    const first = await startKeygate({ clock });
    const dataDir = first.dataDir;
    const ownerId = "topup-trail-ahead";
    await first.admin.upsertAccount({ ownerId, plan: "business" });
    const made = await first.admin.addCredits({ ownerId, amount: 100n, reason: "order 1", idempotencyKey: "order-1" });
    expect(made.account?.topupCredits).toBe(100n);
    // A replica whose clock runs 2 days ahead records one change (any audited change).
    clock.freeze("2027-05-22T10:00:00.000Z");
    await first.admin.upsertAccount({ ownerId: "other-owner", plan: "business" });
    await first.stop({ keepData: true });

    // This replica, clock right (1 h after the top-up), restarts and the caller retries the top-up.
    clock.freeze("2027-05-20T11:00:00.000Z");
    kg = await startKeygate({ clock, dataDir });
    const retry = await kg.admin.addCredits({ ownerId, amount: 100n, reason: "order 1", idempotencyKey: "order-1" });
    expect({ replayed: retry.replayed, topup: retry.account?.topupCredits }).toEqual({ replayed: true, topup: 100n });
    const account = await kg.admin.getAccount({ ownerId });
    expect(account.account?.topupCredits).toBe(100n);
  });
});
