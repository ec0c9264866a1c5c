import type { KeySnapshot } from "../store/store.js";

/** What to drop from caches after a change: one key (by hash) or every key of an owner. */
export type Invalidation = { kind: "key"; hash: string } | { kind: "owner"; ownerId: string } | { kind: "all" };

/** The in-process cache in front of everything else. Reads are synchronous. */
export interface LocalCache {
  /** A snapshot, null for a cached miss, or undefined when nothing is cached. */
  get(hash: string): KeySnapshot | null | undefined;
  /** `ttlMs` shortens the entry's life below the default (used while invalidations may be missed). */
  set(hash: string, snapshot: KeySnapshot, ttlMs?: number): void;
  setMissing(hash: string, ttlMs?: number): void;
  invalidate(event: Invalidation): void;
  readonly size: number;
}

/** A cache shared by replicas (Redis). Reads are asynchronous. */
export interface SharedCache {
  get(hash: string): Promise<KeySnapshot | null | undefined>;
  set(hash: string, snapshot: KeySnapshot): Promise<void>;
  setMissing(hash: string): Promise<void>;
  invalidate(event: Invalidation): Promise<void>;
}

/** Tells every replica to drop cache entries. The local bus only reaches this process. */
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
