import { EventEmitter } from "node:events";
import type { ConnectionOptions } from "node:tls";
import { Cluster, Redis } from "ioredis";
import type { ClusterOptions, RedisOptions } from "ioredis";
import type { Logger } from "pino";
import type { RedisAddress, RedisTopology } from "../config.js";
import { RedisConnectError, connectRedis, describeConnectFailure, isUnanswered, logConnectionErrors, redisOptions, withoutCommand } from "./redis.js";

/** A connection keygate runs commands on: one server (standalone or through Sentinel) or a Cluster. */
export type RedisClient = Redis | Cluster;

/**
 * What the invalidation bus needs of its subscriber connection: a plain ioredis connection
 * satisfies it, and so does ClusterNodeSubscriber. "close" means messages may be missed from
 * now on; "ready" means a fresh connection is up and the channel must be subscribed again.
 */
export interface SubscriberConnection {
  readonly status: string;
  subscribe(channel: string): Promise<unknown>;
  unsubscribe(channel: string): Promise<unknown>;
  on(event: "message", listener: (channel: string, message: string) => void): unknown;
  on(event: "close" | "ready", listener: () => void): unknown;
  off(event: "message", listener: (channel: string, message: string) => void): unknown;
  off(event: "close" | "ready", listener: () => void): unknown;
  /**
   * With `reconnect`, drops the connection and opens another: through Sentinel to the master the
   * Sentinels name now, on a Cluster to another node. Without it, closes for good.
   */
  disconnect(reconnect?: boolean): void;
}

/**
 * How keygate names its Redis keys on this topology. On a Cluster an owner's id is wrapped in a
 * hash tag, so its rate bucket, quota counters and credit hash share a slot (one script touches
 * them together), and every L2 key shares one tag (L2's scripts share its invalidation
 * counters). Elsewhere the names are the ones the released keygate wrote, so its state
 * (credit balances, quota counts) carries over an upgrade untouched.
 */
export interface RedisKeyLayout {
  /** The owner part of a quota counter or credit hash name. */
  owner(ownerId: string): string;
  /** The rate bucket part of a rate key name ("a:<owner>" or "k:<key id>"). */
  bucket(ownerId: string, bucket: string): string;
  /** Prefix of every L2 key. */
  l2Prefix: string;
}

/** The names the released keygate used, for one server and for Sentinel. */
export const BARE_LAYOUT: RedisKeyLayout = { owner: (ownerId) => ownerId, bucket: (_ownerId, bucket) => bucket, l2Prefix: "kg:" };
/**
 * An owner's id as a hash tag. Redis reads a tag up to the first "}" after the first "{", so an
 * id starting with "}" (KeyAdmin accepts any printable ASCII) would make an empty tag, which
 * Redis ignores: each name would hash whole, the charge script's keys would land in different
 * slots and every charge fail with CROSSSLOT. Such an id goes behind a space, which no owner id
 * holds, so its tag is " " and its names are no other owner's.
 */
function ownerTag(ownerId: string): string {
  return ownerId.startsWith("}") ? `{ ${ownerId}}` : `{${ownerId}}`;
}

/** Hash-tagged names, for a Cluster. */
export const CLUSTER_LAYOUT: RedisKeyLayout = {
  owner: ownerTag,
  bucket: (ownerId, bucket) => `${ownerTag(ownerId)}:${bucket}`,
  l2Prefix: "kg:{l2}:",
};

/** The key layout for a topology: hash tags on a Cluster, the released names elsewhere. */
export function keyLayout(topology: RedisTopology): RedisKeyLayout {
  return topology.kind === "cluster" ? CLUSTER_LAYOUT : BARE_LAYOUT;
}

/**
 * Redis must keep keygate's keys until they expire. Under an eviction policy, an invalidation
 * marker evicted within seconds of a revocation lets a store read that began before it fill L2,
 * where the revoked key passes for the L2 TTL, and an evicted rate bucket or quota counter starts
 * again from zero. So a server set to evict is named in a warning at start. A server that refuses
 * CONFIG (many managed ones) is not asked again; its provider's setting is the operator's to check.
 */
export async function warnIfEvicting(redis: RedisClient, logger: Logger): Promise<void> {
  let reply: unknown;
  try {
    reply = await redis.call("CONFIG", "GET", "maxmemory-policy");
  } catch {
    return;
  }
  const policy = Array.isArray(reply) ? reply[1] : undefined;
  if (typeof policy !== "string" || policy === "noeviction") return;
  logger.warn(
    { maxmemoryPolicy: policy },
    "Redis may evict keygate's keys (maxmemory-policy is not noeviction): an evicted invalidation marker can let a revoked key pass from L2 for up to the cache TTL, and an evicted rate bucket or quota count starts again; set maxmemory-policy noeviction",
  );
}

