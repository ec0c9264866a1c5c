import { randomBytes } from "node:crypto";
import type { Logger } from "pino";
import type { RedisClient } from "../cache/redis-client.js";
import { RecentMap } from "./memory.js";

/** How long an idempotency key is remembered: a retry within this time charges nothing. */
export const IDEMPOTENCY_TTL_MS = 24 * 3_600_000;

/**
 * How long a claim lasts unless renewed. A running call renews its claim every third of this; a
 * replica that dies mid-charge leaves the key claimed this long at most; after that a retry runs.
 */
const CLAIM_TTL_MS = 30_000;
/** How often a running call renews its claim. */
const CLAIM_RENEW_MS = CLAIM_TTL_MS / 3;

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

/**
 * The answer kept under an idempotency key is for another call than this one (a charge of
 * another cost, mode or quota): nothing was run or charged. `usedFor` says what the key was used
 * for, to name in the refusal.
 */
export class IdempotencyKeyMismatchError extends Error {
  override readonly name = "IdempotencyKeyMismatchError";
  constructor(readonly usedFor: string) {
    super(`the idempotency key was used for ${usedFor}`);
  }
}

/** A first answer, or the first answer again. */
export interface Once<T> {
  value: T;
  replayed: boolean;
}

/** Every answer is kept: the default of IdempotencyLedger.once's `keep`. */
const KEEP_ALL = (): boolean => true;

/**
 * Resolves while the call that was given it still holds its key's claim; rejects
 * (IdempotencyUnavailableError) once another call may hold it. A charge that would be made
 * where the key's later calls cannot see it (an in-process fallback meter) asks first.
 */
export type ConfirmClaim = () => Promise<void>;

/** The claim of an in-process ledger is never taken from a running call. */
const ALWAYS_HELD: ConfirmClaim = () => Promise.resolve();

/**
 * Runs a charge once per idempotency key: a repeat within IDEMPOTENCY_TTL_MS gets the first
 * answer instead of running again. A charge that throws is not remembered, so it can be retried;
 * nor is an answer `keep` rejects (a refusal by rate: no charge was made, and a retry with the
 * same key after its Retry-After is judged again). `run` is told `afterFailure` when an earlier
 * call with the key threw, having recorded nothing: a charge its meter made anyway (a frozen
 * Redis running it when it thaws) is then the retry's to record; and `confirmClaim`, which a
 * charge made outside the shared meter awaits first.
 */
export interface IdempotencyLedger {
  once<T>(key: string, run: (afterFailure: boolean, confirmClaim: ConfirmClaim) => Promise<T>, keep?: (value: T) => boolean): Promise<Once<T>>;
}

/** The ledger of one process: concurrent calls with one key share the first one's answer. */
export class LocalIdempotencyLedger implements IdempotencyLedger {
  readonly #answers = new RecentMap<string, { atMs: number; answer: Promise<unknown> }>(MAX_LOCAL_KEYS);

  constructor(private readonly nowMs: () => number = Date.now) {}

