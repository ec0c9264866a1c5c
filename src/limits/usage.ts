import type { Logger } from "pino";
import { ALLOWED } from "../store/store.js";
import { PartialWriteError } from "../store/errors.js";
import type { CreditDelta, MeteringStore, UsageDelta, UsageRow } from "../store/store.js";
import { CallUnansweredError, FLUSH_CHUNK, WriteBehind } from "../store/write-behind.js";
import type { WriteBehindOptions } from "../store/write-behind.js";

/**
 * Counts usage in memory and adds it to the store in batches: requests by key, day and
 * outcome, and credits spent by account. Deltas are additive, so every replica flushes its
 * own. `flush()` runs on a timer and on shutdown.
 */
/**
 * Where a usage row waits for its flush: under its key's id, or, for an account's rows that no
 * key made (key id ""), under a space and the owner's id, which no key id begins with. Rows of
 * no key must stay apart by owner: under "" alone, every account's would have been added up in
 * the first one's row, and counted (and their quota reloaded) as that account's.
 */
function usageId(ownerId: string, keyId: string): string {
  return keyId === "" ? ` ${ownerId}` : keyId;
}

export class UsageRecorder {
  // By key id, then its (day, outcome) rows, usually one: a Check finds its row by the key id
  // its snapshot already holds, without building a composite key (a string per Check). Rows of
  // no key (an account's ChargeUsage without key_id) are under " " and the owner's id (usageId).
  #usage = new Map<string, UsageDelta[]>();
  #usageRows = 0;
  #credits = new Map<string, CreditDelta>();
  /** Rows and credit entries of the batch being written, not yet in the store. */
  #inFlight = 0;
  /**
   * The usage rows of the batch being written, and how many of them (from the first) the store
   * has confirmed; null between batches. A row past `written` is in neither the map nor, surely,
   * the store.
   */
  #flight: { rows: UsageDelta[]; written: number } | null = null;
  /** Reads waiting (withRowsSettled) for the batch being written to move on. */
  #flightMoved: Array<() => void> = [];
  readonly #writer: WriteBehind;
  /** The credits of the batch being written, while they are (the rows after them do not count). */
  #writing: Promise<number | null> | null = null;
  /** Reads running under withoutFlush or withRowsSettled, and the flush waiting for them to end. */
  #readers = 0;
  #readersDone: Array<() => void> = [];
  /** Since stop() began: the last failure of a flush, and deltas that may or may not have been written. */
  #stopError: unknown = null;
  #stopUnsure = 0;

  constructor(
    private readonly store: Pick<MeteringStore, "applyUsage">,
    private readonly logger: Logger,
    readonly flushIntervalMs: number,
    options: WriteBehindOptions = {},
  ) {
    this.#writer = new WriteBehind(() => this.#flushOnce(), flushIntervalMs, options.paced ?? true);
  }

