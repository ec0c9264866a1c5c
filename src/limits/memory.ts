import { LRUCache } from "lru-cache";
import { allowedOutcome } from "../store/store.js";
import type { MeteringStore } from "../store/store.js";
import { ChargeAbandonedError, UtcCalendar, applyCreditDelta, gcra, spendCredits } from "./limits.js";
import type { BucketKind, ChargeInput, ChargeResult, GcraStep, Meter } from "./limits.js";
import type { UsageRecorder } from "./usage.js";

interface CreditCell {
  period: string;
  monthlyUsed: number;
  topupBalance: number;
  /** The store's top-up total this balance includes (CreditState.topupTotal). */
  seenTotal: number;
}

const MAX_ENTRIES = 1_000_000;

/** A GCRA bucket's theoretical arrival time (a Tat, changed in place). */
interface TatCell {
  ms: number;
  frac: number;
}

/**
 * A map bounded to `max` entries that forgets the least recently used one past it. lru-cache
 * bounded by size (each entry counts 1) rather than by count: with `max` it preallocates tables
 * for the whole bound, about 84 MB for three tables of a million entries before the first
 * request. Recency lives in lru-cache's index lists. A plain Map that deletes and re-adds a key on
 * every use keeps the deleted entries in that key's hash chain until the table is rebuilt: with
 * one busy key among 150,000 entries a get and set took 0.6 to 1 ms, and `npm run bench`'s
 * one-key run after its many-key scenarios spent 54 % of keygate's CPU there.
 */
export class RecentMap<K extends {}, V extends {}> {
  readonly #entries: LRUCache<K, V>;

  constructor(readonly max: number) {
    this.#entries = new LRUCache<K, V>({ maxSize: max, sizeCalculation: () => 1 });
  }

  get size(): number {
    return this.#entries.size;
  }

  /** The value, marked as just used. */
  get(key: K): V | undefined {
    return this.#entries.get(key);
  }

  /** Whether the key is held; does not count as a use. */
  has(key: K): boolean {
    return this.#entries.has(key);
  }

  set(key: K, value: V): void {
    this.#entries.set(key, value);
  }

  delete(key: K): void {
    this.#entries.delete(key);
  }

  clear(): void {
    this.#entries.clear();
  }
}

/**
 * In-process limits: GCRA buckets, daily quota counters and credit balances. Quota counts and
 * balances are seeded from the store (plus usage not yet flushed) on an account's first
 * request, so a restart neither forgets today's usage nor re-grants spent credits.
 */
