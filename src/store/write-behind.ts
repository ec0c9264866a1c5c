/**
 * Rows a write-behind flush gives the store in one call (one transaction). On SQLite without its
 * writing thread (writes on the event loop) a call of this size takes a fraction of a millisecond,
 * so Checks wait at most that long behind a flush, however many keys were busy in the interval;
 * with the thread, it bounds each message and each transaction that other connections wait
 * behind. On a MongoDB that works through one request at a time (mongo-java-server, a small
 * instance), it bounds how long a key lookup waits behind a write: a few milliseconds.
 */
export const FLUSH_CHUNK = 64;

/** How a recorder's flushes go to its store. */
export interface WriteBehindOptions {
  /** Pause between calls as long as each took (WriteBehind.between); default true. */
  paced?: boolean;
}

/** The longest pause between two calls of a flush, however long the call before took. */
export const MAX_CALL_PAUSE_MS = 1000;

/** Calls that take less than this are followed by one turn of the event loop only. */
const PACED_CALL_MS = 1;

/** The first pause before a stop flushes again what the store refused; each later one doubles, up to the next. */
const STOP_RETRY_FIRST_MS = 250;
const STOP_RETRY_MAX_MS = 2000;

/**
 * How long stop() waits for a flush at least, however near (or past) its deadline: the drain may
 * have used the whole grace, and a store that answers writes a busy interval's batch in well under
 * this. So a stop ends at most this long after its deadline.
 */
export const STOP_FLUSH_WAIT_MIN_MS = 5000;

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
  #stopping = false;

  /**
   * `paced`: pause between calls as long as each took (between()). For a store on another server
   * (MongoDB), whose lookups queue behind its writes; an embedded SQLite writes on a thread of its
   * own at the lowest priority, where a call's time is mostly its wait for the core, not the store.
   */
  constructor(
    private readonly flushOnce: () => Promise<void>,
    private readonly intervalMs: number,
    private readonly paced = true,
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

  /**
   * What a flush waits before its next call, given when the call before started: a turn of the
   * event loop, and, for a call that took a millisecond or more, as long again (up to
   * MAX_CALL_PAUSE_MS). A flush then keeps the store busy at most half the time, so the key
   * lookups of Checks that miss the caches are served between its calls instead of queueing
   * behind the whole batch. Once stop() has begun, only the turn: shutdown writes at full speed;
   * and only the turn when the writer is not `paced`.
   */
  async between(callStartedMs: number): Promise<void> {
    const now = performance.now();
    const tookMs = now - callStartedMs;
    if (!this.paced || this.#stopping || tookMs < PACED_CALL_MS) return yieldToEventLoop();
    const until = now + Math.min(tookMs, MAX_CALL_PAUSE_MS);
    // A timer counts from the event loop's clock, read when the loop's turn began, so on a busy
    // process it can end a little before its delay: wait out what is left.
    for (let left = until - now; left > 0; left = until - performance.now()) {
      await new Promise((resolve) => setTimeout(resolve, left));
    }
  }

  /** Whether stop() has begun: a failed flush is then not retried by a timer. */
  get stopping(): boolean {
    return this.#stopping;
  }

  /**
   * Stops the timer and flushes what is pending. While `unwritten()` says the store refused part
   * of it, flushes again after a pause (250 ms, doubling up to 2 s) until `deadlineMs`
   * (performance.now()'s clock) has passed: a store that is down or full for a moment at shutdown
   * (a failover, a disk being freed) still gets what the process would otherwise take with it.
   * No flush is waited for past `deadlineMs`, or STOP_FLUSH_WAIT_MIN_MS after it began if that
   * is later: a store that takes calls and never answers (a frozen MongoDB) would otherwise hold
   * the process until the kubelet's SIGKILL, and nothing would say what was lost. Resolves to
   * false when a flush was still running then: its calls may still land, so what it holds may or
   * may not be written, and it is never written again.
   */
  async stop(deadlineMs = 0, unwritten: () => boolean = () => false): Promise<boolean> {
    this.#stopping = true;
    if (this.#timer !== undefined) clearInterval(this.#timer);
    this.#timer = undefined;
    if (!(await this.#flushBy(deadlineMs))) return false;
    for (let pauseMs = STOP_RETRY_FIRST_MS; unwritten(); pauseMs = Math.min(2 * pauseMs, STOP_RETRY_MAX_MS)) {
      const leftMs = deadlineMs - performance.now();
      if (leftMs <= 0) return true;
      await new Promise((resolve) => setTimeout(resolve, Math.min(pauseMs, leftMs)));
      if (!(await this.#flushBy(deadlineMs))) return false;
    }
    return true;
  }

  /**
   * Queues a flush and waits for it until `deadlineMs` or STOP_FLUSH_WAIT_MIN_MS, whichever ends
   * later: false when it is still running then.
   */
  async #flushBy(deadlineMs: number): Promise<boolean> {
    let timer: NodeJS.Timeout | undefined;
    const late = new Promise<boolean>((resolve) => {
      timer = setTimeout(() => resolve(false), Math.max(deadlineMs - performance.now(), STOP_FLUSH_WAIT_MIN_MS));
    });
    try {
      return await Promise.race([this.flush().then(() => true), late]);
    } finally {
      clearTimeout(timer);
    }
  }
}
