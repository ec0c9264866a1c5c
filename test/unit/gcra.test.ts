import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { MAX_RATE_PARTS, parsePolicy, DEFAULT_POLICY_INPUT } from "../../src/config.js";
import { REBASE_BEYOND_MS, gcra } from "../../src/limits/limits.js";
import type { GcraStep, Tat } from "../../src/limits/limits.js";

/** A step's answer, without the time it stores (and without rebased, which in-order times never set). */
type Answer = Omit<GcraStep, "tatMs" | "tatFrac" | "rebased">;

/**
 * GCRA in exact arithmetic, the reference: the theoretical arrival time as a big integer count of
 * 1/limit ms since the epoch, so nothing rounds. `limit` requests at once, then one every
 * windowMs/limit ms.
 */
class ExactBucket {
  #tat: bigint | undefined;
  constructor(
    private readonly limit: number,
    private readonly windowSeconds: number,
  ) {}

  step(nowMs: number): Answer {
    const limit = BigInt(this.limit);
    const windowMs = BigInt(this.windowSeconds * 1000);
    const full = windowMs * limit;
    const perSecond = 1000n * limit;
    const now = BigInt(nowMs) * limit;
    const tat = this.#tat === undefined || this.#tat < now ? now : this.#tat;
    const next = tat + windowMs;
    const ceil = (a: bigint, b: bigint): number => Number((a + b - 1n) / b);
    if (next - now > full) {
      return { allowed: false, remaining: 0, resetSeconds: ceil(tat - now, perSecond), resetSecondsBefore: ceil(tat - now, perSecond), retryAfterSeconds: Math.max(1, ceil(next - now - full, perSecond)) };
    }
    this.#tat = next;
    return { allowed: true, remaining: Number((full - (next - now)) / windowMs), resetSeconds: ceil(next - now, perSecond), resetSecondsBefore: ceil(tat - now, perSecond), retryAfterSeconds: 0 };
  }
}

/** keygate's gcra over a sequence, its state kept as a meter keeps it. */
function run(limit: number, windowSeconds: number, times: number[]): Answer[] {
  let tat: Tat | undefined;
  return times.map((nowMs) => {
    const { tatMs, tatFrac, rebased, ...step } = gcra(tat, { limit, windowSeconds }, nowMs);
    if (rebased) expect.fail(`a stored time ahead of a full bucket at ${nowMs}`);
    if (step.allowed) tat = { ms: tatMs, frac: tatFrac };
    return step;
  });
}

function exact(limit: number, windowSeconds: number, times: number[]): Answer[] {
  const bucket = new ExactBucket(limit, windowSeconds);
  return times.map((nowMs) => bucket.step(nowMs));
}

/** Request times from `start`: each the one before plus a gap (0 for a burst). */
const requestTimes = (start: number, gaps: number[]): number[] => {
  let at = start;
  return gaps.map((gap) => (at += gap));
};

const NOW = Date.parse("2026-12-03T12:00:00.000Z");

