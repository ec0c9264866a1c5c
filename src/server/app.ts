import { join } from "node:path";
import { isDeepStrictEqual } from "node:util";
import { Redis } from "ioredis";
import type { Logger } from "pino";
import { AdminAuth } from "../admin/auth.js";
import { keyAdminRoutes } from "../admin/handlers.js";
import { LifecycleService } from "../admin/lifecycle.js";
import { DecisionPipeline } from "../authz/pipeline.js";
import { RouteTable } from "../authz/routes.js";
import { L2_TIMEOUT_MS, SnapshotLookup } from "../cache/lookup.js";
import type { InvalidationBus, SharedCache } from "../cache/cache.js";
import { LocalInvalidationBus, MemoryCache } from "../cache/memory.js";
import { RedisConnectError, RedisInvalidationBus, RedisSharedCache } from "../cache/redis.js";
import { connectRedisClient, keyLayout, openSubscriber, sentinelConfirmation, warnIfEvicting } from "../cache/redis-client.js";
import { ConfigError, loadPolicyFile } from "../config.js";
import type { Config, Policy } from "../config.js";
import { KeyHasher } from "../keys/hasher.js";
import { KeyFormat } from "../keys/key-format.js";
import { LogThrottle } from "../log-throttle.js";
import { LastUsedRecorder } from "../store/last-used.js";
import { MemoryMeter } from "../limits/memory.js";
import type { Meter } from "../limits/limits.js";
import { RedisMeter } from "../limits/redis.js";
import { LocalIdempotencyLedger, RedisIdempotencyLedger } from "../limits/idempotency.js";
import { loadTokensFile } from "../admin/permissions.js";
import type { ScopedToken } from "../admin/permissions.js";
import type { IdempotencyLedger } from "../limits/idempotency.js";
import { UsageRecorder } from "../limits/usage.js";
import { MongoKeyStore } from "../store/mongo.js";
import { DataDirLock, LOCK_FILE } from "../store/data-dir-lock.js";
import type { DataDirLockMode } from "../store/data-dir-lock.js";
import { SqliteKeyStore, sqliteFileHoldsKeys } from "../store/sqlite.js";
import type { KeyStore, LastUsedStore, MeteringStore } from "../store/store.js";
import { createTracing } from "../tracing/otlp.js";
import { AccessLog } from "./access-log.js";
import { createAdminServer } from "./admin.js";
import { processAllocator } from "./allocator.js";
import { listenerLimits } from "./connections.js";
import { createGrpcAuthzServer } from "./grpc-authz.js";
import type { StartedServer } from "./grpc-authz.js";
import { createHttpAuthzServer } from "./http-authz.js";
import { Metrics } from "./metrics.js";
import { Readiness, sharedPing } from "./readiness.js";
import { settleKeyPrefix } from "./key-prefix.js";
import { settlePepper } from "./pepper.js";
import { ensureDataDir, loadSecrets } from "./secrets.js";
import { restoreFastStringPrototype } from "./string-prototype.js";
import { BackendUnansweredError, listenerStartError, mongoStartError, untilAnswered } from "./startup-errors.js";
import type { Secrets } from "./secrets.js";
import { TlsCertificates, redisTlsOptions } from "./tls.js";

/** The ports a running keygate is bound to. */
export interface BoundPorts {
  grpc: number;
  http: number;
  admin: number;
}

/** How a stop ended. */
export interface StopReport {
  /**
   * Write-behind data (usage, spent credits, last-use times) that the store refused until the
   * shutdown grace period ran out, and that ends with the process; each recorder logged it.
   */
  writesLost: boolean;
}

/** A built keygate: start binds the three listeners, stop drains and closes everything. */
export interface Keygate {
  readonly lifecycle: LifecycleService;
  readonly store: KeyStore;
  readonly metrics: Metrics;
  readonly generatedAdminToken: string | null;
  readonly adminTokens: readonly string[];
  start(): Promise<BoundPorts>;
  stop(): Promise<StopReport>;
  /**
   * Reads the policy file (KEYGATE_CONFIG) and the admin tokens file (KEYGATE_ADMIN_TOKENS_FILE)
   * again and puts each in force if it is valid; a bad file keeps the version in force, logs one
   * line and sets keygate_config_reload_failing. Checks already started finish on their version.
   * The TLS certificate files are looked at too: changed ones serve new connections from now on.
   */
  reload(): { policy: ReloadResult; adminTokens: ReloadResult; tls: ReloadResult };
}

