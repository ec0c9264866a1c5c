import { Redis } from "ioredis";
import type { RedisOptions } from "ioredis";
import type { Logger } from "pino";
import { z } from "zod";
import type { KeySnapshot } from "../store/store.js";
import type { Invalidation, InvalidationBus, SharedCache } from "./cache.js";

/**
 * ioredis options for the hot path: commands are auto-pipelined, fail fast instead of queueing
 * while disconnected (no unbounded offline queue), and time out rather than hang a Check.
 */
export function redisOptions(overrides: RedisOptions = {}): RedisOptions {
  return {
    enableAutoPipelining: true,
    enableOfflineQueue: false,
    maxRetriesPerRequest: 1,
    connectTimeout: 2000,
    commandTimeout: 1000,
    lazyConnect: true,
    retryStrategy: (attempt: number) => Math.min(attempt * 100, 2000),
    ...overrides,
  };
}

/**
 * Opens a connection and waits until it is ready. Connection errors go to `logger` (ioredis
 * reconnects by itself); without a listener ioredis prints each one as an unhandled error event.
 */
export async function connectRedis(url: string, overrides: RedisOptions = {}, logger?: Logger): Promise<Redis> {
  const redis = new Redis(url, redisOptions(overrides));
  let lastMessage = "";
  let lastError: unknown = null;
  redis.on("error", (error: unknown) => {
    lastError = error;
    // One line per distinct failure, not one per reconnect attempt.
    const message = error instanceof Error ? error.message : String(error);
    if (message === lastMessage) return;
    lastMessage = message;
    logger?.warn({ err: withoutCommand(error) }, "Redis connection error");
  });
  redis.on("ready", () => {
    lastMessage = "";
  });
  try {
    await redis.connect();
  } catch (error) {
    redis.disconnect();
    throw new RedisConnectError(describeConnectFailure(lastError ?? error), { cause: withoutCommand(lastError ?? error) });
  }
  return redis;
}

/** Redis could not be reached or refused the connection when keygate started. */
export class RedisConnectError extends Error {
  override readonly name = "RedisConnectError";
}

/**
 * ioredis attaches the failed command to a reply error, and for HELLO or AUTH its arguments hold
 * the password: the copy that is logged leaves the command out.
 */
function withoutCommand(error: unknown): unknown {
  if (!(error instanceof Error) || !("command" in error)) return error;
  const copy = new Error(error.message);
  copy.name = error.name;
  copy.stack = error.stack ?? error.message;
  return copy;
}

/** One line on why a connection failed, from the error's code or Redis's reply; never the URL. */
function describeConnectFailure(error: unknown): string {
  const code = error instanceof Error && "code" in error && typeof error.code === "string" ? error.code : "";
  const message = error instanceof Error ? error.message : String(error);
  if (/^(WRONGPASS|NOAUTH|NOPERM)\b/.test(message)) return `Redis refused the credentials (${message.split(" ")[0]})`;
  if (code === "ECONNREFUSED") return "nothing accepts connections at that host and port (ECONNREFUSED)";
  if (code === "ENOTFOUND" || code === "EAI_AGAIN") return `the host name does not resolve (${code})`;
  if (code === "ETIMEDOUT" || /timeout/i.test(message)) return "the connection timed out";
  return `the connection failed (${code || message.slice(0, 120)})`;
}

const nullableString = z.string().nullable();
const nullableNumber = z.number().nullable();

const snapshotSchema = z.object({
  key: z.object({
    id: z.string(),
    hash: z.string(),
    ownerId: z.string(),
    projectId: nullableString,
    name: z.string(),
    mode: z.enum(["live", "test"]),
    start: z.string(),
    last4: z.string(),
    scopes: z.array(z.string()),
    metadata: z.record(z.string(), z.string()),
    createdAtMs: z.number(),
    lastUsedAtMs: nullableNumber,
    expiresAtMs: nullableNumber,
    revokedAtMs: nullableNumber,
    revokeReason: nullableString,
    graceEndsAtMs: nullableNumber,
    rotatedToId: nullableString,
    rateLimit: z.object({ limit: z.number(), windowSeconds: z.number() }).nullable(),
  }),
  account: z.object({
    ownerId: z.string(),
    plan: z.string(),
    subscriptionStatus: z.enum(["active", "none", "past_due", "canceled"]),
    role: z.enum(["standard", "premium", "admin"]),
    createdAtMs: z.number(),
    updatedAtMs: z.number(),
  }),
});

// Checked both ways, so the build breaks when KeySnapshot and the schema drift apart
// (a missing field, or an enum that gained a member the schema would reject).
type CachedSnapshot = z.infer<typeof snapshotSchema>;
true satisfies [CachedSnapshot, KeySnapshot] extends [KeySnapshot, CachedSnapshot] ? true : never;

