import type { Logger } from "pino";
import type { RedisClient } from "../cache/redis-client.js";
import { RecentMap } from "./memory.js";

/** How long an idempotency key is remembered: a retry within this time charges nothing. */
export const IDEMPOTENCY_TTL_MS = 24 * 3_600_000;

/**
 * How long a claim lasts while its charge runs. A replica that dies mid-charge leaves the key
 * claimed this long; after that a retry runs again.
 */
const CLAIM_TTL_MS = 30_000;

/** Keys remembered in-process at most (the oldest go first). */
const MAX_LOCAL_KEYS = 100_000;

/** A call with this key is still running (on another replica): the caller should retry. */
export class IdempotencyInProgressError extends Error {
  override readonly name = "IdempotencyInProgressError";
}

/** Redis could not be asked whether the key was used: nothing was charged. */
export class IdempotencyUnavailableError extends Error {
  override readonly name = "IdempotencyUnavailableError";
}

/** A first answer, or the first answer again. */
export interface Once<T> {
  value: T;
  replayed: boolean;
}

/** Every answer is kept: the default of IdempotencyLedger.once's `keep`. */
const KEEP_ALL = (): boolean => true;

/**
 * Runs a charge once per idempotency key: a repeat within IDEMPOTENCY_TTL_MS gets the first
 * answer instead of running again. A charge that throws is not remembered, so it can be retried;
 * nor is an answer `keep` rejects (a refusal by rate: no charge was made, and a retry with the
 * same key after its Retry-After is judged again). `run` is told `afterFailure` when an earlier
 * call with the key threw, having recorded nothing: a charge its meter made anyway (a frozen
 * Redis running it when it thaws) is then the retry's to record.
 */
export interface IdempotencyLedger {
  once<T>(key: string, run: (afterFailure: boolean) => Promise<T>, keep?: (value: T) => boolean): Promise<Once<T>>;
}

/** The ledger of one process: concurrent calls with one key share the first one's answer. */
export class LocalIdempotencyLedger implements IdempotencyLedger {
  readonly #answers = new RecentMap<string, { atMs: number; answer: Promise<unknown> }>(MAX_LOCAL_KEYS);

  constructor(private readonly nowMs: () => number = Date.now) {}

  // In-process the meter never answers a charge its caller did not hear: afterFailure is always false.
  async once<T>(key: string, run: (afterFailure: boolean) => Promise<T>, keep: (value: T) => boolean = KEEP_ALL): Promise<Once<T>> {
    const known = this.#answers.get(key);
    if (known !== undefined && this.nowMs() - known.atMs < IDEMPOTENCY_TTL_MS) {
      const value = (await known.answer) as T;
      // The call it waited for was not kept (its own call has let the key go by now): judged afresh.
      return keep(value) ? { value, replayed: true } : this.once(key, run, keep);
    }
    const answer = run(false);
    const entry = { atMs: this.nowMs(), answer };
    this.#answers.set(key, entry);
    let value: T;
    try {
      value = await answer;
    } catch (error) {
      if (this.#answers.get(key) === entry) this.#answers.delete(key);
      throw error;
    }
    if (!keep(value) && this.#answers.get(key) === entry) this.#answers.delete(key);
    return { value, replayed: false };
  }
}

/** The claim's value while the charge runs; an answer is stored as JSON, which never equals it. */
const RUNNING = "running";
/** The key's value after a call that threw, having recorded nothing: the next call claims it. */
const FAILED = "failed";

/** Claims a key that holds FAILED, atomically: 1 when this call now holds the claim. */
const CLAIM_FAILED = `if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) return 1 end return 0`;

/**
 * The ledger shared by replicas, in Redis: the first call claims the key (SET NX), runs, and
 * stores its answer for IDEMPOTENCY_TTL_MS; a repeat reads it. A repeat while the first still
 * runs is refused with IdempotencyInProgressError. Redis failing makes the call fail: a charge
 * is never made without its key claimed.
 */
export class RedisIdempotencyLedger implements IdempotencyLedger {
  constructor(
    private readonly redis: RedisClient,
    /** Where an answer that could not be stored is reported; without it, nowhere. */
    private readonly logger?: Pick<Logger, "warn">,
    private readonly prefix = "kg:idem:",
  ) {}

  async once<T>(key: string, run: (afterFailure: boolean) => Promise<T>, keep: (value: T) => boolean = KEEP_ALL): Promise<Once<T>> {
    const name = this.prefix + key;
    const claimed = await this.redis.set(name, RUNNING, "PX", CLAIM_TTL_MS, "NX").catch(unavailable);
    let afterFailure = false;
    if (claimed === null) {
      const stored = await this.redis.get(name).catch(unavailable);
      if (stored === null) return this.once(key, run, keep);
      if (stored === RUNNING) throw new IdempotencyInProgressError("a call with this idempotency key is still running; retry it shortly");
      if (stored !== FAILED) return { value: JSON.parse(stored) as T, replayed: true };
      const taken = await this.redis.eval(CLAIM_FAILED, 1, name, FAILED, RUNNING, String(CLAIM_TTL_MS)).catch(unavailable);
      if (taken !== 1) return this.once(key, run, keep);
      afterFailure = true;
    }
    let value: T;
    try {
      value = await run(afterFailure);
    } catch (error) {
      // Not a DEL: the charge may still be made (sent to a Redis that answers late), and the
      // retry that finds FAILED records what it replays. Written on the same connection after the
      // charge, so it lands after it.
      await this.redis.set(name, FAILED, "PX", IDEMPOTENCY_TTL_MS).catch(() => undefined);
      throw error;
    }
    if (!keep(value)) {
      // Let go at once; if Redis does not take that, the claim runs out by itself.
      await this.redis.del(name).catch(() => undefined);
      return { value, replayed: false };
    }
    await this.#keep(key, JSON.stringify(value));
    return { value, replayed: false };
  }

  /**
   * Stores an answer, trying twice. If it still fails, the claim runs out after CLAIM_TTL_MS and a
   * retry is answered from the charge the meter kept beside its counters (a Redis meter), charging
   * nothing; or, where it kept none, charges again. The caller still gets this answer.
   */
  async #keep(key: string, answer: string): Promise<void> {
    let failure: unknown;
    for (let attempt = 0; attempt < 2; attempt++) {
      try {
        await this.redis.set(this.prefix + key, answer, "PX", IDEMPOTENCY_TTL_MS);
        return;
      } catch (error) {
        failure = error;
      }
    }
    this.logger?.warn(
      { err: failure, idempotencyKey: key },
      "the answer under an idempotency key was not stored (tried twice): a retry with the key is ABORTED until its 30 s claim runs out, then answered from what Redis kept beside the counters (ChargeUsage) or the store's top-up record (AddCredits)",
    );
  }
}

function unavailable(error: unknown): never {
  throw new IdempotencyUnavailableError("idempotency keys cannot be checked: Redis is unavailable; nothing was charged, retry shortly", { cause: error });
}
