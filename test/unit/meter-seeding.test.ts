import { pino } from "pino";
import { describe, expect, it } from "vitest";
import type { ChargeInput, ChargeResult } from "../../src/limits/limits.js";
import { MemoryMeter } from "../../src/limits/memory.js";
import { UsageRecorder } from "../../src/limits/usage.js";
import type { CreditState } from "../../src/store/store.js";

// The in-process meter loads an account's credit balance (and today's quota count) from the store
// on the account's first charge, and charges that arrive while a load runs wait for it. Loads are
// shared per account: two accounts' first charges at once each wait for their own.

const NOW = Date.parse("2026-11-22T12:00:00.000Z");

function input(ownerId: string, extra: Partial<ChargeInput> = {}): ChargeInput {
  return {
    ownerId, bucketKind: "a", bucketId: ownerId, rate: { limit: 100, windowSeconds: 60 },
    dailyQuota: null, countsDaily: true, monthlyCredits: 3, cost: 1, nowMs: NOW, meter: "live", quota: null, budgetExpired: false, ...extra,
  };
}

/** A store whose credit reads answer only when the test says, each with its account's state. */
function heldStore(states: Record<string, CreditState>) {
  const waiting: Array<() => void> = [];
  const reads: string[] = [];
  return {
    reads,
    release: () => { for (const answer of waiting.splice(0)) answer(); },
    store: {
      getCredits: (ownerId: string) => {
        reads.push(ownerId);
        return new Promise<CreditState>((resolve) => waiting.push(() => resolve(states[ownerId] ?? { period: "", monthlyUsed: 0, topupBalance: 0, topupTotal: 0 })));
      },
      listUsage: async () => [],
      applyUsage: async () => undefined,
    },
  };
}

describe("the in-process meter's first load of an account", () => {
  it("loads each account's own balance when two accounts' first charges arrive together", async () => {
    const held = heldStore({
      rich: { period: "2026-11", monthlyUsed: 0, topupBalance: 10, topupTotal: 10 },
      spent: { period: "2026-11", monthlyUsed: 2, topupBalance: 0, topupTotal: 0 },
    });
    const usage = new UsageRecorder(held.store, pino({ level: "silent" }), 60_000);
    const meter = new MemoryMeter(held.store, usage);
    const rich = meter.charge(input("rich"));
    const spent = meter.charge(input("spent"));
    expect(rich).toBeInstanceOf(Promise);
    expect(spent).toBeInstanceOf(Promise);
    // Both loads were asked for before either answered.
    await new Promise((resolve) => setImmediate(resolve));
    held.release();
    await new Promise((resolve) => setImmediate(resolve));
    held.release();
    const [a, b] = (await Promise.all([rich, spent])) as [ChargeResult, ChargeResult];
    expect(held.reads.filter((owner) => owner === "rich").length).toBeGreaterThanOrEqual(1);
    expect(held.reads.filter((owner) => owner === "spent").length).toBeGreaterThanOrEqual(1);
    expect([a.allowed, a.credits?.balance]).toEqual([true, 12]);
    expect([b.allowed, b.credits?.balance]).toEqual([true, 0]);
    // The next charge of the spent account is refused: its balance came from the store, not from zero.
    const next = (await meter.charge(input("spent"))) as ChargeResult;
    expect([next.allowed, next.reason]).toEqual([false, "INSUFFICIENT_CREDITS"]);
    await usage.stop();
  });

  it("shares one load among one account's charges that arrive together", async () => {
    const held = heldStore({ solo: { period: "2026-11", monthlyUsed: 1, topupBalance: 0, topupTotal: 0 } });
    const usage = new UsageRecorder(held.store, pino({ level: "silent" }), 60_000);
    const meter = new MemoryMeter(held.store, usage);
    const first = meter.charge(input("solo"));
    const second = meter.charge(input("solo"));
    await new Promise((resolve) => setImmediate(resolve));
    held.release();
    await new Promise((resolve) => setImmediate(resolve));
    held.release();
    const answers = (await Promise.all([first, second])) as ChargeResult[];
    expect(answers.map((r) => [r.allowed, r.credits?.balance])).toEqual([[true, 1], [true, 0]]);
    await usage.stop();
  });
});
