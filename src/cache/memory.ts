import { LRUCache } from "lru-cache";
import type { KeySnapshot } from "../store/store.js";
import type { Invalidation, InvalidationBus, LocalCache } from "./cache.js";

/** Bounds of the in-process cache. */
export interface MemoryCacheOptions {
  maxEntries: number;
  ttlSeconds: number;
  negativeMaxEntries: number;
  negativeTtlSeconds: number;
}

/** L1: a bounded LRU of snapshots by hash, and a shorter-lived LRU of unknown hashes. */
export class MemoryCache implements LocalCache {
  readonly #hits: LRUCache<string, KeySnapshot>;
  readonly #misses: LRUCache<string, true>;

  constructor(options: MemoryCacheOptions) {
    this.#hits = new LRUCache({ max: options.maxEntries, ttl: options.ttlSeconds * 1000, ttlAutopurge: false });
    this.#misses = new LRUCache({ max: options.negativeMaxEntries, ttl: options.negativeTtlSeconds * 1000, ttlAutopurge: false });
  }

  get size(): number {
    return this.#hits.size;
  }

  get(hash: string): KeySnapshot | null | undefined {
    const hit = this.#hits.get(hash);
    if (hit !== undefined) return hit;
    return this.#misses.get(hash) === true ? null : undefined;
  }

  set(hash: string, snapshot: KeySnapshot, ttlMs?: number): void {
    this.#misses.delete(hash);
    this.#hits.set(hash, snapshot, ttlMs === undefined ? undefined : { ttl: ttlMs });
  }

  setMissing(hash: string, ttlMs?: number): void {
    this.#misses.set(hash, true, ttlMs === undefined ? undefined : { ttl: ttlMs });
  }

  invalidate(event: Invalidation): void {
    switch (event.kind) {
      case "key":
        this.#hits.delete(event.hash);
        this.#misses.delete(event.hash);
        return;
      case "owner":
        // Account changes are rare; a scan keeps the hot path free of a second index.
        for (const [hash, snapshot] of this.#hits.entries()) {
          if (snapshot.account.ownerId === event.ownerId) this.#hits.delete(hash);
        }
        return;
      case "all":
        this.#hits.clear();
        this.#misses.clear();
        return;
    }
  }
}

/** The bus of a single process: publish calls the handlers directly. */
export class LocalInvalidationBus implements InvalidationBus {
  readonly connected = true;
  readonly #handlers: Array<(event: Invalidation) => void> = [];

  async publish(event: Invalidation): Promise<void> {
    for (const handler of this.#handlers) handler(event);
  }

  subscribe(handler: (event: Invalidation) => void): void {
    this.#handlers.push(handler);
  }

  async close(): Promise<void> {
    this.#handlers.length = 0;
  }
}
