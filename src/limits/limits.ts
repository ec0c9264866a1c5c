import type { RateLimitRule } from "../config.js";
import type { KeyMode } from "../store/store.js";
import type { ConfirmClaim } from "./idempotency.js";

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
  /**
   * The request counts toward its quota's count for the day (a metered route's), whether or not
   * the plan limits it: a plan given a daily quota later in the day (a downgrade) finds the
   * day's requests counted, in both meters, as a count loaded from the store would have them.
   */
  countsDaily: boolean;
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
  /**
   * ChargeUsage's idempotency key (unique per owner): a meter that can answer a charge without
   * its caller hearing the answer (Redis) keeps the charge's outcome under it, so a retry after
   * such a charge is answered from it and charges nothing; one for another charge
   * (idempotencyFingerprint differs) is refused (IdempotencyKeyMismatchError). Checks have none.
   */
  idempotencyKey?: string;
  /**
   * What the charge is, as ChargeUsage's ledger compares it: "mode:cost:quota:keyId", the cost and
   * quota as asked (a test key's, which this input charges as 0 and against no named quota, too)
   * and keyId "" for the account's. Kept with the outcome under idempotencyKey; without it, the
   * meter's own mode, cost and quota stand for it.
   */
  idempotencyFingerprint?: string;
  /**
   * A retry after a call with this idempotency key failed having recorded nothing: a kept answer
   * it meets is this call's to record (its `spent` is given), not a repeat of a recorded one.
   */
  recordReplay?: boolean;
  /**
   * ChargeUsage: resolves while the call still holds its idempotency key's claim, rejects once
   * another call may hold it. A meter that would charge where the key's later calls cannot see it
   * (Redis's in-process fallback) asks first. Checks have none.
   */
  confirmClaim?: ConfirmClaim;
  /**
   * Set by the Check's budget (withinBudget) once the Check was answered UNAVAILABLE without this
   * charge: a meter still waiting on a load charges nothing more, and does not send its charge
   * (ChargeAbandonedError). A charge already sent to Redis that it allows is given back when its
   * answer comes (ChargeAbandonedError too). Always false to start.
   */
  budgetExpired: boolean;
}

/**
 * The shared limits could not be asked (Redis failed, limits.onRedisError fail-closed, or
 * fail-open for a charge with an idempotency key): nothing was decided. A charge already sent may
 * still be made when Redis answers again; a retry of a ChargeUsage with the same idempotency key
 * is then answered from it (ChargeInput.idempotencyKey).
 */
export class MeterUnavailableError extends Error {
  override readonly name = "MeterUnavailableError";
}

/**
 * The Check this charge was for has been answered already (its budget ran out, UNAVAILABLE), so
 * the meter charged nothing: README, "One budget per Check". No client ever sees it.
 */
export class ChargeAbandonedError extends Error {
  override readonly name = "ChargeAbandonedError";
}

/** Why the limits step refused. */
export type LimitReason = "RATE_LIMITED" | "QUOTA_EXCEEDED" | "INSUFFICIENT_CREDITS";

/** Where the caller stands after the charge (or the refusal). */
export interface ChargeResult {
  allowed: boolean;
  reason: LimitReason | null;
  rate: { limit: number; windowSeconds: number; remaining: number; resetSeconds: number };
  /** Set on RATE_LIMITED, and on QUOTA_EXCEEDED unless the quota is 0 (noQuotaAllowance). */
  retryAfterSeconds: number | null;
  /** `name`: the named quota charged, null for the plan's dailyQuota. */
  quota: { name: string | null; limit: number; remaining: number; resetAtMs: number } | null;
  /** Balance after the charge; null when the plan is not metered. */
  credits: { balance: number } | null;
  /** Credits this request spent, split by bucket, for the write-behind. */
  spent: { period: string; monthly: number; topup: number } | null;
  /**
   * The answer Redis kept for this charge's idempotency key (ChargeInput.idempotencyKey): an
   * earlier call charged, and nothing was charged now. Its spend is recorded already, unless
   * ChargeInput.recordReplay said the earlier call failed (then `spent` is given).
   */
  replayed: boolean;
}

/**
 * A daily quota of 0: the plan (or test mode) includes none of the quota's requests. Its refusal
 * names no reset, for midnight brings another 0: no Retry-After, not retryable.
 */
