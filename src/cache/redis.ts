import { createHash, randomUUID } from "node:crypto";
import { Socket } from "node:net";
import { Cluster, Redis } from "ioredis";
import type { RedisOptions } from "ioredis";
import type { Logger } from "pino";
import { z } from "zod";
import { LogThrottle } from "../log-throttle.js";
import type { KeySnapshot } from "../store/store.js";
import type { FillToken, Invalidation, InvalidationBus, SharedCache, SharedRead } from "./cache.js";
import type { RedisClient, SubscriberConnection } from "./redis-client.js";

/**
 * How long a connection may go without a byte from Redis while a command waits (redisOptions).
 * A healthy connection never comes near it: keygate sends no blocking command, waits at most
 * 500 ms server-side (WAIT), and its scripts are short. It is over twice the command timeout: a
 * command that fails on a stalled connection may be followed there by one more (ChargeUsage's
 * failure mark goes on the connection that carried the charge, so it lands after it), and both
 * are decided by their own timeouts before the connection is dropped, which would leave the
 * mark to be sent again on another connection.
 */
export const SOCKET_TIMEOUT_MS = 3000;

/**
 * ioredis options for the hot path: commands fail fast instead of queueing while disconnected
 * (no unbounded offline queue), and time out rather than hang a Check. Each command is written
 * as it is issued, not auto-pipelined: with ioredis's auto-pipelining, every Check's objects
 * (its stream, its request, the pipeline's callbacks) outlived young-generation GCs and were
 * promoted, about 1.2 MB a scavenge at 3,000 Checks/s against 7 KB without it, and the old
 * generation then filled for the mark-compacts that set the p99 (docs/performance-log.md).
 * A command whose connection resets before its answer fails at once and is never sent again:
 * Redis may have run it (the answer was lost, not the command), and the charge script is not
 * idempotent, so a resent Check's charge would be made twice. The reset is a Redis failure, left
 * to each caller (limits.onRedisError, the idempotency ledger's retry, the store for L2 reads).
 */
export function redisOptions(overrides: RedisOptions = {}): RedisOptions {
  return {
    enableAutoPipelining: false,
    enableOfflineQueue: false,
    // 0: the commands written on a connection that closes are failed when it closes; with 1 they
    // would wait for the next connection, and be sent again on it (autoResendUnfulfilledCommands)
    // or, with that off, only time out (commandTimeout).
    maxRetriesPerRequest: 0,
    autoResendUnfulfilledCommands: false,
    connectTimeout: 2000,
    commandTimeout: 1000,
    // A server that stops answering without closing the socket (frozen, a hung VM, a partition
    // that drops packets) would hold the connection for good: commands only time out, and
    // ioredis never reconnects, so through Sentinel it never asks the Sentinels for the new
    // master. This drops a socket from which nothing has come for SOCKET_TIMEOUT_MS while a
    // command waits; any reply resets it.
    socketTimeout: SOCKET_TIMEOUT_MS,
    lazyConnect: true,
    retryStrategy: (attempt: number) => Math.min(attempt * 100, 2000),
    ...overrides,
  };
}

/** Uncorks a connection's socket: the writes held since holdWritesForThisTurn go out as one. */
function release(stream: { uncork(): void }): void {
  stream.uncork();
}

/**
 * Holds a standalone connection's writes until the current turn's callbacks and promise
 * reactions have run, then sends them in one write (Node's cork, uncorked on the next tick). A
 * Cluster spreads commands over many sockets and is left alone.
 */
export function holdWritesForThisTurn(redis: Redis | Cluster): void {
  if (!(redis instanceof Redis) || redis.status !== "ready") return;
  const stream: unknown = redis.stream;
  if (!(stream instanceof Socket) || stream.destroyed || stream.writableCorked > 0) return;
  stream.cork();
  process.nextTick(release, stream);
}

/**
 * Opens a connection and waits until it is ready. Connection errors go to `logger` (ioredis
 * reconnects by itself); without a listener ioredis prints each one as an unhandled error event.
 */
export async function connectRedis(url: string, overrides: RedisOptions = {}, logger?: Logger): Promise<Redis> {
  let redis: Redis;
  try {
    redis = new Redis(url, redisOptions(overrides));
  } catch {
    // ioredis parses the URL here, and new URL()'s TypeError quotes all of it, password included:
    // the error is dropped, not kept as the cause.
    throw new RedisConnectError("the URL does not parse; percent-encode / ? # @ % in the user name and password");
  }
  const lastError = logConnectionErrors(redis, logger);
  try {
    await redis.connect();
  } catch (error) {
    redis.disconnect();
    const failure = lastError() ?? error;
    throw new RedisConnectError(describeConnectFailure(failure), { cause: withoutCommand(failure), unanswered: isUnanswered(failure) });
  }
  return redis;
}

/** How many distinct error messages a connection logs at most between two readies. */
const DISTINCT_ERRORS_LOGGED = 16;

/**
 * Logs a connection's errors, one line per distinct message until it is ready again, not one per
 * reconnect attempt: against a server that stops answering without closing its sockets, each
 * attempt connects and then fails in turn on the socket timeout and on the ready check's command
 * timeout, for as long as the server stays that way. Returns the latest error, for the start's
 * one line when it never gets ready.
 */