/** How long an invalidation through Sentinel waits for a replica to hold it. */
const REPLICA_WAIT_MS = 500;

/**
 * The check an invalidation through Sentinel must pass before it counts as made. Replication is
 * asynchronous, and in a failover two nodes can both act as master for a moment: a revocation
 * written only to the one being replaced would be lost, and replicas already moved to the new
 * master would never hear it. So: a replica must hold it (WAIT 1), or, when the master has no
 * replica left, a majority of the Sentinels must name the node this connection is on as the
 * master. Otherwise it throws, and the invalidation is retried until it lands on the master.
 */
export function sentinelConfirmation(client: Redis, topology: Extract<RedisTopology, { kind: "sentinel" }>, tls: RedisTlsOptions = {}): () => Promise<void> {
  return async () => {
    const acknowledged = await client.wait(1, REPLICA_WAIT_MS);
    if (acknowledged >= 1) return;
    const here = { host: normalizeAddress(client.stream.remoteAddress ?? ""), port: client.stream.remotePort ?? 0 };
    const named = await Promise.all(topology.sentinels.map((sentinel) => askSentinelForMaster(sentinel, topology, tls)));
    const answered = named.filter((address): address is RedisAddress => address !== null);
    const agree = answered.filter((address) => normalizeAddress(address.host) === here.host && address.port === here.port).length;
    if (agree === answered.length && agree > topology.sentinels.length / 2) return;
    throw new Error("the invalidation reached no replica, and the Sentinels do not name this node as the master");
  };
}

function normalizeAddress(address: string): string {
  return address.startsWith("::ffff:") ? address.slice(7) : address;
}

/** The master one Sentinel names, or null when it does not answer. */
async function askSentinelForMaster(sentinel: RedisAddress, topology: Extract<RedisTopology, { kind: "sentinel" }>, tls: RedisTlsOptions = {}): Promise<RedisAddress | null> {
  const connection = new Redis({
    host: sentinel.host,
    port: sentinel.port,
    username: topology.sentinelUsername,
    password: topology.sentinelPassword,
    ...(topology.tls ? { tls } : {}),
    lazyConnect: true,
    retryStrategy: () => null,
    maxRetriesPerRequest: 0,
    connectTimeout: 1000,
    commandTimeout: 1000,
  });
  connection.on("error", () => undefined);
  try {
    await connection.connect();
    const reply = await connection.call("SENTINEL", "GET-MASTER-ADDR-BY-NAME", topology.masterName);
    if (!Array.isArray(reply)) return null;
    const [host, port] = reply;
    return typeof host === "string" && typeof port === "string" ? { host, port: Number(port) } : null;
  } catch {
    return null;
  } finally {
    connection.disconnect();
  }
}

// A Sentinel that demoted the master kills its clients; a client that still reaches it gets
// READONLY on a write: reconnect, which asks the Sentinels for the master again.
const reconnectOnReadonly = (error: Error): boolean => error.message.startsWith("READONLY");

/** How often a plain URL's connection reconnects on READONLY at most. */
const READONLY_RECONNECT_MS = 1000;

/**
 * A plain URL whose server was demoted (a managed Redis's primary endpoint after a failover: the
 * name now leads to the new master, the open connection stays on the old one): reconnect on
 * READONLY, at most once a second, so a URL that names a replica for good does not reconnect on
 * every write.
 */
function reconnectOnReadonlyAtMostOnceASecond(): (error: Error) => boolean {
  let lastMs = -Infinity;
  return (error) => {
    if (!reconnectOnReadonly(error)) return false;
    const now = performance.now();
    if (now - lastMs < READONLY_RECONNECT_MS) return false;
    lastMs = now;
    return true;
  };
}

