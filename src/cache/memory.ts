import { LRUCache } from "lru-cache";
import type { KeySnapshot } from "../store/store.js";
import type { Invalidation, InvalidationBus, LocalCache } from "./cache.js";

// Plans, subscription states, roles, modes and scope names come from small configured sets, but
// every snapshot read from the store brings its own copies of them. L1 keeps one copy per value.
// The bound only guards against a store full of unexpected values.
const MAX_SHARED_VALUES = 4096;

/** One copy per distinct value. */
class SharedValues<T extends string> {
  readonly #values = new Map<T, T>();

  /** The process's copy of `value`, the same text. */
  of(value: T): T {
    const known = this.#values.get(value);
    if (known !== undefined) return known;
    if (this.#values.size < MAX_SHARED_VALUES) this.#values.set(value, value);
    return value;
  }
}

const modes = new SharedValues<KeySnapshot["key"]["mode"]>();
const names = new SharedValues<string>();
const statuses = new SharedValues<KeySnapshot["account"]["subscriptionStatus"]>();
const roles = new SharedValues<KeySnapshot["account"]["role"]>();

/**
 * Points a snapshot's low-cardinality fields at the process's copies (equal text, so nothing
 * reads differently), and its account's owner id at the key's: L1 holds up to maxEntries of them.
 */
function shareValues(snapshot: KeySnapshot): void {
  const { key, account } = snapshot;
  key.mode = modes.of(key.mode);
  for (let i = 0; i < key.scopes.length; i++) {
    const scope = key.scopes[i];
    if (scope !== undefined) key.scopes[i] = names.of(scope);
  }
  if (account.ownerId === key.ownerId) account.ownerId = key.ownerId;
  account.plan = names.of(account.plan);
  account.subscriptionStatus = statuses.of(account.subscriptionStatus);
  account.role = roles.of(account.role);
}

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
    // Keyed by the snapshot's own copy of the hash when it is the same text: the caller's copy
    // (computed for the request) can then go, instead of a second 64-character string per key.
    const key = snapshot.key.hash === hash ? snapshot.key.hash : hash;
    shareValues(snapshot);
    this.#hits.set(key, snapshot, ttlMs === undefined ? undefined : { ttl: ttlMs });
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
