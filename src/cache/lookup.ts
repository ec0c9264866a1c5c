import type { Attributes } from "@opentelemetry/api";
import type { Logger } from "pino";
import { LogThrottle } from "../log-throttle.js";
import { REDIS_L2_GET_SPAN, STORE_LOOKUP_SPAN, backendAttributes, traced } from "../tracing/tracing.js";
import type { DecisionTrace } from "../tracing/tracing.js";
import type { CheckSnapshot, KeySnapshot, SnapshotStore } from "../store/store.js";
import { CacheUnavailableError } from "./cache.js";
import type { FillToken, Invalidation, InvalidationBus, LocalCache, SharedCache, SharedRead } from "./cache.js";

/** Receives cache results and backend timings (the metrics). */
export interface LookupObserver {
  cacheResult(layer: "l1" | "l2", result: "hit" | "negative" | "miss"): void;
  backendCall(backend: "store" | "redis", op: string, seconds: number, ok: boolean): void;
}

const NO_OBSERVER: LookupObserver = { cacheResult: () => undefined, backendCall: () => undefined };

/** Parts of the read path: L1, an optional shared L2, the store and the bus. */
export interface SnapshotLookupDeps {
  observer?: LookupObserver | undefined;
  local: LocalCache;
  shared?: SharedCache | undefined;
  store: SnapshotStore;
  bus: InvalidationBus;
  logger?: Logger | undefined;
  /** How long an L1 miss waits for L2 before reading the store (default L2_TIMEOUT_MS). */
  l2TimeoutMs?: number | undefined;
  /** The store's db.system.name in trace spans ("sqlite", "mongodb"). */
  storeSystem?: string | undefined;
  /** A monotonic clock in ms for spacing out L2 failure lines (default performance.now). */
  nowMs?: (() => number) | undefined;
}

const L2_GET_ATTRIBUTES: Attributes = backendAttributes("redis", "l2_get");

/**
 * L1 lifetime while the invalidation bus is down: this replica cannot hear revocations then,
 * so it re-reads a key at least this often. It bounds how long a revoked key can pass here.
 */
export const DISCONNECTED_TTL_MS = 1000;

/**
 * How long a Check waits for L2 before it reads the store instead. An L2 answer takes well under
 * a millisecond; a Redis that takes this long is failing, and the store answers correctly.
 */
export const L2_TIMEOUT_MS = 250;

/** How often the warn line for one L2 failure is written; every such failure is counted. */
const L2_FAILURE_LOG_INTERVAL_MS = 60_000;
/** Distinct L2 failures remembered for that; past it they start over. */
const MAX_L2_FAILURES_TRACKED = 256;

/**
 * How long after its store read was asked a late answer (one that came after the store's deadline
 * failed the lookup) may still be cached: as long as L2 takes a fill read that long ago, so L1
 * trusts no older view of the store than L2 does.
 */
export const LATE_ANSWER_WINDOW_MS = 5000;
/** Keys whose late answer is awaited; past it the oldest is given up. */
const MAX_LATE_ANSWERS = 4096;

/** How often invalidations that did not reach Redis are sent again, and how many may wait. */
const INVALIDATION_RETRY_MS = 1000;
const MAX_PENDING_INVALIDATIONS = 10_000;

