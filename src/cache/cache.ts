import type { CheckSnapshot, KeySnapshot } from "../store/store.js";

/** What to drop from caches after a change: one key (by hash) or every key of an owner. */
export type Invalidation = { kind: "key"; hash: string } | { kind: "owner"; ownerId: string } | { kind: "all" };

/** The in-process cache in front of everything else. Reads are synchronous. */
export interface LocalCache {
  /** What a Check reads of the key, null for a cached miss, or undefined when nothing is cached. */
  get(hash: string): CheckSnapshot | null | undefined;
  /**
   * Keeps what a Check reads of `snapshot` and returns that copy, which later Checks get from get().
   * `ttlMs` shortens the entry's life below the default (used while invalidations may be missed).
   */
  set(hash: string, snapshot: KeySnapshot, ttlMs?: number): CheckSnapshot;
  setMissing(hash: string, ttlMs?: number): void;
  invalidate(event: Invalidation): void;
  readonly size: number;
}

/**
 * Where the shared cache's invalidations stood when it was read. A snapshot read from the store
 * after that read is written back with it, and refused if the key or its owner was invalidated
 * in between (the store read may predate that change) or if the write comes too late to tell.
 */
export interface FillToken {
  readonly generation: number;
  readonly atMs: number;
}

/** One read of the shared cache: what it holds, and the token to fill it with a store read. */
export interface SharedRead {
  /** A snapshot, null for a cached miss, or undefined when nothing (trusted) is cached. */
  value: KeySnapshot | null | undefined;
  fill: FillToken;
  /**
   * What is left of the entry's lifetime in L2, in ms, when it has one: L1 keeps the entry no
   * longer, so a copy is never trusted past the TTL its first read started.
   */
  ttlMs?: number | undefined;
}

/** A cache shared by replicas (Redis). Reads are asynchronous. */
export interface SharedCache {
  get(hash: string): Promise<KeySnapshot | null | undefined>;
  read(hash: string): Promise<SharedRead>;
  /**
   * Stores a snapshot. With `fill` (from a read made before the store read), only if no
   * invalidation of the key or its owner came after that read; resolves false when refused.
   * Without it, the snapshot is taken as current.
   */
  set(hash: string, snapshot: KeySnapshot, fill?: FillToken): Promise<boolean>;
  setMissing(hash: string): Promise<void>;
  invalidate(event: Invalidation): Promise<void>;
  /**
   * Stops trusting every entry written so far, for all replicas. Used when this replica could
   * not hear invalidations for a while: one that failed to reach Redis then may have left a
   * stale entry behind.
   */
  distrustEarlierEntries(): Promise<void>;
}

/**
 * Tells every replica to drop cache entries. The local bus only reaches this process. A bus
 * sends `{kind: "all"}` to its handlers whenever `connected` changes, either way.
 */
export interface InvalidationBus {
  /** False while this replica may be missing other replicas' invalidations. */
  readonly connected: boolean;
  publish(event: Invalidation): Promise<void>;
  subscribe(handler: (event: Invalidation) => void): void;
  close(): Promise<void>;
}

/** The shared cache or bus failed; the store change was made, but replicas may not know yet. */
export class CacheUnavailableError extends Error {
  override readonly name = "CacheUnavailableError";
}