/** ioredis options for a Sentinel-managed master (credentials, TLS, master name). */
function sentinelOptions(topology: Extract<RedisTopology, { kind: "sentinel" }>, tls: RedisTlsOptions): RedisOptions {
  return redisOptions({
    sentinels: topology.sentinels,
    name: topology.masterName,
    db: topology.db,
    username: topology.username,
    password: topology.password,
    sentinelUsername: topology.sentinelUsername,
    sentinelPassword: topology.sentinelPassword,
    ...(topology.tls ? { tls, sentinelTLS: tls, enableTLSForSentinelMode: true } : {}),
    // Off: ioredis's detector closes the connector on +switch-master, and if that lands while a
    // reconnect is resolving the master, the connection ends for good ("Connection is closed.");
    // it also holds a pub/sub connection to every Sentinel for each of keygate's connections.
    // A failover reaches keygate anyway: Sentinel kills the old master's clients when it
    // reconfigures it, a dead master drops them, a write to a demoted one is READONLY, and a
    // master that stopped answering with its sockets open (frozen, hung, cut off) is left by the
    // socket timeout (redisOptions) and, for the subscriber, by the bus (RedisInvalidationBus).
    failoverDetector: false,
    // Never gives up: ioredis ends a connection for good once this returns null, and a
    // replica must come back when the Sentinels do. A start waits START_TIMEOUT_MS at most.
    sentinelRetryStrategy: (attempt: number) => Math.min(attempt * 100, 1000),
    reconnectOnError: reconnectOnReadonly,
  });
}

/** ioredis Cluster options: the hot path's fail-fast settings on every node connection. */
function clusterOptions(topology: Extract<RedisTopology, { kind: "cluster" }>, tls: RedisTlsOptions): ClusterOptions {
  const { retryStrategy: _ignored, enableOfflineQueue: _offline, ...nodeOptions } = redisOptions();
  return {
    lazyConnect: true,
    enableOfflineQueue: false,
    // Not auto-pipelined, as on one server (redisOptions): each command is written as it is issued.
    enableAutoPipelining: false,
    scaleReads: "master",
    // A failover moves slots: refresh the map and retry within a command's budget, when the
    // node refused the command (MOVED, TRYAGAIN, CLUSTERDOWN). Not when its connection closed:
    // the node may have run it, and a charge sent again would be made twice (redisOptions).
    retryDelayOnFailover: 0,
    retryDelayOnClusterDown: 100,
    retryDelayOnTryAgain: 100,
    slotsRefreshTimeout: 2000,
    clusterRetryStrategy: (attempt: number) => Math.min(attempt * 100, 2000),
    redisOptions: { ...nodeOptions, username: topology.username, password: topology.password, ...(topology.tls ? { tls } : {}) },
  };
}

/**
 * TLS options for rediss URLs beyond the system CAs (KEYGATE_REDIS_TLS_*: a private CA, a client
 * certificate); empty: Node's defaults.
 */
export type RedisTlsOptions = Pick<ConnectionOptions, "ca" | "cert" | "key">;

/** A standalone rediss:// connection takes the TLS options as overrides; redis:// ignores them. */
function standaloneOverrides(tls: RedisTlsOptions): RedisOptions {
  return Object.keys(tls).length === 0 ? {} : { tls };
}

/** How long a start waits for a Cluster or a Sentinel-managed master before it fails. */
const START_TIMEOUT_MS = 15_000;

/**
 * Opens the command connection for a topology and waits until it is ready. Failures at start
 * are a RedisConnectError that never holds the URL or a password.
 */
export async function connectRedisClient(topology: RedisTopology, logger?: Logger, tls: RedisTlsOptions = {}): Promise<RedisClient> {
  switch (topology.kind) {
    case "standalone":
      return connectRedis(topology.url, { ...standaloneOverrides(tls), reconnectOnError: reconnectOnReadonlyAtMostOnceASecond() }, logger);
    case "sentinel":
      return connectWatched(new Redis(sentinelOptions(topology, tls)), logger);
    case "cluster":
      return connectWatched(new Cluster(topology.nodes, clusterOptions(topology, tls)), logger);
  }
}

/** A Redis reply or TLS failure that says the server answered and refused: no wait mends it. */
const REFUSAL = /^(?:ReplyError: )?(?:ERR|WRONGPASS|NOAUTH|NOPERM|WRONGTYPE)\b|No such master|invalid reply|certificate|CERT_|SIGNATURE|ISSUER|ERR_TLS|ERR_SSL/;

/**
 * The refusal a Sentinel or Cluster client's failure wraps, or null: ioredis ends a Sentinel try
 * with "All sentinels are unreachable … Last error: …" and a Cluster's with a ClusterAllFailedError
 * holding the node's error, which read as an outage whatever the cause: a wrong password, a master
 * the Sentinels do not know, a node without cluster support.
 */
function wrappedRefusal(failure: unknown): Error | null {
  if (!(failure instanceof Error)) return null;
  if ("lastNodeError" in failure && failure.lastNodeError instanceof Error) {
    const node = failure.lastNodeError;
    const code = "code" in node && typeof node.code === "string" ? node.code : "";
    return REFUSAL.test(node.message) || REFUSAL.test(code) ? node : null;
  }
  const last = /Last error: (.+)$/s.exec(failure.message)?.[1]?.trim();
  return last !== undefined && REFUSAL.test(last) ? new Error(last.replace(/^ReplyError: /, "")) : null;
}

