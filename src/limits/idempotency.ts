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

/**
 * Runs a charge once per idempotency key: a repeat within IDEMPOTENCY_TTL_MS gets the first
 * answer instead of running again. A charge that throws is not remembered, so it can be retried.
 */
export interface IdempotencyLedger {
  once<T>(key: string, run: () => Promise<T>): Promise<Once<T>>;
}

/** The ledger of one process: concurrent calls with one key share the first one's answer. */
export class LocalIdempotencyLedger implements IdempotencyLedger {
  readonly #answers = new RecentMap<string, { atMs: number; answer: Promise<unknown> }>(MAX_LOCAL_KEYS);

  constructor(private readonly nowMs: () => number = Date.now) {}

  async once<T>(key: string, run: () => Promise<T>): Promise<Once<T>> {
    const known = this.#answers.get(key);
    if (known !== undefined && this.nowMs() - known.atMs < IDEMPOTENCY_TTL_MS) return { value: (await known.answer) as T, replayed: true };
    const answer = run();
    const entry = { atMs: this.nowMs(), answer };
    this.#answers.set(key, entry);
    try {
      return { value: await answer, replayed: false };
    } catch (error) {
      if (this.#answers.get(key) === entry) this.#answers.delete(key);
      throw error;
    }
  }
}

/** The claim's value while the charge runs; an answer is stored as JSON, which never equals it. */
const RUNNING = "running";

/**
 * The ledger shared by replicas, in Redis: the first call claims the key (SET NX), runs, and
 * stores its answer for IDEMPOTENCY_TTL_MS; a repeat reads it. A repeat while the first still
 * runs is refused with IdempotencyInProgressError. Redis failing makes the call fail: a charge
 * is never made without its key claimed.
 */
export class RedisIdempotencyLedger implements IdempotencyLedger {
  constructor(
    private readonly redis: RedisClient,
    private readonly prefix = "kg:idem:",
  ) {}

  async once<T>(key: string, run: () => Promise<T>): Promise<Once<T>> {
    const name = this.prefix + key;
    const claimed = await this.redis.set(name, RUNNING, "PX", CLAIM_TTL_MS, "NX").catch(unavailable);
    if (claimed === null) {
      const stored = await this.redis.get(name).catch(unavailable);
      if (stored === null) return this.once(key, run);
      if (stored === RUNNING) throw new IdempotencyInProgressError("a call with this idempotency key is still running; retry it shortly");
      return { value: JSON.parse(stored) as T, replayed: true };
    }
    let value: T;
    try {
      value = await run();
    } catch (error) {
      await this.redis.del(name).catch(() => undefined);
      throw error;
    }
    // The charge is made: if its answer cannot be stored, the claim runs out and a retry after
    // CLAIM_TTL_MS charges again. The caller still gets this answer.
    await this.redis.set(name, JSON.stringify(value), "PX", IDEMPOTENCY_TTL_MS).catch(() => undefined);
    return { value, replayed: false };
  }
}

function unavailable(error: unknown): never {
  throw new IdempotencyUnavailableError("idempotency keys cannot be checked: Redis is unavailable; nothing was charged, retry shortly", { cause: error });
}