export function noQuotaAllowance(quota: ChargeResult["quota"]): boolean {
  return quota !== null && quota.limit === 0;
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
  /**
   * Gives a rotation's new key the rate bucket of the key it replaces (kind "k": a key's own
   * bucket), so rotating never hands out a fresh one; the old key, while in grace, charges the
   * new key's bucket from then on (ChargeInput.bucketId). Nothing when the old key has none.
   */
  inheritKeyBucket(ownerId: string, fromKeyId: string, toKeyId: string): Promise<void>;
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

/**
 * A bucket's theoretical arrival time, exactly: `ms` whole milliseconds since the epoch plus
 * `frac` of one. GCRA steps by windowMs/limit, rarely a whole number of milliseconds; summed as
 * one float near 1.8e12, where floats are 2^-12 ms apart, a burst's roundings grew past any fixed
 * tolerance, and a plan of 9 a minute let 8 through at some instants (nearly half of all limits
 * from 1 to 1000 a minute came out one short at some time). `frac` is a multiple of 1/limit,
 * recovered exactly from the float (Math.round(frac * limit)) for every limit keygate accepts.
 */
export interface Tat {
  ms: number;
  frac: number;
}

/**
 * Result of a GCRA step on one bucket; `tatMs` and `tatFrac` are the new theoretical arrival
 * time to store (a Tat's `ms` and `frac`, kept apart so a Check allocates no Tat of its own).
 */
export interface GcraStep {
  allowed: boolean;
  tatMs: number;
  tatFrac: number;
  remaining: number;
  resetSeconds: number;
  /** Reset as it stood before this request, for a refusal that does not charge the bucket. */
  resetSecondsBefore: number;
  retryAfterSeconds: number;
  /**
   * The stored time was further ahead than a full bucket reaches (a clock stepped ahead wrote it,
   * or the window was shortened since; see gcra for a time another replica's clock wrote): it
   * counts as a full bucket from now, and the refusal stores that time (tatMs, tatFrac), so the
   * bucket drains on this clock.
   */
  rebased: boolean;
}

/**
 * GCRA (the generic cell rate algorithm): a bucket allows `limit` requests at once and then
 * one every windowMs/limit. Times are counted from now in parts of 1/limit ms, whole numbers, so
 * one interval is windowMs parts and a full bucket windowMs * limit: every sum and comparison
 * is exact (config.ts bounds windowMs * limit by MAX_RATE_PARTS). The Redis script (limits/redis.ts)
 * implements the same arithmetic.
 */
/**
 * How far past a full bucket a stored time must reach, on the caller's clock, before a refusal
 * rebases it (ms), when nothing says it was written under a longer window. Replicas share a Redis
 * bucket, each judging it on its own clock: a time one ahead by a few seconds wrote reads on the
 * others as more than a full bucket. Rebased at once, it moved back by that skew, and the replica
 * ahead found room again: with round-robin traffic over clocks 2 s apart, every request through
 * the one ahead passed. Within this margin such a time is a debt like any other (refused, nothing
 * written); past it, it is a clock stepped ahead, which would otherwise hold the account for as
 * long as the step.
 */
export const REBASE_BEYOND_MS = 5 * 60_000;

/**
 * One request on a bucket. `debtMs` is how long the stored time's debt still runs by the clock
 * of whoever keeps it (a Redis key's remaining life, less its second of slack), when another
 * clock may have written it; omitted in process, where this clock wrote it.
 */
export function gcra(stored: Tat | undefined, rule: RateLimitRule, nowMs: number, debtMs?: number): GcraStep {
  const { limit } = rule;
  const windowMs = rule.windowSeconds * 1000;
  const full = windowMs * limit;
  const nowWhole = Math.floor(nowMs);
  const nowParts = Math.floor((nowMs - nowWhole) * limit);
  // Parts from now to the stored time; one in the past is a full bucket. One further ahead than a
  // full bucket reaches is a full bucket's debt from now (else a clock stepped forward and back,
  // or a replica whose clock ran an hour ahead, refused the account for that hour; and a window
  // shortened by a reload held it to the old one) when this clock wrote it, when its keeper says
  // it runs longer than a window (written under a longer one), or when it is past a full bucket
  // by more than REBASE_BEYOND_MS; else it is a debt (another replica's clock runs a little ahead).
  const ahead = stored === undefined ? 0 : (stored.ms - nowWhole) * limit + Math.round(stored.frac * limit) - nowParts;
  const rebased = ahead > full && (debtMs === undefined || debtMs > windowMs || ahead > full + REBASE_BEYOND_MS * limit);
  const before = rebased ? full : ahead > 0 ? ahead : 0;
  const after = before + windowMs;
  const allowed = after <= full;
  // The time to store: the one after this request if it is allowed, else the one before.
  const tatParts = nowParts + (allowed ? after : before);
  const tatWhole = Math.floor(tatParts / limit);
  const partsPerSecond = 1000 * limit;
  const resetSecondsBefore = Math.ceil(before / partsPerSecond);
  return {
    allowed,
    tatMs: nowWhole + tatWhole,
    tatFrac: (tatParts - tatWhole * limit) / limit,
    remaining: allowed ? Math.floor((full - after) / windowMs) : 0,
    resetSeconds: allowed ? Math.ceil(after / partsPerSecond) : resetSecondsBefore,
    resetSecondsBefore,
    retryAfterSeconds: allowed ? 0 : Math.max(1, Math.ceil((after - full) / partsPerSecond)),
    rebased,
  };
}

/** Milliseconds from `nowMs` to `tat`, rounded up: how long a bucket's state must be kept. */
export function msUntil(tat: Tat, nowMs: number): number {
  return Math.max(0, Math.ceil(tat.ms - nowMs + tat.frac));
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
