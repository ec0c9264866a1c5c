/** How a LookupBatcher groups lookups. */
export interface LookupBatchOptions {
  /** The most keys one read asks for. */
  maxBatch: number;
  /** Reads outstanding at once; lookups that come meanwhile wait and go together in the next. */
  maxInFlight: number;
  /**
   * How long a lookup waits for its answer before it fails with `timeoutError()`. A read that
   * takes longer stops holding its place, so the next can go out beside it.
   */
  timeoutMs: number;
  timeoutError: () => Error;
  /**
   * Timed-out lookups whose read went on that are remembered, to be told its answer (`late`);
   * past it the oldest is forgotten (default MAX_LATE_LOOKUPS).
   */
  maxLate?: number;
}

/**
 * How many timed-out lookups are remembered for their late answer by default: while the backend
 * stays slower than the deadline, outstanding reads hold a steady stream of them.
 */
export const MAX_LATE_LOOKUPS = 4096;

interface Waiting<V> {
  key: string;
  resolve: (value: V) => void;
  reject: (error: unknown) => void;
  timer?: NodeJS.Timeout;
  settled: boolean;
  /** In a read (not only waiting to be sent): only then can an answer come after the deadline. */
  sent: boolean;
  late: ((value: V) => void) | undefined;
}

/**
 * Reads keys from a backend in groups: lookups made in one turn of the event loop, and those made
 * while `maxInFlight` reads are outstanding, go out as one read of up to `maxBatch` keys. A cold
 * key then costs a share of one command instead of one command of its own (the command's
 * overhead in the driver, its wake-ups and the server's own is most of a lookup's cost), while
 * a lookup on an idle backend goes out in the turn it was made.
 *
 * `readMany` answers every key it was given (never with undefined), or throws: then every lookup
 * in the read fails. A key it leaves out fails on its own: a missing answer is never read as
 * "no such key".
 *
 * A lookup that timed out while its read was out can be given `late`: the read's answer, when it
 * comes after all, is handed to it, so a backend slower than the deadline still warms a cache.
 */
export class LookupBatcher<V> {
  readonly #waiting: Array<Waiting<V>> = [];
  /** Timed-out lookups whose read is still out and which asked for its answer, oldest first. */
  readonly #late = new Set<Waiting<V>>();
  #inFlight = 0;
  #scheduled = false;
  readonly #send = (): void => {
    this.#scheduled = false;
    this.#drain();
  };

  constructor(
    private readonly readMany: (keys: readonly string[]) => Promise<ReadonlyMap<string, V>>,
    private readonly options: LookupBatchOptions,
  ) {}

  /**
   * The value for `key`, read alone or with others. `late`, when given, is told the value if the
   * lookup timed out after its read was sent and the read answers later (at most once, never
   * after the lookup was answered or failed otherwise, and not once maxLate later ones replaced it).
   */
  get(key: string, late?: (value: V) => void): Promise<V> {
    return new Promise<V>((resolve, reject) => {
      const waiting: Waiting<V> = { key, resolve, reject, settled: false, sent: false, late };
      waiting.timer = setTimeout(() => {
        waiting.settled = true;
        if (waiting.sent && waiting.late !== undefined) this.#rememberLate(waiting);
        reject(this.options.timeoutError());
      }, this.options.timeoutMs);
      this.#waiting.push(waiting);
      this.#schedule();
    });
  }

  /** Lookups not yet sent (timed-out ones included until a read would have taken them). */
  get waiting(): number {
    return this.#waiting.length;
  }

  /** Reads outstanding and still holding their place. */
  get inFlight(): number {
    return this.#inFlight;
  }

  /** Timed-out lookups remembered for their read's late answer. */
  get late(): number {
    return this.#late.size;
  }

  #rememberLate(waiting: Waiting<V>): void {
    this.#late.add(waiting);
    if (this.#late.size <= (this.options.maxLate ?? MAX_LATE_LOOKUPS)) return;
    // A backend slow for long keeps timing lookups out: the oldest is forgotten (its read is the
    // most likely to be stalled for good), so what is remembered stays bounded.
    for (const oldest of this.#late) {
      this.#late.delete(oldest);
      oldest.late = undefined;
      return;
    }
  }

  /** Hands a late answer to a timed-out lookup still remembered; a failing listener fails nothing else. */
  #tellLate(waiting: Waiting<V>, value: V | undefined): void {
    if (!this.#late.delete(waiting)) return;
    const late = waiting.late;
    waiting.late = undefined;
    if (late === undefined || value === undefined) return;
    try {
      late(value);
    } catch {
      // The lookup has failed already; an answer that cannot be used is only not kept.
    }
  }

  #schedule(): void {
    if (this.#scheduled || this.#inFlight >= this.options.maxInFlight || this.#waiting.length === 0) return;
    this.#scheduled = true;
    process.nextTick(this.#send);
  }

  #drain(): void {
    while (this.#inFlight < this.options.maxInFlight) {
      const { batch, keys } = this.#take();
      if (batch.length === 0) return;
      this.#read(batch, [...keys]);
    }
  }

  /** Up to maxBatch distinct keys' lookups, oldest first, and those keys; timed-out lookups are dropped. */
  #take(): { batch: Array<Waiting<V>>; keys: Set<string> } {
    const batch: Array<Waiting<V>> = [];
    const keys = new Set<string>();
    let index = 0;
    for (; index < this.#waiting.length; index += 1) {
      const waiting = this.#waiting[index] as Waiting<V>;
      if (waiting.settled) continue;
      if (!keys.has(waiting.key)) {
        if (keys.size === this.options.maxBatch) break;
        keys.add(waiting.key);
      }
      waiting.sent = true;
      batch.push(waiting);
    }
    this.#waiting.splice(0, index);
    return { batch, keys };
  }

  #read(batch: Array<Waiting<V>>, keys: readonly string[]): void {
    this.#inFlight += 1;
    let holding = true;
    const release = (): void => {
      if (!holding) return;
      holding = false;
      clearTimeout(slow);
      this.#inFlight -= 1;
      this.#schedule();
    };
    // A read that outlives the lookups' deadline stops holding its place: a stalled connection
    // must not keep every later lookup from being sent.
    const slow = setTimeout(release, this.options.timeoutMs);
    let read: Promise<ReadonlyMap<string, V>>;
    try {
      read = this.readMany(keys);
    } catch (error) {
      read = Promise.reject(error);
    }
    read.then(
      (found) => {
        release();
        for (const waiting of batch) {
          const value = found.get(waiting.key);
          if (waiting.settled) this.#tellLate(waiting, value);
          else if (value === undefined) fail(waiting, new Error("the batched read gave no answer for a key it was asked for"));
          else succeed(waiting, value);
        }
      },
      (error: unknown) => {
        release();
        for (const waiting of batch) {
          if (waiting.settled) this.#late.delete(waiting);
          else fail(waiting, error);
        }
      },
    );
  }
}

function succeed<V>(waiting: Waiting<V>, value: V): void {
  if (waiting.settled) return;
  waiting.settled = true;
  clearTimeout(waiting.timer);
  waiting.resolve(value);
}

function fail<V>(waiting: Waiting<V>, error: unknown): void {
  if (waiting.settled) return;
  waiting.settled = true;
  clearTimeout(waiting.timer);
  waiting.reject(error);
}
