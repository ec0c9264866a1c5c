import type { KeySnapshot, KeyStore } from "../store/store.js";
import type { Invalidation, InvalidationBus, LocalCache, SharedCache } from "./cache.js";

/** Parts of the read path: L1, an optional shared L2, the store and the bus. */
export interface SnapshotLookupDeps {
  local: LocalCache;
  shared?: SharedCache | undefined;
  store: KeyStore;
  bus: InvalidationBus;
}

/**
 * Finds a key's snapshot by hash: L1, then L2, then the store. Misses are cached too, so a
 * flood of well-formed fakes stops at the cache.
 */
export class SnapshotLookup {
  readonly #deps: SnapshotLookupDeps;

  constructor(deps: SnapshotLookupDeps) {
    this.#deps = deps;
    deps.bus.subscribe((event) => deps.local.invalidate(event));
  }

  /** Synchronous L1 read: the cached-path answer, without a promise. */
  peek(hash: string): KeySnapshot | null | undefined {
    return this.#deps.local.get(hash);
  }

  /** The slow path after an L1 miss. Store failures propagate as errors. */
  async load(hash: string): Promise<KeySnapshot | null> {
    const { local, shared, store } = this.#deps;
    if (shared !== undefined) {
      const cached = await shared.get(hash);
      if (cached !== undefined) {
        if (cached === null) local.setMissing(hash);
        else local.set(hash, cached);
        return cached;
      }
    }
    const snapshot = await store.findSnapshotByHash(hash);
    if (snapshot === null) {
      local.setMissing(hash);
      if (shared !== undefined) await shared.setMissing(hash);
    } else {
      local.set(hash, snapshot);
      if (shared !== undefined) await shared.set(hash, snapshot);
    }
    return snapshot;
  }

  /** Drops entries everywhere: L2 first, then every replica's L1 through the bus. */
  async invalidate(event: Invalidation): Promise<void> {
    if (this.#deps.shared !== undefined) await this.#deps.shared.invalidate(event);
    this.#deps.local.invalidate(event);
    await this.#deps.bus.publish(event);
  }
}
