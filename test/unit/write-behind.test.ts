import { pino } from "pino";
import { afterEach, describe, expect, it, vi } from "vitest";
import { UsageRecorder } from "../../src/limits/usage.js";
import { PartialWriteError } from "../../src/store/errors.js";
import { LastUsedRecorder } from "../../src/store/last-used.js";
import type { CreditDelta, UsageDelta } from "../../src/store/store.js";
import { FLUSH_CHUNK, MAX_CALL_PAUSE_MS, WriteBehind } from "../../src/store/write-behind.js";

// Write-behind flushes give the store FLUSH_CHUNK rows a call and let the event loop run between
// calls, so a busy interval's flush never holds Checks for its whole length. A failed call puts
// back its rows and those after it, and nothing before it: each call is one transaction.

const silent = pino({ level: "silent" });

/** Usage totals by key|day|outcome, as a store adding the deltas would hold them. */
class UsageTotals {
  readonly counts = new Map<string, number>();
  readonly spent = new Map<string, number>();
  readonly calls: Array<{ usage: number; credits: number }> = [];
  /** Call numbers (from 1) that fail, once each. */
  readonly failing = new Set<number>();
  /** What else ran on the event loop, in order with the calls. */
  readonly events: string[] = [];

  async applyUsage(usage: readonly UsageDelta[], credits: readonly CreditDelta[]): Promise<void> {
    this.calls.push({ usage: usage.length, credits: credits.length });
    this.events.push(`call ${this.calls.length}`);
    if (this.failing.delete(this.calls.length)) throw new Error("store unavailable");
    for (const u of usage) this.counts.set(`${u.keyId}|${u.day}|${u.outcome}`, (this.counts.get(`${u.keyId}|${u.day}|${u.outcome}`) ?? 0) + u.count);
    for (const c of credits) this.spent.set(c.ownerId, (this.spent.get(c.ownerId) ?? 0) + c.monthlyUsed + c.topupUsed);
  }
}