export function logConnectionErrors(client: Redis | Cluster, logger: Logger | undefined): () => unknown {
  const logged = new Set<string>();
  let lastError: unknown = null;
  client.on("error", (error: unknown) => {
    lastError = error;
    const message = error instanceof Error ? error.message : String(error);
    if (logged.has(message) || logged.size >= DISTINCT_ERRORS_LOGGED) return;
    logged.add(message);
    logger?.warn({ err: withoutCommand(error) }, "Redis connection error");
  });
  client.on("ready", () => logged.clear());
  return () => lastError;
}

/** Redis could not be reached or refused the connection when keygate started. */
export class RedisConnectError extends Error {
  override readonly name = "RedisConnectError";
  /** The server did not answer (isUnanswered), rather than refusing the connection's credentials or certificate. */
  readonly unanswered: boolean;

  constructor(message: string, options: { cause?: unknown; unanswered?: boolean } = {}) {
    super(message, { cause: options.cause });
    this.unanswered = options.unanswered ?? false;
  }
}

/**
 * ioredis attaches the failed command to a reply error, and for HELLO or AUTH its arguments hold
 * the password: the copy that is logged leaves the command out.
 */
export function withoutCommand(error: unknown): unknown {
  if (!(error instanceof Error) || !("command" in error)) return error;
  const copy = new Error(error.message);
  copy.name = error.name;
  copy.stack = error.stack ?? error.message;
  return copy;
}

/**
 * Whether a connection failed because nothing answered (refused, a name that does not resolve
 * yet, a reset, a timeout): a Redis still starting. Refused credentials (WRONGPASS, NOAUTH,
 * NOPERM) and a certificate not trusted are not.
 */
export function isUnanswered(error: unknown): boolean {
  const code = error instanceof Error && "code" in error && typeof error.code === "string" ? error.code : "";
  const message = error instanceof Error ? error.message : String(error);
  if (/CERT|SIGNATURE|ISSUER|ERR_TLS|ERR_SSL/.test(code)) return false;
  if (UNANSWERED_CODES.has(code)) return true;
  return /^All sentinels are unreachable|^Failed to refresh slots cache|^Connection is closed|timeout/i.test(message);
}

const UNANSWERED_CODES = new Set(["ECONNREFUSED", "ENOTFOUND", "EAI_AGAIN", "ETIMEDOUT", "ECONNRESET", "EHOSTUNREACH", "ENETUNREACH", "EPIPE"]);

/** One line on why a connection failed, from the error's code or Redis's reply; never the URL. */
export function describeConnectFailure(error: unknown): string {
  const code = error instanceof Error && "code" in error && typeof error.code === "string" ? error.code : "";
  const message = error instanceof Error ? error.message : String(error);
  if (/^(WRONGPASS|NOAUTH|NOPERM)\b/.test(message)) return `Redis refused the credentials (${message.split(" ")[0]})`;
  if (code === "ECONNREFUSED") return "nothing accepts connections at that host and port (ECONNREFUSED)";
  if (code === "ENOTFOUND" || code === "EAI_AGAIN") return `the host name does not resolve (${code})`;
  if (/^All sentinels are unreachable/.test(message)) return "no Sentinel answered";
  if (/^Failed to refresh slots cache/.test(message)) return "no seed node of the Cluster answered";
  if (/^SENTINEL|No master|master name/i.test(message)) return `the Sentinels do not know that master (${message.slice(0, 120)})`;
  if (code === "ETIMEDOUT" || /timeout/i.test(message)) return "the connection timed out";
  // Node's certificate verification codes (UNABLE_TO_VERIFY_LEAF_SIGNATURE, ...) and hostname mismatch.
  if (/CERT|SIGNATURE|ISSUER|ERR_TLS|ERR_SSL/.test(code)) return `the server's TLS certificate was not accepted (${code}); set KEYGATE_REDIS_TLS_CA_FILE to the CA that signed it`;
  return `the connection failed (${code || message.slice(0, 120)})`;
}

const nullableString = z.string().nullable();
// zod 4's z.number() refuses NaN and ±Infinity: a time read back is a time or null, never neither.
const nullableNumber = z.number().nullable();

