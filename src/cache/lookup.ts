import type { Logger } from "pino";
import type { KeySnapshot, KeyStore } from "../store/store.js";
import { CacheUnavailableError } from "./cache.js";
import type { Invalidation, InvalidationBus, LocalCache, SharedCache } from "./cache.js";

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
  store: KeyStore;
  bus: InvalidationBus;
  logger?: Logger | undefined;
}

/**
 * L1 lifetime while the invalidation bus is down: this replica cannot hear revocations then,
 * so it re-reads a key at least this often. It bounds how long a revoked key can pass here.
 */
export const DISCONNECTED_TTL_MS = 1000;

/**
 * Finds a key's snapshot by hash: L1, then L2, then the store. Misses are cached too, so a
 * flood of well-formed fakes stops at the cache. An L2 failure degrades to the store; a store
 * failure propagates, because then the key cannot be decided.
 */
export class SnapshotLookup {
  readonly #deps: SnapshotLookupDeps;
  readonly #observer: LookupObserver;

  constructor(deps: SnapshotLookupDeps) {
    this.#deps = deps;
    this.#observer = deps.observer ?? NO_OBSERVER;
    deps.bus.subscribe((event) => deps.local.invalidate(event));
  }

  /** Synchronous L1 read: the cached-path answer, without a promise. */
  peek(hash: string): KeySnapshot | null | undefined {
    const cached = this.#deps.local.get(hash);
    this.#observer.cacheResult("l1", cached === undefined ? "miss" : cached === null ? "negative" : "hit");
    return cached;
  }

  /** The slow path after an L1 miss. */
  async load(hash: string): Promise<KeySnapshot | null> {
    const { shared, store } = this.#deps;
    if (shared !== undefined) {
      const cached = await this.#sharedGet(shared, hash);
      if (cached !== undefined) {
        this.#remember(hash, cached);
        return cached;
      }
    }
    const started = performance.now();
    let snapshot: KeySnapshot | null;
    try {
      snapshot = await store.findSnapshotByHash(hash);
    } catch (error) {
      this.#observer.backendCall("store", "find_snapshot", (performance.now() - started) / 1000, false);
      throw error;
    }
    this.#observer.backendCall("store", "find_snapshot", (performance.now() - started) / 1000, true);
    this.#remember(hash, snapshot);
    if (shared !== undefined) {
      const write = snapshot === null ? shared.setMissing(hash) : shared.set(hash, snapshot);
      // Filling L2 is best effort and off the answer's path.
      write.catch((error: unknown) => this.#deps.logger?.warn({ err: error }, "L2 cache write failed"));
    }
    return snapshot;
  }

  #remember(hash: string, snapshot: KeySnapshot | null): void {
    const ttlMs = this.#deps.bus.connected ? undefined : DISCONNECTED_TTL_MS;
    if (snapshot === null) this.#deps.local.setMissing(hash, ttlMs);
    else this.#deps.local.set(hash, snapshot, ttlMs);
  }

  async #sharedGet(shared: SharedCache, hash: string): Promise<KeySnapshot | null | undefined> {
    const started = performance.now();
    try {
      const cached = await shared.get(hash);
      this.#observer.backendCall("redis", "l2_get", (performance.now() - started) / 1000, true);
      this.#observer.cacheResult("l2", cached === undefined ? "miss" : cached === null ? "negative" : "hit");
      return cached;
    } catch (error) {
      this.#observer.backendCall("redis", "l2_get", (performance.now() - started) / 1000, false);
      this.#deps.logger?.warn({ err: error }, "L2 cache read failed; reading the store");
      return undefined;
    }
  }

  /**
   * Drops entries everywhere: L2 first, then this replica's L1, then every other replica's L1
   * through the bus. A failure is thrown so the admin call reports it and can be retried; the
   * store change it follows has already been made.
   */
  async invalidate(event: Invalidation): Promise<void> {
    this.#deps.local.invalidate(event);
    try {
      if (this.#deps.shared !== undefined) await this.#deps.shared.invalidate(event);
      await this.#deps.bus.publish(event);
    } catch (error) {
      throw new CacheUnavailableError("the change is saved, but the shared cache could not be told; retry the call", { cause: error });
    }
  }
}