/** Connects a client built lazily, logging its errors (logConnectionErrors), within START_TIMEOUT_MS. */
async function connectWatched<T extends RedisClient>(client: T, logger: Logger | undefined): Promise<T> {
  const lastError = logConnectionErrors(client, logger);
  let timer: NodeJS.Timeout | undefined;
  let refused: ((error: unknown) => void) | undefined;
  try {
    await Promise.race([
      client.connect(),
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Error(`no ready connection within ${START_TIMEOUT_MS} ms (timeout)`)), START_TIMEOUT_MS);
        // ioredis goes on trying Sentinels that refused it (a wrong password, an unknown master)
        // until the timeout: a refusal ends the start at once, as no wait mends it.
        refused = (error: unknown) => {
          if (wrappedRefusal(error) !== null) reject(error);
        };
        client.on("error", refused);
      }),
    ]);
  } catch (error) {
    client.disconnect();
    const failure = lastError() ?? error;
    // A refusal wrapped in the client's own "cannot reach" error is named as the refusal.
    const refusal = wrappedRefusal(failure);
    throw new RedisConnectError(describeConnectFailure(refusal ?? failure), { cause: withoutCommand(failure), unanswered: refusal === null && isUnanswered(failure) });
  } finally {
    clearTimeout(timer);
    if (refused !== undefined) client.off("error", refused);
  }
  return client;
}

/**
 * The subscriber connection does not re-subscribe on its own after a reconnect: the bus does, and
 * handles the answer (RedisInvalidationBus). ioredis's own re-subscription is a promise nobody
 * holds: when the connection drops again before Redis confirms it, and the next attempt is
 * refused too, ioredis rejects it (MaxRetriesPerRequestError) with no handler, an unhandled
 * rejection.
 */
const SUBSCRIBER_OVERRIDES: RedisOptions = {
  autoResubscribe: false,
  // The bus drops the subscriber when its server stopped answering (disconnect(true)): ending
  // the socket gracefully would wait for a close that never comes (2 s by default) before the
  // reconnect could begin.
  disconnectTimeout: 100,
};

/**
 * Opens the invalidation bus's subscriber. Standalone and Sentinel: a connection of its own
 * (through Sentinel it follows the master across a failover, dropping and coming back, so the
 * bus clears L1 and subscribes again; the bus drops it itself when no heartbeat comes back,
 * since a subscriber has no command waiting for the socket timeout to notice a frozen master).
 * Cluster: PUBLISH reaches every node, so one node's connection hears every replica;
 * ClusterNodeSubscriber moves to another node when it drops or the bus drops it.
 */
export async function openSubscriber(
  topology: RedisTopology,
  main: RedisClient,
  logger?: Logger,
  tls: RedisTlsOptions = {},
): Promise<SubscriberConnection & { disconnect(): void; quit(): Promise<unknown> }> {
  switch (topology.kind) {
    case "standalone":
      return connectRedis(topology.url, { ...standaloneOverrides(tls), ...SUBSCRIBER_OVERRIDES }, logger);
    case "sentinel":
      return connectWatched(new Redis({ ...sentinelOptions(topology, tls), ...SUBSCRIBER_OVERRIDES }), logger);
    case "cluster": {
      if (!(main instanceof Cluster)) throw new Error("a Cluster topology needs a Cluster client");
      const auth = { username: topology.username, password: topology.password, tls: topology.tls ? tls : undefined };
      const subscriber = new ClusterNodeSubscriber(main, topology.nodes, auth, logger);
      await subscriber.connect();
      return subscriber;
    }
  }
}

/** A Cluster node connection's credentials, and its TLS options when the URL is rediss+cluster. */
interface ClusterNodeAuth {
  username: string | undefined;
  password: string | undefined;
  tls: RedisTlsOptions | undefined;
}

/** How often a Cluster subscriber that lost its node tries the next one. */
const NODE_RETRY_MS = 250;

/**
 * A subscriber on one Cluster node, chosen from the nodes the Cluster client knows (the seed
 * nodes before it knows any). Unlike ioredis's own Cluster subscriber, which moves to another
 * node silently, this one says so: "close" when its node is lost (invalidations may be missed
 * from then on), "ready" once another node's connection is up.
 */
