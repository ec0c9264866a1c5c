import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { DatabaseSync } from "node:sqlite";
import { pino } from "pino";
import { afterEach, describe, expect, it } from "vitest";
import type { ChargeInput, ChargeResult } from "../../src/limits/limits.js";
import { MemoryMeter } from "../../src/limits/memory.js";
import { UsageRecorder } from "../../src/limits/usage.js";
import type { CreditState, UsageDelta, UsageRow } from "../../src/store/store.js";
import { SqliteKeyStore } from "../../src/store/sqlite.js";
import { until } from "../harness/poll.js";

// The in-process meter loads a daily quota count, when a limit first applies to an owner, from
// the store's usage rows plus the rows not yet flushed (UsageRecorder.pendingAllowed). The rows
// of a batch being written are in neither until the store confirms them, so the load waits for
// that owner's rows in the batch (UsageRecorder.withRowsSettled) and counts each request once: in
// the store when the write succeeded, back among the pending rows when it failed. An account moved
// to a plan with a daily quota during a flush (a downgrade later in the day) must have the day's
// earlier requests counted against it, neither missed (allowed past its quota) nor twice.
//
// Every case records 5 requests and then loads a quota of 6: exactly 5 counted leaves the next
// request allowed with 0 remaining; 0 counted would leave 5 remaining, 10 would refuse it.

const silent = pino({ level: "silent" });
const NOW = Date.now();
const DAY = new Date(NOW).toISOString().slice(0, 10);
const OWNER = "acct_seed";

function input(ownerId: string, extra: Partial<ChargeInput> = {}): ChargeInput {
  return {
    ownerId, bucketKind: "a", bucketId: ownerId, rate: { limit: 1000, windowSeconds: 60 },
    dailyQuota: null, countsDaily: true, monthlyCredits: null, cost: 1, nowMs: NOW, meter: "live", quota: null, budgetExpired: false, ...extra,
  };
}

/** Five allowed requests of OWNER on a plan without a daily quota, charged and recorded as the pipeline does. */
async function fiveRequests(meter: MemoryMeter, usage: UsageRecorder): Promise<void> {
  for (let i = 0; i < 5; i++) {
    expect(((await meter.charge(input(OWNER))) as ChargeResult).allowed).toBe(true);
    usage.record(OWNER, "key_seed", DAY, "ALLOWED", 0);
  }
  expect(usage.pendingAllowed(OWNER, DAY)).toBe(5);
}

function outcome(result: ChargeResult): [boolean, string | null, number | undefined] {
  return [result.allowed, result.reason, result.quota?.remaining];
}

/** A store whose usage writes wait for the test's word, then succeed (adding the rows) or fail. */
function heldStore() {
  const stored: UsageDelta[] = [];
  const held: Array<(fail: boolean) => void> = [];
  return {
    stored,
    held,
    store: {
      applyUsage: (usage: readonly UsageDelta[]): Promise<void> =>
        new Promise<void>((resolve, reject) =>
          held.push((fail) => {
            if (fail) reject(new Error("disk full"));
            else {
              stored.push(...usage.map((row) => ({ ...row })));
              resolve();
            }
          }),
        ),
      listUsage: async (ownerId: string, fromDay: string, toDay: string): Promise<UsageRow[]> =>
        stored.filter((row) => row.ownerId === ownerId && row.day >= fromDay && row.day <= toDay).map(({ keyId, day, outcome, count, credits }) => ({ keyId, day, outcome, count, credits })),
      getCredits: async (): Promise<CreditState> => ({ period: "", monthlyUsed: 0, topupBalance: 0, topupTotal: 0 }),
    },
  };
}

const dirs: string[] = [];
afterEach(() => {
  for (const dir of dirs.splice(0)) rmSync(dir, { recursive: true, force: true });
});

