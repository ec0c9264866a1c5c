import type { Logger } from "pino";
import type { LastUsedStore } from "./store.js";
import { FLUSH_CHUNK, WriteBehind, yieldToEventLoop } from "./write-behind.js";

/**
 * Collects last-use times in memory and writes them to the store in batches, so the Check
 * path never writes per request. `flush()` runs on a timer and on shutdown.
 */
export class LastUsedRecorder {
  #pending = new Map<string, number>();
  /** Keys of the batch being written, not yet in the store. */
  #inFlight = 0;
  readonly #writer: WriteBehind;

  constructor(
    private readonly store: LastUsedStore,
    private readonly logger: Logger,
    flushIntervalMs: number,
  ) {
    this.#writer = new WriteBehind(() => this.#flushOnce(), flushIntervalMs);
  }

  /** Remembers that the key was used at `atMs`. */
  record(keyId: string, atMs: number): void {
    this.#pending.set(keyId, atMs);
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

  /** Stops the timer and writes what is pending. */
  stop(): Promise<void> {
    return this.#writer.stop();
  }

  /** Writes FLUSH_CHUNK keys a call, yielding between calls (see UsageRecorder's flush). */
  async #flushOnce(): Promise<void> {
    if (this.#pending.size === 0) return;
    const batch = [...this.#pending];
    this.#pending = new Map();
    let written = 0;
    this.#inFlight = batch.length;
    try {
      while (written < batch.length) {
        if (written > 0) await yieldToEventLoop();
        const chunk = batch.slice(written, written + FLUSH_CHUNK);
        await this.store.touchLastUsed(new Map(chunk));
        written += chunk.length;
        this.#inFlight -= chunk.length;
      }
    } catch (error) {
      // What was not written goes back to the map, where pendingCount counts it.
      this.#inFlight = 0;
      for (const [id, atMs] of batch.slice(written)) {
        const newer = this.#pending.get(id);
        if (newer === undefined || newer < atMs) this.#pending.set(id, atMs);
      }
      this.logger.warn({ err: error, keys: batch.length - written }, "last-used flush failed; will retry");
    }
  }
}
