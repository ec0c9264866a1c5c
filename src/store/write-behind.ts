/**
 * Rows a write-behind flush gives the store in one call (one transaction). On SQLite without its
 * writing thread (writes on the event loop) a call of this size takes about a millisecond, so
 * Checks wait at most that long behind a flush, however many keys were busy in the interval; with
 * the thread, it bounds each message and each transaction that other connections wait behind.
 */
export const FLUSH_CHUNK = 256;

/** Lets I/O and timers queued behind a long job run before it goes on. */
export function yieldToEventLoop(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}

/**
 * Runs a flush on a timer, one at a time, and once more on stop: the write-behind rhythm of
 * last-use times and usage counts. The flush itself keeps failed batches for the next run.
 */
export class WriteBehind {
  #timer: NodeJS.Timeout | undefined;
  #chain: Promise<void> = Promise.resolve();

  constructor(
    private readonly flushOnce: () => Promise<void>,
    private readonly intervalMs: number,
  ) {}

  start(): void {
    if (this.#timer !== undefined) return;
    this.#timer = setInterval(() => void this.flush(), this.intervalMs);
    this.#timer.unref();
  }

  /** Queues a flush after any running one; resolves when it is done. */
  flush(): Promise<void> {
    this.#chain = this.#chain.then(this.flushOnce);
    return this.#chain;
  }

  /** Stops the timer and flushes what is pending. */
  async stop(): Promise<void> {
    if (this.#timer !== undefined) clearInterval(this.#timer);
    this.#timer = undefined;
    await this.flush();
  }
}
