import { LRUCache } from "lru-cache";
import type { CheckSnapshot, CheckedKey, KeySnapshot } from "../store/store.js";
import type { Invalidation, InvalidationBus, LocalCache } from "./cache.js";

// Plans, subscription states, roles, modes and scope lists come from small configured sets, but
// every snapshot read from the store brings its own copies of them. L1 keeps one copy per value.
// The bound only guards against a store full of unexpected values.
const MAX_SHARED_VALUES = 4096;

/** One copy per distinct value, found by its text. */
class SharedValues<T> {
  readonly #values = new Map<string, T>();

  /** `textOf` names a value; `keep` makes the copy that is shared (the value itself by default). */
  constructor(
    private readonly textOf: (value: T) => string,
    private readonly keep: (value: T) => T = (value) => value,
  ) {}

  /** The process's copy of `value`, equal to it. */
  of(value: T): T {
    const text = this.textOf(value);
    const known = this.#values.get(text);
    if (known !== undefined) return known;
    const kept = this.keep(value);
    if (this.#values.size < MAX_SHARED_VALUES) this.#values.set(text, kept);
    return kept;
  }
}

const modes = new SharedValues<CheckedKey["mode"]>(String);
const plans = new SharedValues<string>(String);
const statuses = new SharedValues<CheckSnapshot["account"]["subscriptionStatus"]>(String);
const roles = new SharedValues<CheckSnapshot["account"]["role"]>(String);
// Named by their JSON, which no two different lists share whatever they hold: joined with commas,
// ["a,b"] and ["a","b"] would have one name, and keys of one would be handed the list of the
// other. The stores refuse such lists (stored-values.ts); this holds if one ever got past them.
// Shared lists are frozen: one key's list is every such key's.
const scopeLists = new SharedValues<readonly string[]>(
  (scopes) => JSON.stringify(scopes),
  (scopes) => Object.freeze(scopes.slice()),
);

/**
 * What L1 keeps of a snapshot: only the fields a Check reads, in two small objects of fixed
 * shape, with low-cardinality values (and the scope list, frozen) shared with every other key
 * that has them, and the account's owner id pointing at the key's (they are equal).
 */
function checkSnapshot(snapshot: KeySnapshot, forwardMetadata: readonly string[], readEpoch: number): KeptSnapshot {
  const { key, account } = snapshot;
  const ownerId = key.ownerId;
  return {
    readEpoch,
    key: {
      id: key.id,
      ownerId,
      projectId: key.projectId,
      mode: modes.of(key.mode),
      scopes: scopeLists.of(key.scopes),
      expiresAtMs: key.expiresAtMs,
      revokedAtMs: key.revokedAtMs,
      graceEndsAtMs: key.graceEndsAtMs,
      rotatedToId: key.rotatedToId,
      rateLimit: key.rateLimit,
      disabledAtMs: key.disabledAtMs,
      lastUsedAtMs: key.lastUsedAtMs,
      metadata: forwardedOnly(key.metadata, forwardMetadata),
    },
    account: {
      ownerId: account.ownerId === ownerId ? ownerId : account.ownerId,
      plan: plans.of(account.plan),
      subscriptionStatus: statuses.of(account.subscriptionStatus),
      role: roles.of(account.role),
    },
  };
}

const NO_METADATA: Readonly<Record<string, string>> = Object.freeze({});

/** The metadata entries a Check forwards, or one shared empty object when the key has none. */
function forwardedOnly(metadata: Readonly<Record<string, string>>, names: readonly string[]): Readonly<Record<string, string>> {
  let kept: Record<string, string> | undefined;
  for (const name of names) {
    const value = Object.hasOwn(metadata, name) ? metadata[name] : undefined;
    if (value === undefined) continue;
    kept ??= {};
    kept[name] = value;
  }
  return kept ?? NO_METADATA;
}

/** Bounds of the in-process cache, and the metadata entries it keeps (the policy's forwardMetadata). */
export interface MemoryCacheOptions {
  maxEntries: number;
  ttlSeconds: number;
  negativeMaxEntries: number;
  negativeTtlSeconds: number;
  forwardMetadata?: readonly string[];
}

/** L1's copy of a snapshot: what a Check reads, and the read epoch in which it last moved up L1's order. */
interface KeptSnapshot extends CheckSnapshot {
  readEpoch: number;
}

// lru-cache's options objects for reads, made once (it makes an empty one per call without).
const PEEK = {};
const TOUCH = {};

/**
 * L1: a bounded LRU of what a Check reads, by hash, and a shorter-lived LRU of unknown hashes.
 *
 * A hit moves its entry to the most recent end of lru-cache's order at most once per read epoch
 * (`maxEntries` hits): moving costs a few memory reads and writes in lru-cache's index lists,
 * which, with many keys busy, are not in the CPU's caches. So an entry read in the current epoch
 * is evicted only after every entry not read in it, and entries not read in it go in the order
 * of their last move: least recently used first, to within one epoch.
 */
export class MemoryCache implements LocalCache {
  readonly #hits: LRUCache<string, KeptSnapshot>;
  readonly #misses: LRUCache<string, true>;
  #forwardMetadata: readonly string[];
  readonly #epochReads: number;
  #reads = 0;
  #epoch = 0;

  constructor(options: MemoryCacheOptions) {
    this.#forwardMetadata = options.forwardMetadata ?? [];
    this.#epochReads = Math.max(1, options.maxEntries);
    // lru-cache takes whole ms only (16.1 s is 16100.000000000002 ms in floats): rounded, at
    // least 1 ms, as the Redis L2 keeps them.
    this.#hits = new LRUCache({ max: options.maxEntries, ttl: Math.max(1, Math.round(options.ttlSeconds * 1000)), ttlAutopurge: false });
    this.#misses = new LRUCache({ max: options.negativeMaxEntries, ttl: Math.max(1, Math.round(options.negativeTtlSeconds * 1000)), ttlAutopurge: false });
  }

  get size(): number {
    return this.#hits.size;
  }

  /**
   * Keeps another set of metadata entries from now on (a reloaded policy's forwardMetadata).
   * Entries cached with the old set are dropped, so no allow forwards by the old list.
   */
  reconfigure(forwardMetadata: readonly string[]): void {
    const same = forwardMetadata.length === this.#forwardMetadata.length && forwardMetadata.every((name, i) => name === this.#forwardMetadata[i]);
    this.#forwardMetadata = forwardMetadata;
    if (!same) this.#hits.clear();
  }

  get(hash: string): CheckSnapshot | null | undefined {
    const hit = this.#hits.peek(hash, PEEK);
    if (hit !== undefined) {
      if (++this.#reads === this.#epochReads) {
        this.#reads = 0;
        this.#epoch++;
      }
      if (hit.readEpoch !== this.#epoch) {
        hit.readEpoch = this.#epoch;
        this.#hits.get(hash, TOUCH);
      }
      return hit;
    }
    return this.#misses.get(hash) === true ? null : undefined;
  }

  set(hash: string, snapshot: KeySnapshot, ttlMs?: number): CheckSnapshot {
    this.#misses.delete(hash);
    // Keyed by the snapshot's own copy of the hash when it is the same text: the caller's copy
    // (computed for the request) can then go, instead of a second 64-character string per key.
    const key = snapshot.key.hash === hash ? snapshot.key.hash : hash;
    // Not yet read in this epoch: its first read moves it, as a read of an entry set earlier would.
    const kept = checkSnapshot(snapshot, this.#forwardMetadata, this.#epoch - 1);
    this.#hits.set(key, kept, ttlMs === undefined ? undefined : { ttl: ttlMs });
    return kept;
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
