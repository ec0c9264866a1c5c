import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from "prom-client";
import type { LookupObserver } from "../cache/lookup.js";
import { LISTENER_NAMES } from "../config.js";
import type { ListenerId } from "../config.js";
import { StoredValueError } from "../store/stored-values.js";
import { OneLabelHistogram } from "./histogram.js";

// Sub-millisecond buckets: a cached Check takes tens of microseconds.
const CHECK_BUCKETS = [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1];
const IO_BUCKETS = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 2.5];

/** keygate's three listeners, as metrics label them (and the TLS settings name them). */
export type ListenerName = ListenerId;
const LISTENERS: readonly ListenerName[] = LISTENER_NAMES;

/** prom-client's default gauges whose names end in _total, as only counters' should. */
const MISNAMED_DEFAULT_GAUGES = ["nodejs_active_handles_total", "nodejs_active_requests_total", "nodejs_active_resources_total"] as const;

/**
 * A count kept as a plain number on the hot path and added to its prom-client counter at each
 * scrape: prom-client hashes a child's labels into a new string on every inc(), which for the
 * two counts each Check makes was most of the metrics' cost per Check.
 */
interface CountCell<L extends string> {
  labels: Record<L, string>;
  count: number;
  reported: number;
}

/** Cells by two label values, found without building a key string per count. */
class CountCells<L extends string> {
  readonly #cells = new Map<string, Map<string, CountCell<L>>>();

  constructor(private readonly labelsOf: (a: string, b: string) => Record<L, string>) {}

  /** Counts one for (a, b). */
  add(a: string, b: string): void {
    let inner = this.#cells.get(a);
    if (inner === undefined) {
      inner = new Map();
      this.#cells.set(a, inner);
    }
    const cell = inner.get(b);
    if (cell === undefined) inner.set(b, { labels: this.labelsOf(a, b), count: 1, reported: 0 });
    else cell.count += 1;
  }

  /** Adds what was counted since the last scrape to `counter`. */
  report(counter: Counter<L>): void {
    for (const inner of this.#cells.values()) {
      for (const cell of inner.values()) {
        if (cell.count === cell.reported) continue;
        counter.inc(cell.labels, cell.count - cell.reported);
        cell.reported = cell.count;
      }
    }
  }
}

/**
 * What a Check that could not be decided is counted as. It is answered UNAVAILABLE either way (fail
 * closed; the proxy's failure_mode_allow decides), but only a backend that failed or a deadline is
 * an outage: a programming error (TypeError and its kin) or a stored value keygate never writes is
 * a defect, counted INTERNAL so KeygateCheckErrors fires, and logged at level 50.
 */
export function failureReason(error: unknown): "UNAVAILABLE" | "INTERNAL" {
  const defect =
    error instanceof TypeError || error instanceof RangeError || error instanceof ReferenceError || error instanceof SyntaxError || error instanceof EvalError || error instanceof StoredValueError;
  return defect ? "INTERNAL" : "UNAVAILABLE";
}

function decisionOf(reason: string): string {
  return reason === "OK" ? "allow" : reason === "UNAVAILABLE" || reason === "INTERNAL" ? "error" : "deny";
}

/** Prometheus metrics of one keygate process, served on the admin port's /metrics. */
export class Metrics implements LookupObserver {
  readonly registry = new Registry();
  readonly #checkDuration: OneLabelHistogram;
  readonly #ioDuration: Histogram<"backend" | "op">;
  readonly #ioErrors: Counter<"backend" | "op">;
  readonly #queueSizes = new Map<string, () => number>();
  // Counted per Check as plain numbers, reported at each scrape.
  readonly #checkCounts = new CountCells<"decision" | "reason" | "mode">((mode, reason) => ({ decision: decisionOf(reason), reason, mode }));
  readonly #cacheCounts = new CountCells<"layer" | "result">((layer, result) => ({ layer, result }));
  readonly #connections: Gauge<"listener">;
  readonly #connectionsRejected: Counter<"listener">;
  readonly #reloads: Counter<"file" | "result">;
  readonly #reloadFailing: Gauge<"file">;
  readonly #tlsHandshakeFailures: Counter<"listener">;
  readonly #unhandledRejections: Counter;
  readonly #redisConnected: Gauge;
  /** The render waiting for readiness for /metrics, which every scrape arriving meanwhile answers with (render). */
  #rendering: Promise<string> | null = null;
  /** Readiness as render read it, for keygate_ready while render reads the registry; null otherwise. */
  readonly #renderReady: { ready: boolean | null } = { ready: null };
  /** States read at each scrape (watchReady, watchRedis, watchLogDrops). */
  readonly #states = { ready: (): boolean | Promise<boolean> => false, redisConnected: (): boolean => false, logLinesDropped: (): number => 0 };