export const snapshotSchema = z.object({
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
    rateLimit: z.object({ limit: z.number().int().positive(), windowSeconds: z.number().int().positive() }).nullable(),
    disabledAtMs: nullableNumber,
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
/**
 * How many hashes an owner's index may hold before a fill prunes it, whatever it kept at its
 * last pruning: an owner with a few live keys is not pruned at every other fill.
 */
export const OWNER_INDEX_PRUNE_FLOOR = 64;

/**
 * How long after its cache read a store read may still be written to L2. Above a slow store
 * read (MongoDB's lookup deadline is 1 s); a write held up longer (Redis frozen with it in the
 * socket, a partition) is refused, since invalidations may have come and gone meanwhile.
 */
const FILL_WINDOW_MS = 5000;
/** How long an invalidation keeps refusing fills read before it: well past FILL_WINDOW_MS. */
const MARKER_TTL_SECONDS = 60;

// L2 entries carry the invalidation generation they were read under: "<generation>|<json>".
// `gen` counts invalidations; `floor` is the lowest generation still trusted. Older entries,
// and entries without a generation (written by an earlier version), read as not cached.
// KEYS: snapshot, miss marker, gen, floor.
// Reply: status (0 nothing, 1 snapshot, 2 cached miss), snapshot JSON, generation, Redis time ms,
// what is left of the entry's lifetime in ms (PTTL: -1 for none).
const READ = `
local gen = tonumber(redis.call('GET', KEYS[3]) or '0')
local t = redis.call('TIME')
local nowMs = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local v = redis.call('GET', KEYS[1])
if v then
  local sep = string.find(v, '|', 1, true)
  local stamp = sep and tonumber(string.sub(v, 1, sep - 1))
  if stamp and stamp >= tonumber(redis.call('GET', KEYS[4]) or '0') then
    return {1, string.sub(v, sep + 1), gen, nowMs, redis.call('PTTL', KEYS[1])}
  end
  redis.call('DEL', KEYS[1])
end
if redis.call('EXISTS', KEYS[2]) == 1 then return {2, '', gen, nowMs, redis.call('PTTL', KEYS[2])} end
return {0, '', gen, nowMs, -1}
`;

// Writes a snapshot read from the store, unless the key or its owner was invalidated after the
// cache read that preceded the store read (its marker is newer), everything before some point
// was distrusted since (floor), or the write comes more than the fill window after that read.
// The owner index's lifetime is only ever lengthened: replicas may run different cache TTLs (one
// restarted after a policy edit), and a shorter one would let the index expire before snapshots
// the others wrote, so an account change would find none of them to delete. PTTL is -1 for the
// set SADD has just made.
// The index is pruned here too. A hash stays listed when its snapshot expires, or is deleted
// other than by INVALIDATE_KEY (READ dropping a stale entry, the plain-DEL fallback, a replica of
// an earlier release), and an index kept alive by one key in use would grow with every key the
// owner ever used, for INVALIDATE_OWNER to walk in one script.
// Once it holds more than twice the members it kept at its last pruning (and more than the
// floor), the members whose snapshot is gone are removed, in this script, so no fill can write
// one of them back between the look and the removal; a member whose snapshot exists always
// stays. That costs O(1) a fill, amortized. The size kept is lowered when the index is found
// smaller (deleted and made again, or members removed), and lives as long as the index.
// KEYS: snapshot, miss marker, owner index, gen, floor, key marker, owner marker, index size kept.
// ARGV: generation ("" for a snapshot known to be current), read time ms, JSON, TTL ms, window ms,
// hash, snapshot key prefix, pruning floor.
const FILL = `
local stamp = ARGV[1]
if stamp == '' then
  stamp = redis.call('GET', KEYS[4]) or '0'
else
  local g = tonumber(stamp)
  if g < tonumber(redis.call('GET', KEYS[5]) or '0') then return 0 end
  if tonumber(redis.call('GET', KEYS[6]) or '0') > g then return 0 end
  if tonumber(redis.call('GET', KEYS[7]) or '0') > g then return 0 end
  local t = redis.call('TIME')
  local age = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - tonumber(ARGV[2])
  if age < 0 or age > tonumber(ARGV[5]) then return 0 end
end
redis.call('SET', KEYS[1], stamp .. '|' .. ARGV[3], 'PX', ARGV[4])
redis.call('DEL', KEYS[2])
redis.call('SADD', KEYS[3], ARGV[6])
local life = redis.call('PTTL', KEYS[3])
if life < tonumber(ARGV[4]) then
  life = tonumber(ARGV[4])
  redis.call('PEXPIRE', KEYS[3], life)
end
local kept = tonumber(redis.call('GET', KEYS[8]) or '0') or 0
local size = redis.call('SCARD', KEYS[3])
if size > math.max(2 * kept, tonumber(ARGV[8])) then
  for _, hash in ipairs(redis.call('SMEMBERS', KEYS[3])) do
    if redis.call('EXISTS', ARGV[7] .. hash) == 0 then redis.call('SREM', KEYS[3], hash) end
  end
  redis.call('SET', KEYS[8], redis.call('SCARD', KEYS[3]), 'PX', life)
elseif size < kept then
  redis.call('SET', KEYS[8], size, 'PX', life)
elseif kept > 0 and redis.call('PTTL', KEYS[8]) < life then
  redis.call('PEXPIRE', KEYS[8], life)
end
return 1
`;

// The next generation. A counter that is missing (a new Redis, or one that lost its data: FLUSHALL,
// a restart without persistence, an eviction) starts again from Redis's clock in microseconds, not
// from 1: a fill token read before the loss holds an older generation than any marker set after
// it, so it is refused as every token read before an invalidation is. Written with %.0f, as a
// whole number INCR takes.
const NEXT_GENERATION = `
local function nextGeneration(genKey)
  if redis.call('EXISTS', genKey) == 0 then
    local t = redis.call('TIME')
    redis.call('SET', genKey, string.format('%.0f', tonumber(t[1]) * 1000000 + tonumber(t[2])))
  end
  return redis.call('INCR', genKey)
end
`;

// Invalidates one key: a new generation, the key's marker at it, and its entries deleted. The
// hash leaves its owner's index with the snapshot: the owner is read from the snapshot itself
// ("<generation>|<json>", or bare JSON from a release before generations), since the invalidation
// names only the hash. So the index's name is built here (undeclared, as INVALIDATE_OWNER's
// snapshot names: the L2 prefix's hash tag keeps it in the same Cluster slot). redis.pcall: an
// index that is not a set must not fail the invalidation, whose deletions are made by then.
// KEYS: snapshot, miss marker, gen, key marker. ARGV: marker TTL s, owner index prefix, hash.
const INVALIDATE_KEY = `${NEXT_GENERATION}
local g = nextGeneration(KEYS[3])
redis.call('SET', KEYS[4], g, 'EX', ARGV[1])
local v = redis.call('GET', KEYS[1])
redis.call('DEL', KEYS[1], KEYS[2])
if v then
  local sep = string.sub(v, 1, 1) ~= '{' and string.find(v, '|', 1, true)
  local ok, snapshot = pcall(cjson.decode, sep and string.sub(v, sep + 1) or v)
  local account = ok and type(snapshot) == 'table' and snapshot.account
  if type(account) == 'table' and type(account.ownerId) == 'string' then
    redis.pcall('SREM', ARGV[2] .. account.ownerId, ARGV[3])
  end
end
return g
`;

// Invalidates every key of an owner, in one step so a fill cannot slip between listing the
// owner's hashes and deleting them. KEYS: owner index, gen, owner marker, index size kept.
// ARGV: marker TTL s, snapshot key prefix, batch size.
const INVALIDATE_OWNER = `${NEXT_GENERATION}
local g = nextGeneration(KEYS[2])
redis.call('SET', KEYS[3], g, 'EX', ARGV[1])
local hashes = redis.call('SMEMBERS', KEYS[1])
local batch = tonumber(ARGV[3])
for i = 1, #hashes, batch do
  local keys = {}
  for j = i, math.min(i + batch - 1, #hashes) do keys[#keys + 1] = ARGV[2] .. hashes[j] end
  redis.call('DEL', unpack(keys))
end
redis.call('DEL', KEYS[1], KEYS[4])
return g
`;

// Distrusts every entry written so far. KEYS: gen, floor.
const DISTRUST = `${NEXT_GENERATION}
local g = nextGeneration(KEYS[1])
redis.call('SET', KEYS[2], g)
return g
`;

const readReply = z.tuple([z.number(), z.string(), z.number(), z.number(), z.number()]);

/** TTLs and key prefix of the Redis L2. */
export interface RedisCacheOptions {
  /** Any positive number of seconds, as the policy allows (a fraction too). */
  ttlSeconds: number;
  negativeTtlSeconds: number;
  /** Prepended to every key; default "kg:". */
  keyPrefix?: string;
  /**
   * Runs after an invalidation is written and throws when it cannot be trusted to last (through
   * Sentinel: no replica holds it and this node may no longer be the master). It then counts as
   * not made: the caller retries it, and the admin call answers UNAVAILABLE.
   */
  confirmInvalidation?: () => Promise<void>;
  /**
   * The connection invalidations are written on, when not the main one: confirmInvalidation may
   * block its connection (WAIT), which must not hold up the Checks queued on the main one.
   */
  invalidationConnection?: RedisClient;
}



/**
 * L2 in Redis: snapshots under `snap:<hash>` (with the generation they were read under), cached
 * misses under `miss:<hash>`, and a set of hashes per owner under `owner:<ownerId>` so an
 * account change can drop all of its snapshots (kept within about twice the owner's live
 * snapshots: see FILL). A read is one script call. Redis errors propagate; the caller decides how
 * to degrade.
 */
export class RedisSharedCache implements SharedCache {
  readonly #redis: RedisClient;
  readonly #invalidator: RedisClient;
  readonly #ttlMs: number;
  readonly #negativeTtlMs: number;
  readonly #prefix: string;
  readonly #genKey: string;
  readonly #floorKey: string;
  readonly #confirm: () => Promise<void>;
  readonly #sha = new Map<string, string>();

  constructor(redis: RedisClient, options: RedisCacheOptions) {
    this.#confirm = options.confirmInvalidation ?? (async () => undefined);
    this.#invalidator = options.invalidationConnection ?? redis;
    this.#redis = redis;
    // In whole milliseconds (PX, PEXPIRE): the policy takes a fraction of a second, which L1
    // honours, and Redis refuses one for EX and EXPIRE, so every fill and miss marker would fail.
    // Replicas of an earlier release still write with EX during a rolling upgrade; the unit is
    // each command's own, so their entries and these mix.
    this.#ttlMs = Math.max(1, Math.round(options.ttlSeconds * 1000));
    this.#negativeTtlMs = Math.max(1, Math.round(options.negativeTtlSeconds * 1000));
    this.#prefix = options.keyPrefix ?? "kg:";
    this.#genKey = `${this.#prefix}l2:gen`;
    this.#floorKey = `${this.#prefix}l2:floor`;
  }

  async #run(script: string, keys: string[], args: Array<string | number>, redis: RedisClient = this.#redis): Promise<unknown> {
    let sha = this.#sha.get(script);
    if (sha === undefined) {
      sha = createHash("sha1").update(script).digest("hex");
      this.#sha.set(script, sha);
    }
    return redis.evalsha(sha, keys.length, ...keys, ...args).catch((error: unknown) => {
      if (!(error instanceof Error) || !error.message.startsWith("NOSCRIPT")) throw error;
      return redis.eval(script, keys.length, ...keys, ...args);
    });
  }

  /** A snapshot, null for a cached miss, undefined when nothing (valid) is cached. */
  async get(hash: string): Promise<KeySnapshot | null | undefined> {
    return (await this.read(hash)).value;
  }

  async read(hash: string): Promise<SharedRead> {
    const snapKey = this.#snapKey(hash);
    const reply = readReply.safeParse(await this.#run(READ, [snapKey, this.#missKey(hash), this.#genKey, this.#floorKey], []));
    if (!reply.success) throw new Error("unexpected reply from the L2 read script");
    const [status, json, generation, atMs, leftMs] = reply.data;
    const fill: FillToken = { generation, atMs };
    const ttlMs = leftMs > 0 ? leftMs : undefined;
    if (status === 2) return { value: null, fill, ttlMs };
    if (status !== 1) return { value: undefined, fill };
    const parsed = parseSnapshot(json);
    if (parsed === OTHER_FORMAT) return { value: undefined, fill };
    if (parsed !== undefined) return { value: parsed, fill, ttlMs };
    await this.#redis.del(snapKey);
    return { value: undefined, fill };
  }

  /**
   * Stores the snapshot, clears a miss marker and indexes the hash under its owner, atomically.
   * The fill goes out with what the Check sends next in this turn (its charge): one write, and
   * Redis answers both in one, where two would wake the Check's process twice.
   */
  async set(hash: string, snapshot: KeySnapshot, fill?: FillToken): Promise<boolean> {
    const ownerId = snapshot.account.ownerId;
    const encoded = encodeSnapshot(snapshot);
    holdWritesForThisTurn(this.#redis);
    const written = await this.#run(
      FILL,
      [
        this.#snapKey(hash),
        this.#missKey(hash),
        this.#ownerKey(ownerId),
        this.#genKey,
        this.#floorKey,
        this.#keyMarker(hash),
        this.#ownerMarker(ownerId),
        this.#ownerIndexSizeKey(ownerId),
      ],
      [fill === undefined ? "" : fill.generation, fill?.atMs ?? 0, encoded, this.#ttlMs, FILL_WINDOW_MS, hash, this.#snapKey(""), OWNER_INDEX_PRUNE_FLOOR],
    );
    return written === 1;
  }

  /** Remembers that no key has this hash, for the negative TTL. */
  async setMissing(hash: string): Promise<void> {
    await this.#redis.set(this.#missKey(hash), "1", "PX", this.#negativeTtlMs);
  }

  /**
   * Deletes the entries of a key or of every key of an owner, and refuses fills read before
   * now. `all` deletes nothing here: it is an L1-only signal (a replica's bus went silent or came
   * back); see distrustEarlierEntries for its L2 counterpart.
   */
  async invalidate(event: Invalidation): Promise<void> {
    if (event.kind === "all") return;
    try {
      await this.#writeInvalidation(event);
    } catch (error) {
      // Redis refused the script (a full one under noeviction refuses a script whose first write
      // may grow memory, here the generation's SET), but it takes a plain DEL. Replicas of an
      // earlier release read their own entries with no generation, and the `all` the caller then
      // publishes sends them back to L2: the entries must be gone before it. Deleting adds no
      // entry and leaves the generation, floor and markers alone, so fills are refused as before.
      // Only on Redis's own refusal: one that did not answer (frozen, cut off) would hold the
      // caller's UNAVAILABLE for another command timeout.
      if (error instanceof Error && error.name === "ReplyError") await this.#deleteEntries(event).catch(() => undefined);
      throw error;
    }
    return this.#confirm();
  }

  async #writeInvalidation(event: Exclude<Invalidation, { kind: "all" }>): Promise<void> {
    if (event.kind === "key") {
      const keys = [this.#snapKey(event.hash), this.#missKey(event.hash), this.#genKey, this.#keyMarker(event.hash)];
      await this.#run(INVALIDATE_KEY, keys, [MARKER_TTL_SECONDS, this.#ownerKey(""), event.hash], this.#invalidator);
      return;
    }
    await this.#run(INVALIDATE_OWNER, [this.#ownerKey(event.ownerId), this.#genKey, this.#ownerMarker(event.ownerId), this.#ownerIndexSizeKey(event.ownerId)], [
      MARKER_TTL_SECONDS,
      this.#snapKey(""),
      DELETE_BATCH,
    ], this.#invalidator);
  }

  /**
   * The entries an invalidation drops, deleted without its generation and marker. The owner's
   * index stays: a fill between its SMEMBERS and a DEL of it would go unlisted, and the
   * invalidation's retry still needs it.
   */
  async #deleteEntries(event: Exclude<Invalidation, { kind: "all" }>): Promise<void> {
    if (event.kind === "key") {
      await this.#invalidator.del(this.#snapKey(event.hash), this.#missKey(event.hash));
      return;
    }
    const keys = (await this.#invalidator.smembers(this.#ownerKey(event.ownerId))).map((hash) => this.#snapKey(hash));
    for (let i = 0; i < keys.length; i += DELETE_BATCH) {
      await this.#invalidator.del(...keys.slice(i, i + DELETE_BATCH));
    }
  }

  async distrustEarlierEntries(): Promise<void> {
    await this.#run(DISTRUST, [this.#genKey, this.#floorKey], []);
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

  #keyMarker(hash: string): string {
    return `${this.#prefix}l2:inv:k:${hash}`;
  }

  #ownerMarker(ownerId: string): string {
    return `${this.#prefix}l2:inv:o:${ownerId}`;
  }

  /** How many hashes the owner's index held after its last pruning (FILL). */
  #ownerIndexSizeKey(ownerId: string): string {
    return `${this.#prefix}l2:pruned:o:${ownerId}`;
  }
}

