import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { DEFAULT_POLICY_INPUT } from "../../src/config.js";
import { TestClock } from "../harness/clock.js";
import { checkInit, checkOutcome, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

// GetUsage flushes this replica's pending rows and then reads the store. When the store refuses
// the write (a full disk: SQLITE_FULL; a MongoDB refusing writes), the recorder keeps the rows for
// the next flush, and the report adds them from there: an invoice built from it never misses
// requests this replica has counted, and counts each once when the flush lands later.

const POLICY = {
  ...DEFAULT_POLICY_INPUT,
  defaultPlan: "metered",
  plans: { metered: { maxActiveKeys: 5, rateLimit: { limit: 1000, windowSeconds: 60 }, dailyQuota: null, monthlyCredits: 10 } },
  scopes: { catalog: ["read"], default: ["read"] },
  routes: [{ method: "*", pathPrefix: "/v1", cost: 1 }],
};
const DAY = "2026-12-03";

describe("GetUsage while the store refuses the usage flush", () => {
  let kg: TestKeygate;
  beforeAll(async () => {
    const clock = new TestClock();
    clock.freeze(`${DAY}T12:00:00.000Z`);
    kg = await startKeygate({ policy: POLICY, clock });
  });
  afterAll(async () => kg?.stop());

  it("error: reports the requests the store has not taken yet, once, and once again after the flush lands", async () => {
    const ownerId = "flush-refused";
    await kg.admin.upsertAccount({ ownerId, plan: "metered" });
    const key = await kg.admin.createKey({ ownerId, name: "k" });
    const store = kg.app.store;
    const realApply = store.applyUsage.bind(store);
    store.applyUsage = async () => {
      throw new Error("injected: SQLITE_FULL: database or disk is full");
    };
    const report = async (): Promise<unknown> => {
      const usage = await kg.admin.getUsage({ ownerId, from: DAY, to: DAY });
      return { allowed: usage.totals?.allowed, creditsUsed: usage.totals?.creditsUsed, byKey: usage.byKey.map((row) => [row.keyId, row.keyName, row.day, row.usage?.allowed]) };
    };
    const expected = { allowed: 2n, creditsUsed: 2n, byKey: [[key.key?.id, "k", DAY, 2n]] };
    try {
      for (let i = 0; i < 2; i++) expect(checkOutcome(await kg.check(checkInit({ "x-api-key": key.secret }, "/v1/x"))).code).toBe(null);
      expect(await report()).toEqual(expected);
      // Another owner's rows and other days stay out of it.
      expect((await kg.admin.getUsage({ ownerId, from: "2026-12-04", to: "2026-12-05" })).totals?.allowed).toBe(0n);
    } finally {
      store.applyUsage = realApply;
    }
    // The store takes the rows now: they are reported from it, and not from the recorder as well.
    expect(await report()).toEqual(expected);
    expect(await store.listUsage(ownerId, DAY, DAY)).toEqual([expect.objectContaining({ keyId: key.key?.id, day: DAY, count: 2, credits: 2 })]);
  });
});
