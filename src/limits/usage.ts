import type { Logger } from "pino";
import type { CreditDelta, KeyStore, UsageDelta } from "../store/store.js";
import { WriteBehind } from "../store/write-behind.js";

/**
 * Counts usage in memory and adds it to the store in batches: requests by key, day and
 * outcome, and credits spent by account. Deltas are additive, so every replica flushes its
 * own. `flush()` runs on a timer and on shutdown.
 */
export class UsageRecorder {
  #usage = new Map<string, UsageDelta>();
  #credits = new Map<string, CreditDelta>();
  readonly #writer: WriteBehind;

  constructor(
    private readonly store: KeyStore,
    private readonly logger: Logger,
    flushIntervalMs: number,
  ) {
    this.#writer = new WriteBehind(() => this.#flushOnce(), flushIntervalMs);
  }

  /** Counts one request of `keyId` on `day` with `outcome` ("ALLOWED" or a denial code). */
  record(ownerId: string, keyId: string, day: string, outcome: string, credits: number): void {
    this.#addUsage(ownerId, keyId, day, outcome, 1, credits);
  }

  #addUsage(ownerId: string, keyId: string, day: string, outcome: string, count: number, credits: number): void {
    const id = `${keyId}|${day}|${outcome}`;
    const entry = this.#usage.get(id);
    if (entry === undefined) this.#usage.set(id, { ownerId, keyId, day, outcome, count, credits });
    else {
      entry.count += count;
      entry.credits += credits;
    }
  }

  /** Counts credits spent by an account in `period`. */
  spend(ownerId: string, period: string, monthly: number, topup: number): void {
    const id = `${ownerId}|${period}`;
    const entry = this.#credits.get(id);
    if (entry === undefined) this.#credits.set(id, { ownerId, period, monthlyUsed: monthly, topupUsed: topup });
    else {
      entry.monthlyUsed += monthly;
      entry.topupUsed += topup;
    }
  }

  /** Rows waiting for the next flush. */
  get pendingCount(): number {
    return this.#usage.size + this.#credits.size;
  }

  /** Allowed requests of an owner on a day not yet in the store. */
  pendingAllowed(ownerId: string, day: string): number {
    let total = 0;
    for (const entry of this.#usage.values()) {
      if (entry.ownerId === ownerId && entry.day === day && entry.outcome === "ALLOWED") total += entry.count;
    }
    return total;
  }

  /** Credits of an owner spent but not yet in the store. */
  pendingSpend(ownerId: string, period: string): { monthly: number; topup: number } {
    let monthly = 0;
    let topup = 0;
    for (const entry of this.#credits.values()) {
      if (entry.ownerId !== ownerId) continue;
      if (entry.period === period) monthly += entry.monthlyUsed;
      topup += entry.topupUsed;
    }
    return { monthly, topup };
  }

  start(): void {
    this.#writer.start();
  }

  /** Writes everything pending; a failed batch is merged back and retried next time. */
  flush(): Promise<void> {
    return this.#writer.flush();
  }

  stop(): Promise<void> {
    return this.#writer.stop();
  }

  async #flushOnce(): Promise<void> {
    if (this.#usage.size === 0 && this.#credits.size === 0) return;
    const usage = this.#usage;
    const credits = this.#credits;
    this.#usage = new Map();
    this.#credits = new Map();
    try {
      await this.store.applyUsage([...usage.values()], [...credits.values()]);
    } catch (error) {
      for (const e of usage.values()) this.#addUsage(e.ownerId, e.keyId, e.day, e.outcome, e.count, e.credits);
      for (const e of credits.values()) this.spend(e.ownerId, e.period, e.monthlyUsed, e.topupUsed);
      this.logger.warn({ err: error, rows: usage.size }, "usage flush failed; will retry");
    }
  }
}