  /**
   * Runs `read` (a store read of credits) while no batch's credits are being written, so the
   * store's answer and pendingSpend() agree: each spent credit is in exactly one of them. Credits
   * written during the read could be in both (counted twice) or, when the read came first, in
   * neither. A batch's usage rows, written after its credits, do not hold the read.
   */
  async withoutFlush<T>(read: () => Promise<T>): Promise<T> {
    while (this.#writing !== null) await this.#writing;
    return this.#asReader(read);
  }

  /**
   * Runs `read` (a store read of an owner's usage rows of `day`, with pendingAllowed() inside it)
   * once no row of that owner, day and `outcome` is in the batch being written, and keeps the next
   * batch from being taken until it ends: each request is then counted exactly once, in the
   * store's answer or in pendingAllowed(). A row being written is in neither; counting it as
   * pending instead could count it twice (the store may have it before this process hears so).
   * Waits only for a batch holding that owner's rows of the day, and not at all between batches.
   */
  async withRowsSettled<T>(ownerId: string, day: string, outcome: string, read: () => Promise<T>): Promise<T> {
    while (this.#rowsInFlight(ownerId, day, outcome)) await new Promise<void>((resolve) => this.#flightMoved.push(resolve));
    return this.#asReader(read);
  }

  /**
   * Runs `read` (a store read of an owner's usage rows from `fromDay` to `toDay`, with pendingRows()
   * inside it) once none of those rows is in the batch being written, and keeps the next batch from
   * being taken until it ends: each row is then in exactly one of the store's answer and
   * pendingRows(), as in withRowsSettled.
   */
  async withOwnerRowsSettled<T>(ownerId: string, fromDay: string, toDay: string, read: () => Promise<T>): Promise<T> {
    while (this.#ownerRowsInFlight(ownerId, fromDay, toDay)) await new Promise<void>((resolve) => this.#flightMoved.push(resolve));
    return this.#asReader(read);
  }

  async #asReader<T>(read: () => Promise<T>): Promise<T> {
    this.#readers += 1;
    try {
      return await read();
    } finally {
      this.#readers -= 1;
      if (this.#readers === 0) for (const wake of this.#readersDone.splice(0)) wake();
    }
  }

  #rowsInFlight(ownerId: string, day: string, outcome: string): boolean {
    const flight = this.#flight;
    if (flight === null) return false;
    for (let i = flight.written; i < flight.rows.length; i++) {
      const row = flight.rows[i];
      if (row !== undefined && row.ownerId === ownerId && row.day === day && row.outcome === outcome) return true;
    }
    return false;
  }

  #ownerRowsInFlight(ownerId: string, fromDay: string, toDay: string): boolean {
    const flight = this.#flight;
    if (flight === null) return false;
    for (let i = flight.written; i < flight.rows.length; i++) {
      const row = flight.rows[i];
      if (row !== undefined && row.ownerId === ownerId && row.day >= fromDay && row.day <= toDay) return true;
    }
    return false;
  }

  /** Wakes the reads waiting for the batch being written to move on. */
  #flightMovedOn(): void {
    for (const wake of this.#flightMoved.splice(0)) wake();
  }

  /** Counts one request of `keyId` on `day` with `outcome` (ALLOWED, ALLOWED_UNMETERED or a denial code). */
  record(ownerId: string, keyId: string, day: string, outcome: string, credits: number): void {
    this.#addUsage(ownerId, keyId, day, outcome, 1, credits);
  }

  #addUsage(ownerId: string, keyId: string, day: string, outcome: string, count: number, credits: number): void {
    const id = usageId(ownerId, keyId);
    const rows = this.#usage.get(id);
    if (rows !== undefined) {
      for (const row of rows) {
        if (row.day === day && row.outcome === outcome && row.ownerId === ownerId) {
          row.count += count;
          row.credits += credits;
          return;
        }
      }
      rows.push({ ownerId, keyId, day, outcome, count, credits });
    } else {
      // A key's first row of the interval: an array made to hold one (an empty one grows to
      // room for 17 on its first push), kept until the flush like the row itself.
      this.#usage.set(id, [{ ownerId, keyId, day, outcome, count, credits }]);
    }
    this.#usageRows += 1;
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

  /** Rows not yet in the store: waiting for the next flush, or in the batch being written. */
  get pendingCount(): number {
    return this.#usageRows + this.#credits.size + this.#inFlight;
  }

  /**
   * Requests of an owner on a day with `outcome` (ALLOWED by default) waiting for the next flush
   * (not those of the batch being written: see withRowsSettled).
   */
  pendingAllowed(ownerId: string, day: string, outcome: string = ALLOWED): number {
    let total = 0;
    for (const rows of this.#usage.values()) {
      for (const entry of rows) if (entry.ownerId === ownerId && entry.day === day && entry.outcome === outcome) total += entry.count;
    }
    return total;
  }

  /**
   * An owner's usage rows from `fromDay` to `toDay` waiting for the next flush (after a failed one
   * too), as the store lists them; not those of the batch being written (see withOwnerRowsSettled).
   */
  pendingRows(ownerId: string, fromDay: string, toDay: string): UsageRow[] {
    const rows: UsageRow[] = [];
    for (const entries of this.#usage.values()) {
      for (const { ownerId: owner, keyId, day, outcome, count, credits } of entries) {
        if (owner === ownerId && day >= fromDay && day <= toDay) rows.push({ keyId, day, outcome, count, credits });
      }
    }
    return rows;
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

  /**
   * Stops the timer and writes what is pending, again while the store refuses it, until
   * `deadlineMs` (performance.now()'s clock; WriteBehind.stop says how long past it a flush the
   * store answers goes on). Resolves to false, after one error-level line saying how many rows,
   * requests and spent credits are lost, when the process would end without them: refused, or
   * never sent once the store stopped answering. The call the store took and had not answered
   * then is counted as `unsure`: it may or may not land, and is never written again.
   */
  async stop(deadlineMs = 0): Promise<boolean> {
    const settled = await this.#writer.stop(deadlineMs, () => this.#usageRows > 0 || this.#credits.size > 0);
    const rows = [...this.#usage.values()].flat();
    const spent = [...this.#credits.values()];
    const unsure = this.#stopUnsure + (settled ? 0 : this.#inFlight);
    if (rows.length === 0 && spent.length === 0 && unsure === 0) return true;
    this.logger.error(
      {
        err: settled ? this.#stopError : new Error("the store did not answer a usage write before the final flush's wait ran out"),
        rows: rows.length,
        requests: rows.reduce((n, row) => n + row.count, 0),
        accounts: spent.length,
        creditsSpent: spent.reduce((n, entry) => n + entry.monthlyUsed + entry.topupUsed, 0),
        unsure,
      },
      "usage not written at shutdown: the store refused it until the shutdown grace period ran out, or stopped answering, so these requests and spent credits are lost; the unsure rows and credits were in a write it did not answer, and may or may not have been written",
    );
    return false;
  }

  /**
   * Writes one batch: the credits spent first, then the usage rows. Credit reads (withoutFlush)
   * wait for the credits only; the rows after them are counts no credit read needs, written while
   * Checks go on.
   */
  async #flushOnce(): Promise<void> {
    if (this.#usageRows === 0 && this.#credits.size === 0) return;
    while (this.#readers > 0) await new Promise<void>((resolve) => this.#readersDone.push(resolve));
    const rows = [...this.#usage.values()].flat();
    const spent = [...this.#credits.values()];
    this.#usage = new Map();
    this.#usageRows = 0;
    this.#credits = new Map();
    this.#inFlight = rows.length + spent.length;
    this.#flight = { rows, written: 0 };
    try {
      const writing = this.#writeCredits(spent, rows);
      this.#writing = writing;
      let lastCall: number | null;
      try {
        lastCall = await writing;
      } finally {
        this.#writing = null;
      }
      if (lastCall !== null) await this.#writeRows(rows, lastCall);
    } finally {
      // Every row is written or back in the map by now.
      this.#flight = null;
      this.#flightMovedOn();
    }
  }

  /**
   * Adds the batch's credits to the store, FLUSH_CHUNK accounts a call, pausing between calls
   * (WriteBehind.between). Never rejects: when a call fails, the credits it and later calls held go
   * back into the map, and so do all of the batch's usage rows (nothing of them was written yet).
   * Resolves to when its last call started (0 with no credits to write), or null when one failed:
   * the rows are then not written this time.
   */
  async #writeCredits(spent: CreditDelta[], rows: UsageDelta[]): Promise<number | null> {
    let c = 0;
    let callStarted = 0;
    let chunk: CreditDelta[] = [];
    try {
      while (c < spent.length) {
        if (c > 0) await this.#writer.between(callStarted);
        chunk = spent.slice(c, c + FLUSH_CHUNK);
        callStarted = performance.now();
        await this.#writer.send(() => this.store.applyUsage([], chunk));
        c += chunk.length;
        this.#inFlight -= chunk.length;
      }
      return callStarted;
    } catch (error) {
      this.#inFlight = 0;
      const failed = unwritten(error, [], chunk);
      for (const e of [...failed.credits, ...spent.slice(c + chunk.length)]) this.spend(e.ownerId, e.period, e.monthlyUsed, e.topupUsed);
      for (const e of rows) this.#addUsage(e.ownerId, e.keyId, e.day, e.outcome, e.count, e.credits);
      this.#warn(error, rows.length + failed.credits.length + spent.length - c - chunk.length, failed.unsure);
      return null;
    }
  }

  /**
   * Logs a failed flush: what is kept for the next one, and what may be written and is not kept.
   * Once stopping, only stop() retries, until the grace period ends, and it reports what is lost.
   */
  #warn(error: unknown, kept: number, unsure: number): void {
    if (this.#writer.stopping) {
      this.#stopError = error;
      this.#stopUnsure += unsure;
      if (unsure === 0) this.logger.warn({ err: error, rows: kept }, "usage flush failed during shutdown");
      else this.logger.error({ err: error, rows: kept, unsure }, "usage flush failed during shutdown; the rows that may have been written are not written again (never counted twice)");
    } else if (unsure === 0) this.logger.warn({ err: error, rows: kept }, "usage flush failed; will retry");
    else this.logger.error({ err: error, rows: kept, unsure }, "usage flush failed; will retry the rows not written, and not those that may have been (never counted twice)");
  }

  /**
   * Adds the batch's usage rows to the store, FLUSH_CHUNK rows a call, pausing between calls
   * (WriteBehind.between): a synchronous store (SQLite) writing a whole busy interval at once would
   * hold every Check for the length of the write, and a MongoDB that serves one request at a time
   * would hold every key lookup. Never rejects: the rows of the call that failed, and of those
   * after it, go back into the map (each call is one transaction, so none of them counted).
   * `creditsCallStarted`: when the credits' last call started (0 when there was none).
   */
  async #writeRows(rows: UsageDelta[], creditsCallStarted: number): Promise<void> {
    let u = 0;
    let callStarted = creditsCallStarted;
    let chunk: UsageDelta[] = [];
    try {
      while (u < rows.length) {
        if (callStarted > 0) await this.#writer.between(callStarted);
        chunk = rows.slice(u, u + FLUSH_CHUNK);
        callStarted = performance.now();
        await this.#writer.send(() => this.store.applyUsage(chunk, []));
        u += chunk.length;
        this.#inFlight -= chunk.length;
        if (this.#flight !== null) this.#flight.written = u;
        this.#flightMovedOn();
      }
    } catch (error) {
      // What was not written goes back to the map, where pendingCount counts it.
      this.#inFlight = 0;
      const failed = unwritten(error, chunk, []);
      for (const e of [...failed.usage, ...rows.slice(u + chunk.length)]) this.#addUsage(e.ownerId, e.keyId, e.day, e.outcome, e.count, e.credits);
      this.#warn(error, failed.usage.length + rows.length - u - chunk.length, failed.unsure);
    }
  }
}

/**
 * What of a failed call is sure not to be in the store: all of it for a store whose call is one
 * transaction; what PartialWriteError names for one whose call is not, with the count of deltas
 * that may have been written (kept out of the retry, so never counted twice); none of a call the
 * store took and stop() gave up waiting for (CallUnansweredError).
 */
function unwritten(error: unknown, usage: UsageDelta[], credits: CreditDelta[]): { usage: UsageDelta[]; credits: CreditDelta[]; unsure: number } {
  if (error instanceof PartialWriteError) return { ...error.unapplied, unsure: error.unsure };
  if (error instanceof CallUnansweredError) return { usage: [], credits: [], unsure: usage.length + credits.length };
  return { usage, credits, unsure: 0 };
}
