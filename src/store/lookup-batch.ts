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
}

interface Waiting<V> {
  key: string;
  resolve: (value: V) => void;
  reject: (error: unknown) => void;
  timer?: NodeJS.Timeout;
  settled: boolean;
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
 */
export class LookupBatcher<V> {
  readonly #waiting: Array<Waiting<V>> = [];
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

  /** The value for `key`, read alone or with others. */
  get(key: string): Promise<V> {
    return new Promise<V>((resolve, reject) => {
      const waiting: Waiting<V> = { key, resolve, reject, settled: false };
      waiting.timer = setTimeout(() => {
        waiting.settled = true;
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
          if (value === undefined) fail(waiting, new Error("the batched read gave no answer for a key it was asked for"));
          else succeed(waiting, value);
        }
      },
      (error: unknown) => {
        release();
        for (const waiting of batch) fail(waiting, error);
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