export class ClusterNodeSubscriber extends EventEmitter implements SubscriberConnection {
  readonly #cluster: Cluster;
  readonly #seeds: readonly RedisAddress[];
  readonly #auth: ClusterNodeAuth;
  readonly #logger: Logger | undefined;
  #connection: Redis | null = null;
  #attempt = 0;
  #closing = false;
  #retry: NodeJS.Timeout | undefined;

  constructor(cluster: Cluster, seeds: readonly RedisAddress[], auth: ClusterNodeAuth, logger?: Logger) {
    super();
    this.#cluster = cluster;
    this.#seeds = seeds;
    this.#auth = auth;
    this.#logger = logger;
  }

  get status(): string {
    return this.#connection?.status ?? "wait";
  }

  /** Connects to the first node that answers; rejects when none does (at start). */
  async connect(): Promise<void> {
    const candidates = this.#candidates();
    let lastError: unknown = null;
    for (let i = 0; i < candidates.length; i++) {
      try {
        await this.#open(candidates[(this.#attempt + i) % candidates.length] ?? { host: "127.0.0.1", port: 6379 });
        return;
      } catch (error) {
        lastError = error;
      }
    }
    throw new RedisConnectError(`no Cluster node accepted the invalidation subscriber: ${describeConnectFailure(lastError)}`, { cause: withoutCommand(lastError) });
  }

  async subscribe(channel: string): Promise<unknown> {
    return this.#current().subscribe(channel);
  }

  async unsubscribe(channel: string): Promise<unknown> {
    return this.#current().unsubscribe(channel);
  }

  /** Closes for good; with `reconnect`, leaves the current node and moves to the next one. */
  disconnect(reconnect = false): void {
    if (reconnect) {
      this.#leave();
      return;
    }
    this.#closing = true;
    clearTimeout(this.#retry);
    this.#connection?.disconnect();
    this.#connection = null;
  }

  async quit(): Promise<unknown> {
    this.#closing = true;
    clearTimeout(this.#retry);
    const connection = this.#connection;
    this.#connection = null;
    return connection?.quit();
  }

  #current(): Redis {
    if (this.#connection === null || this.#connection.status !== "ready") throw new Error("the invalidation subscriber has no Cluster node connected");
    return this.#connection;
  }

  /** The nodes the Cluster client knows now, else the seeds. */
  #candidates(): RedisAddress[] {
    const known: RedisAddress[] = [];
    for (const node of this.#cluster.nodes("all")) {
      const { host, port } = node.options;
      if (host !== undefined && port !== undefined) known.push({ host, port });
    }
    return known.length > 0 ? known : [...this.#seeds];
  }

  async #open(address: RedisAddress): Promise<void> {
    const connection = new Redis(
      redisOptions({
        host: address.host,
        port: address.port,
        username: this.#auth.username,
        password: this.#auth.password,
        ...(this.#auth.tls === undefined ? {} : { tls: this.#auth.tls }),
        // One node, once: when it goes, another node is chosen here, not this one retried.
        retryStrategy: () => null,
        connectionName: "keygate-invalidation",
      }),
    );
    connection.on("error", (error: unknown) => this.#logger?.debug({ err: withoutCommand(error), node: `${address.host}:${address.port}` }, "Cluster subscriber connection error"));
    try {
      await connection.connect();
    } catch (error) {
      connection.disconnect();
      throw error;
    }
    if (this.#closing) {
      connection.disconnect();
      return;
    }
    connection.on("message", (channel: string, message: string) => this.emit("message", channel, message));
    connection.once("end", () => this.#lost(connection, address));
    this.#connection = connection;
    this.emit("ready");
  }

  #lost(connection: Redis, address: RedisAddress): void {
    if (this.#connection !== connection) return;
    this.#connection = null;
    this.emit("close");
    if (this.#closing) return;
    this.#logger?.warn({ node: `${address.host}:${address.port}` }, "the invalidation subscriber lost its Cluster node; moving to another");
    this.#scheduleRetry();
  }

  /** Drops the current node's connection at once (its close may never come) and moves on. */
  #leave(): void {
    const connection = this.#connection;
    if (connection === null || this.#closing) return;
    this.#connection = null;
    connection.disconnect();
    this.emit("close");
    this.#scheduleRetry();
  }

  #scheduleRetry(): void {
    this.#retry = setTimeout(() => {
      this.#attempt += 1;
      const candidates = this.#candidates();
      const next = candidates[this.#attempt % candidates.length];
      if (next === undefined || this.#closing) return;
      this.#open(next).catch(() => {
        if (!this.#closing) this.#scheduleRetry();
      });
    }, NODE_RETRY_MS);
    this.#retry.unref();
  }
}