describe("write-behind flush happy", () => {
  it("counts one row per key, day and outcome, and reads back what is pending", async () => {
    const totals = new UsageTotals();
    const usage = new UsageRecorder(totals, silent, 60_000);
    for (let i = 0; i < 3; i++) usage.record("acct_a", "key_a", "2026-12-03", "ALLOWED", 0);
    usage.record("acct_a", "key_a", "2026-12-03", "RATE_LIMITED", 0);
    usage.record("acct_a", "key_a", "2026-12-04", "ALLOWED", 0);
    usage.record("acct_a", "key_a", "2026-12-04", "ALLOWED", 0);
    usage.record("acct_a", "key_b", "2026-12-03", "ALLOWED", 0);
    usage.record("acct_b", "key_c", "2026-12-03", "ALLOWED", 0);
    expect(usage.pendingCount).toBe(5);
    expect(usage.pendingAllowed("acct_a", "2026-12-03")).toBe(4);
    expect(usage.pendingAllowed("acct_a", "2026-12-04")).toBe(2);
    expect(usage.pendingAllowed("acct_a", "2026-12-03", "RATE_LIMITED")).toBe(1);
    expect(usage.pendingAllowed("acct_b", "2026-12-03")).toBe(1);
    await usage.flush();
    expect(usage.pendingCount).toBe(0);
    expect(usage.pendingAllowed("acct_a", "2026-12-03")).toBe(0);
    expect(totals.calls).toEqual([{ usage: 5, credits: 0 }]);
    expect(Object.fromEntries(totals.counts)).toEqual({
      "key_a|2026-12-03|ALLOWED": 3,
      "key_a|2026-12-03|RATE_LIMITED": 1,
      "key_a|2026-12-04|ALLOWED": 2,
      "key_b|2026-12-03|ALLOWED": 1,
      "key_c|2026-12-03|ALLOWED": 1,
    });
  });

  it("writes a busy interval in calls of at most FLUSH_CHUNK rows, letting other work run between them", async () => {
    const store = new UsageTotals();
    const recorder = new UsageRecorder(store, silent, 60_000);
    const keys = FLUSH_CHUNK * 3 + 10;
    for (let i = 0; i < keys; i++) recorder.record(`owner-${i}`, `key-${i}`, "2026-12-03", "ALLOWED", 1);
    for (let i = 0; i < 20; i++) recorder.spend(`owner-${i}`, "2026-12", 2, 0);
    // Work that keeps arriving on the event loop while the flush runs, as Checks would.
    let running = true;
    const tick = (): void => {
      store.events.push("tick");
      if (running) setImmediate(tick);
    };
    setImmediate(tick);
    await recorder.flush();
    running = false;
    // The credits first, in a call of their own, then the rows.
    expect(store.calls).toStrictEqual([
      { usage: 0, credits: 20 },
      { usage: FLUSH_CHUNK, credits: 0 },
      { usage: FLUSH_CHUNK, credits: 0 },
      { usage: FLUSH_CHUNK, credits: 0 },
      { usage: 10, credits: 0 },
    ]);
    // Between any two calls, something else ran.
    const calls = store.events.map((event, i) => [event, i] as const).filter(([event]) => event.startsWith("call"));
    for (let i = 1; i < calls.length; i++) {
      const between = store.events.slice((calls[i - 1]?.[1] ?? 0) + 1, calls[i]?.[1]);
      expect(between.length).toBeGreaterThan(0);
    }
    expect(store.counts.size).toBe(keys);
    expect([...store.counts.values()].every((count) => count === 1)).toBe(true);
    expect(store.spent.get("owner-0")).toBe(2);
    expect(recorder.pendingCount).toBe(0);
  });

  it("puts back the failed call's rows and the later ones, never the written ones: every request counted once", async () => {
    const store = new UsageTotals();
    store.failing.add(3);
    const recorder = new UsageRecorder(store, silent, 60_000);
    const keys = FLUSH_CHUNK * 4;
    for (let i = 0; i < keys; i++) recorder.record("owner", `key-${i}`, "2026-12-03", "ALLOWED", 0);
    recorder.spend("owner", "2026-12", 5, 1);
    await recorder.flush();
    // Call 1 wrote the credits, call 2 the first rows; call 3 failed.
    expect(store.calls).toStrictEqual([
      { usage: 0, credits: 1 },
      { usage: FLUSH_CHUNK, credits: 0 },
      { usage: FLUSH_CHUNK, credits: 0 },
    ]);
    expect(store.counts.size).toBe(FLUSH_CHUNK);
    expect(store.spent.get("owner")).toBe(6);
    expect(recorder.pendingCount).toBe(FLUSH_CHUNK * 3);
    expect(recorder.pendingSpend("owner", "2026-12")).toStrictEqual({ monthly: 0, topup: 0 });
    // A request counted meanwhile joins the put-back row.
    recorder.record("owner", `key-${keys - 1}`, "2026-12-03", "ALLOWED", 0);
    await recorder.flush();
    expect(store.counts.size).toBe(keys);
    expect(store.counts.get(`key-${keys - 1}|2026-12-03|ALLOWED`)).toBe(2);
    expect([...store.counts.values()].reduce((a, b) => a + b, 0)).toBe(keys + 1);
    expect(store.spent.get("owner")).toBe(6);
    expect(recorder.pendingCount).toBe(0);
  });

  it("after a call that was not one transaction fails, writes again only what it was sure is not written: nothing counted twice", async () => {
    // As MongoDB's applyUsage answers: of a failed call, rows the server refused are named
    // unapplied; rows whose answer was lost may be written, and are counted as unsure.
    const counts = new Map<string, number>();
    const spent = new Map<string, number>();
    let call = 0;
    const store = {
      async applyUsage(usage: readonly UsageDelta[], credits: readonly CreditDelta[]): Promise<void> {
        call += 1;
        // Call 1: the first account's spend made, the second's made but its answer lost, the third never sent.
        const made = call === 1 ? credits.slice(0, 2) : credits;
        for (const c of made) spent.set(c.ownerId, (spent.get(c.ownerId) ?? 0) + c.monthlyUsed + c.topupUsed);
        if (call === 1) throw new PartialWriteError("partial", { usage: [], credits: credits.slice(2) }, 1);
        const refused = call === 2 ? usage.filter((u) => u.keyId === "key_refused") : [];
        for (const u of usage) if (!refused.includes(u)) counts.set(u.keyId, (counts.get(u.keyId) ?? 0) + u.count);
        if (call === 2) throw new PartialWriteError("partial", { usage: refused, credits: [] }, 0);
      },
    };
    const logs: Array<{ level: number; msg: string; unsure?: number }> = [];
    const logger = pino({ level: "warn" }, { write: (line: string) => void logs.push(JSON.parse(line) as { level: number; msg: string; unsure?: number }) });
    const recorder = new UsageRecorder(store, logger, 60_000);
    for (const owner of ["acct_a", "acct_b", "acct_c"]) recorder.spend(owner, "2026-12", 2, 0);
    recorder.record("acct_a", "key_ok", "2026-12-03", "ALLOWED", 0);
    recorder.record("acct_a", "key_refused", "2026-12-03", "ALLOWED", 0);
    await recorder.flush();
    // The credits call failed: acct_c (never sent) is kept, acct_b (maybe written) is not; the rows wait.
    expect(recorder.pendingSpend("acct_c", "2026-12")).toStrictEqual({ monthly: 2, topup: 0 });
    expect(recorder.pendingSpend("acct_b", "2026-12")).toStrictEqual({ monthly: 0, topup: 0 });
    expect(logs.at(-1)).toMatchObject({ level: 50, unsure: 1, msg: "usage flush failed; will retry the rows not written, and not those that may have been (never counted twice)" });
    await recorder.flush();
    // Call 2 wrote the credits; call 3 the rows, refusing one, which call 4 writes.
    await recorder.flush();
    expect(Object.fromEntries(spent)).toStrictEqual({ acct_a: 2, acct_b: 2, acct_c: 2 });
    expect(Object.fromEntries(counts)).toStrictEqual({ key_ok: 1, key_refused: 1 });
    expect(recorder.pendingCount).toBe(0);
  });

  it("counts the entries of a batch being written as pending until each call has written them", async () => {
    // A store whose calls wait for the test: the flush stands still inside each call in turn.
    const gates: Array<() => void> = [];
    const entered: Array<() => void> = [];
    const gated = <T>(write: () => T): Promise<T> =>
      new Promise<T>((resolve) => {
        gates.push(() => resolve(write()));
        entered.shift()?.();
      });
    const nextCall = (): Promise<void> => new Promise<void>((resolve) => entered.push(resolve));
    /** pendingCount inside the first call, inside the second, and after the flush. */
    const pendingThroughFlush = async (recorder: { pendingCount: number; flush(): Promise<void> }): Promise<number[]> => {
      const seen: number[] = [];
      let called = nextCall();
      const flushed = recorder.flush();
      await called;
      seen.push(recorder.pendingCount);
      called = nextCall();
      gates.shift()?.();
      await called;
      seen.push(recorder.pendingCount);
      gates.shift()?.();
      await flushed;
      seen.push(recorder.pendingCount);
      return seen;
    };
    const keys = FLUSH_CHUNK + 3;
    const totals = new UsageTotals();
    const usage = new UsageRecorder({ applyUsage: async (u, c) => gated(() => totals.applyUsage(u, c)).then((written) => written) }, silent, 60_000);
    for (let i = 0; i < keys; i++) usage.record("owner", `key-${i}`, "2026-12-04", "ALLOWED", 0);
    expect(await pendingThroughFlush(usage)).toStrictEqual([keys, 3, 0]);
    const lastUsed = new LastUsedRecorder({ touchLastUsed: () => gated(() => undefined) }, silent, 60_000);
    for (let i = 0; i < keys; i++) lastUsed.record(`key-${i}`, 1000);
    expect(await pendingThroughFlush(lastUsed)).toStrictEqual([keys, 3, 0]);
  });

  it("writes last-use times in calls of at most FLUSH_CHUNK keys and keeps the newer time of a failed call's keys", async () => {
    const calls: number[] = [];
    const stored = new Map<string, number>();
    let failNext = false;
    const recorder = new LastUsedRecorder(
      {
        async touchLastUsed(lastUsed: ReadonlyMap<string, number>): Promise<void> {
          calls.push(lastUsed.size);
          if (failNext) {
            failNext = false;
            throw new Error("store unavailable");
          }
          for (const [id, atMs] of lastUsed) stored.set(id, Math.max(stored.get(id) ?? 0, atMs));
        },
      },
      silent,
      60_000,
    );
    const keys = FLUSH_CHUNK * 2 + 1;
    for (let i = 0; i < keys; i++) recorder.record(`key-${i}`, 1000);
    await recorder.flush();
    expect(calls).toStrictEqual([FLUSH_CHUNK, FLUSH_CHUNK, 1]);
    expect(stored.size).toBe(keys);

    calls.length = 0;
    for (let i = 0; i < keys; i++) recorder.record(`key-${i}`, 2000);
    failNext = true;
    await recorder.flush();
    expect(calls).toStrictEqual([FLUSH_CHUNK]);
    expect(recorder.pendingCount).toBe(keys);
    recorder.record("key-0", 3000);
    await recorder.flush();
    expect(stored.get("key-0")).toBe(3000);
    expect(stored.get(`key-${keys - 1}`)).toBe(2000);
    expect(recorder.pendingCount).toBe(0);
  });

  it("writes each key's last-use time exactly as recorded, epoch times earlier and later than the first, across flushes and a failed call", async () => {
    const stored = new Map<string, number>();
    let fail = false;
    const recorder = new LastUsedRecorder(
      {
        async touchLastUsed(lastUsed: ReadonlyMap<string, number>): Promise<void> {
          if (fail) throw new Error("store unavailable");
          for (const [id, atMs] of lastUsed) stored.set(id, atMs);
        },
      },
      silent,
      60_000,
    );
    const t = Date.UTC(2026, 11, 5, 3, 0, 0);
    recorder.record("key-a", t);
    recorder.record("key-b", t - 86_400_000);
    recorder.record("key-c", t + 0.5);
    recorder.record("key-a", t + 1234);
    await recorder.flush();
    expect(Object.fromEntries(stored)).toStrictEqual({ "key-a": t + 1234, "key-b": t - 86_400_000, "key-c": t + 0.5 });

    recorder.record("key-a", t + 50_000);
    recorder.record("key-d", t + 40_000);
    fail = true;
    await recorder.flush();
    fail = false;
    expect(recorder.pendingCount).toBe(2);
    // One key used again after the failure, one not: the new time, and the time put back.
    recorder.record("key-a", t + 55_000);
    await recorder.flush();
    expect(stored.get("key-a")).toBe(t + 55_000);
    expect(stored.get("key-d")).toBe(t + 40_000);
    expect(recorder.pendingCount).toBe(0);
  });
});