describe("gcra", () => {
  it("takes a stored time further ahead than a full bucket (a clock that ran ahead) as a full bucket from now, refused for one interval", () => {
    // 10 a minute: one interval is 6 s. A replica an hour ahead stored its time after one request.
    const rule = { limit: 10, windowSeconds: 60 };
    const fromAhead: Tat = { ms: NOW + 3_600_000 + 6000, frac: 0 };
    const refused = gcra(fromAhead, rule, NOW);
    expect({ allowed: refused.allowed, rebased: refused.rebased, retryAfterSeconds: refused.retryAfterSeconds, tat: [refused.tatMs, refused.tatFrac] }).toEqual({
      allowed: false,
      rebased: true,
      retryAfterSeconds: 6,
      // The refusal keeps a full bucket's debt from this clock: a minute from now.
      tat: [NOW + 60_000, 0],
    });
    const kept: Tat = { ms: refused.tatMs, frac: refused.tatFrac };
    expect(gcra(kept, rule, NOW + 5999).allowed).toBe(false);
    const next = gcra(kept, rule, NOW + 6000);
    expect({ allowed: next.allowed, rebased: next.rebased, remaining: next.remaining }).toEqual({ allowed: true, rebased: false, remaining: 0 });
  });

  it("takes a time another clock wrote a few seconds past a full bucket (a replica whose clock runs ahead) as a debt: refused, nothing moved back", () => {
    // 10 a minute; a replica 2 s ahead filled the bucket, and Redis says its debt runs a minute
    // (debtMs). Rebasing it to this clock's full bucket moved it back 2 s, and the replica ahead
    // found room again at every refusal here.
    const rule = { limit: 10, windowSeconds: 60 };
    const filledAhead: Tat = { ms: NOW + 60_000 + 2000, frac: 0 };
    const refused = gcra(filledAhead, rule, NOW, 60_000);
    expect({ allowed: refused.allowed, rebased: refused.rebased, retryAfterSeconds: refused.retryAfterSeconds, tat: [refused.tatMs, refused.tatFrac] }).toEqual({
      allowed: false,
      rebased: false,
      // The interval, and the 2 s this clock is behind the one that wrote the time.
      retryAfterSeconds: 8,
      tat: [NOW + 62_000, 0],
    });
    // The margin: up to REBASE_BEYOND_MS past a full bucket is a debt; a millisecond more is rebased.
    expect(gcra({ ms: NOW + 60_000 + REBASE_BEYOND_MS, frac: 0 }, rule, NOW, 60_000).rebased).toBe(false);
    expect(gcra({ ms: NOW + 60_000 + REBASE_BEYOND_MS + 1, frac: 0 }, rule, NOW, 60_000).rebased).toBe(true);
    // A debt that runs longer than a window was written under a longer one (a reload shortened
    // it): rebased within the margin too. And in process (no debtMs) this clock wrote it: rebased.
    expect(gcra(filledAhead, rule, NOW, 62_000).rebased).toBe(true);
    expect(gcra(filledAhead, rule, NOW).rebased).toBe(true);
  });

  it("lets a full burst of every limit from 1 to 1000 a minute through at once, and no more", () => {
    for (let limit = 1; limit <= 1000; limit++) {
      const answers = run(limit, 60, Array.from({ length: limit + 1 }, () => NOW));
      const allowed = answers.filter((a) => a.allowed).length;
      if (allowed !== limit) expect.fail(`${limit} a minute: ${allowed} allowed at once`);
      expect(answers[0]?.remaining).toBe(limit - 1);
      expect(answers[limit]?.allowed).toBe(false);
    }
  });

  it("answers as exact arithmetic does, for any limit, window and request times", () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 1, max: 5000 }),
        fc.constantFrom(1, 2, 7, 60, 3600, 86_400),
        fc.integer({ min: 1_700_000_000_000, max: 2_500_000_000_000 }),
        fc.array(fc.oneof(fc.constant(0), fc.integer({ min: 0, max: 50 }), fc.integer({ min: 0, max: 90_000_000 })), { minLength: 1, maxLength: 300 }),
        (limit, windowSeconds, start, gaps) => {
          const times = requestTimes(start, gaps);
          expect(run(limit, windowSeconds, times)).toEqual(exact(limit, windowSeconds, times));
        },
      ),
      { numRuns: 300 },
    );
  });

  it("stays exact at the largest limit a configuration may have", () => {
    const limit = Math.floor(MAX_RATE_PARTS / 1000); // with a one-second window
    const times = requestTimes(NOW, [0, 0, 0, 1, 0, 999, 1000]);
    expect(run(limit, 1, times)).toEqual(exact(limit, 1, times));
  });

  it("a configuration whose limit and window are too large to count exactly is refused", () => {
    const plans = { ...DEFAULT_POLICY_INPUT.plans, huge: { maxActiveKeys: 1, rateLimit: { limit: 1_000_000_000, windowSeconds: 86_400 }, dailyQuota: null, monthlyCredits: null } };
    expect(() => parsePolicy({ ...DEFAULT_POLICY_INPUT, plans })).toThrow(/limit times windowSeconds must be at most 1125899906842/);
  });
});