const invalidationSchema = z.discriminatedUnion("kind", [
  z.object({ kind: z.literal("key"), hash: z.string() }),
  z.object({ kind: z.literal("owner"), ownerId: z.string() }),
  z.object({ kind: z.literal("all") }),
]);

/** DEL arguments per command when dropping an owner's snapshots; keeps one command bounded. */
const DELETE_BATCH = 500;

/** TTLs and key prefix of the Redis L2. */
export interface RedisCacheOptions {
  ttlSeconds: number;
  negativeTtlSeconds: number;
  /** Prepended to every key; default "kg:". */
  keyPrefix?: string;
}

/**
 * L2 in Redis: snapshots as JSON under `snap:<hash>`, cached misses under `miss:<hash>`, and a
 * set of hashes per owner under `owner:<ownerId>` so an account change can drop all of its
 * snapshots. A read is one MGET. Redis errors propagate; the caller decides how to degrade.
 */
export class RedisSharedCache implements SharedCache {
  readonly #redis: Redis;
  readonly #ttlSeconds: number;
  readonly #negativeTtlSeconds: number;
  readonly #prefix: string;

  constructor(redis: Redis, options: RedisCacheOptions) {
    this.#redis = redis;
    this.#ttlSeconds = options.ttlSeconds;
    this.#negativeTtlSeconds = options.negativeTtlSeconds;
    this.#prefix = options.keyPrefix ?? "kg:";
  }

  /** A snapshot, null for a cached miss, undefined when nothing (valid) is cached. */
  async get(hash: string): Promise<KeySnapshot | null | undefined> {
    const snapKey = this.#snapKey(hash);
    const [snap, miss] = await this.#redis.mget(snapKey, this.#missKey(hash));
    // A snapshot wins over a miss marker: a miss written late by a slow replica is older news.
    if (snap !== null && snap !== undefined) {
      const parsed = parseSnapshot(snap);
      if (parsed !== undefined) return parsed;
      await this.#redis.del(snapKey);
      return undefined;
    }
    return miss === null || miss === undefined ? undefined : null;
  }

  /** Stores the snapshot, clears a miss marker and indexes the hash under its owner, atomically. */
  async set(hash: string, snapshot: KeySnapshot): Promise<void> {
    const ownerKey = this.#ownerKey(snapshot.account.ownerId);
    const results = await this.#redis
      .multi()
      .set(this.#snapKey(hash), JSON.stringify(snapshot), "EX", this.#ttlSeconds)
      .del(this.#missKey(hash))
      .sadd(ownerKey, hash)
      // Each write pushes the index's expiry past that of every snapshot it lists.
      .expire(ownerKey, this.#ttlSeconds)
      .exec();
    throwFirstError(results);
  }

  /** Remembers that no key has this hash, for the negative TTL. */
  async setMissing(hash: string): Promise<void> {
    await this.#redis.set(this.#missKey(hash), "1", "EX", this.#negativeTtlSeconds);
  }

  /**
   * Deletes the entries of a key or of every key of an owner. `all` deletes nothing here: it is
   * an L1-only signal (a replica that lost its subscription), and L2 entries stay valid because
   * every change deletes them before it is published.
   */
  async invalidate(event: Invalidation): Promise<void> {
    switch (event.kind) {
      case "key":
        await this.#redis.del(this.#snapKey(event.hash), this.#missKey(event.hash));
        return;
      case "owner":
        await this.#invalidateOwner(event.ownerId);
        return;
      case "all":
        return;
    }
  }

  async #invalidateOwner(ownerId: string): Promise<void> {
    const ownerKey = this.#ownerKey(ownerId);
    const hashes = await this.#redis.smembers(ownerKey);
    const keys = [...hashes.map((hash) => this.#snapKey(hash)), ownerKey];
    for (let i = 0; i < keys.length; i += DELETE_BATCH) {
      await this.#redis.del(...keys.slice(i, i + DELETE_BATCH));
    }
  }

  #snapKey(hash: string): string {
    return `${this.#prefix}snap:${hash}`;
  }

  #missKey(hash: string): string {
    return `${this.#prefix}miss:${hash}`;
  }

  #ownerKey(ownerId: string): string {
    return `${this.#prefix}owner:${ownerId}`;
  }
}

function parseSnapshot(text: string): KeySnapshot | undefined {
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch {
    return undefined;
  }
  const result = snapshotSchema.safeParse(json);
  return result.success ? result.data : undefined;
}

function parseInvalidation(text: string): Invalidation | undefined {
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch {
    return undefined;
  }
  const result = invalidationSchema.safeParse(json);
  return result.success ? result.data : undefined;
}

/** MULTI reports a failed command inside its results rather than rejecting. */
function throwFirstError(results: Array<[error: Error | null, result: unknown]> | null): void {
  if (results === null) throw new Error("Redis transaction was aborted");
  for (const [error] of results) if (error !== null) throw error;
}

/** Channel and logger of the Redis invalidation bus. */
export interface RedisInvalidationBusOptions {
  /** Pub/sub channel shared by every replica; default "keygate:invalidate". */
  channel?: string;
  logger?: Logger;
}

/**
 * Cross-replica invalidation over Redis pub/sub. The bus borrows both connections: the caller
 * opens them, and closes them after `close()`. `subscriber` must be ready before `start()` and
 * is used for nothing else, since a subscribed connection cannot run other commands. When the
 * subscription drops, and again once it is back, handlers get `{kind: "all"}`: invalidations
 * sent in between were missed.
 */
export class RedisInvalidationBus implements InvalidationBus {
  readonly #publisher: Redis;
  readonly #subscriber: Redis;
  readonly #channel: string;
  readonly #logger: Logger | undefined;
  readonly #handlers: Array<(event: Invalidation) => void> = [];
  #connected = false;
  #listening = false;

