import { afterEach, describe, expect, it, vi } from "vitest";
import { LookupBatcher } from "../../src/store/lookup-batch.js";
import type { LookupBatchOptions } from "../../src/store/lookup-batch.js";

class Timeout extends Error {}

/** A backend whose reads the test answers by hand, one deferred promise a read. */
function manualBackend(): {
  reads: Array<{ keys: readonly string[]; answer: (values?: Map<string, string>) => void; fail: (error: unknown) => void }>;
  readMany: (keys: readonly string[]) => Promise<ReadonlyMap<string, string>>;
} {
  const reads: Array<{ keys: readonly string[]; answer: (values?: Map<string, string>) => void; fail: (error: unknown) => void }> = [];
  return {
    reads,
    readMany: (keys) =>
      new Promise((resolve, reject) => {
        reads.push({ keys, answer: (values) => resolve(values ?? new Map(keys.map((k) => [k, `value of ${k}`]))), fail: reject });
      }),
  };
}

const OPTIONS: LookupBatchOptions = { maxBatch: 3, maxInFlight: 2, timeoutMs: 1000, timeoutError: () => new Timeout("no answer within 1000 ms") };

/** Lets queued ticks and promise callbacks run. */
async function settle(): Promise<void> {
  for (let i = 0; i < 5; i += 1) await new Promise<void>((resolve) => process.nextTick(resolve));
}

