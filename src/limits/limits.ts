import type { RateLimitRule } from "../config.js";
import type { KeyMode } from "../store/store.js";

/**
 * Who shares a rate-limit bucket: one key ("k"), an account's live or test-mode keys ("a", "t"),
 * or an account's live or test-mode ChargeUsage calls ("u", "ut").
 */
export type BucketKind = "k" | "a" | "t" | "u" | "ut";

/**
 * A bucket's name, "<kind>:<id>", as Redis keys spell it. The in-process meter keys its buckets
 * by kind and id instead: a name built per Check cost about a microsecond in hashing alone.
 */
export function bucketName(input: Pick<ChargeInput, "bucketKind" | "bucketId">): string {
  return `${input.bucketKind}:${input.bucketId}`;
}

/** The per-request charge: rate bucket, plan limits and the route's cost. */
export interface ChargeInput {
  ownerId: string;
  /** Whose rate-limit bucket this request counts in (see bucketName). */
  bucketKind: BucketKind;
  /** The key id for "k", else the owner id. */
  bucketId: string;
  rate: RateLimitRule;
  /** Requests a UTC day; null is unlimited. */
  dailyQuota: number | null;
  /** The plan's monthly credit allowance; null when the plan is not metered. */
  monthlyCredits: number | null;
  cost: number;
  nowMs: number;
  /**
   * Whose counters: a live key's, or a test-mode key's, whose daily quota is counted apart (test
   * keys never spend credits: the pipeline passes no monthlyCredits for them).
   */
  meter: KeyMode;
  /** The named daily quota `dailyQuota` is (counted apart from the others); null: the plan's dailyQuota. */
  quota: string | null;
}

/** Why the limits step refused. */
export type LimitReason = "RATE_LIMITED" | "QUOTA_EXCEEDED" | "INSUFFICIENT_CREDITS";

/** Where the caller stands after the charge (or the refusal). */
export interface ChargeResult {
  allowed: boolean;
  reason: LimitReason | null;
  rate: { limit: number; windowSeconds: number; remaining: number; resetSeconds: number };
  /** Set on RATE_LIMITED and QUOTA_EXCEEDED. */
  retryAfterSeconds: number | null;
  /** `name`: the named quota charged, null for the plan's dailyQuota. */
  quota: { name: string | null; limit: number; remaining: number; resetAtMs: number } | null;
  /** Balance after the charge; null when the plan is not metered. */
  credits: { balance: number } | null;
  /** Credits this request spent, split by bucket, for the write-behind. */
  spent: { period: string; monthly: number; topup: number } | null;
}

/** Counts a request against its rate limit, daily quota and credits, in that order, atomically. */
export interface Meter {
  /** Synchronous when all the state is at hand. Charges nothing unless every step passes. */
  charge(input: ChargeInput): ChargeResult | Promise<ChargeResult>;
  /** Where the caller stands, charging nothing: for refusals that happen before the limits step. */
  peek(input: ChargeInput): ChargeResult | Promise<ChargeResult>;
  /**
   * Tells the live counters about a top-up already written to the store: `topupTotal` is the
   * account's top-up total (CreditState.topupTotal) after it. Counters that reflect a lower total
   * add the difference; any other call does nothing, so a repeat, a late call or one before the
   * balance was loaded can neither count a top-up twice nor lose it. Never rejects: a counter it
   * cannot reach is retried in the background.
   */
  addCredits(ownerId: string, topupTotal: number): Promise<void>;
  /** The live credit state, if this meter holds it. */
  credits(ownerId: string, nowMs: number, monthlyCredits: number | null): Promise<{ monthlyUsed: number; topupBalance: number; period: string } | null>;
  close(): Promise<void>;
}

const DAY_MS = 86_400_000;

/** Calendar helpers for UTC days and months, memoized per day: the hot path formats no dates. */
export class UtcCalendar {
  #dayStartMs = -1;
  #dayEndMs = -1;
  #day = "";
  #month = "";

