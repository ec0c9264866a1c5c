import type { Logger } from "pino";
import type { LastUsedStore } from "./store.js";
import { CallUnansweredError, FLUSH_CHUNK, WriteBehind } from "./write-behind.js";
import type { WriteBehindOptions } from "./write-behind.js";

/**
 * Collects last-use times in memory and writes them to the store in batches, so the Check
 * path never writes per request. `flush()` runs on a timer and on shutdown.
 */
export class LastUsedRecorder {
  // By key id, the time of its last use as milliseconds after #base, the first time recorded
  // since the last flush: a small integer, which V8 keeps in the map's own table. A whole epoch
  // time does not fit there and is a heap number, allocated by every Check and kept alive by the
  // map (long-lived, so in the old generation) until the next one: about 16 bytes a Check that
  // young-generation GCs promote for a mark-compact to sweep.
  #pending = new Map<string, number>();
  #base = 0;
  /** Keys of the batch being written, not yet in the store. */
  #inFlight = 0;
  /** Since stop() began: the last failure of a flush, and keys of a call it gave up waiting for. */
  #stopError: unknown = null;
  #stopUnsure = 0;
  readonly #writer: WriteBehind;

  constructor(
    private readonly store: LastUsedStore,
    private readonly logger: Logger,
    flushIntervalMs: number,
    options: WriteBehindOptions = {},
  ) {
    this.#writer = new WriteBehind(() => this.#flushOnce(), flushIntervalMs, options.paced ?? true);
  }

  /** Remembers that the key was used at `atMs`. */
  record(keyId: string, atMs: number): void {
    if (this.#pending.size === 0) this.#base = atMs;
    this.#pending.set(keyId, atMs - this.#base);
  }

  /** Keys whose time is not yet in the store: waiting for the next flush, or being written. */
  get pendingCount(): number {
    return this.#pending.size + this.#inFlight;
  }

  start(): void {
    this.#writer.start();
  }

  /** Writes everything pending. A failed batch is kept and retried on the next flush. */
  flush(): Promise<void> {
    return this.#writer.flush();
  }

  /**
   * Stops the timer and writes what is pending, again while the store refuses it, until
   * `deadlineMs` (performance.now()'s clock; WriteBehind.stop says how long past it a flush the
   * store answers goes on). Resolves to false, after one error-level line with the count of keys,
   * when the process would end without their last-use times; keys of the call the store took and
   * had not answered then are among them, and counted as `unsure` too (never written again).
   */
  async stop(deadlineMs = 0): Promise<boolean> {
    const settled = await this.#writer.stop(deadlineMs, () => this.#pending.size > 0);
    const unsure = this.#stopUnsure + (settled ? 0 : this.#inFlight);
    if (this.#pending.size + unsure === 0) return true;
    this.logger.error(
      {
        err: settled ? this.#stopError : new Error("the store did not answer a last-use write before the final flush's wait ran out"),
        keys: this.#pending.size + unsure,
        unsure,
      },
      "last-use times not written at shutdown: the store refused them until the shutdown grace period ran out, or stopped answering, so they are lost",
    );
    return false;
  }

  /**
   * Writes FLUSH_CHUNK keys a call, pausing between calls (WriteBehind.between). The batch
   * is the pending map itself, read key by key: no list of [id, time] pairs, which would live as
   * long as the batch takes to write.
   */
  async #flushOnce(): Promise<void> {
    if (this.#pending.size === 0) return;
    const batch = this.#pending;
    const base = this.#base;
    this.#pending = new Map();
    const ids = batch.keys();
    let written = 0;
    let callStarted = 0;
    // Keys of the call out, which a CallUnansweredError leaves unsure (not put back).
    let sending = 0;
    this.#inFlight = batch.size;
    try {
      while (written < batch.size) {
        if (written > 0) await this.#writer.between(callStarted);
        const chunk = new Map<string, number>();
        for (let next = ids.next(); !next.done; next = ids.next()) {
          chunk.set(next.value, base + (batch.get(next.value) as number));
          if (chunk.size === FLUSH_CHUNK) break;
        }
        callStarted = performance.now();
        sending = chunk.size;
        await this.#writer.send(() => this.store.touchLastUsed(chunk));
        written += chunk.size;
        this.#inFlight -= chunk.size;
      }
    } catch (error) {
      // What was not written goes back to the map, where pendingCount counts it.
      this.#inFlight = 0;
      const unsure = error instanceof CallUnansweredError ? sending : 0;
      let index = 0;
      for (const [id, offset] of batch) {
        if (index++ < written + unsure) continue;
        const atMs = base + offset;
        const newer = this.#pending.get(id);
        if (newer === undefined || this.#base + newer < atMs) this.record(id, atMs);
      }
      if (!this.#writer.stopping) this.logger.warn({ err: error, keys: batch.size - written }, "last-used flush failed; will retry");
      else {
        // Only stop() retries now, until the grace period ends, and it reports what is lost.
        this.#stopError = error;
        this.#stopUnsure += unsure;
        this.logger.warn({ err: error, keys: batch.size - written, unsure }, "last-used flush failed during shutdown");
      }
    }
  }
}
