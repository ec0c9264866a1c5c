import type { Logger } from "pino";
import type { LastUsedStore } from "./store.js";
import { WriteBehind } from "./write-behind.js";

/**
 * Collects last-use times in memory and writes them to the store in batches, so the Check
 * path never writes per request. `flush()` runs on a timer and on shutdown.
 */
export class LastUsedRecorder {
  #pending = new Map<string, number>();
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

  get pendingCount(): number {
    return this.#pending.size;
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

  async #flushOnce(): Promise<void> {
    if (this.#pending.size === 0) return;
    const batch = this.#pending;
    this.#pending = new Map();
    try {
      await this.store.touchLastUsed(batch);
    } catch (error) {
      for (const [id, atMs] of batch) {
        const newer = this.#pending.get(id);
        if (newer === undefined || newer < atMs) this.#pending.set(id, atMs);
      }
      this.logger.warn({ err: error, keys: batch.size }, "last-used flush failed; will retry");
    }
  }
}