/** What a reload did with one file. */
export type ReloadResult = "applied" | "unchanged" | "failed";

/** Options a test or the CLI may add to the config. */
export interface BuildOptions {
  logger: Logger;
  nowMs?: () => number;
  /** Prometheus default process metrics; off in tests that build many instances. */
  defaultMetrics?: boolean;
  /**
   * Called once the listeners are bound, before the "keygate listening" line is logged, so what
   * it prints is out by the time a supervisor or test sees that line.
   */
  announce?: (ports: BoundPorts) => void;
  /** Apply pending schema steps on start (the default); false refuses a store that needs any. */
  migrate?: boolean;
}

/**
 * How often the warn line for one failure of the SQLite writing thread is written. Its PASSIVE
 * checkpoint runs every second, and on a full disk (or a read-only volume) each one fails the same
 * way: a line each would be 86,400 a day, written to what is often that same full disk.
 */
const WRITER_FAILURE_LOG_INTERVAL_MS = 60_000;
/** Distinct writing-thread failures remembered for that; past it they start over. */
const MAX_WRITER_FAILURES_TRACKED = 64;

/** The start refused because other keygates hold the data directory: who holds it, and what to do. */
function dataDirInUse(dataDir: string, wanted: DataDirLockMode, heldBy: DataDirLockMode): ConfigError {
  const holders =
    heldBy === "exclusive"
      ? `one without Redis, which holds ${join(dataDir, LOCK_FILE)} alone`
      : `one or more with KEYGATE_REDIS_URL, which share ${join(dataDir, LOCK_FILE)}`;
  const remedy =
    wanted === "exclusive" && heldBy === "exclusive"
      ? "without Redis each embedded keygate needs a data directory of its own (replicas share MongoDB and Redis instead)"
      : wanted === "exclusive"
        ? "a keygate without Redis needs the data directory to itself: set KEYGATE_REDIS_URL as they do, or stop them first"
        : "keygates with Redis share a data directory only with each other: stop that one first, or give it KEYGATE_REDIS_URL too";
  return new ConfigError(
    `KEYGATE_DATA_DIR ${dataDir} is in use by another keygate process (${holders}); ${remedy}. The lock is never stale: the operating system releases it when the process holding it ends, so do not delete ${LOCK_FILE}`,
  );
}

/**
 * Embedded mode keeps everything in the data directory. With MongoDB, replicas share the
 * store, so they must share the pepper and admin tokens too: both must come from the
 * environment, and nothing is generated.
 */