  /** The third argument may still be a bare logger (the earlier signature). */
  constructor(publisher: Redis, subscriber: Redis, options: RedisInvalidationBusOptions | Logger = {}) {
    const { channel, logger } = "info" in options ? { channel: undefined, logger: options } : options;
    this.#publisher = publisher;
    this.#subscriber = subscriber;
    this.#channel = channel ?? "keygate:invalidate";
    this.#logger = logger;
  }

  /** True while the subscription is live; while false, this replica may miss invalidations. */
  get connected(): boolean {
    return this.#connected;
  }

  /** Subscribes; resolves once Redis has confirmed the subscription. */
  async start(): Promise<void> {
    if (this.#listening) return;
    this.#listening = true;
    this.#subscriber.on("message", this.#onMessage);
    this.#subscriber.on("close", this.#onDrop);
    this.#subscriber.on("ready", this.#onReady);
    await this.#subscriber.subscribe(this.#channel);
    this.#connected = true;
  }

  /** Sends the event to every replica's handlers, this one's included. */
  async publish(event: Invalidation): Promise<void> {
    await this.#publisher.publish(this.#channel, JSON.stringify(event));
  }

  subscribe(handler: (event: Invalidation) => void): void {
    this.#handlers.push(handler);
  }

  /** Unsubscribes and drops the handlers; the connections stay open for their owner to close. */
  async close(): Promise<void> {
    const wasListening = this.#listening;
    this.#listening = false;
    this.#connected = false;
    this.#handlers.length = 0;
    this.#subscriber.off("message", this.#onMessage);
    this.#subscriber.off("close", this.#onDrop);
    this.#subscriber.off("ready", this.#onReady);
    if (!wasListening || this.#subscriber.status !== "ready") return;
    try {
      await this.#subscriber.unsubscribe(this.#channel);
    } catch (error) {
      // Shutdown goes on: the owner is about to close the connection anyway.
      this.#logger?.warn({ err: error }, "could not unsubscribe from invalidations");
    }
  }

  readonly #onMessage = (channel: string, message: string): void => {
    if (channel !== this.#channel) return;
    const event = parseInvalidation(message);
    if (event === undefined) {
      this.#logger?.warn({ channel, length: message.length }, "ignored a malformed invalidation message");
      return;
    }
    this.#emit(event);
  };

  readonly #onDrop = (): void => {
    if (!this.#connected) return;
    this.#connected = false;
    this.#logger?.warn({ channel: this.#channel }, "invalidation subscription lost; clearing L1");
    this.#emit({ kind: "all" });
  };

  readonly #onReady = (): void => {
    if (this.#connected || !this.#listening) return;
    void this.#resubscribe();
  };

  /**
   * ioredis re-subscribes on its own after "ready", but without telling us when it is done.
   * Subscribing again and awaiting it means "all" goes out only once no event can slip by.
   */
  async #resubscribe(): Promise<void> {
    try {
      await this.#subscriber.subscribe(this.#channel);
    } catch (error) {
      // The connection dropped again; the next "ready" retries.
      this.#logger?.warn({ err: error }, "re-subscribing to invalidations failed");
      return;
    }
    if (this.#connected || !this.#listening) return;
    this.#connected = true;
    this.#logger?.info({ channel: this.#channel }, "invalidation subscription restored; clearing L1");
    this.#emit({ kind: "all" });
  }

  #emit(event: Invalidation): void {
    for (const handler of this.#handlers) {
      try {
        handler(event);
      } catch (error) {
        // One failing handler must not keep the others from dropping their entries.
        this.#logger?.error({ err: error, event }, "invalidation handler failed");
      }
    }
  }
}