describe("a daily quota loaded while a usage batch is being written: happy", () => {
  it("on SQLite, waits for the batch another connection holds back, then counts its requests once", async () => {
    const dir = mkdtempSync(join(tmpdir(), "keygate-quota-seed-"));
    dirs.push(dir);
    const path = join(dir, "keygate.db");
    const store = new SqliteKeyStore(path, { writeInBackground: true });
    const usage = new UsageRecorder(store, silent, 60_000, { paced: false });
    const meter = new MemoryMeter(store, usage);
    // Another connection holds SQLite's write lock (a checkpoint, a backup tool, or the nice-19
    // writing thread not yet scheduled): the batch has left the recorder but is not committed.
    const holder = new DatabaseSync(path, { timeout: 0 });
    try {
      await fiveRequests(meter, usage);
      holder.exec("BEGIN IMMEDIATE");
      const flushed = usage.flush();
      await until(() => usage.pendingAllowed(OWNER, DAY) === 0, 5000, "the batch to be taken for writing");
      // The account moves to a plan with a daily quota of 6 while its batch is held.
      const afterDowngrade = meter.charge(input(OWNER, { dailyQuota: 6 }));
      holder.exec("COMMIT");
      await flushed;
      expect(outcome(await afterDowngrade)).toEqual([true, null, 0]);
      const stored = (await store.listUsage(OWNER, DAY, DAY)).reduce((n, row) => n + (row.outcome === "ALLOWED" ? row.count : 0), 0);
      expect(stored).toBe(5);
      // The next one is over the quota.
      expect(outcome(await meter.charge(input(OWNER, { dailyQuota: 6 })))).toEqual([false, "QUOTA_EXCEEDED", 0]);
    } finally {
      if (holder.isTransaction) holder.exec("ROLLBACK");
      holder.close();
      await usage.stop();
      await store.close();
    }
  });

  it("does not wait for a batch that holds none of the owner's rows of the day", async () => {
    const { store, held } = heldStore();
    const usage = new UsageRecorder(store, silent, 60_000, { paced: false });
    const meter = new MemoryMeter(store, usage);
    await fiveRequests(meter, usage);
    const flushed = usage.flush();
    await until(() => held.length === 1, 5000, "the batch's write to start");
    // Another account's first charge under a quota is answered while OWNER's batch is held.
    expect(outcome(await meter.charge(input("acct_other", { dailyQuota: 6 })))).toEqual([true, null, 5]);
    held.splice(0).forEach((answer) => answer(false));
    await flushed;
  });
});

describe("a daily quota loaded while a usage batch is being written: error", () => {
  it("counts the rows of a batch whose write failed once, from the rows put back for the next flush", async () => {
    const { store, stored, held } = heldStore();
    const usage = new UsageRecorder(store, silent, 60_000, { paced: false });
    const meter = new MemoryMeter(store, usage);
    await fiveRequests(meter, usage);
    const flushed = usage.flush();
    await until(() => held.length === 1, 5000, "the batch's write to start");
    expect(usage.pendingAllowed(OWNER, DAY)).toBe(0);
    const afterDowngrade = meter.charge(input(OWNER, { dailyQuota: 6 }));
    held.splice(0).forEach((answer) => answer(true));
    await flushed;
    expect(outcome(await afterDowngrade)).toEqual([true, null, 0]);
    usage.record(OWNER, "key_seed", DAY, "ALLOWED", 0);
    expect(stored).toEqual([]);
    expect(usage.pendingAllowed(OWNER, DAY)).toBe(6);
    // The put-back rows are written by the next flush, and counted no more than once.
    const next = usage.flush();
    await until(() => held.length === 1, 5000, "the retry's write to start");
    held.splice(0).forEach((answer) => answer(false));
    await next;
    expect(stored.reduce((n, row) => n + row.count, 0)).toBe(5 + 1);
    expect(outcome(await meter.charge(input(OWNER, { dailyQuota: 6 })))).toEqual([false, "QUOTA_EXCEEDED", 0]);
  });
});