async function openStore(config: Config, migrate: boolean, logger: Logger, giveUpAtMs: number): Promise<{ store: KeyStore; secrets: Secrets; release(): void }> {
  if (config.mongodbUri === undefined) {
    ensureDataDir(config.dataDir);
    // Without Redis nothing would tell another process on this directory of a change (its
    // caches, invalidations and limits are its own), so it holds the directory alone; processes
    // that share Redis hear each other's changes and share limits, as replicas do, so they hold it
    // together, and neither kind starts beside the other.
    const mode: DataDirLockMode = config.redis === undefined ? "exclusive" : "shared";
    const lock = DataDirLock.acquire(config.dataDir, mode, logger);
    if (!(lock instanceof DataDirLock)) throw dataDirInUse(config.dataDir, mode, lock.heldBy);
    try {
      const path = join(config.dataDir, "keygate.db");
      const secrets = loadSecrets(
        config.dataDir,
        { pepper: config.pepper, adminTokens: config.adminTokens, adminTokensFile: config.adminTokensFile },
        () => sqliteFileHoldsKeys(path),
      );
      // Used anyway: a released keygate may have made keys with it, and their hashes depend on it.
      if (secrets.pepperFileProblems.length > 0) {
        logger.error(
          { file: secrets.pepperFile, problems: secrets.pepperFileProblems },
          "the pepper file is weaker than a generated one; keygate uses it, since the stored keys' hashes depend on it",
        );
      }
      if (secrets.adminTokenFileProblems.length > 0) {
        logger.error({ file: secrets.adminTokenFile, problems: secrets.adminTokenFileProblems }, "the admin token file is weaker than a generated one; keygate uses it");
      }
      if (secrets.ignoredAdminTokenFile !== null) {
        logger.warn(
          { file: secrets.ignoredAdminTokenFile },
          "the admin token file is ignored: with KEYGATE_ADMIN_TOKENS_FILE and no KEYGATE_ADMIN_TOKENS, that file's scoped tokens are the only admin tokens; delete it",
        );
      }
      // Once a minute for each message, with how many more there were since (`since`).
      const writerFailures = new LogThrottle(WRITER_FAILURE_LOG_INTERVAL_MS, MAX_WRITER_FAILURES_TRACKED);
      const store = new SqliteKeyStore(path, {
        migrate,
        writeInBackground: true,
        onWriterFailure: (message) => {
          const since = writerFailures.due(message);
          if (since !== null) logger.warn({ since }, message);
        },
        logger,
      });
      return { store, secrets, release: () => lock.release() };
    } catch (error) {
      lock.release();
      throw error;
    }
  }
  if (config.pepper === undefined) throw new ConfigError("KEYGATE_PEPPER is required when KEYGATE_MONGODB_URI is set");
  if (config.adminTokens === undefined && config.adminTokensFile === undefined) {
    throw new ConfigError("KEYGATE_ADMIN_TOKENS (or KEYGATE_ADMIN_TOKENS_FILE) is required when KEYGATE_MONGODB_URI is set");
  }
  const uri = config.mongodbUri;
  const store = await untilAnswered(
    () =>
      MongoKeyStore.connect(uri, { migrate, lookupTimeoutMs: config.checkBudgetMs, logger }).catch((error: unknown) => {
        throw mongoStartError(error);
      }),
    { giveUpAtMs, logger },
  );
  return {
    store,
    secrets: {
      pepper: config.pepper,
      pepperFile: null,
      pepperFileProblems: [],
      adminTokens: config.adminTokens ?? [],
      generatedAdminToken: null,
      adminTokenFile: null,
      adminTokenFileProblems: [],
      ignoredAdminTokenFile: null,
    },
    release: () => undefined,
  };
}

/**
 * The store as the write-behind recorders write to it, each call counted in
 * keygate_backend_duration_seconds and keygate_backend_errors_total (backend "store", op
 * apply_usage or touch_last_used). Checks only read the store, so when it refuses writes (a full
 * disk, a MongoDB that takes no writes) they go on answering while billed usage and last-use
 * times pile up in memory: these counts are what KeygateStoreErrors sees of it.
 */
function countedFlushWrites(store: KeyStore, metrics: Metrics): Pick<MeteringStore, "applyUsage"> & LastUsedStore {
  const counted = async (op: string, call: () => Promise<void>): Promise<void> => {
    const started = performance.now();
    let ok = false;
    try {
      await call();
      ok = true;
    } finally {
      metrics.backendCall("store", op, (performance.now() - started) / 1000, ok);
    }
  };
  return {
    applyUsage: (usage, credits) => counted("apply_usage", () => store.applyUsage(usage, credits)),
    touchLastUsed: (lastUsed) => counted("touch_last_used", () => store.touchLastUsed(lastUsed)),
  };
}

/**
 * Reads a configuration file again and puts it in force when it is valid and changed; a bad
 * file keeps the version in force and logs one line naming the file and the problem.
 */