/** Rejects with a timeout error when `promise` has not settled within `ms`. */
async function withDeadline<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const deadline = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} took longer than ${ms} ms`)), ms);
  });
  try {
    return await Promise.race([promise, deadline]);
  } finally {
    clearTimeout(timer);
    // The abandoned call settles later; its failure is already reported as the deadline's.
    promise.catch(() => undefined);
  }
}

function pendingId(event: Invalidation): string {
  switch (event.kind) {
    case "key":
      return `k:${event.hash}`;
    case "owner":
      return `o:${event.ownerId}`;
    case "all":
      return "all";
  }
}

/**
 * Finds a key's snapshot by hash: L1, then L2, then the store. Misses are cached too, so a
 * flood of well-formed fakes stops at the cache. Concurrent loads of one hash share one read.
 * An L2 failure or delay degrades to the store; a store failure propagates, because then the
 * key cannot be decided.
 *
 * While the bus is disconnected (including a Redis that stopped answering), L2 is neither read
 * nor written, and L1 keeps snapshots for DISCONNECTED_TTL_MS only. When the bus comes back,
 * L2 entries written before are distrusted (an invalidation may have failed to reach them)
 * before L2 is used again.
 */
export class SnapshotLookup {
  readonly #deps: SnapshotLookupDeps;
  readonly #observer: LookupObserver;
  readonly #inflight = new Map<string, Promise<CheckSnapshot | null>>();
  /** Counts invalidations seen here: a read that began before one is answered but not cached. */
  #epoch = 0;
  /** Counts store reads asked here, so of two reads of one key the later is known. */
  #storeReads = 0;
  /**
   * Keys whose store read failed (its deadline) while a late answer may still come, each with the
   * first read whose late answer may be cached. Any answer kept for the key removes it: a read's
   * answer never replaces a newer one in the caches, as reads answered in time never can.
   */
  readonly #lateFrom = new Map<string, number>();
  /** Counts the bus's `all` events, and the count when L2 was last distrusted up to date. */
  #busChanges = 0;
  #l2TrustedAt = 0;
  #distrusting: Promise<void> | null = null;
  readonly #pending = new Map<string, Invalidation>();
  #retryTimer: NodeJS.Timeout | undefined;
  #retrying = false;
  readonly #storeAttributes: Attributes;
  /** Each L2 failure logged lately, by its line and error message. */
  readonly #l2Failures: LogThrottle;

  readonly #l2TimeoutMs: number;

  constructor(deps: SnapshotLookupDeps) {
    this.#deps = deps;
    this.#l2TimeoutMs = deps.l2TimeoutMs ?? L2_TIMEOUT_MS;
    this.#storeAttributes = backendAttributes(deps.storeSystem ?? "unknown", "find_snapshot");
    this.#observer = deps.observer ?? NO_OBSERVER;
    this.#l2Failures = new LogThrottle(L2_FAILURE_LOG_INTERVAL_MS, MAX_L2_FAILURES_TRACKED, deps.nowMs);
    deps.bus.subscribe((event) => this.#dropLocal(event));
  }

  /** Synchronous L1 read: the cached-path answer, without a promise. */
  peek(hash: string): CheckSnapshot | null | undefined {
    const cached = this.#deps.local.get(hash);
    this.#observer.cacheResult("l1", cached === undefined ? "miss" : cached === null ? "negative" : "hit");
    return cached;
  }

  /**
   * The slow path after an L1 miss; callers loading the same hash at once share one read. With a
   * decision's trace, the backend calls this load makes are spans under it.
   */
  load(hash: string, trace?: DecisionTrace): Promise<CheckSnapshot | null> {
    const inflight = this.#inflight.get(hash);
    if (inflight !== undefined) {
      if (trace !== undefined) trace.cacheTier = "shared";
      return inflight;
    }
    const loading: Promise<CheckSnapshot | null> = this.#load(hash, trace).finally(() => {
      if (this.#inflight.get(hash) === loading) this.#inflight.delete(hash);
    });
    this.#inflight.set(hash, loading);
    return loading;
  }

  async #load(hash: string, trace: DecisionTrace | undefined): Promise<CheckSnapshot | null> {
    const epoch = this.#epoch;
    const { shared: configured, bus } = this.#deps;
    let shared = configured !== undefined && bus.connected ? configured : undefined;
    if (shared !== undefined && this.#l2TrustedAt !== this.#busChanges) shared = await this.#distrustEarlier(shared);
    let fill: FillToken | undefined;
    if (shared !== undefined) {
      const cached = await this.#sharedRead(shared, hash, trace);
      if (cached !== undefined) {
        if (cached.value !== undefined) {
          if (trace !== undefined) trace.cacheTier = "l2";
          if (epoch !== this.#epoch) return cached.value;
          if (this.#lateFrom.size !== 0) this.#lateFrom.delete(hash);
          return this.#remember(hash, cached.value, cached.ttlMs);
        }
        fill = cached.fill;
      }
    }
    if (trace !== undefined) trace.cacheTier = "store";
    const read = (this.#storeReads += 1);
    const askedMs = performance.now();
    // A read that outlives the store's deadline (the Check was answered UNAVAILABLE) goes on; its
    // answer is kept as one in time would have been, under this load's epoch and fill token, so
    // the retry is answered from the cache instead of reading the store again (and again failing).
    const late = (answer: KeySnapshot | null): void => {
      // While the bus is down no invalidation reaches this replica, and L1 trusts a read for
      // DISCONNECTED_TTL_MS from when it is kept: an answer read up to LATE_ANSWER_WINDOW_MS ago
      // would outlast that bound (a key revoked on another replica meanwhile would pass), so none is kept.
      if (!this.#deps.bus.connected) return;
      const from = this.#lateFrom.get(hash);
      if (from === undefined || read < from || performance.now() - askedMs > LATE_ANSWER_WINDOW_MS) return;
      this.#keep(hash, answer, epoch, shared, fill);
    };
    let snapshot: KeySnapshot | null;
    try {
      snapshot = await this.#storeRead(hash, trace, late);
    } catch (error) {
      this.#awaitLate(hash, read, epoch);
      throw error;
    }
    return this.#keep(hash, snapshot, epoch, shared, fill);
  }

  /**
   * Keeps a store read's answer in L1 and, with the fill token of the L2 read before it, in L2;
   * returns what L1 keeps. Nothing is kept when a change was seen since the load began.
   */
  #keep(hash: string, snapshot: KeySnapshot | null, epoch: number, shared: SharedCache | undefined, fill: FillToken | undefined): CheckSnapshot | null {
    // A change seen while this read was running may have come after it: answer, but keep nothing.
    if (epoch !== this.#epoch) return snapshot;
    if (this.#lateFrom.size !== 0) this.#lateFrom.delete(hash);
    const kept = this.#remember(hash, snapshot);
    if (shared !== undefined && fill !== undefined) {
      const write = snapshot === null ? shared.setMissing(hash) : shared.set(hash, snapshot, fill);
      // Filling L2 is best effort and off the answer's path.
      write.catch((error: unknown) => this.#warnL2(error, "L2 cache write failed"));
    }
    return kept;
  }

  /**
   * After read `read` of `hash` failed: its late answer, or a later read's, may be kept, unless an
   * earlier read's is awaited already (the first to come is kept; the older the read, the sooner).
   */
  #awaitLate(hash: string, read: number, epoch: number): void {
    if (epoch !== this.#epoch || this.#lateFrom.has(hash)) return;
    if (this.#lateFrom.size >= MAX_LATE_ANSWERS) {
      // A store slow for long: the key waiting longest is given up (its late answer is not kept).
      for (const oldest of this.#lateFrom.keys()) {
        this.#lateFrom.delete(oldest);
        break;
      }
    }
    this.#lateFrom.set(hash, read);
  }

  /**
   * An L1 miss read from the store in the caller's turn, when nothing is asked before the store
   * (no L2) and the store reads without waiting (SQLite): the miss is decided at once, without the
   * promises and the budget timer a waiting read needs. undefined when the read must wait: load().
   */
  loadNow(hash: string): CheckSnapshot | null | undefined {
    const { store, shared } = this.#deps;
    if (shared !== undefined || store.findSnapshotByHashNow === undefined) return undefined;
    const started = performance.now();
    let snapshot: KeySnapshot | null;
    try {
      snapshot = store.findSnapshotByHashNow(hash);
    } catch (error) {
      this.#observer.backendCall("store", "find_snapshot", (performance.now() - started) / 1000, false);
      throw error;
    }
    this.#observer.backendCall("store", "find_snapshot", (performance.now() - started) / 1000, true);
    return this.#remember(hash, snapshot);
  }

  async #storeRead(hash: string, trace: DecisionTrace | undefined, late: (snapshot: KeySnapshot | null) => void): Promise<KeySnapshot | null> {
    const started = performance.now();
    try {
      const read = this.#deps.store.findSnapshotByHash(hash, late);
      const snapshot = await (trace === undefined ? read : traced(trace.child(STORE_LOOKUP_SPAN, this.#storeAttributes), read));
      this.#observer.backendCall("store", "find_snapshot", (performance.now() - started) / 1000, true);
      return snapshot;
    } catch (error) {
      this.#observer.backendCall("store", "find_snapshot", (performance.now() - started) / 1000, false);
      throw error;
    }
  }

  /**
   * After the bus changed state, L2 is used again only once the entries written before are
   * distrusted: a replica that could not hear invalidations cannot know which entries they would
   * have deleted. Resolves to L2 when that is done, else to undefined (read the store).
   */
  async #distrustEarlier(shared: SharedCache): Promise<SharedCache | undefined> {
    if (this.#distrusting === null) {
      const upTo = this.#busChanges;
      this.#distrusting = withDeadline(shared.distrustEarlierEntries(), this.#l2TimeoutMs, "distrusting L2")
        .then(
          () => {
            this.#l2TrustedAt = upTo;
            this.#deps.logger?.info("L2 entries from before the invalidation channel came back are no longer trusted");
          },
          (error: unknown) => this.#warnL2(error, "could not distrust earlier L2 entries; reading the store"),
        )
        .finally(() => {
          this.#distrusting = null;
        });
    }
    await this.#distrusting;
    return this.#l2TrustedAt === this.#busChanges && this.#deps.bus.connected ? shared : undefined;
  }

  /**
   * Keeps the read in L1 and returns what L1 keeps: the copy later Checks of the key read. An L2
   * entry is kept for what is left of its own lifetime at most (`leftMs`): a change whose
   * invalidation never reached this replica is then seen within one cache TTL of the store read
   * that filled L2, not two.
   */
  #remember(hash: string, snapshot: KeySnapshot | null, leftMs?: number): CheckSnapshot | null {
    const ttlMs = !this.#deps.bus.connected ? DISCONNECTED_TTL_MS : leftMs;
    if (snapshot !== null) return this.#deps.local.set(hash, snapshot, ttlMs);
    this.#deps.local.setMissing(hash, ttlMs);
    return null;
  }

  async #sharedRead(shared: SharedCache, hash: string, trace: DecisionTrace | undefined): Promise<SharedRead | undefined> {
    const started = performance.now();
    try {
      const read = withDeadline(shared.read(hash), this.#l2TimeoutMs, "L2 read");
      const cached = await (trace === undefined ? read : traced(trace.child(REDIS_L2_GET_SPAN, L2_GET_ATTRIBUTES), read));
      this.#observer.backendCall("redis", "l2_get", (performance.now() - started) / 1000, true);
      this.#observer.cacheResult("l2", cached.value === undefined ? "miss" : cached.value === null ? "negative" : "hit");
      return cached;
    } catch (error) {
      this.#observer.backendCall("redis", "l2_get", (performance.now() - started) / 1000, false);
      this.#warnL2(error, "L2 cache read failed; reading the store");
      return undefined;
    }
  }

  /**
   * Logs an L2 failure met by a Check once a minute for each line and error message, with how
   * many more there were since (`since`): a Redis that refuses every fill fails each Check the
   * same way, and a made-up key with a valid checksum, which anyone can send, reaches L2.
   */
  #warnL2(error: unknown, line: string): void {
    const logger = this.#deps.logger;
    if (logger === undefined) return;
    const since = this.#l2Failures.due(`${line}\n${error instanceof Error ? error.message : String(error)}`);
    if (since !== null) logger.warn({ err: error, since }, line);
  }


  /** Drops L1 entries for an event from this replica or another; reads in flight stop counting. */
  #dropLocal(event: Invalidation): void {
    this.#deps.local.invalidate(event);
    this.#epoch += 1;
    this.#inflight.clear();
    // Every late answer awaited began before this change: none of them is kept.
    this.#lateFrom.clear();
    if (event.kind === "all") this.#busChanges += 1;
  }

  /**
   * Drops entries everywhere: this replica's L1, then L2, then every other replica's L1 through
   * the bus. When L2 or the bus cannot be told, the event is kept and sent again every second
   * until it lands, and CacheUnavailableError is thrown: the store change it follows is made,
   * and other replicas learn of it when Redis answers again (or, if they cannot hear it either,
   * within their disconnected bound).
   */
  async invalidate(event: Invalidation): Promise<void> {
    this.#dropLocal(event);
    try {
      await this.#deliver(event, true);
    } catch (error) {
      this.#keepForRetry(event, error);
      throw new CacheUnavailableError("the change is saved; other replicas could not be told yet, and keygate keeps telling them until Redis answers", {
        cause: error,
      });
    }
  }

  /**
   * L2 first, then the bus. When L2 could not be told on a change's first try, L2 may still hold
   * what the change made stale while Redis answers reads and PUBLISH (a demoted master's READONLY,
   * a full one's OOM): no replica reads L2 again until a distrust of earlier entries is written.
   * Here at once, elsewhere through an `all` on the bus when it can still carry one.
   */
  async #deliver(event: Invalidation, firstTry = false): Promise<void> {
    const { shared, bus } = this.#deps;
    if (shared !== undefined) {
      try {
        if (event.kind === "all") await shared.distrustEarlierEntries();
        else await shared.invalidate(event);
      } catch (error) {
        if (firstTry) {
          this.#dropLocal({ kind: "all" });
          // Not awaited: a frozen Redis would hold the caller's answer for another command timeout.
          bus.publish({ kind: "all" }).catch(() => undefined);
        }
        throw error;
      }
    }
    await bus.publish(event);
  }

  #keepForRetry(event: Invalidation, error: unknown): void {
    let kept = event;
    if (this.#pending.size >= MAX_PENDING_INVALIDATIONS && !this.#pending.has(pendingId(event))) {
      // Too many to track one by one: one `all` covers them (L2 distrusted, every L1 cleared).
      this.#pending.clear();
      kept = { kind: "all" };
      this.#deps.logger?.error({ max: MAX_PENDING_INVALIDATIONS }, "too many invalidations waiting for Redis; will distrust all of L2 and clear every L1 instead");
    }
    this.#pending.set(pendingId(kept), kept);
    this.#deps.logger?.warn(
      { err: error, kind: kept.kind, ...(kept.kind === "owner" ? { ownerId: kept.ownerId } : {}), waiting: this.#pending.size },
      "could not tell other replicas about a change; retrying until Redis answers",
    );
    if (this.#retryTimer === undefined) {
      this.#retryTimer = setInterval(() => void this.#retryPending(), INVALIDATION_RETRY_MS);
      this.#retryTimer.unref();
    }
  }

  /** One pass over the waiting invalidations, oldest first; stops at the first failure. */
  async #retryPending(): Promise<void> {
    if (this.#retrying) return;
    this.#retrying = true;
    try {
      for (const [id, event] of [...this.#pending]) {
        await this.#deliver(event);
        if (this.#pending.get(id) === event) this.#pending.delete(id);
      }
    } catch {
      // Redis still fails; the next pass tries again.
    } finally {
      this.#retrying = false;
    }
    if (this.#pending.size === 0 && this.#retryTimer !== undefined) {
      clearInterval(this.#retryTimer);
      this.#retryTimer = undefined;
      this.#deps.logger?.info("waiting invalidations reached the other replicas");
    }
  }

  /** Invalidations still waiting for Redis. */
  get pendingInvalidations(): number {
    return this.#pending.size;
  }

  /** Stops retrying, after one last pass; what is still waiting is logged. */
  async close(): Promise<void> {
    if (this.#retryTimer === undefined) return;
    clearInterval(this.#retryTimer);
    this.#retryTimer = undefined;
    await this.#retryPending();
    if (this.#pending.size > 0) {
      this.#deps.logger?.error({ waiting: this.#pending.size }, "invalidations never reached the other replicas; their caches expire within the cache TTL");
    }
  }
}
