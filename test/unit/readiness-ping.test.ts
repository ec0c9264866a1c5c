import { afterEach, describe, expect, it, vi } from "vitest";
import { READINESS_PING_FRESH_MS, READINESS_PING_TIMEOUT_MS, sharedPing } from "../../src/server/readiness.js";

// /readyz's store ping (sharedPing): one at a time, its answer standing for a second, a deadline
// for a store that never answers, and each failure heard once however many probes it answers.

function heldPing() {
  const waiting: Array<{ resolve: () => void; reject: (e: Error) => void }> = [];
  let calls = 0;
  return {
    ping: () => {
      calls += 1;
      return new Promise<void>((resolve, reject) => waiting.push({ resolve, reject }));
    },
    calls: () => calls,
    answer: (error?: Error) => {
      for (const w of waiting.splice(0)) (error === undefined ? w.resolve() : w.reject(error));
    },
  };
}

const settled = (p: Promise<void>): Promise<string> => p.then(() => "ready", (e: Error) => `failed: ${e.message}`);

describe("sharedPing", () => {
  afterEach(() => {
    vi.useRealTimers();
  });

  it("shares one ping among probes that come while it runs, and keeps its answer for the fresh window", async () => {
    let now = 0;
    const held = heldPing();
    const failures: unknown[] = [];
    const probe = sharedPing(held.ping, (e) => failures.push(e), () => now);
    const first = [probe(), probe(), probe()].map(settled);
    expect(held.calls()).toBe(1);
    held.answer();
    expect(await Promise.all(first)).toEqual(["ready", "ready", "ready"]);
    now += READINESS_PING_FRESH_MS - 1;
    expect(await settled(probe())).toBe("ready");
    expect(held.calls()).toBe(1);
    now += 1;
    const next = settled(probe());
    expect(held.calls()).toBe(2);
    held.answer(new Error("store down"));
    expect(await next).toBe("failed: store down");
    // The failure stands too, and was heard once.
    expect(await Promise.all([settled(probe()), settled(probe())])).toEqual(["failed: store down", "failed: store down"]);
    expect(held.calls()).toBe(2);
    expect(failures).toHaveLength(1);
  });

  it("fails a ping the store has not answered within the deadline, and pings again after the fresh window", async () => {
    vi.useFakeTimers();
    let now = 0;
    const held = heldPing();
    const failures: unknown[] = [];
    const probe = sharedPing(held.ping, (e) => failures.push(e), () => now);
    const frozen = settled(probe());
    await vi.advanceTimersByTimeAsync(READINESS_PING_TIMEOUT_MS);
    expect(await frozen).toBe(`failed: the store did not answer a ping within ${READINESS_PING_TIMEOUT_MS} ms`);
    expect(failures).toHaveLength(1);
    now += READINESS_PING_FRESH_MS;
    const again = settled(probe());
    expect(held.calls()).toBe(2);
    held.answer();
    expect(await again).toBe("ready");
  });
});