function fileReloader<T>(spec: {
  file: string | undefined;
  kind: "policy" | "admin_tokens";
  /** The log lines of a failed and of an applied reload. */
  messages: { failed: string; applied: string };
  initial: T;
  load: (file: string) => T;
  same: (a: T, b: T) => boolean;
  apply: (next: T, previous: T) => void;
  logger: Logger;
  metrics: Metrics;
}): () => ReloadResult {
  let inForce = spec.initial;
  return () => {
    if (spec.file === undefined) return "unchanged";
    let next: T;
    try {
      next = spec.load(spec.file);
    } catch (error) {
      const problem = error instanceof Error ? error.message : String(error);
      spec.logger.error({ file: spec.file, problem }, spec.messages.failed);
      spec.metrics.configReloaded(spec.kind, "failed");
      return "failed";
    }
    if (spec.same(next, inForce)) {
      spec.metrics.configReloaded(spec.kind, "unchanged");
      return "unchanged";
    }
    try {
      spec.apply(next, inForce);
    } catch (error) {
      // Never out of a signal handler: a version that cannot be built is a failed reload.
      spec.logger.error({ file: spec.file, problem: error instanceof Error ? error.message : String(error) }, spec.messages.failed);
      spec.metrics.configReloaded(spec.kind, "failed");
      return "failed";
    }
    inForce = next;
    spec.logger.info({ file: spec.file }, spec.messages.applied);
    spec.metrics.configReloaded(spec.kind, "applied");
    return "applied";
  };
}

/**
 * Policy settings read once, by parts built at start (cache bounds, write-behind timers, the
 * Redis error mode): a reload that changes them says they wait for a restart.
 */
const RESTART_ONLY_SETTINGS: ReadonlyArray<readonly [string, (policy: Policy) => unknown]> = [
  ["cache", (p) => p.cache],
  ["lastUsedFlushSeconds", (p) => p.lastUsedFlushSeconds],
  ["limits.usageFlushSeconds", (p) => p.limits.usageFlushSeconds],
  ["limits.onRedisError", (p) => p.limits.onRedisError],
];

/** The named admin tokens of KEYGATE_ADMIN_TOKENS_FILE; a bad file is a ConfigError naming it. */
function scopedTokensFrom(path: string): ScopedToken[] {
  try {
    return loadTokensFile(path);
  } catch (error) {
    throw new ConfigError(error instanceof Error ? error.message : String(error));
  }
}

/** Redis failing at start, as one line naming KEYGATE_REDIS_URL (the URL may hold a password). */
function redisStartError(error: unknown): never {
  if (error instanceof RedisConnectError) {
    const message = `KEYGATE_REDIS_URL: ${error.message}`;
    throw error.unanswered ? new BackendUnansweredError(message, { cause: error }) : new ConfigError(message, { cause: error });
  }
  throw error;
}

/** Shared cache and bus: Redis when configured, else the single-process bus. */
async function openCache(
  config: Config,
  logger: Logger,
  store: KeyStore,
  usage: UsageRecorder,
  metrics: Metrics,
  redisTls: ReturnType<typeof redisTlsOptions> | undefined,
  giveUpAtMs: number,
): Promise<{ shared: SharedCache | undefined; bus: InvalidationBus; meter: Meter; idempotency: IdempotencyLedger; close(): Promise<void> }> {
  const memoryMeter = new MemoryMeter(store, usage);
  if (config.redis === undefined) {
    const bus = new LocalInvalidationBus();
    return { shared: undefined, bus, meter: memoryMeter, idempotency: new LocalIdempotencyLedger(), close: () => bus.close() };
  }
  const topology = config.redis;
  // rediss alone verifies Redis against the system's CAs; a private CA or a client certificate
  // comes from the KEYGATE_REDIS_TLS_* files, for every topology.
  const tls = redisTls ?? {};
  // The first connection waits for a Redis still starting (untilAnswered); once it answered, the
  // others are expected to connect as it did.
  const main = await untilAnswered(() => connectRedisClient(topology, logger, tls).catch(redisStartError), { giveUpAtMs, logger });
  await warnIfEvicting(main, logger);
  const subscriber = await openSubscriber(topology, main, logger, tls).catch(async (error: unknown) => {
    main.disconnect();
    return redisStartError(error);
  });
  const layout = keyLayout(topology);
  // Through Sentinel, invalidations go on a connection of their own: confirming one may wait
  // (WAIT) on it, and Checks must not queue behind that.
  let confirmation: { confirmInvalidation: () => Promise<void>; invalidationConnection: Redis } | undefined;
  if (topology.kind === "sentinel") {
    const invalidator = await connectRedisClient(topology, logger, tls).catch(async (error: unknown) => {
      main.disconnect();
      subscriber.disconnect();
      return redisStartError(error);
    });
    if (invalidator instanceof Redis) confirmation = { confirmInvalidation: sentinelConfirmation(invalidator, topology, tls), invalidationConnection: invalidator };
  }
  const bus = new RedisInvalidationBus(main, subscriber, logger);
  await bus.start();
  // Lost exactly when the meter below skips Redis: no Redis call fails then, so no error rate shows it.
  metrics.watchRedis(() => bus.connected);
  const { ttlSeconds, negativeTtlSeconds } = config.policy.cache;
  return {
    shared: new RedisSharedCache(main, { ttlSeconds, negativeTtlSeconds, keyPrefix: layout.l2Prefix, ...confirmation }),
    bus,
    meter: new RedisMeter(main, store, usage, memoryMeter, config.policy.limits.onRedisError, logger, metrics, "kg:", layout, () => !bus.connected),
    idempotency: new RedisIdempotencyLedger(main, logger),
    async close() {
      await bus.close();
      await Promise.allSettled([main.quit(), subscriber.quit(), confirmation?.invalidationConnection.quit()]);
    },
  };
}

