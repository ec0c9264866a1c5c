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
 * How long stop() waits for the answer to one call at least, however near (or past) its deadline:
 * a store that has not answered a call of FLUSH_CHUNK rows for this long is frozen, not slow (one
 * that answers writes each call in milliseconds, a loaded one in well under a second).
 */
export const STOP_CALL_WAIT_MS = 5000;

/**
 * How long past its deadline a stop's final flush may go on while the store answers each call:
 * the manifests give the flush 15 s after the grace before the kubelet's SIGKILL
 * (terminationGracePeriodSeconds = preStop 5 s + delay + grace + 15 s), and closing the store and the
 * caches after it needs the rest.
 */
export const STOP_FLUSH_OVERRUN_MS = 12_000;

/**
 * A call stop() stopped waiting for: the store took it and has not answered, so what it holds may
 * or may not land. Its caller counts those deltas as unsure and never writes them again.
 */
export class CallUnansweredError extends Error {
  override readonly name = "CallUnansweredError";
}

/** A call not made because stop() gave up on the store: what it holds is surely not written. */
export class FlushGivenUpError extends Error {
  override readonly name = "FlushGivenUpError";
}

/** The call a flush has out (flushes run one after another, and each makes its calls in turn). */
interface CallOut {
  startedMs: number;
  unanswered: (error: CallUnansweredError) => void;
}

/** A running stop's bounds, on performance.now()'s clock, and how it hears that they ran out. */
interface StopWatch {
  deadlineMs: number;
  capMs: number;
  timer: NodeJS.Timeout | undefined;
  givenUp: () => void;
}

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
  #call: CallOut | null = null;
  #watch: StopWatch | null = null;
  /** Why stop() gave up on the store, once it has. */
  #givenUp: string | null = null;

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
   * Makes one store call of a flush. Once stop() has given up on the store, rejects with
   * CallUnansweredError while the call is out (it may still land), and makes no call after that
   * (FlushGivenUpError): an answer that comes late starts no other write.
   */
  async send<T>(call: () => Promise<T>): Promise<T> {
    if (this.#givenUp !== null) throw new FlushGivenUpError(`${this.#givenUp}; this call was not made`);
    const out: CallOut = { startedMs: performance.now(), unanswered: () => undefined };
    const unanswered = new Promise<never>((_, reject) => {
      out.unanswered = reject;
    });
    this.#call = out;
    if (this.#watch !== null) this.#check();
    try {
      return await Promise.race([call(), unanswered]);
    } finally {
      if (this.#call === out) this.#call = null;
    }
  }

  /**
   * Stops the timer and flushes what is pending. While `unwritten()` says the store refused part
   * of it, flushes again after a pause (250 ms, doubling up to 2 s) until `deadlineMs`
   * (performance.now()'s clock) has passed: a store that is down or full for a moment at shutdown
   * (a failover, a disk being freed) still gets what the process would otherwise take with it.
   * A flush whose calls the store answers goes on past `deadlineMs` (the drain may have used the
   * whole grace), up to STOP_FLUSH_OVERRUN_MS past it; one call is waited for until `deadlineMs`,
   * or STOP_CALL_WAIT_MS after it was sent if that is later: a store that takes calls and never
   * answers (a frozen MongoDB) would otherwise hold the process until the kubelet's SIGKILL, and
   * nothing would say what was lost. Giving up rejects the call out (CallUnansweredError: its
   * caller counts it as unsure) and makes no later call (its caller keeps those deltas, surely not
   * written). Resolves to false only when the flush was still running even then (waiting for
   * reads, before it took its batch), true otherwise.
   */
  async stop(deadlineMs = 0, unwritten: () => boolean = () => false): Promise<boolean> {
    this.#stopping = true;
    if (this.#timer !== undefined) clearInterval(this.#timer);
    this.#timer = undefined;
    let givenUp = (): void => undefined;
    const gaveUp = new Promise<"given up">((resolve) => {
      givenUp = () => resolve("given up");
    });
    const capMs = Math.max(deadlineMs, performance.now()) + STOP_FLUSH_OVERRUN_MS;
    const watch: StopWatch = { deadlineMs, capMs, timer: undefined, givenUp };
    this.#watch = watch;
    this.#check();
    const flushing = this.#flushUntil(deadlineMs, unwritten).then(() => "settled" as const);
    try {
      if ((await Promise.race([flushing, gaveUp])) === "settled") return true;
      // The call given up on settles its flush in promise jobs (its caller's catch puts back what
      // it had not sent), all run before the next turn of the event loop.
      return (await Promise.race([flushing, yieldToEventLoop()])) === "settled";
    } finally {
      clearTimeout(watch.timer);
      this.#watch = null;
    }
  }

  async #flushUntil(deadlineMs: number, unwritten: () => boolean): Promise<void> {
    await this.flush();
    for (let pauseMs = STOP_RETRY_FIRST_MS; unwritten() && this.#givenUp === null; pauseMs = Math.min(2 * pauseMs, STOP_RETRY_MAX_MS)) {
      const leftMs = deadlineMs - performance.now();
      if (leftMs <= 0) return;
      await new Promise((resolve) => setTimeout(resolve, Math.min(pauseMs, leftMs)));
      await this.flush();
    }
  }

  /**
   * Gives up on the store when the stop's cap has passed, or the call out has waited its full
   * wait; otherwise sets the stop's timer for the earlier of the two.
   */
  #check(): void {
    const watch = this.#watch;
    if (watch === null || this.#givenUp !== null) return;
    clearTimeout(watch.timer);
    const call = this.#call;
    const callEndsMs = call === null ? Infinity : Math.max(watch.deadlineMs, call.startedMs + STOP_CALL_WAIT_MS);
    const endsMs = Math.min(watch.capMs, callEndsMs);
    // A timer can fire a little early (it counts from the loop's clock): check again then.
    const leftMs = endsMs - performance.now();
    if (leftMs > 0) {
      watch.timer = setTimeout(() => this.#check(), leftMs);
      return;
    }
    const why =
      call !== null && endsMs === callEndsMs
        ? `the store did not answer a write for ${Math.round(performance.now() - call.startedMs)} ms at shutdown`
        : `the final flush was still writing ${STOP_FLUSH_OVERRUN_MS} ms after the shutdown grace period ended`;
    this.#givenUp = why;
    call?.unanswered(new CallUnansweredError(why));
    watch.givenUp();
  }
}
