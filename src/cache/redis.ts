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

/** Opens a connection and waits until it is ready. */
export async function connectRedis(url: string, overrides: RedisOptions = {}): Promise<Redis> {
  const redis = new Redis(url, redisOptions(overrides));
  await redis.connect();
  return redis;
}

const snapshotSchema = z.object({
  key: z.object({
    id: z.string(),
    hash: z.string(),
    ownerId: z.string(),
    projectId: z.string().nullable(),
    name: z.string(),
    mode: z.enum(["live", "test"]),
    start: z.string(),
    last4: z.string(),
    scopes: z.array(z.string()),
    metadata: z.record(z.string(), z.string()),
    createdAtMs: z.number(),
    lastUsedAtMs: z.number().nullable(),
    expiresAtMs: z.number().nullable(),
    revokedAtMs: z.number().nullable(),
    revokeReason: z.string().nullable(),
    graceEndsAtMs: z.number().nullable(),
    rotatedToId: z.string().nullable(),
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

const invalidationSchema = z.discriminatedUnion("kind", [
  z.object({ kind: z.literal("key"), hash: z.string() }),
  z.object({ kind: z.literal("owner"), ownerId: z.string() }),
  z.object({ kind: z.literal("all") }),
]);

/** TTLs and key prefix of the Redis L2. */
export interface RedisCacheOptions {
  ttlSeconds: number;
  negativeTtlSeconds: number;
  keyPrefix?: string;
}

/**
 * L2 in Redis: snapshots as JSON under `snap:<hash>`, cached misses under `miss:<hash>`, and a
 * set per owner so an account change can drop all of its snapshots. A read is one MGET.
 */
export class RedisSharedCache implements SharedCache {
  readonly #prefix: string;

  constructor(
    private readonly redis: Redis,
    private readonly options: RedisCacheOptions,
  ) {
    this.#prefix = options.keyPrefix ?? "kg:";
  }

  async get(hash: string): Promise<KeySnapshot | null | undefined> {
    const snapKey = `${this.#prefix}snap:${hash}`;
    const [snap, miss] = await this.redis.mget(snapKey, `${this.#prefix}miss:${hash}`);
    if (snap !== null && snap !== undefined) {
      const parsed = this.#parse(snap);
      if (parsed !== undefined) return parsed;
      await this.redis.del(snapKey);
      return undefined;
    }
    return miss === null || miss === undefined ? undefined : null;
  }

  #parse(text: string): KeySnapshot | undefined {
    let json: unknown;
    try {
      json = JSON.parse(text);
    } catch {
      return undefined;
    }
    const result = snapshotSchema.safeParse(json);
    return result.success ? result.data : undefined;
  }

  async set(hash: string, snapshot: KeySnapshot): Promise<void> {
    const ownerKey = `${this.#prefix}owner:${snapshot.account.ownerId}`;
    await this.redis
      .multi()
      .set(`${this.#prefix}snap:${hash}`, JSON.stringify(snapshot), "EX", this.options.ttlSeconds)
      .del(`${this.#prefix}miss:${hash}`)
      .sadd(ownerKey, hash)
      .expire(ownerKey, this.options.ttlSeconds)
      .exec();
  }

  async setMissing(hash: string): Promise<void> {
    await this.redis.set(`${this.#prefix}miss:${hash}`, "1", "EX", this.options.negativeTtlSeconds);
  }

  /** `all` is an L1-only signal (a replica that lost its subscription); L2 keeps its entries. */
  async invalidate(event: Invalidation): Promise<void> {
    switch (event.kind) {
      case "key":
        await this.redis.del(`${this.#prefix}snap:${event.hash}`, `${this.#prefix}miss:${event.hash}`);
        return;
      case "owner": {
        const ownerKey = `${this.#prefix}owner:${event.ownerId}`;
        const hashes = await this.redis.smembers(ownerKey);
        await this.redis.del(ownerKey, ...hashes.map((h) => `${this.#prefix}snap:${h}`));
        return;
      }
      case "all":
        return;
    }
  }
}

/**
 * Cross-replica invalidation over Redis pub/sub. The bus uses the connections it is given and
 * does not close them. When the subscription drops, and again when it is back, handlers get
 * `{kind: "all"}`: invalidations sent in between were missed.
 */
export class RedisInvalidationBus implements InvalidationBus {
  readonly #handlers: Array<(event: Invalidation) => void> = [];
  readonly #channel: string;
  #connected = false;
  #listening = false;

  constructor(
    private readonly publisher: Redis,
    private readonly subscriber: Redis,
    private readonly logger?: Logger,
    channel = "keygate:invalidate",
  ) {
    this.#channel = channel;
  }

  /** True while the subscription is live; while false, L1 entries may miss invalidations. */
  get connected(): boolean {
    return this.#connected;
  }

  /** Subscribes; resolves once the subscription is confirmed. */
  async start(): Promise<void> {
    if (this.#listening) return;
    this.#listening = true;
    this.subscriber.on("message", this.#onMessage);
    this.subscriber.on("close", this.#onDrop);
    this.subscriber.on("ready", this.#onReady);
    await this.subscriber.subscribe(this.#channel);
    this.#connected = true;
  }

  readonly #onMessage = (channel: string, message: string): void => {
    if (channel !== this.#channel) return;
    let json: unknown;
    try {
      json = JSON.parse(message);
    } catch {
      json = undefined;
    }
    const parsed = invalidationSchema.safeParse(json);
    if (!parsed.success) {
      this.logger?.warn({ channel }, "ignored a malformed invalidation message");
      return;
    }
    this.#emit(parsed.data);
  };

  readonly #onDrop = (): void => {
    if (!this.#connected) return;
    this.#connected = false;
    this.logger?.warn("invalidation subscription lost; clearing L1");
    this.#emit({ kind: "all" });
  };

  readonly #onReady = (): void => {
    if (this.#connected) return;
    // ioredis re-subscribes on reconnect; anything published meanwhile was missed.
    this.#connected = true;
    this.logger?.info("invalidation subscription restored; clearing L1");
    this.#emit({ kind: "all" });
  };

  #emit(event: Invalidation): void {
    for (const handler of this.#handlers) handler(event);
  }

  async publish(event: Invalidation): Promise<void> {
    await this.publisher.publish(this.#channel, JSON.stringify(event));
  }

  subscribe(handler: (event: Invalidation) => void): void {
    this.#handlers.push(handler);
  }

  async close(): Promise<void> {
    this.subscriber.off("message", this.#onMessage);
    this.subscriber.off("close", this.#onDrop);
    this.subscriber.off("ready", this.#onReady);
    this.#handlers.length = 0;
    if (this.#listening && this.subscriber.status === "ready") await this.subscriber.unsubscribe(this.#channel);
    this.#listening = false;
  }
}