  #roll(nowMs: number): void {
    if (nowMs >= this.#dayStartMs && nowMs < this.#dayEndMs) return;
    this.#dayStartMs = nowMs - (nowMs % DAY_MS);
    this.#dayEndMs = this.#dayStartMs + DAY_MS;
    const iso = new Date(this.#dayStartMs).toISOString();
    this.#day = iso.slice(0, 10);
    this.#month = iso.slice(0, 7);
  }

  /** "YYYY-MM-DD" of `nowMs`. */
  day(nowMs: number): string {
    this.#roll(nowMs);
    return this.#day;
  }

  /** "YYYY-MM" of `nowMs`: the credit period. */
  month(nowMs: number): string {
    this.#roll(nowMs);
    return this.#month;
  }

  /** The next UTC midnight, when daily quotas reset. */
  nextMidnightMs(nowMs: number): number {
    this.#roll(nowMs);
    return this.#dayEndMs;
  }
}

/** Result of a GCRA step on one bucket; `tatMs` is the new theoretical arrival time to store. */
export interface GcraStep {
  allowed: boolean;
  tatMs: number;
  remaining: number;
  resetSeconds: number;
  /** Reset as it stood before this request, for a refusal that does not charge the bucket. */
  resetSecondsBefore: number;
  retryAfterSeconds: number;
}

// Floating point: limit * (windowMs / limit) can exceed windowMs by a rounding error.
const EPSILON_MS = 1e-6;

/**
 * GCRA (the generic cell rate algorithm): a bucket allows `limit` requests at once and then
 * one every windowMs/limit. The Redis script implements the same arithmetic.
 */
export function gcra(storedTatMs: number | undefined, rule: RateLimitRule, nowMs: number): GcraStep {
  const windowMs = rule.windowSeconds * 1000;
  const intervalMs = windowMs / rule.limit;
  const tatMs = storedTatMs === undefined || storedTatMs < nowMs ? nowMs : storedTatMs;
  const nextTatMs = tatMs + intervalMs;
  if (nextTatMs - nowMs > windowMs + EPSILON_MS) {
    return {
      allowed: false,
      tatMs,
      remaining: 0,
      resetSeconds: Math.ceil((tatMs - nowMs) / 1000),
      resetSecondsBefore: Math.ceil((tatMs - nowMs) / 1000),
      retryAfterSeconds: Math.max(1, Math.ceil((nextTatMs - windowMs - nowMs) / 1000)),
    };
  }
  return {
    allowed: true,
    tatMs: nextTatMs,
    remaining: Math.max(0, Math.floor((windowMs - (nextTatMs - nowMs) + EPSILON_MS) / intervalMs)),
    resetSeconds: Math.ceil((nextTatMs - nowMs) / 1000),
    resetSecondsBefore: Math.ceil((tatMs - nowMs) / 1000),
    retryAfterSeconds: 0,
  };
}

/** Splits a cost between this month's allowance and top-ups; null when the balance is short. */
export function spendCredits(
  state: { monthlyUsed: number; topupBalance: number },
  allowance: number,
  cost: number,
): { monthly: number; topup: number; balanceAfter: number } | null {
  const monthlyLeft = Math.max(0, allowance - state.monthlyUsed);
  const balance = monthlyLeft + Math.max(0, state.topupBalance);
  if (balance < cost) return null;
  const monthly = Math.min(monthlyLeft, cost);
  return { monthly, topup: cost - monthly, balanceAfter: balance - cost };
}

/** Applies spent credits to a credit state with the store's rule: a later period starts over. */
export function applyCreditDelta(
  state: { period: string; monthlyUsed: number; topupBalance: number },
  period: string,
  monthly: number,
  topup: number,
): { period: string; monthlyUsed: number; topupBalance: number } {
  const topupBalance = state.topupBalance - topup;
  if (state.period === period) return { period, monthlyUsed: state.monthlyUsed + monthly, topupBalance };
  if (state.period < period) return { period, monthlyUsed: monthly, topupBalance };
  return { period: state.period, monthlyUsed: state.monthlyUsed, topupBalance };
}