/**
 * The format of a snapshot in L2, kept in its "v" field. Replicas of two keygate versions share
 * Redis during a rolling upgrade, and a snapshot holds what its writer knew of the key: one
 * written before keys could be disabled (format 1, or no "v" at all) says nothing of it. So a
 * replica reads only its own format. Another format reads as not cached (the store answers, and
 * this replica's fill replaces it), and an entry it cannot parse is dropped. A Check never fails
 * because of an L2 entry. A change to KeySnapshot's shape makes the build fail (above) until the
 * schema, and this number, move with it.
 */
export const SNAPSHOT_FORMAT = 2;

/**
 * The entry's text. A snapshot the schema would refuse is not cached: JSON writes NaN and
 * ±Infinity as null, which reads back as another answer (a NaN revokedAtMs, revoked on the replica
 * that read the store, and not revoked on every other one).
 */
function encodeSnapshot(snapshot: KeySnapshot): string {
  const checked = snapshotSchema.safeParse(snapshot);
  if (!checked.success) {
    const fields = checked.error.issues.map((issue) => issue.path.join(".")).join(", ");
    throw new Error(`not cached in L2: the snapshot of key ${snapshot.key.id} holds a value its schema refuses (${fields})`);
  }
  return JSON.stringify({ v: SNAPSHOT_FORMAT, ...snapshot });
}

