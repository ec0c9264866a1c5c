import { pino } from "pino";
import { afterEach, describe, expect, it, vi } from "vitest";
import { z } from "zod";
import { UsageRecorder } from "../../src/limits/usage.js";
import { LastUsedRecorder } from "../../src/store/last-used.js";
import type { CreditDelta, UsageDelta } from "../../src/store/store.js";
import { FLUSH_CHUNK, STOP_CALL_WAIT_MS, STOP_FLUSH_OVERRUN_MS } from "../../src/store/write-behind.js";

// The final flush at shutdown against a store that answers, slowly. The drain may use the whole
// grace, and the manifests give the flush 15 s after it before the kubelet's SIGKILL: a flush
// whose calls the store answers goes on past the deadline (up to STOP_FLUSH_OVERRUN_MS), and only
// a call left unanswered for STOP_CALL_WAIT_MS is a frozen store. Then the chunks never sent are
// lost, counted with their requests and credits; only the call out is unsure, and a late answer
// to it sends nothing more. (A bound on the whole flush of 5 s once dropped 1,984 of 5,120 rows of
// a store answering each call in 100 ms, logged as unsure with 0 requests.)

const DAY = "2025-01-01";
const logged = z.object({
  level: z.number(),
  msg: z.string(),
  rows: z.number().optional(),
  requests: z.number().optional(),
  accounts: z.number().optional(),
  creditsSpent: z.number().optional(),
  unsure: z.number().optional(),
  keys: z.number().optional(),
});
type Logged = z.infer<typeof logged>;

function capturing(lines: Logged[]) {
  return pino({ level: "info" }, { write: (line: string) => void lines.push(logged.parse(JSON.parse(line))) });
}

/**
 * A store whose calls each answer after `answerMs(call)` (from 1), or, when it is null, once
 * release() is called; it counts what it wrote (requests and credits) and the calls made.
 */
function slowStore(answerMs: (call: number) => number | null) {
  const state = { calls: 0, requests: 0, credits: 0, keys: 0 };
  const held: Array<() => void> = [];
  const answer = async (): Promise<void> => {
    state.calls += 1;
    const ms = answerMs(state.calls);
    await new Promise<void>((resolve) => {
      if (ms === null) held.push(resolve);
      else setTimeout(resolve, ms);
    });
  };
  return {
    state,
    release: () => held.splice(0).forEach((resolve) => resolve()),
    applyUsage: async (usage: readonly UsageDelta[], credits: readonly CreditDelta[]): Promise<void> => {
      await answer();
      state.requests += usage.reduce((n, u) => n + u.count, 0);
      state.credits += credits.reduce((n, c) => n + c.monthlyUsed + c.topupUsed, 0);
    },
    touchLastUsed: async (times: Map<string, number>): Promise<void> => {
      await answer();
      state.keys += times.size;
    },
  };
}

/**
 * Settles `promise` into the box returned, with the time (performance.now()) it settled at and
 * `sample()` then: what the store held when the process would close it and exit.
 */
function watch<T>(promise: Promise<T>, sample: () => number = () => 0): { done: boolean; value?: T; atMs?: number; sampled?: number } {
  const box: { done: boolean; value?: T; atMs?: number; sampled?: number } = { done: false };
  void promise.then((value) => Object.assign(box, { done: true, value, atMs: performance.now(), sampled: sample() }));
  return box;
}

/** `ms` down to 50 ms: each turn of the fake event loop moves its clock by 1 ms. */
function coarse(ms: number): number {
  return Math.floor(ms / 50) * 50;
}

function lost(lines: Logged[], prefix: string) {
  return lines.filter((l) => l.level === 50 && l.msg.startsWith(prefix)).map(({ rows, requests, accounts, creditsSpent, unsure, keys }) => ({ rows, requests, accounts, creditsSpent, unsure, keys }));
}