  constructor(options: { defaultMetrics: boolean } = { defaultMetrics: true }) {
    if (options.defaultMetrics) {
      collectDefaultMetrics({ register: this.registry });
      // Gauges named like counters fail `promtool check metrics`; the same counts stay, by type,
      // in nodejs_active_handles, nodejs_active_requests and nodejs_active_resources.
      for (const name of MISNAMED_DEFAULT_GAUGES) this.registry.removeSingleMetric(name);
    }
    const registers = [this.registry];
    const states = this.#states;
    const renderReady = this.#renderReady;
    this.#reloads = new Counter({
      name: "keygate_config_reloads_total",
      help: "Reloads of the policy file, the admin tokens file or the TLS certificate files (file=tls) by result: applied, unchanged, or failed (the previous version stays in force)",
      labelNames: ["file", "result"],
      registers,
    });
    this.#reloadFailing = new Gauge({
      name: "keygate_config_reload_failing",
      help: "1 while the last reload of the file failed (a bad edit is on disk; the previous version is in force), else 0",
      labelNames: ["file"],
      registers,
    });
    const checkCounts = this.#checkCounts;
    new Counter({
      name: "keygate_checks_total",
      help: "Check decisions by decision (allow, deny, error), reason and mode (grpc, http)",
      labelNames: ["decision", "reason", "mode"],
      registers,
      collect() {
        checkCounts.report(this);
      },
    });
    // Observed on every Check: kept as plain numbers, read out as prom-client's Histogram would.
    this.#checkDuration = new OneLabelHistogram("keygate_check_duration_seconds", "Time from a Check arriving to its answer, by mode", "mode", CHECK_BUCKETS, registers);
    const cacheCounts = this.#cacheCounts;
    new Counter({
      name: "keygate_cache_lookups_total",
      help: "Snapshot lookups by cache layer (l1, l2) and result (hit, negative, miss)",
      labelNames: ["layer", "result"],
      registers,
      collect() {
        cacheCounts.report(this);
      },
    });
    this.#ioDuration = new Histogram({
      name: "keygate_backend_duration_seconds",
      help: "Latency of store and Redis calls by backend and operation: those of the Check path, and the store writes of write-behind flushes (op apply_usage, touch_last_used)",
      labelNames: ["backend", "op"],
      buckets: IO_BUCKETS,
      registers,
    });
    this.#ioErrors = new Counter({
      name: "keygate_backend_errors_total",
      help: "Failed store and Redis calls by backend and operation: those of the Check path, and the store writes of write-behind flushes (op apply_usage, touch_last_used)",
      labelNames: ["backend", "op"],
      registers,
    });
    this.#connections = new Gauge({
      name: "keygate_connections",
      help: "Open client connections, by listener (grpc, http, admin)",
      labelNames: ["listener"],
      registers,
    });
    this.#connectionsRejected = new Counter({
      name: "keygate_connections_rejected_total",
      help: "Connections closed on arrival because the listener held its maximum, by listener",
      labelNames: ["listener"],
      registers,
    });
    this.#tlsHandshakeFailures = new Counter({
      name: "keygate_tls_handshake_failures_total",
      help: "TLS handshakes that failed or timed out (no or an untrusted client certificate, no shared protocol), by listener",
      labelNames: ["listener"],
      registers,
    });
    this.#unhandledRejections = new Counter({
      name: "keygate_unhandled_rejections_total",
      help: "Promises rejected with no handler (each logged at error level); keygate serve keeps serving instead of exiting",
      registers,
    });
    this.#unhandledRejections.inc(0);
    // The count is kept where the lines are dropped (the stdout destination); read at each scrape.
    let logLinesReported = 0;
    new Counter({
      name: "keygate_log_lines_dropped_total",
      help: "Log lines dropped because stdout was not read while 4 MiB of log waited for it (a stuck log shipper, a full log pipe)",
      registers,
      collect() {
        const dropped = states.logLinesDropped();
        this.inc(dropped - logLinesReported);
        logLinesReported = dropped;
      },
    });
    // Every listener's series exists from the start, so a dashboard shows 0 rather than nothing.
    for (const listener of LISTENERS) {
      this.#connections.labels(listener).set(0);
      this.#connectionsRejected.labels(listener).inc(0);
      this.#tlsHandshakeFailures.labels(listener).inc(0);
    }
    // Read at each scrape, never per Check: the states are kept where /readyz and the bus keep them.
    new Gauge({
      name: "keygate_ready",
      help: "1 while this replica reports ready on /readyz (serving, and the store answers a ping), else 0 (starting, draining, or the store not answering)",
      registers,
      collect() {
        // render asked already, just before reading the registry: no wait here, so every count is
        // read when the registry is (a scrape that follows a Check counts it).
        if (renderReady.ready !== null) return void this.set(renderReady.ready ? 1 : 0);
        return Promise.resolve(states.ready()).then((ready) => void this.set(ready ? 1 : 0));
      },
    });
    // Registered by watchRedis only: a keygate without Redis has no such series, rather than a 0 that would page.
    this.#redisConnected = new Gauge({
      name: "keygate_redis_connected",
      help: "1 while the invalidation bus hears Redis (subscribed, its heartbeats coming back), 0 while Redis is lost (limits follow limits.onRedisError, L2 is not read); only with KEYGATE_REDIS_URL",
      registers: [],
      collect() {
        this.set(states.redisConnected() ? 1 : 0);
      },
    });
    const sizes = this.#queueSizes;
    new Gauge({
      name: "keygate_write_behind_pending",
      help: "Entries not yet written to the store, waiting for a flush or in one under way, by queue",
      labelNames: ["queue"],
      registers,
      collect() {
        for (const [queue, size] of sizes) this.set({ queue }, size());
      },
    });
  }

  /**
   * The registry's text for /metrics, shared: /metrics needs no token, and each render builds
   * ~10 KiB of text and waits for keygate_ready (the store ping), so a flood of pipelined scrapes
   * rendered and held one each. Scrapes that come while the ping is awaited share it and the text
   * read once it is answered: prom-client reads every count when the registry's render starts, so
   * that starts only then, with readiness already known, and a scrape that follows a Check counts
   * it. One that comes after that starts a render of its own.
   */
  render(): Promise<string> {
    if (this.#rendering !== null) return this.#rendering;
    const rendering = (async () => {
      let ready: boolean;
      try {
        ready = await this.#states.ready();
      } finally {
        this.#rendering = null;
      }
      // Every synchronous collect runs within metrics()'s call, keygate_ready's reading this.
      this.#renderReady.ready = ready;
      try {
        return this.registry.metrics();
      } finally {
        this.#renderReady.ready = null;
      }
    })();
    // Every caller handles the rejection; this copy only keeps it from counting as unhandled.
    rendering.catch(() => undefined);
    this.#rendering = rendering;
    return rendering;
  }

  /** Counts one answered Check and observes its duration; reason "OK" is an allow, "UNAVAILABLE" and "INTERNAL" errors. */
  recordCheck(mode: "grpc" | "http", reason: string, startedAtMs: number, endedAtMs: number): void {
    this.#checkCounts.add(mode, reason);
    this.#checkDuration.cell(mode).observe((endedAtMs - startedAtMs) / 1000);
  }

  cacheResult(layer: "l1" | "l2", result: "hit" | "negative" | "miss"): void {
    this.#cacheCounts.add(layer, result);
  }

  backendCall(backend: "store" | "redis", op: string, seconds: number, ok: boolean): void {
    this.#ioDuration.labels(backend, op).observe(seconds);
    if (!ok) this.#ioErrors.labels(backend, op).inc();
  }

  /** Counts a connection a listener accepted, until it closes. */
  connectionOpened(listener: ListenerName): void {
    this.#connections.labels(listener).inc();
  }

  connectionClosed(listener: ListenerName): void {
    this.#connections.labels(listener).dec();
  }

  /** Counts a connection refused because the listener was at its cap. */
  connectionRejected(listener: ListenerName): void {
    this.#connectionsRejected.labels(listener).inc();
  }

  /** Counts a reload of a configuration file ("policy" or "admin_tokens") and whether it was applied. */
  configReloaded(file: "policy" | "admin_tokens" | "tls", result: "applied" | "unchanged" | "failed"): void {
    this.#reloads.labels(file, result).inc();
    this.#reloadFailing.labels(file).set(result === "failed" ? 1 : 0);
  }

  /** Counts one promise rejected with no handler. */
  unhandledRejection(): void {
    this.#unhandledRejections.inc();
  }

  /** Counts a TLS handshake that failed on a listener. */
  tlsHandshakeFailed(listener: ListenerName): void {
    this.#tlsHandshakeFailures.labels(listener).inc();
  }

  /**
   * Reports at each scrape whether this replica would answer /readyz ready (keygate_ready): asked
   * at the scrape, so it holds where nothing polls /readyz.
   */
  watchReady(isReady: () => boolean | Promise<boolean>): void {
    this.#states.ready = isReady;
  }

  /** Exports keygate_redis_connected, read at each scrape; only a keygate with Redis calls this. */
  watchRedis(isConnected: () => boolean): void {
    if (this.registry.getSingleMetric("keygate_redis_connected") === undefined) this.registry.registerMetric(this.#redisConnected);
    this.#states.redisConnected = isConnected;
  }

  /** Exports the log lines the stdout destination dropped (keygate_log_lines_dropped_total), read at each scrape. */
  watchLogDrops(droppedLines: () => number): void {
    this.#states.logLinesDropped = droppedLines;
  }

  /** Reports a write-behind queue's size at each scrape. */
  watchQueue(queue: string, size: () => number): void {
    this.#queueSizes.set(queue, size);
  }
}