export class MemoryMeter implements Meter {
  // A bucket's theoretical arrival time; one in the past means a full bucket (gcra reads it as
  // none), so an entry needs no expiry of its own: it is only the oldest to go when full.
  // By bucket kind, then id (ChargeInput's bucketKind and bucketId), each bounded on its own.
  // Each bucket's time is a cell changed in place: a charge reads its bucket once, and stores no
  // new number into the (old-generation) table, which a young-generation GC would have to keep.
  readonly #tats: Record<BucketKind, RecentMap<string, TatCell>> = {
    k: new RecentMap(MAX_ENTRIES),
    a: new RecentMap(MAX_ENTRIES),
    t: new RecentMap(MAX_ENTRIES),
    u: new RecentMap(MAX_ENTRIES),
    ut: new RecentMap(MAX_ENTRIES),
  };
  readonly #quota = new RecentMap<string, { count: number }>(MAX_ENTRIES);
  /**
   * Owners that have had a count (a limited plan's): only for them does a request without a limit
   * build its count's name, so an unlimited plan's Check allocates nothing for it. Emptied at
   * MAX_ENTRIES: an owner then missing counts on once a limit applies again (loaded from the store).
   */
  readonly #countedOwners = new Set<string>();
  readonly #credits = new RecentMap<string, CreditCell>(MAX_ENTRIES);
  readonly #seeding = new Map<string, Promise<void>>();
  readonly #calendar = new UtcCalendar();

  constructor(
    private readonly store: Pick<MeteringStore, "getCredits" | "listUsage">,
    private readonly usage: UsageRecorder,
  ) {}

  charge(input: ChargeInput): ChargeResult | Promise<ChargeResult> {
    return this.#withState(input, (quotaKey) => this.#evaluate(input, quotaKey));
  }

  peek(input: ChargeInput): ChargeResult | Promise<ChargeResult> {
    return this.#withState(input, (quotaKey) => this.#peek(input, quotaKey));
  }

  /** Runs `fn` once the account's quota count and balance are loaded. */
  #withState(input: ChargeInput, fn: (quotaKey: string) => ChargeResult): ChargeResult | Promise<ChargeResult> {
    const day = this.#calendar.day(input.nowMs);
    // A metered request is counted under this key whether or not its plan has a limit (an
    // unmetered one builds no key); the count is loaded from the store only once a limit applies.
    const counted = input.countsDaily && (input.dailyQuota !== null || this.#countedOwners.has(input.ownerId));
    const quotaKey = counted ? `${input.ownerId}|${day}|${input.meter}|${input.quota ?? ""}` : "";
    const needsQuota = input.dailyQuota !== null && !this.#quota.has(quotaKey);
    const needsCredits = input.monthlyCredits !== null && !this.#credits.has(input.ownerId);
    if (needsQuota || needsCredits) {
      return this.#seed(input, day, quotaKey, needsQuota, needsCredits).then(() => {
        // The load outlasted the Check's budget: it was answered UNAVAILABLE, so nothing is charged.
        if (input.budgetExpired) throw new ChargeAbandonedError("the check was answered before its limits were loaded");
        return fn(quotaKey);
      });
    }
    return fn(quotaKey);
  }

  async inheritKeyBucket(_ownerId: string, fromKeyId: string, toKeyId: string): Promise<void> {
    const from = this.#tats.k.get(fromKeyId);
    if (from === undefined) return;
    const own = this.#tats.k.get(toKeyId);
    if (own !== undefined && own.ms + own.frac >= from.ms + from.frac) return;
    this.#tats.k.set(toKeyId, { ms: from.ms, frac: from.frac });
  }

  #peek(input: ChargeInput, quotaKey: string): ChargeResult {
    const { rate, nowMs } = input;
    const step = gcra(this.#tats[input.bucketKind].get(input.bucketId), rate, nowMs);
    return {
      allowed: false,
      reason: null,
      rate: {
        limit: rate.limit,
        windowSeconds: rate.windowSeconds,
        remaining: step.allowed ? Math.min(rate.limit, step.remaining + 1) : 0,
        resetSeconds: step.resetSecondsBefore,
      },
      retryAfterSeconds: null,
      quota: this.#quotaNow(input, quotaKey),
      credits: this.#balanceNow(input),
      spent: null,
      replayed: false,
    };
  }

  /** Where the request's daily quota stands, charging nothing; null when none limits it. */
  #quotaNow(input: ChargeInput, quotaKey: string): ChargeResult["quota"] {
    if (input.dailyQuota === null) return null;
    const used = this.#quota.get(quotaKey)?.count ?? 0;
    return { name: input.quota, limit: input.dailyQuota, remaining: Math.max(0, input.dailyQuota - used), resetAtMs: this.#calendar.nextMidnightMs(input.nowMs) };
  }

  /** The account's balance, charging nothing; null when the plan is not metered or none is loaded. */
  #balanceNow(input: ChargeInput): ChargeResult["credits"] {
    if (input.monthlyCredits === null) return null;
    const cell = this.#credits.get(input.ownerId);
    if (cell === undefined) return null;
    const current = applyCreditDelta(cell, this.#calendar.month(input.nowMs), 0, 0);
    return { balance: Math.max(0, input.monthlyCredits - current.monthlyUsed) + Math.max(0, current.topupBalance) };
  }

  #seed(input: ChargeInput, day: string, quotaKey: string, quota: boolean, credits: boolean): Promise<void> {
    const { ownerId, nowMs } = input;
    const counted = allowedOutcome(input.meter, input.quota);
    // The account and day whatever the quota: a seeding of credits alone is the account's too.
    const id = `${ownerId}|${day}|${input.meter}|${input.quota ?? ""}|${quota}|${credits}`;
    let pending = this.#seeding.get(id);
    if (pending === undefined) {
      pending = (async () => {
        if (quota && !this.#quota.has(quotaKey)) {
          // Rows of a batch being written are in neither the store's answer nor pendingAllowed.
          const used = await this.usage.withRowsSettled(ownerId, day, counted, async () => {
            const rows = await this.store.listUsage(ownerId, day, day);
            const stored = rows.reduce((sum, row) => sum + (row.outcome === counted ? row.count : 0), 0);
            return stored + this.usage.pendingAllowed(ownerId, day, counted);
          });
          if (!this.#quota.has(quotaKey)) this.#setCount(ownerId, quotaKey, used);
        }
        if (credits && !this.#credits.has(ownerId)) await this.#seedCredits(ownerId, this.#calendar.month(nowMs));
      })().finally(() => this.#seeding.delete(id));
      this.#seeding.set(id, pending);
    }
    return pending;
  }

  /**
   * Loads a balance: the store's, less what this process spent and has not flushed. A top-up
   * whose addCredits ran before the cell existed changed nothing here, so the top-up total is
   * read again once the cell is in place and any difference is added.
   */
  async #seedCredits(ownerId: string, period: string): Promise<void> {
    const { stored, unflushed } = await this.usage.withoutFlush(async () => {
      const state = await this.store.getCredits(ownerId);
      return { stored: state, unflushed: this.usage.pendingSpend(ownerId, period) };
    });
    if (this.#credits.has(ownerId)) return;
    this.#credits.set(ownerId, { ...applyCreditDelta(stored, period, unflushed.monthly, unflushed.topup), seenTotal: stored.topupTotal });
    const after = await this.store.getCredits(ownerId);
    this.#catchUp(ownerId, after.topupTotal);
  }

  /** Adds top-ups this cell does not include yet; a total it already reflects changes nothing. */
  #catchUp(ownerId: string, topupTotal: number): void {
    const cell = this.#credits.get(ownerId);
    if (cell === undefined || topupTotal <= cell.seenTotal) return;
    cell.topupBalance += topupTotal - cell.seenTotal;
    cell.seenTotal = topupTotal;
  }

  #evaluate(input: ChargeInput, quotaKey: string): ChargeResult {
    const { rate, nowMs } = input;
    const bucket = this.#tats[input.bucketKind].get(input.bucketId);
    const step = gcra(bucket, rate, nowMs);
    const result: ChargeResult = {
      allowed: false,
      reason: null,
      rate: { limit: rate.limit, windowSeconds: rate.windowSeconds, remaining: step.remaining, resetSeconds: step.resetSeconds },
      retryAfterSeconds: null,
      quota: null,
      credits: null,
      spent: null,
      replayed: false,
    };
    if (!step.allowed) {
      // A time from a clock that ran ahead is kept as a full bucket's debt from this clock's now.
      if (step.rebased && bucket !== undefined) {
        bucket.ms = step.tatMs;
        bucket.frac = step.tatFrac;
      }
      result.reason = "RATE_LIMITED";
      result.retryAfterSeconds = step.retryAfterSeconds;
      // A refusal still says where the quota and balance stand (README, Headers); read only here.
      result.quota = this.#quotaNow(input, quotaKey);
      result.credits = this.#balanceNow(input);
      return result;
    }
    const quotaCell = quotaKey === "" ? undefined : this.#quota.get(quotaKey);
    if (input.dailyQuota !== null) {
      const used = quotaCell?.count ?? 0;
      const resetAtMs = this.#calendar.nextMidnightMs(nowMs);
      result.quota = { name: input.quota, limit: input.dailyQuota, remaining: Math.max(0, input.dailyQuota - used), resetAtMs };
      if (used >= input.dailyQuota) {
        result.credits = this.#balanceNow(input);
        // A quota of 0 comes back as 0 at midnight: no time to retry at.
        const retryAfterSeconds = input.dailyQuota === 0 ? null : Math.max(1, Math.ceil((resetAtMs - nowMs) / 1000));
        return this.#refuse(result, step, "QUOTA_EXCEEDED", retryAfterSeconds);
      }
    }
    let cell: CreditCell | undefined;
    let spend: ReturnType<typeof spendCredits> = null;
    const period = this.#calendar.month(nowMs);
    if (input.monthlyCredits !== null) {
      // No cell only after an eviction between seeding and this charge: it then counts from zero
      // and takes no later top-up (an infinite total), so it can undercount but never overcount.
      cell = this.#credits.get(input.ownerId) ?? { period, monthlyUsed: 0, topupBalance: 0, seenTotal: Number.POSITIVE_INFINITY };
      if (cell.period !== period) cell = { ...applyCreditDelta(cell, period, 0, 0), seenTotal: cell.seenTotal };
      spend = spendCredits(cell, input.monthlyCredits, input.cost);
      if (spend === null) {
        result.credits = { balance: Math.max(0, input.monthlyCredits - cell.monthlyUsed) + Math.max(0, cell.topupBalance) };
        return this.#refuse(result, step, "INSUFFICIENT_CREDITS", null);
      }
    }
    // Every step passed: charge them all.
    if (bucket === undefined) this.#tats[input.bucketKind].set(input.bucketId, { ms: step.tatMs, frac: step.tatFrac });
    else {
      bucket.ms = step.tatMs;
      bucket.frac = step.tatFrac;
    }
    // Without a limit, a count is kept on only once loaded: the usage rows the store loads it
    // from hold the requests made meanwhile.
    if (quotaCell !== undefined) quotaCell.count += 1;
    else if (input.dailyQuota !== null) this.#setCount(input.ownerId, quotaKey, 1);
    if (result.quota !== null) result.quota.remaining -= 1;
    if (cell !== undefined && spend !== null) {
      // The period charged is the cell's, the later of the two when this clock reads an earlier
      // month than the balance has (a clock stepped back across a month's start): spend written
      // under the earlier month would be dropped, here and by the store.
      const charged = cell.period;
      this.#credits.set(input.ownerId, { ...applyCreditDelta(cell, charged, spend.monthly, spend.topup), seenTotal: cell.seenTotal });
      result.credits = { balance: spend.balanceAfter };
      result.spent = { period: charged, monthly: spend.monthly, topup: spend.topup };
    }
    result.allowed = true;
    return result;
  }

  /** A refusal after the rate step: the request was not charged, so it keeps its rate slot. */
  #refuse(result: ChargeResult, step: GcraStep, reason: "QUOTA_EXCEEDED" | "INSUFFICIENT_CREDITS", retryAfterSeconds: number | null): ChargeResult {
    result.reason = reason;
    result.retryAfterSeconds = retryAfterSeconds;
    result.rate.remaining = Math.min(result.rate.limit, result.rate.remaining + 1);
    result.rate.resetSeconds = step.resetSecondsBefore;
    return result;
  }

  async addCredits(ownerId: string, topupTotal: number): Promise<void> {
    this.#catchUp(ownerId, topupTotal);
  }

  async credits(ownerId: string, nowMs: number): Promise<{ period: string; monthlyUsed: number; topupBalance: number } | null> {
    const cell = this.#credits.get(ownerId);
    if (cell === undefined) return null;
    return applyCreditDelta(cell, this.#calendar.month(nowMs), 0, 0);
  }

  /**
   * Drops every count: rate buckets, quota counts and credit balances. A meter that stood in for
   * Redis calls this once Redis answers again, so a later outage loads its counts afresh from the
   * store instead of charging against what it held the last time.
   */
  #setCount(ownerId: string, quotaKey: string, count: number): void {
    if (this.#countedOwners.size >= MAX_ENTRIES) this.#countedOwners.clear();
    this.#countedOwners.add(ownerId);
    this.#quota.set(quotaKey, { count });
  }

  reset(): void {
    for (const tats of Object.values(this.#tats)) tats.clear();
    this.#quota.clear();
    this.#countedOwners.clear();
    this.#credits.clear();
  }

  async close(): Promise<void> {
    this.reset();
  }
}