  // In-process the meter never answers a charge its caller did not hear: afterFailure is always false.
  async once<T>(key: string, run: (afterFailure: boolean, confirmClaim: ConfirmClaim) => Promise<T>, keep: (value: T) => boolean = KEEP_ALL): Promise<Once<T>> {
    const known = this.#answers.get(key);
    if (known !== undefined && this.nowMs() - known.atMs < IDEMPOTENCY_TTL_MS) {
      const value = (await known.answer) as T;
      // The call it waited for was not kept (its own call has let the key go by now): judged afresh.
      return keep(value) ? { value, replayed: true } : this.once(key, run, keep);
    }
    const answer = run(false, ALWAYS_HELD);
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

/**
 * A claim's value starts with this, then ":" and the claiming call's own random token; an answer
 * is stored as JSON, which never starts with it. A claim of the bare word (an earlier release's,
 * during a rolling upgrade) is another call's claim too.
 */
const RUNNING = "running";
/** The key's value after a call that threw, having recorded nothing: the next call claims it. */
const FAILED = "failed";

function isClaim(stored: string): boolean {
  return stored === RUNNING || stored.startsWith(`${RUNNING}:`);
}

/**
 * Replaces the key's value when it is ARGV[1] (a call's own claim, or FAILED when a retry claims
 * the key), atomically: 1 when replaced, or when it holds ARGV[2] already (a write whose answer
 * was lost, tried again); else 0, and nothing written. KEYS: the key. ARGV: expected, new, ms.
 */
const SWAP = `local v = redis.call('GET', KEYS[1]) if v == ARGV[1] then redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) return 1 end if v == ARGV[2] then return 1 end return 0`;
/**
 * SWAP for a call's last write (its answer, or its failure mark), which may also land where the
 * key is gone: its claim ran out (a stall longer than CLAIM_TTL_MS) and no other call took the key.
 * Still never over another call's claim or answer.
 */
const SETTLE = `local v = redis.call('GET', KEYS[1]) if v == ARGV[1] or not v then redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) return 1 end if v == ARGV[2] then return 1 end return 0`;
/** Deletes the key while it holds ARGV[1] (the call's own claim): 1 when deleted. */
const RELEASE = `if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) return 1 end return 0`;
/** Extends the key's life to ARGV[2] ms while it holds ARGV[1] (the call's own claim): 1 when it does. */
const RENEW = `if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end return 0`;

/**
 * One running call's claim on a key: renewed every CLAIM_RENEW_MS until the call settles, so a
 * call that runs long keeps its key; and known lost once a renewal or a confirmation finds
 * another value under the key (the claim ran out while Redis could not be reached, and another
 * call took the key).
 */
class RedisClaim {
  /** When a renewal Redis confirmed was sent (performance.now()): the claim lives CLAIM_TTL_MS from then at least. */
  #heldSinceMs: number;
  #lost = false;
  #renewing = false;
  readonly #timer: NodeJS.Timeout;

  constructor(
    private readonly redis: RedisClient,
    readonly name: string,
    readonly token: string,
    claimedAtMs: number,
  ) {
    this.#heldSinceMs = claimedAtMs;
    this.#timer = setInterval(() => void this.#renew(), CLAIM_RENEW_MS);
    this.#timer.unref();
  }

  /** Until when (performance.now()) the claim surely lives: CLAIM_TTL_MS after its last confirmed renewal. */
  get heldUntilMs(): number {
    return this.#heldSinceMs + CLAIM_TTL_MS;
  }

  /** The call has settled: no more renewals. */
  stop(): void {
    clearInterval(this.#timer);
  }

  /**
   * ConfirmClaim: asks Redis whose claim the key holds. When Redis does not answer, the claim
   * counts as held until CLAIM_TTL_MS after its last confirmed renewal (measured from when that
   * was sent, so never past the key's real expiry); no other call can take it before then.
   */
  readonly confirm = async (): Promise<void> => {
    if (!this.#lost) {
      const askedAtMs = performance.now();
      let stored: string | null | undefined;
      try {
        stored = await this.redis.get(this.name);
      } catch {
        if (askedAtMs - this.#heldSinceMs < CLAIM_TTL_MS - CLAIM_RENEW_MS) return;
      }
      if (stored === this.token) return;
      if (stored !== undefined) this.#lost = true;
    }
    throw new IdempotencyUnavailableError(
      "this call's claim on its idempotency key ran out before it could charge (another call with the key may hold it now); nothing was charged: retry with the same idempotency_key",
    );
  };

  async #renew(): Promise<void> {
    if (this.#renewing || this.#lost) return;
    this.#renewing = true;
    const sentAtMs = performance.now();
    try {
      const renewed = await this.redis.eval(RENEW, 1, this.name, this.token, String(CLAIM_TTL_MS));
      if (renewed === 1) this.#heldSinceMs = sentAtMs;
      else this.#lost = true;
    } catch {
      // Not renewed this time: the claim lives on until CLAIM_TTL_MS after the last renewal.
    } finally {
      this.#renewing = false;
    }
  }
}

/**
 * The ledger shared by replicas, in Redis: the first call claims the key (SET NX, under a token of
 * its own, renewed while it runs), runs, and stores its answer for IDEMPOTENCY_TTL_MS; a repeat
 * reads it. A repeat while the first still runs is refused with IdempotencyInProgressError. Redis
 * failing makes the call fail: a charge is never made without its key claimed. A call writes its
 * answer, its failure or its release only while the key still holds its own claim: a call that
 * outlasted its claim (Redis unreachable for CLAIM_TTL_MS) never overwrites the answer of the
 * retry that claimed the key after it.
 */
export class RedisIdempotencyLedger implements IdempotencyLedger {
  /**
   * Failure marks Redis did not take (a connection resetting with the call's charge in flight):
   * the key's name, the claim the mark replaces and until when that claim surely lives, sent
   * again every MARK_RETRY_MS until Redis answers or the claim may have run out. Oldest first; at
   * most MAX_PENDING_MARKS.
   */
  readonly #pendingMarks = new Map<string, { token: string; heldUntilMs: number }>();
  #markTimer: NodeJS.Timeout | undefined;

  constructor(
    private readonly redis: RedisClient,
    /** Where an answer that could not be stored is reported; without it, nowhere. */
    private readonly logger?: Pick<Logger, "warn">,
    private readonly prefix = "kg:idem:",
  ) {}

  async once<T>(key: string, run: (afterFailure: boolean, confirmClaim: ConfirmClaim) => Promise<T>, keep: (value: T) => boolean = KEEP_ALL): Promise<Once<T>> {
    const name = this.prefix + key;
    const token = `${RUNNING}:${randomBytes(12).toString("base64url")}`;
    const claimedAtMs = performance.now();
    const claimed = await onceMore(() => this.redis.set(name, token, "PX", CLAIM_TTL_MS, "NX")).catch(unavailable);
    let afterFailure = false;
    if (claimed === null) {
      const stored = await onceMore(() => this.redis.get(name)).catch(unavailable);
      if (stored === null) return this.once(key, run, keep);
      // This call's own claim: a first SET whose answer a closed connection lost, sent again.
      if (stored !== token) {
        if (isClaim(stored)) throw new IdempotencyInProgressError("a call with this idempotency key is still running; retry it shortly");
        if (stored !== FAILED) return { value: JSON.parse(stored) as T, replayed: true };
        const taken = await onceMore(() => this.redis.eval(SWAP, 1, name, FAILED, token, String(CLAIM_TTL_MS))).catch(unavailable);
        if (taken !== 1) return this.once(key, run, keep);
        afterFailure = true;
      }
    }
    const claim = new RedisClaim(this.redis, name, token, claimedAtMs);
    let value: T;
    try {
      value = await run(afterFailure, claim.confirm);
    } catch (error) {
      claim.stop();
      // Refused for another call's kept answer, having charged nothing: the key is left as it was
      // found, free (let go here) or FAILED (marked again below), so the identical retry replays
      // the kept charge and records it only when its own call never did.
      if (error instanceof IdempotencyKeyMismatchError && !afterFailure) {
        await this.redis.eval(RELEASE, 1, name, token).catch(() => undefined);
        throw error;
      }
      // Not a DEL: the charge may still be made (sent to a Redis that answers late), and the
      // retry that finds FAILED records what it replays. Written on the same connection after the
      // charge, so it lands after it; sent again until Redis takes it (#markFailed).
      await this.#markFailed(name, token, claim.heldUntilMs);
      throw error;
    }
    claim.stop();
    if (!keep(value)) {
      // Let go at once; if Redis does not take that, the claim runs out by itself.
      await this.redis.eval(RELEASE, 1, name, token).catch(() => undefined);
      return { value, replayed: false };
    }
    await this.#keep(key, claim, JSON.stringify(value));
    return { value, replayed: false };
  }

  /**
   * Stores an answer in place of the call's claim, trying twice. If it still fails, the claim runs
   * out after CLAIM_TTL_MS and a retry is answered from the charge the meter kept beside its
   * counters (a Redis meter), charging nothing; or, where it kept none, charges again. When the
   * claim is another call's by now, that call's answer stays. The caller still gets this answer.
   */
  async #keep(key: string, claim: RedisClaim, answer: string): Promise<void> {
    let failure: unknown;
    for (let attempt = 0; attempt < 2; attempt++) {
      try {
        const stored = await this.redis.eval(SETTLE, 1, claim.name, claim.token, answer, String(IDEMPOTENCY_TTL_MS));
        if (stored !== 1) {
          this.logger?.warn({ idempotencyKey: key }, "the answer under an idempotency key was not stored: the call outlasted its claim, and the key holds another call's claim or answer now");
        }
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

  /**
   * Replaces the call's claim (or its absence: the claim ran out) with FAILED. When Redis does not
   * take it (the connection that carried the charge resetting), it is sent again every
   * MARK_RETRY_MS while the claim surely still lives, and then only over the claim itself: without
   * it, the claim would run out, and the retry would take the charge Redis kept for another call's,
   * recording nothing; once the claim may have run out, an empty key may be another call's doing
   * (a retry that charged and recorded, then lost its own answer), where a late mark would make the
   * next retry record that charge again. Another call's claim or answer under the key stays.
   */
  async #markFailed(name: string, token: string, heldUntilMs: number): Promise<void> {
    try {
      await this.redis.eval(SETTLE, 1, name, token, FAILED, String(IDEMPOTENCY_TTL_MS));
    } catch {
      this.#pendingMarks.delete(name);
      this.#pendingMarks.set(name, { token, heldUntilMs });
      for (const oldest of this.#pendingMarks.keys()) {
        if (this.#pendingMarks.size <= MAX_PENDING_MARKS) break;
        this.#pendingMarks.delete(oldest);
        this.#markLost(oldest, "too many waiting for Redis");
      }
      this.#markTimer ??= setInterval(() => void this.#resendMarks(), MARK_RETRY_MS).unref();
    }
  }

  async #resendMarks(): Promise<void> {
    for (const [name, mark] of [...this.#pendingMarks]) {
      if (performance.now() >= mark.heldUntilMs) {
        this.#pendingMarks.delete(name);
        this.#markLost(name, "Redis did not answer before the call's claim could run out");
        continue;
      }
      try {
        await this.redis.eval(SWAP, 1, name, mark.token, FAILED, String(IDEMPOTENCY_TTL_MS));
      } catch {
        // Redis still unreachable: the rest wait for the next round.
        return;
      }
      if (this.#pendingMarks.get(name) === mark) this.#pendingMarks.delete(name);
    }
    if (this.#pendingMarks.size === 0) {
      clearInterval(this.#markTimer);
      this.#markTimer = undefined;
    }
  }

  #markLost(name: string, why: string): void {
    this.logger?.warn({ idempotencyKey: name.slice(this.prefix.length) }, `a failed call's mark under its idempotency key was dropped unsent (${why}): a retry that replays its charge records nothing`);
  }
}

/** How often failure marks Redis did not take are sent again. */
const MARK_RETRY_MS = 1_000;
/** Failure marks kept for sending again at most (the oldest go first, with a warning). */
const MAX_PENDING_MARKS = 10_000;

/**
 * Runs a ledger command, and again (up to CLOSED_TRIES) when its connection closed before the answer (a Cluster
 * node's connection replaced as the client learns the slots): the client itself sends nothing
 * again (redisOptions), since a charge must not be made twice, but each of these is safe to send
 * twice (a GET; a SET NX or a swap that finds its own value says so).
 */
async function onceMore<T>(command: () => Promise<T>): Promise<T> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await command();
    } catch (error) {
      if (!(error instanceof Error && error.message === CONNECTION_CLOSED) || attempt === CLOSED_TRIES) throw error;
      // As the Cluster client waited before it was told not to: time for the new connection.
      await new Promise((resolve) => setTimeout(resolve, CLOSED_RETRY_MS));
    }
  }
}
/** Tries of a ledger command whose connection closed, and the pause between them. */
const CLOSED_TRIES = 3;
const CLOSED_RETRY_MS = 100;
/** ioredis's message for a command whose connection closed before its answer. */
const CONNECTION_CLOSED = "Connection is closed.";

function unavailable(error: unknown): never {
  throw new IdempotencyUnavailableError("idempotency keys cannot be checked: Redis is unavailable; nothing was charged, retry shortly", { cause: error });
}