/** The one composition root: builds store, caches, pipeline, services and listeners from Config. */
export async function buildKeygate(config: Config, options: BuildOptions): Promise<Keygate> {
  const { logger } = options;
  const nowMs = options.nowMs ?? Date.now;
  // Every module is loaded by now, ioredis's String subclass with them (string-prototype.ts).
  restoreFastStringPrototype();
  const metrics = new Metrics({ defaultMetrics: options.defaultMetrics ?? true });
  // Before anything is opened: a bad certificate or key fails the start naming its variable.
  const tls = config.tls === null ? null : new TlsCertificates(config.tls, { logger, metrics });
  const redisTls = config.redisTls === null ? undefined : redisTlsOptions(config.redisTls);
  // MongoDB and Redis that do not answer yet are tried again until then, the two waits together.
  const giveUpAtMs = performance.now() + config.startupWaitSeconds * 1000;
  const { store, secrets, release: releaseStore } = await openStore(config, options.migrate ?? true, logger, giveUpAtMs);
  const pepperSource = { file: secrets.pepperFile, dataDirFile: config.mongodbUri === undefined ? join(config.dataDir, "pepper") : null };
  // What the store's keys were made with, the pepper and then the prefix: a start with another
  // would answer every key 401 while reporting ready, so it is refused.
  const settled = async (): Promise<string> => {
    const pepper = await settlePepper(store, secrets.pepper, pepperSource, logger);
    await settleKeyPrefix(store, config.keyPrefix);
    return pepper;
  };
  const pepper = await settled().catch(async (error: unknown) => {
    await store.close().catch(() => undefined);
    releaseStore();
    throw error;
  });
  const format = new KeyFormat(config.keyPrefix);
  const hasher = new KeyHasher(pepper);
  // Flushes to MongoDB pause between calls, so the key lookups of other Checks are not held behind
  // a whole batch; SQLite's writing thread needs no pauses (WriteBehind).
  const writeBehind = { paced: store.kind !== "sqlite" };
  const flushWrites = countedFlushWrites(store, metrics);
  const usage = new UsageRecorder(flushWrites, logger, config.policy.limits.usageFlushSeconds * 1000, writeBehind);
  const cache = await openCache(config, logger, store, usage, metrics, redisTls, giveUpAtMs);
  const { bus, shared, meter, idempotency } = cache;
  const local = new MemoryCache({ ...config.policy.cache, forwardMetadata: config.policy.forwardMetadata });
  // Every backend call of a Check gives up within the Check's budget; L2 sooner, so the store
  // still has time to answer after a slow Redis.
  const l2TimeoutMs = Math.min(L2_TIMEOUT_MS, Math.ceil(config.checkBudgetMs / 3));
  const lookup = new SnapshotLookup({ local, shared, store, bus, logger, observer: metrics, l2TimeoutMs, storeSystem: store.kind });
  const lastUsed = new LastUsedRecorder(flushWrites, logger, config.policy.lastUsedFlushSeconds * 1000, writeBehind);
  const pipeline = new DecisionPipeline({
    format,
    hasher,
    lookup,
    routes: new RouteTable(config.policy.routes, config.policy.routeMatching),
    credentialHeaders: config.policy.credentialHeaders,
    lastUsed,
    meter,
    usage,
    policy: config.policy,
    nowMs,
    checkBudgetMs: config.checkBudgetMs,
    limitsBackend: shared === undefined ? "memory" : "redis",
  });
  const lifecycle = new LifecycleService({ store, lookup, pipeline, format, hasher, policy: config.policy, meter, usage, idempotency, nowMs, logger });
  // The store answered the pepper's check just now; should this read fail still, the start goes on
  // with ids monotonic from this process's own clock (the trail's order across a clock step back at risk).
  await lifecycle.init().catch((error: unknown) => logger.warn({ err: error }, "audit ids: the trail's newest id could not be read; continuing from the clock"));
  metrics.watchQueue("last_used", () => lastUsed.pendingCount);
  metrics.watchQueue("usage", () => usage.pendingCount);
  const readiness = new Readiness();
  // /readyz on the admin and HTTP authorization ports, and keygate_ready: one store ping at a time,
  // its answer reused for a second.
  const probe = sharedPing(
    () => store.ping(),
    (error) => logger.warn({ err: error }, "readiness probe failed"),
  );

  const scopedTokens = config.adminTokensFile === undefined ? [] : scopedTokensFrom(config.adminTokensFile);
  // Beside a tokens file no admin token is generated, so an empty one alone would leave no way in.
  if (config.adminTokensFile !== undefined && secrets.adminTokens.length + scopedTokens.length === 0) {
    throw new ConfigError(`KEYGATE_ADMIN_TOKENS_FILE (${config.adminTokensFile}) lists no tokens and KEYGATE_ADMIN_TOKENS is unset: keygate needs at least one admin token`);
  }
  const auth = new AdminAuth(secrets.adminTokens, format, scopedTokens);

  const limits = listenerLimits(config.listeners);
  // Both stay undefined when off: a Check then builds no span and writes no access line.
  const tracing = config.tracing === undefined ? undefined : createTracing(config.tracing, logger);
  const tracer = tracing?.tracer;
  const accessLog = AccessLog.create(logger, config.accessLogSampleRate);
  const grpc = createGrpcAuthzServer({ pipeline, readiness, metrics, logger, nowMs, limits, engine: config.grpcEngine, tracer, accessLog, tls: tls?.forListener("grpc") ?? null });
  // Asked at each scrape (the shared ping), so it holds where nothing polls /readyz. Not-ready pods
  // leave the Service and get no Checks, so no Check-based rate can show it.
  metrics.watchReady(() => (readiness.serving ? probe().then(() => true, () => false) : false));
  const http = createHttpAuthzServer({
    pipeline,
    readiness,
    probe,
    metrics,
    logger,
    nowMs,
    limits,
    proxy: config.httpAuthzProxy,
    tracer,
    accessLog,
    tls: tls?.forListener("http") ?? null,
  });
  const admin = createAdminServer({
    routes: keyAdminRoutes(lifecycle, nowMs, logger),
    auth,
    readiness,
    metrics,
    logger,
    probe,
    maxBodyBytes: config.adminMaxBodyBytes,
    limits,
    tls: tls?.forListener("admin") ?? null,
  });

  // Live reload: each file's version in force, and how to put a new one in force.
  const reloadPolicy = fileReloader<Policy>({
    file: config.policyFile,
    kind: "policy",
    messages: { failed: "policy reload failed; the policy in force stays", applied: "policy reloaded" },
    initial: config.policy,
    load: loadPolicyFile,
    same: isDeepStrictEqual,
    apply: (next, previous) => {
      const atRestart = RESTART_ONLY_SETTINGS.filter(([, read]) => !isDeepStrictEqual(read(next), read(previous))).map(([name]) => name);
      if (atRestart.length > 0) logger.warn({ settings: atRestart }, "these policy settings take effect at the next restart");
      const routes = new RouteTable(next.routes, next.routeMatching);
      pipeline.reconfigure(next, routes, next.credentialHeaders);
      lifecycle.reconfigure(next);
      local.reconfigure(next.forwardMetadata);
    },
    logger,
    metrics,
  });
  const tokensText = (tokens: readonly ScopedToken[]): string => JSON.stringify(tokens.map((t) => [t.name, t.token, [...t.permissions], t.owners === null ? null : [...t.owners]]));
  const reloadTokens = fileReloader<ScopedToken[]>({
    file: config.adminTokensFile,
    kind: "admin_tokens",
    messages: { failed: "admin tokens reload failed; the tokens in force stay", applied: "admin tokens reloaded" },
    initial: scopedTokens,
    load: loadTokensFile,
    same: (a, b) => tokensText(a) === tokensText(b),
    apply: (next) => auth.replaceScoped(next),
    logger,
    metrics,
  });

  let started: StartedServer[] = [];
  return {
    reload: () => ({ policy: reloadPolicy(), adminTokens: reloadTokens(), tls: tls?.reload() ?? "unchanged" }),
    lifecycle,
    store,
    metrics,
    generatedAdminToken: secrets.generatedAdminToken,
    adminTokens: secrets.adminTokens,
    async start() {
      // A listener that cannot bind closes the ones already bound and names its variable.
      const bind = async (variable: string, port: number, listener: { start(host: string, port: number): Promise<StartedServer> }): Promise<StartedServer> => {
        try {
          const server = await listener.start(config.host, port);
          started.push(server);
          return server;
        } catch (error) {
          await Promise.all(started.map((s) => s.stop(0)));
          started = [];
          throw listenerStartError(variable, config.host, port, error);
        }
      };
      const g = await bind("KEYGATE_GRPC_PORT", config.grpcPort, grpc);
      const h = await bind("KEYGATE_HTTP_AUTHZ_PORT", config.httpAuthzPort, http);
      const a = await bind("KEYGATE_ADMIN_PORT", config.adminPort, admin);
      lastUsed.start();
      usage.start();
      tls?.watch();
      readiness.setReady(true);
      const ports = { grpc: g.port, http: h.port, admin: a.port };
      options.announce?.(ports);
      logger.info(
        {
          grpcPort: g.port,
          httpPort: h.port,
          adminPort: a.port,
          // The policy judging Checks: its file (KEYGATE_CONFIG), or the built-in one with no routes.
          policy: config.policyFile ?? "built-in",
          store: store.kind,
          cache: shared === undefined ? "memory" : "redis",
          tracing: config.tracing === undefined ? "off" : config.tracing.protocol,
          accessLogSample: config.accessLogSampleRate,
          allocator: processAllocator(),
          tls: config.tls === null ? [] : [...config.tls.listeners],
          clientAuth: config.tls === null ? [] : [...config.tls.clientAuthListeners],
          ...(tls === null ? {} : { certificate: tls.fingerprint }),
        },
        "keygate listening",
      );
      return ports;
    },
    async stop() {
      readiness.drain();
      if (config.shutdownDelaySeconds > 0) await new Promise((resolve) => setTimeout(resolve, config.shutdownDelaySeconds * 1000));
      const graceMs = config.shutdownGraceSeconds * 1000;
      // One grace period for the drain and the final flush: a flush the store refuses is tried
      // again for what the drain left of it (at least once); one the store answers goes on for
      // up to 12 s past the grace (STOP_FLUSH_OVERRUN_MS), and a call it does not answer is given
      // up after the grace or 5 s (STOP_CALL_WAIT_MS), whichever ends later, so the stop ends
      // within the 15 s the pod's terminationGracePeriodSeconds gives the flush after the grace.
      const graceEndsAt = performance.now() + graceMs;
      await Promise.all(started.map((s) => s.stop(graceMs)));
      started = [];
      tls?.close();
      // Side by side: the usage retries are not held behind last-use times the store refuses.
      const written = await Promise.all([lastUsed.stop(graceEndsAt), usage.stop(graceEndsAt)]);
      await meter.close();
      await lookup.close();
      await cache.close();
      await store.close();
      releaseStore();
      // After the listeners drained: the spans of the last Checks go out before the process ends.
      await tracing?.shutdown();
      const writesLost = written.includes(false);
      logger.info({ writesLost }, "keygate stopped");
      return { writesLost };
    },
  };
}