/** Read as "not cached" and not dropped: another keygate version wrote it. */
const OTHER_FORMAT = Symbol("another snapshot format");

function parseSnapshot(text: string): KeySnapshot | typeof OTHER_FORMAT | undefined {
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch {
    return undefined;
  }
  if (typeof json !== "object" || json === null) return undefined;
  const format: unknown = (json as { v?: unknown }).v ?? 1;
  if (typeof format !== "number" || !Number.isInteger(format) || format < 1) return undefined;
  if (format !== SNAPSHOT_FORMAT) return OTHER_FORMAT;
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

/** How often the bus sends itself a heartbeat through Redis. */
export const HEARTBEAT_INTERVAL_MS = 500;
/**
 * How long the subscriber connection may stay silent before the bus counts itself
 * disconnected. A frozen or hung Redis keeps its connections open and says nothing; this is
 * how the bus notices. Revocation then reaches this replica within about this long.
 */
export const HEARTBEAT_SILENCE_MS = 2000;
/** How long a heartbeat's key lives in Redis: one small key per running replica. */
const HEARTBEAT_KEY_TTL_MS = 10_000;
/** How often at most the bus drops a subscriber that hears no heartbeat, so that it connects again. */
export const SILENT_SUBSCRIBER_DROP_MS = 5000;
/** How often at most a replica writes the "ignored a malformed invalidation message" line, with how many more came since. */
export const MALFORMED_LOG_INTERVAL_MS = 60_000;

/** Channel, logger and heartbeat of the Redis invalidation bus. */
export interface RedisInvalidationBusOptions {
  /** Pub/sub channel shared by every replica; default "keygate:invalidate". */
  channel?: string;
  logger?: Logger;
  /** Default HEARTBEAT_INTERVAL_MS. */
  heartbeatIntervalMs?: number;
  /** Default HEARTBEAT_SILENCE_MS. */
  silenceLimitMs?: number;
  /** The monotonic clock that spaces out the malformed-message line (default performance.now); tests step it. */
  logClockMs?: () => number;
}

/**
 * Cross-replica invalidation over Redis pub/sub. The bus borrows both connections: the caller
 * opens them, and closes them after `close()`. `subscriber` must be ready before `start()` and
 * is used for nothing else, since a subscribed connection cannot run other commands. The bus is
 * connected while its subscription is confirmed and a heartbeat it published came back on that
 * connection within the silence limit: the heartbeat takes the path an invalidation takes, so a
 * subscriber on a server that the publishes do not reach (a Sentinel failover's old master that
 * still answers PING, a partition) is noticed as well as a frozen or hung Redis. When that stops,
 * and again once it is back, handlers get `{kind: "all"}`: invalidations sent in between may have
 * been missed. A heartbeat is a write (a key of its own, with a TTL) before its PUBLISH: a Redis
 * that refuses writes while it still answers reads and PUBLISH (a master demoted to a replica
 * under a plain URL, READONLY; a full one under noeviction, OOM) can take no invalidation, so it
 * counts as lost too. A subscriber that stays silent for another reason is dropped, so that it
 * connects again, perhaps elsewhere (#dropIfSilent), and trusted only once a heartbeat comes back.
 */
export class RedisInvalidationBus implements InvalidationBus {
  readonly #publisher: Pick<RedisClient, "publish" | "set">;
  readonly #subscriber: SubscriberConnection;
  readonly #channel: string;
  /** This replica's own heartbeat channel: nobody else publishes to it or listens on it. */
  readonly #heartbeatChannel: string;
  /** The key each heartbeat writes before it publishes. */
  readonly #heartbeatKey: string;
  /** Why the last heartbeat failed (Redis's error message), for the log line when the bus goes silent. */
  #heartbeatError: string | undefined;
  /** Redis itself refused the last heartbeat (READONLY, OOM): it answers, so its connections are alive. */
  #heartbeatRefused = false;
  /** The refusal the last "heartbeats stopped" warning named, so that a refusal seen later is named once too. */
  #loggedRefusal: string | undefined;
  /** When the bus last dropped its silent subscriber (performance.now()). */
  #droppedAtMs = -Infinity;
  /**
   * The bus dropped its subscriber for silence and has heard no heartbeat since: a new
   * subscription is trusted only once a heartbeat comes back on it, since the server it lands on
   * may be the one that did not answer.
   */
  #awaitingHeartbeat = false;
  readonly #logger: Logger | undefined;
  /**
   * Malformed messages logged lately: anything that can PUBLISH on the channel (a tool sharing
   * the Redis) would otherwise write a line on every replica for each message it sends.
   */
  readonly #malformedLogged: LogThrottle;
  readonly #heartbeatIntervalMs: number;
  readonly #silenceLimitMs: number;
  readonly #handlers: Array<(event: Invalidation) => void> = [];
  #connected = false;
  #listening = false;
  /** The subscription is confirmed on the current connection. */
  #subscribed = false;
  /** When a heartbeat last came back on the subscriber connection (performance.now()). */
  #lastHeardMs = 0;
  /** A heartbeat's PUBLISH is out (at most one; ioredis's command timeout ends one that gets no answer). */
  #beating = false;
  #heartbeat: NodeJS.Timeout | undefined;

  /** The third argument may still be a bare logger (the earlier signature). */
  constructor(publisher: Pick<RedisClient, "publish" | "set">, subscriber: SubscriberConnection, options: RedisInvalidationBusOptions | Logger = {}) {
    const settings: RedisInvalidationBusOptions = "info" in options ? { logger: options } : options;
    this.#publisher = publisher;
    this.#subscriber = subscriber;
    this.#channel = settings.channel ?? "keygate:invalidate";
    const replica = randomUUID();
    this.#heartbeatChannel = `${this.#channel}:heartbeat:${replica}`;
    this.#heartbeatKey = `kg:hb:${replica}`;
    this.#logger = settings.logger;
    this.#heartbeatIntervalMs = settings.heartbeatIntervalMs ?? HEARTBEAT_INTERVAL_MS;
    this.#silenceLimitMs = settings.silenceLimitMs ?? HEARTBEAT_SILENCE_MS;
    this.#malformedLogged = new LogThrottle(MALFORMED_LOG_INTERVAL_MS, 1, settings.logClockMs);
  }

  /** True while the subscription is live and answering; while false, this replica may miss invalidations. */
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
    await this.#subscribeBoth();
    this.#subscribed = true;
    this.#lastHeardMs = performance.now();
    this.#connected = true;
    this.#heartbeat = setInterval(this.#beat, this.#heartbeatIntervalMs);
    this.#heartbeat.unref();
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
    this.#subscribed = false;
    if (this.#heartbeat !== undefined) clearInterval(this.#heartbeat);
    this.#heartbeat = undefined;
    this.#handlers.length = 0;
    this.#subscriber.off("message", this.#onMessage);
    this.#subscriber.off("close", this.#onDrop);
    this.#subscriber.off("ready", this.#onReady);
    if (!wasListening || this.#subscriber.status !== "ready") return;
    try {
      await this.#subscriber.unsubscribe(this.#channel);
      await this.#subscriber.unsubscribe(this.#heartbeatChannel);
    } catch (error) {
      // Shutdown goes on: the owner is about to close the connection anyway.
      this.#logger?.warn({ err: error }, "could not unsubscribe from invalidations");
    }
  }

  readonly #onMessage = (channel: string, message: string): void => {
    if (channel === this.#heartbeatChannel) {
      // Fresh as of when it was sent, not when it came: Redis delivers one connection's messages in
      // the order it ran their PUBLISHes, so every invalidation published before that time has
      // come too. A subscriber connection that lags (a queue building on its flow) would otherwise
      // look healthy while invalidations wait behind the lag.
      const sentAt = Number(message);
      const nowMs = performance.now();
      this.#lastHeardMs = Math.max(this.#lastHeardMs, Number.isFinite(sentAt) && sentAt <= nowMs ? sentAt : nowMs);
      this.#awaitingHeartbeat = false;
      this.#update();
      return;
    }
    if (channel !== this.#channel) return;
    const event = parseInvalidation(message);
    if (event === undefined) {
      // Ignored, not read as an `all`: a tool that publishes on this channel by mistake would
      // then clear every replica's L1 and distrust L2 (a Redis write) at its own rate, sending
      // the Checks of cached keys to the store.
      const since = this.#malformedLogged.due("malformed");
      if (since !== null) this.#logger?.warn({ channel, length: message.length, since }, "ignored a malformed invalidation message");
      return;
    }
    this.#emit(event);
  };

  /**
   * One heartbeat: a write of this replica's heartbeat key, then a PUBLISH on its heartbeat
   * channel, both through the publishing connection; heard when it comes back on the subscriber
   * connection (#onMessage). Then a look at how long it has been since one did.
   */
  readonly #beat = (): void => {
    if (this.#subscribed && !this.#beating && this.#subscriber.status === "ready") {
      this.#beating = true;
      this.#publisher
        .set(this.#heartbeatKey, "1", "PX", HEARTBEAT_KEY_TTL_MS)
        // Stamped as the PUBLISH is sent, on this process's clock (the channel is this bus's
        // alone: its name holds a random id), so the SET's time does not count as lag.
        .then(() => this.#publisher.publish(this.#heartbeatChannel, String(performance.now())))
        .then(
          () => {
            this.#beating = false;
            this.#heartbeatError = undefined;
            this.#heartbeatRefused = false;
          },
          (error: unknown) => {
            this.#beating = false;
            this.#heartbeatError = error instanceof Error ? error.message.slice(0, 200) : "unknown error";
            // Redis's own error replies (redis-errors' ReplyError), not a timeout or a closed connection.
            this.#heartbeatRefused = error instanceof Error && error.name === "ReplyError";
            // Silent already (a stall before Redis began refusing): the warning then named no cause.
            if (this.#heartbeatRefused && !this.#connected && this.#heartbeatError !== this.#loggedRefusal) this.#warnSilent();
          },
        );
    }
    this.#update();
    this.#dropIfSilent();
  };

  /**
   * Drops a subscriber connection that hears no heartbeat although it looks up: its server stopped
   * answering without closing the socket (frozen, hung, cut off by a partition; with no command
   * waiting on a subscriber, ioredis's socket timeout never fires) or no longer gets the
   * publishes. Its next connection finds the server anew: through Sentinel the master the
   * Sentinels name now (a frozen master is failed over but never closes its clients), on a Cluster
   * another node. Not when Redis refused the heartbeat: it answered, so the connection is alive.
   * At most once every SILENT_SUBSCRIBER_DROP_MS; one warning until a heartbeat comes back.
   */
  #dropIfSilent(): void {
    if (this.#connected || !this.#listening || !this.#subscribed || this.#heartbeatRefused || this.#subscriber.status !== "ready") return;
    // Not connected while subscribed: silent past the limit.
    const nowMs = performance.now();
    if (nowMs - this.#droppedAtMs < SILENT_SUBSCRIBER_DROP_MS) return;
    this.#droppedAtMs = nowMs;
    const fields = { channel: this.#channel, silentMs: Math.round(nowMs - this.#lastHeardMs) };
    const message = "no heartbeat came back on the invalidation subscriber's connection; dropping it to connect again";
    if (this.#awaitingHeartbeat) this.#logger?.debug(fields, message);
    else this.#logger?.warn(fields, message);
    this.#awaitingHeartbeat = true;
    this.#subscriber.disconnect(true);
  }

  /** The invalidation channel, then the heartbeat channel; each confirmed by Redis. */
  async #subscribeBoth(): Promise<void> {
    await this.#subscriber.subscribe(this.#channel);
    await this.#subscriber.subscribe(this.#heartbeatChannel);
  }

  readonly #onDrop = (): void => {
    this.#subscribed = false;
    this.#update();
  };

  readonly #onReady = (): void => {
    if (this.#subscribed || !this.#listening) return;
    void this.#resubscribe();
  };

  /**
   * The subscriber connection does not re-subscribe by itself (openSubscriber turns ioredis's
   * autoResubscribe off): the bus subscribes after each "ready" and awaits it, so "all" goes out
   * only once no event can slip by, and a failed SUBSCRIBE is handled here.
   */
  async #resubscribe(): Promise<void> {
    try {
      await this.#subscribeBoth();
    } catch (error) {
      // The connection dropped again; the next "ready" retries.
      this.#logger?.warn({ err: error }, "re-subscribing to invalidations failed");
      return;
    }
    if (this.#subscribed || !this.#listening) return;
    this.#subscribed = true;
    if (!this.#awaitingHeartbeat) this.#lastHeardMs = performance.now();
    this.#update();
  }

  /** Moves `connected` to what the subscription and the last answer say; every change clears L1 everywhere here. */
  #update(): void {
    const silentMs = performance.now() - this.#lastHeardMs;
    const healthy = this.#listening && this.#subscribed && silentMs <= this.#silenceLimitMs;
    if (healthy === this.#connected) return;
    this.#connected = healthy;
    if (healthy) {
      this.#loggedRefusal = undefined;
      this.#logger?.info({ channel: this.#channel }, "invalidation channel answering again; clearing L1");
    } else if (!this.#subscribed) {
      this.#logger?.warn({ channel: this.#channel }, "invalidation subscription lost; clearing L1 and reading keys from the store until it is back");
    } else {
      this.#warnSilent();
    }
    this.#emit({ kind: "all" });
  }

  /** The warning that heartbeats stopped, with why the last one failed when Redis said. */
  #warnSilent(): void {
    this.#loggedRefusal = this.#heartbeatError;
    this.#logger?.warn(
      {
        channel: this.#channel,
        silentMs: Math.round(performance.now() - this.#lastHeardMs),
        ...(this.#heartbeatError !== undefined ? { heartbeatError: this.#heartbeatError } : {}),
      },
      "heartbeats stopped coming back on the invalidation channel (Redis frozen or refusing writes, or the subscriber on a server the publishes do not reach); clearing L1 and reading keys from the store until they do",
    );
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