describe("LookupBatcher", () => {
  afterEach(() => {
    vi.useRealTimers();
  });

  it("sends lookups made in one turn as one read, and answers each with its own value", async () => {
    const backend = manualBackend();
    const batcher = new LookupBatcher(backend.readMany, OPTIONS);
    const answers = Promise.all(["a", "b", "c"].map((k) => batcher.get(k)));
    expect(backend.reads).toHaveLength(0);
    await settle();
    expect(backend.reads.map((r) => r.keys)).toEqual([["a", "b", "c"]]);
    backend.reads[0]?.answer();
    expect(await answers).toEqual(["value of a", "value of b", "value of c"]);
  });

  it("splits at maxBatch distinct keys, holds at most maxInFlight reads, and sends what waited together when one ends", async () => {
    const backend = manualBackend();
    const batcher = new LookupBatcher(backend.readMany, OPTIONS);
    const first = ["a", "b", "c", "d", "e", "f", "g"].map((k) => batcher.get(k));
    await settle();
    expect(backend.reads.map((r) => r.keys)).toEqual([
      ["a", "b", "c"],
      ["d", "e", "f"],
    ]);
    expect(batcher.inFlight).toBe(2);
    const later = ["h", "a"].map((k) => batcher.get(k));
    await settle();
    expect(backend.reads).toHaveLength(2);
    expect(batcher.waiting).toBe(3);
    backend.reads[1]?.answer();
    await settle();
    expect(backend.reads.map((r) => r.keys)).toEqual([
      ["a", "b", "c"],
      ["d", "e", "f"],
      ["g", "h", "a"],
    ]);
    backend.reads[0]?.answer();
    backend.reads[2]?.answer();
    expect(await Promise.all([...first, ...later])).toEqual(["a", "b", "c", "d", "e", "f", "g", "h", "a"].map((k) => `value of ${k}`));
    expect(batcher.inFlight).toBe(0);
    expect(batcher.waiting).toBe(0);
  });

  it("asks a key repeated in one read once and answers every lookup of it", async () => {
    const backend = manualBackend();
    const batcher = new LookupBatcher(backend.readMany, OPTIONS);
    const answers = Promise.all(["a", "a", "b", "a"].map((k) => batcher.get(k)));
    await settle();
    expect(backend.reads.map((r) => r.keys)).toEqual([["a", "b"]]);
    backend.reads[0]?.answer();
    expect(await answers).toEqual(["value of a", "value of a", "value of b", "value of a"]);
  });

  it("fails every lookup of a read that fails, with the read's error, and goes on with the next", async () => {
    const backend = manualBackend();
    const batcher = new LookupBatcher(backend.readMany, { ...OPTIONS, maxInFlight: 1 });
    const failing = ["a", "b"].map((k) => batcher.get(k).catch((error: unknown) => error));
    await settle();
    const next = batcher.get("c");
    const cause = new Error("connection closed");
    backend.reads[0]?.fail(cause);
    expect(await Promise.all(failing)).toEqual([cause, cause]);
    await settle();
    expect(backend.reads.map((r) => r.keys)).toEqual([["a", "b"], ["c"]]);
    backend.reads[1]?.answer();
    expect(await next).toBe("value of c");
  });

  it("fails a lookup whose key the read left out, never answering it with another key's value", async () => {
    const backend = manualBackend();
    const batcher = new LookupBatcher(backend.readMany, OPTIONS);
    const answers = ["a", "b"].map((k) => batcher.get(k).catch((error: unknown) => error));
    await settle();
    backend.reads[0]?.answer(new Map([["a", "value of a"]]));
    const [a, b] = await Promise.all(answers);
    expect(a).toBe("value of a");
    expect(b).toBeInstanceOf(Error);
    expect((b as Error).message).toBe("the batched read gave no answer for a key it was asked for");
  });

  it("a read that throws before it returns a promise fails its lookups", async () => {
    const cause = new Error("not connected");
    const batcher = new LookupBatcher<string>(() => {
      throw cause;
    }, OPTIONS);
    await expect(batcher.get("a")).rejects.toBe(cause);
    expect(batcher.inFlight).toBe(0);
  });

  it("times a lookup out on its own deadline, and a stalled read stops holding its place at that deadline", async () => {
    vi.useFakeTimers();
    const backend = manualBackend();
    const batcher = new LookupBatcher(backend.readMany, { ...OPTIONS, maxInFlight: 1 });
    const stalled = batcher.get("a").catch((error: unknown) => error);
    await vi.advanceTimersByTimeAsync(300);
    expect(backend.reads.map((r) => r.keys)).toEqual([["a"]]);
    const queued = [batcher.get("b")];
    await vi.advanceTimersByTimeAsync(300);
    queued.push(batcher.get("c"));
    await vi.advanceTimersByTimeAsync(399);
    expect(backend.reads).toHaveLength(1);
    await vi.advanceTimersByTimeAsync(1);
    // "a" reached its deadline, and its read gave up its place: "b" and "c" went out together.
    expect(await stalled).toBeInstanceOf(Timeout);
    expect(backend.reads.map((r) => r.keys)).toEqual([["a"], ["b", "c"]]);
    backend.reads[1]?.answer();
    expect(await Promise.all(queued)).toEqual(["value of b", "value of c"]);
    // The stalled read's late answer changes nothing.
    backend.reads[0]?.answer();
    await vi.advanceTimersByTimeAsync(0);
    expect(batcher.inFlight).toBe(0);
    expect(batcher.waiting).toBe(0);
  });
  // A backend slower than the deadline (MongoDB under load) still warms the cache: a lookup that
  // timed out while its read was out is told the read's answer when it comes (SnapshotLookup
  // caches it), and no more such lookups are remembered than maxLate.
  describe("late answers", () => {
    it("happy: a lookup that timed out with its read out is told that read's answer once, after its timeout", async () => {
      vi.useFakeTimers();
      const backend = manualBackend();
      const batcher = new LookupBatcher(backend.readMany, OPTIONS);
      const told: string[] = [];
      const timedOut = batcher.get("a", (value) => told.push(`a: ${value}`)).catch((error: unknown) => error);
      const plain = batcher.get("b").catch((error: unknown) => error);
      await vi.advanceTimersByTimeAsync(1000);
      expect(await timedOut).toBeInstanceOf(Timeout);
      expect(await plain).toBeInstanceOf(Timeout);
      expect(batcher.late).toBe(1);
      backend.reads[0]?.answer();
      await vi.advanceTimersByTimeAsync(0);
      expect(told).toEqual(["a: value of a"]);
      expect(batcher.late).toBe(0);
    });

    it("happy: a lookup answered in time is never told again", async () => {
      const backend = manualBackend();
      const batcher = new LookupBatcher(backend.readMany, OPTIONS);
      const told: string[] = [];
      const answer = batcher.get("a", (value) => told.push(value));
      await settle();
      backend.reads[0]?.answer();
      expect(await answer).toBe("value of a");
      expect(told).toEqual([]);
      expect(batcher.late).toBe(0);
    });

    it("error: nothing is told for a lookup that timed out before its read was sent, nor when the read fails or leaves its key out", async () => {
      vi.useFakeTimers();
      const backend = manualBackend();
      const batcher = new LookupBatcher(backend.readMany, { ...OPTIONS, maxBatch: 1, maxInFlight: 1 });
      const told: string[] = [];
      // "b" and "c" wait behind "a"'s read and time out there: never sent, so no answer can come.
      const lookups = ["a", "b", "c"].map((k) => batcher.get(k, (value) => told.push(value)).catch(() => undefined));
      await vi.advanceTimersByTimeAsync(1000);
      await Promise.all(lookups);
      expect(backend.reads.map((r) => r.keys)).toEqual([["a"]]);
      expect(batcher.late).toBe(1);
      backend.reads[0]?.fail(new Error("connection closed"));
      await vi.advanceTimersByTimeAsync(0);
      expect(batcher.late).toBe(0);

      const leftOut = batcher.get("d", (value) => told.push(value)).catch(() => undefined);
      await vi.advanceTimersByTimeAsync(1000);
      await leftOut;
      expect(batcher.late).toBe(1);
      backend.reads[1]?.answer(new Map());
      await vi.advanceTimersByTimeAsync(0);
      expect(told).toEqual([]);
      expect(batcher.late).toBe(0);
    });

    it("error: a listener that throws fails nothing else: the read's other late lookups are still told", async () => {
      vi.useFakeTimers();
      const backend = manualBackend();
      const batcher = new LookupBatcher(backend.readMany, OPTIONS);
      const told: string[] = [];
      const lookups = [
        batcher.get("a", () => {
          throw new Error("cannot convert");
        }),
        batcher.get("b", (value) => told.push(value)),
      ].map((lookup) => lookup.catch(() => undefined));
      await vi.advanceTimersByTimeAsync(1000);
      await Promise.all(lookups);
      backend.reads[0]?.answer();
      await vi.advanceTimersByTimeAsync(0);
      expect(told).toEqual(["value of b"]);
    });

    it("security: at most maxLate timed-out lookups are remembered; the oldest are forgotten and never told", async () => {
      vi.useFakeTimers();
      const backend = manualBackend();
      const batcher = new LookupBatcher(backend.readMany, { ...OPTIONS, maxBatch: 1, maxInFlight: 1, maxLate: 2 });
      const told: string[] = [];
      // A backend that stays slow: every read outlives its lookup, which a steady stream of cold
      // Checks follows with another.
      const lookups: Array<Promise<unknown>> = [];
      for (const key of ["a", "b", "c", "d"]) {
        lookups.push(batcher.get(key, (value) => told.push(value)).catch(() => undefined));
        await vi.advanceTimersByTimeAsync(1000);
      }
      await Promise.all(lookups);
      expect(backend.reads.map((r) => r.keys)).toEqual([["a"], ["b"], ["c"], ["d"]]);
      expect(batcher.late).toBe(2);
      for (const read of backend.reads) read.answer();
      await vi.advanceTimersByTimeAsync(0);
      expect(told).toEqual(["value of c", "value of d"]);
      expect(batcher.late).toBe(0);
    });
  });
});