describe("write-behind final flush against a slow store", () => {
  afterEach(() => {
    vi.useRealTimers();
  });

  it("happy: a store answering every call in 100 ms gets all 80 calls after a deadline already past: true, nothing logged", async () => {
    vi.useFakeTimers({ toFake: ["setTimeout", "clearTimeout", "setInterval", "clearInterval", "setImmediate", "clearImmediate", "performance"] });
    const lines: Logged[] = [];
    const store = slowStore(() => 100);
    const usage = new UsageRecorder(store, capturing(lines), 60_000);
    const ROWS = FLUSH_CHUNK * 80;
    for (let i = 0; i < ROWS; i++) usage.record("acme", `key_${i}`, DAY, "ALLOWED", 0);
    // The drain used the whole grace: the deadline has passed as the stop begins.
    const startedMs = performance.now();
    const stopped = watch(usage.stop(startedMs), () => store.state.requests);
    await vi.advanceTimersByTimeAsync(STOP_FLUSH_OVERRUN_MS);
    expect({ value: stopped.value, requestsAtStop: stopped.sampled, calls: store.state.calls, lost: lost(lines, "usage not written at shutdown") }).toEqual({
      value: true,
      requestsAtStop: ROWS,
      calls: 80,
      lost: [],
    });
    expect((stopped.atMs ?? Infinity) - startedMs).toBeLessThan(STOP_FLUSH_OVERRUN_MS);
  });

  it("error: usage: the store stops answering partway: the rows never sent are lost with their requests and credits, only the call out is unsure", async () => {
    vi.useFakeTimers({ toFake: ["setTimeout", "clearTimeout", "setInterval", "clearInterval", "setImmediate", "clearImmediate", "performance"] });
    const lines: Logged[] = [];
    // Credits go first (one call for 3 accounts), then 10 calls of rows; the 5th row call never answers.
    const store = slowStore((call) => (call === 6 ? null : 100));
    const usage = new UsageRecorder(store, capturing(lines), 60_000);
    const ROWS = FLUSH_CHUNK * 10;
    // Each key twice: every row holds 2 requests.
    for (let i = 0; i < 2 * ROWS; i++) usage.record("acme", `key_${i % ROWS}`, DAY, "ALLOWED", 0);
    for (const owner of ["a", "b", "c"]) usage.spend(owner, "2025-01", 5, 1);
    const startedMs = performance.now();
    const stopped = watch(usage.stop(startedMs));
    await vi.advanceTimersByTimeAsync(STOP_FLUSH_OVERRUN_MS);
    // The frozen call was sent after 5 answered ones (500 ms), and given up STOP_CALL_WAIT_MS later.
    expect({ done: stopped.done, value: stopped.value, atMs: coarse((stopped.atMs ?? 0) - startedMs) }).toEqual({ done: true, value: false, atMs: 500 + STOP_CALL_WAIT_MS });
    expect({ calls: store.state.calls, requests: store.state.requests, credits: store.state.credits }).toEqual({ calls: 6, requests: 2 * 4 * FLUSH_CHUNK, credits: 18 });
    expect(lost(lines, "usage not written at shutdown")).toEqual([
      { rows: 5 * FLUSH_CHUNK, requests: 2 * 5 * FLUSH_CHUNK, accounts: 0, creditsSpent: 0, unsure: FLUSH_CHUNK, keys: undefined },
    ]);
    // The frozen call lands late: nothing after it is sent, nor by a flush after the stop.
    store.release();
    await usage.flush();
    await vi.advanceTimersByTimeAsync(60_000);
    expect({ calls: store.state.calls, requests: store.state.requests }).toEqual({ calls: 6, requests: 2 * 5 * FLUSH_CHUNK });
  });

  it("error: usage: credits never sent are lost with the accounts and credits they hold", async () => {
    vi.useFakeTimers({ toFake: ["setTimeout", "clearTimeout", "setInterval", "clearInterval", "setImmediate", "clearImmediate", "performance"] });
    const lines: Logged[] = [];
    // Two credit calls (FLUSH_CHUNK + 2 accounts): the first never answers.
    const store = slowStore(() => null);
    const usage = new UsageRecorder(store, capturing(lines), 60_000);
    for (let i = 0; i < FLUSH_CHUNK + 2; i++) usage.spend(`owner_${i}`, "2025-01", 2, 1);
    usage.record("owner_0", "key_0", DAY, "ALLOWED", 3);
    const stopped = watch(usage.stop(performance.now()));
    await vi.advanceTimersByTimeAsync(STOP_CALL_WAIT_MS);
    expect({ done: stopped.done, value: stopped.value, calls: store.state.calls }).toEqual({ done: true, value: false, calls: 1 });
    expect(lost(lines, "usage not written at shutdown")).toEqual([{ rows: 1, requests: 1, accounts: 2, creditsSpent: 6, unsure: FLUSH_CHUNK, keys: undefined }]);
  });

  it("error: usage: a store slower than the final flush's cap: the stop ends at the cap, the rest counted lost", async () => {
    vi.useFakeTimers({ toFake: ["setTimeout", "clearTimeout", "setInterval", "clearInterval", "setImmediate", "clearImmediate", "performance"] });
    const lines: Logged[] = [];
    // 2.5 s a call: 40 calls would take 100 s.
    const store = slowStore(() => 2500);
    const usage = new UsageRecorder(store, capturing(lines), 60_000);
    const ROWS = FLUSH_CHUNK * 40;
    for (let i = 0; i < ROWS; i++) usage.record("acme", `key_${i}`, DAY, "ALLOWED", 0);
    const deadlineMs = performance.now() + 1000;
    const stopped = watch(usage.stop(deadlineMs));
    await vi.advanceTimersByTimeAsync(1000 + STOP_FLUSH_OVERRUN_MS);
    // Calls answered at 2.5 s, 5 s, … 12.5 s: the 6th is out at the cap (13 s).
    const sent = 6;
    expect({ done: stopped.done, value: stopped.value, atMs: coarse((stopped.atMs ?? 0) - deadlineMs) }).toEqual({ done: true, value: false, atMs: STOP_FLUSH_OVERRUN_MS });
    expect({ calls: store.state.calls, requests: store.state.requests }).toEqual({ calls: sent, requests: (sent - 1) * FLUSH_CHUNK });
    const unsent = ROWS - sent * FLUSH_CHUNK;
    expect(lost(lines, "usage not written at shutdown")).toEqual([{ rows: unsent, requests: unsent, accounts: 0, creditsSpent: 0, unsure: FLUSH_CHUNK, keys: undefined }]);
    await vi.advanceTimersByTimeAsync(60_000);
    expect(store.state.calls).toBe(sent);
  });

  it("error: last-use times: the store stops answering partway: keys never sent and the call out are named, the latter as unsure", async () => {
    vi.useFakeTimers({ toFake: ["setTimeout", "clearTimeout", "setInterval", "clearInterval", "setImmediate", "clearImmediate", "performance"] });
    const lines: Logged[] = [];
    const store = slowStore((call) => (call === 3 ? null : 100));
    const lastUsed = new LastUsedRecorder(store, capturing(lines), 60_000);
    const KEYS = FLUSH_CHUNK * 5;
    for (let i = 0; i < KEYS; i++) lastUsed.record(`key_${i}`, Date.now());
    const startedMs = performance.now();
    const stopped = watch(lastUsed.stop(startedMs));
    await vi.advanceTimersByTimeAsync(STOP_FLUSH_OVERRUN_MS);
    expect({ done: stopped.done, value: stopped.value, atMs: coarse((stopped.atMs ?? 0) - startedMs) }).toEqual({ done: true, value: false, atMs: 200 + STOP_CALL_WAIT_MS });
    expect({ calls: store.state.calls, keys: store.state.keys }).toEqual({ calls: 3, keys: 2 * FLUSH_CHUNK });
    // `keys` counts every key not known written: the two chunks never sent and the one out.
    expect(lost(lines, "last-use times not written at shutdown").map((l) => [l.keys, l.unsure])).toEqual([[3 * FLUSH_CHUNK, FLUSH_CHUNK]]);
    store.release();
    await vi.advanceTimersByTimeAsync(60_000);
    expect({ calls: store.state.calls, keys: store.state.keys }).toEqual({ calls: 3, keys: 3 * FLUSH_CHUNK });
  });
});
