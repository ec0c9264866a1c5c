import { pino } from "pino";
import { afterEach, describe, expect, it, vi } from "vitest";
import { z } from "zod";
import { UsageRecorder } from "../../src/limits/usage.js";
import { LastUsedRecorder } from "../../src/store/last-used.js";
import { STOP_CALL_WAIT_MS } from "../../src/store/write-behind.js";

// A store that takes a write and never answers (a frozen MongoDB) must not hold a stop past its
// deadline, or STOP_CALL_WAIT_MS after that call was sent if that is later: the kubelet's SIGKILL
// would come first, and nothing would say what was lost. What that call held is named as unsure
// (it may still land) and never written again; a store that answers within the wait loses nothing.
// test/unit/write-behind-slow-store.test.ts has a store that answers slowly, or stops answering
// partway; test/e2e/shutdown-frozen-backends.test.ts runs this through SIGTERM and a frozen MongoDB.

const DAY = "2025-01-01";
const logged = z.object({ level: z.number(), msg: z.string(), rows: z.number().optional(), requests: z.number().optional(), unsure: z.number().optional(), keys: z.number().optional() });

/** A logger whose lines land in `lines`, parsed. */
function capturing(lines: Array<z.infer<typeof logged>>) {
  return pino({ level: "info" }, { write: (line: string) => void lines.push(logged.parse(JSON.parse(line))) });
}

/** A store call that answers when `answer()` is called, or never. */
function heldCalls() {
  const answers: Array<() => void> = [];
  let calls = 0;
  const held = (): Promise<void> => {
    calls += 1;
    return new Promise((resolve) => answers.push(resolve));
  };
  return { held, calls: () => calls, answer: () => answers.splice(0).forEach((resolve) => resolve()) };
}

/** Whether `promise` has settled, and with what, as the test advances the clock. */
function watch<T>(promise: Promise<T>): () => { done: boolean; value?: T } {
  let state: { done: boolean; value?: T } = { done: false };
  void promise.then((value) => {
    state = { done: true, value };
  });
  return () => state;
}

describe("write-behind stop against a store that does not answer", () => {
  afterEach(() => {
    vi.useRealTimers();
  });

  it("error: usage: the stop ends at the deadline's wait, false, with the batch logged as unsure and not written again", async () => {
    vi.useFakeTimers({ toFake: ["setTimeout", "clearTimeout", "setInterval", "clearInterval", "performance"] });
    const lines: Array<z.infer<typeof logged>> = [];
    const store = heldCalls();
    const usage = new UsageRecorder({ applyUsage: store.held }, capturing(lines), 60_000);
    for (let i = 0; i < 5; i++) usage.record("acme", "key_1", DAY, "ALLOWED", 0);
    const stopped = watch(usage.stop(performance.now() + 1000));
    await vi.advanceTimersByTimeAsync(STOP_CALL_WAIT_MS - 1);
    expect(stopped()).toEqual({ done: false });
    await vi.advanceTimersByTimeAsync(1);
    expect(stopped()).toEqual({ done: true, value: false });
    const lost = lines.filter((l) => l.msg.startsWith("usage not written at shutdown"));
    expect(lost.map((l) => [l.level, l.rows, l.requests, l.unsure])).toEqual([[50, 0, 0, 1]]);
    // The write lands late: nothing is sent again.
    store.answer();
    await vi.advanceTimersByTimeAsync(60_000);
    expect({ calls: store.calls(), pending: usage.pendingCount }).toEqual({ calls: 1, pending: 0 });
  });

  it("error: last-use times: the stop ends at the deadline when it is later than the wait, false, with the keys logged", async () => {
    vi.useFakeTimers({ toFake: ["setTimeout", "clearTimeout", "setInterval", "clearInterval", "performance"] });
    const lines: Array<z.infer<typeof logged>> = [];
    const store = heldCalls();
    const lastUsed = new LastUsedRecorder({ touchLastUsed: store.held }, capturing(lines), 60_000);
    lastUsed.record("key_1", Date.now());
    lastUsed.record("key_2", Date.now());
    const graceMs = 2 * STOP_CALL_WAIT_MS;
    const stopped = watch(lastUsed.stop(performance.now() + graceMs));
    await vi.advanceTimersByTimeAsync(graceMs - 1);
    expect(stopped()).toEqual({ done: false });
    await vi.advanceTimersByTimeAsync(1);
    expect(stopped()).toEqual({ done: true, value: false });
    const lost = lines.filter((l) => l.msg.startsWith("last-use times not written at shutdown"));
    expect(lost.map((l) => [l.level, l.keys, l.unsure])).toEqual([[50, 2, 2]]);
  });

  it("happy: a store that answers within the wait, after a deadline already past, gets the whole flush: true, nothing logged", async () => {
    vi.useFakeTimers({ toFake: ["setTimeout", "clearTimeout", "setInterval", "clearInterval", "performance"] });
    const lines: Array<z.infer<typeof logged>> = [];
    const store = heldCalls();
    const usage = new UsageRecorder({ applyUsage: store.held }, capturing(lines), 60_000);
    usage.record("acme", "key_1", DAY, "ALLOWED", 0);
    // The drain used the whole grace: the deadline has passed as the stop begins.
    const stopped = watch(usage.stop(performance.now()));
    await vi.advanceTimersByTimeAsync(STOP_CALL_WAIT_MS - 1);
    store.answer();
    await vi.advanceTimersByTimeAsync(0);
    expect(stopped()).toEqual({ done: true, value: true });
    expect({ lines, pending: usage.pendingCount }).toEqual({ lines: [], pending: 0 });
  });
});