/** Resolves on the next turn of the real event loop (setImmediate is never faked below). */
const turn = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));

describe("write-behind pacing", () => {
  afterEach(() => {
    vi.useRealTimers();
  });

  it("waits as long as the call before took (at most MAX_CALL_PAUSE_MS), a turn after a quick call, when not paced, and once stopping", async () => {
    // The clock too: the writer checks it against the pause's end when a timer fires.
    vi.useFakeTimers({ toFake: ["setTimeout", "clearTimeout", "setInterval", "clearInterval", "performance"] });
    const writer = new WriteBehind(async () => undefined, 60_000);
    const settled = (promise: Promise<void>): (() => boolean) => {
      let done = false;
      void promise.then(() => {
        done = true;
      });
      return () => done;
    };

    // A call that took 50 ms: no sooner than 50 ms of timers later.
    const after50 = settled(writer.between(performance.now() - 50));
    await turn();
    await vi.advanceTimersByTimeAsync(45);
    expect(after50()).toBe(false);
    await vi.advanceTimersByTimeAsync(MAX_CALL_PAUSE_MS - 45);
    expect(after50()).toBe(true);

    // A call that took a minute: the pause stops at MAX_CALL_PAUSE_MS.
    const afterMinute = settled(writer.between(performance.now() - 60_000));
    await turn();
    await vi.advanceTimersByTimeAsync(MAX_CALL_PAUSE_MS - 5);
    expect(afterMinute()).toBe(false);
    await vi.advanceTimersByTimeAsync(5);
    expect(afterMinute()).toBe(true);

    // A call that took no time: one turn, no timer. (Its start is given a second ahead, so however
    // long a loaded machine takes between here and the writer's own clock read, it is under 1 ms.)
    const afterQuick = settled(writer.between(performance.now() + 1000));
    await turn();
    await turn();
    expect(afterQuick()).toBe(true);

    // A writer that is not paced (embedded SQLite): one turn after a slow call too.
    const unpaced = new WriteBehind(async () => undefined, 60_000, false);
    const afterUnpaced = settled(unpaced.between(performance.now() - 50));
    await turn();
    await turn();
    expect(afterUnpaced()).toBe(true);

    // Stopping: the slow call's pause is one turn too.
    await writer.stop();
    const whileStopping = settled(writer.between(performance.now() - 50));
    await turn();
    await turn();
    expect(whileStopping()).toBe(true);
  });

  it("a flush leaves the store idle between two calls at least as long as the first took", async () => {
    const CALL_MS = 20;
    const spans: Array<{ start: number; end: number }> = [];
    const slow = async (): Promise<void> => {
      const start = performance.now();
      await new Promise((resolve) => setTimeout(resolve, CALL_MS));
      spans.push({ start, end: performance.now() });
    };
    const usage = new UsageRecorder({ applyUsage: slow }, silent, 60_000);
    for (let i = 0; i < FLUSH_CHUNK * 2 + 1; i++) usage.record("owner", `key-${i}`, "2026-12-05", "ALLOWED", 0);
    await usage.flush();
    const lastUsed = new LastUsedRecorder({ touchLastUsed: slow }, silent, 60_000);
    for (let i = 0; i < FLUSH_CHUNK * 2 + 1; i++) lastUsed.record(`key-${i}`, 1000);
    await lastUsed.flush();
    expect(spans).toHaveLength(6);
    for (const pair of [spans.slice(0, 3), spans.slice(3)]) {
      for (let i = 1; i < pair.length; i++) {
        const before = pair[i - 1] as { start: number; end: number };
        const next = pair[i] as { start: number; end: number };
        // Measured from the call's start, as the writer does: idle at least as long as it took.
        expect(next.start - before.end).toBeGreaterThanOrEqual(before.end - before.start - 1);
      }
    }
  });

  it("a credit read waits for the batch's credits only, not for its usage rows", async () => {
    const held: Array<() => void> = [];
    const entered: Array<{ usage: number; credits: number }> = [];
    const store = {
      applyUsage: (usage: readonly UsageDelta[], credits: readonly CreditDelta[]): Promise<void> => {
        entered.push({ usage: usage.length, credits: credits.length });
        return new Promise<void>((resolve) => held.push(resolve));
      },
    };
    const recorder = new UsageRecorder(store, silent, 60_000);
    recorder.record("owner", "key-1", "2026-12-05", "ALLOWED", 3);
    recorder.spend("owner", "2026-12", 3, 0);
    const flushed = recorder.flush();
    await vi.waitFor(() => expect(entered).toEqual([{ usage: 0, credits: 1 }]));
    // While the credits are being written, a read waits.
    let reads = 0;
    const firstRead = recorder.withoutFlush(async () => {
      reads += 1;
    });
    await turn();
    expect(reads).toBe(0);
    held.shift()?.();
    await firstRead;
    expect(reads).toBe(1);
    await vi.waitFor(() => expect(entered).toEqual([{ usage: 0, credits: 1 }, { usage: 1, credits: 0 }]));
    // While the usage row is being written, a read goes ahead.
    await recorder.withoutFlush(async () => {
      reads += 1;
    });
    expect(reads).toBe(2);
    held.shift()?.();
    await flushed;
    expect(recorder.pendingCount).toBe(0);
  });
});
