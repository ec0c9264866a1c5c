import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from "prom-client";
import type { LookupObserver } from "../cache/lookup.js";
import { LISTENER_NAMES } from "../config.js";
import type { ListenerId } from "../config.js";

// Sub-millisecond buckets: a cached Check takes tens of microseconds.
const CHECK_BUCKETS = [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1];
const IO_BUCKETS = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 2.5];

/** keygate's three listeners, as metrics label them (and the TLS settings name them). */
export type ListenerName = ListenerId;
const LISTENERS: readonly ListenerName[] = LISTENER_NAMES;

/** prom-client's default gauges whose names end in _total, as only counters' should. */
const MISNAMED_DEFAULT_GAUGES = ["nodejs_active_handles_total", "nodejs_active_requests_total", "nodejs_active_resources_total"] as const;

/** Prometheus metrics of one keygate process, served on the admin port's /metrics. */
export class Metrics implements LookupObserver {
  readonly registry = new Registry();
  readonly #checks: Counter<"decision" | "reason" | "mode">;
  readonly #checkDuration: Histogram<"mode">;
  readonly #cache: Counter<"layer" | "result">;
  readonly #ioDuration: Histogram<"backend" | "op">;
  readonly #ioErrors: Counter<"backend" | "op">;
  readonly #queueSizes = new Map<string, () => number>();
  // Label children are looked up once; the hot path then only increments.
  readonly #checkChildren = new Map<string, Counter.Internal>();
  readonly #durationChildren = new Map<string, Histogram.Internal<"mode">>();
  readonly #cacheChildren = new Map<string, Counter.Internal>();
  readonly #connections: Gauge<"listener">;
  readonly #connectionsRejected: Counter<"listener">;
  readonly #reloads: Counter<"file" | "result">;
  readonly #reloadFailing: Gauge<"file">;
  readonly #tlsHandshakeFailures: Counter<"listener">;

  constructor(options: { defaultMetrics: boolean } = { defaultMetrics: true }) {
    if (options.defaultMetrics) {
      collectDefaultMetrics({ register: this.registry });
      // Gauges named like counters fail `promtool check metrics`; the same counts stay, by type,
      // in nodejs_active_handles, nodejs_active_requests and nodejs_active_resources.
      for (const name of MISNAMED_DEFAULT_GAUGES) this.registry.removeSingleMetric(name);
    }
    const registers = [this.registry];
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
    this.#checks = new Counter({
      name: "keygate_checks_total",
      help: "Check decisions by decision (allow, deny, error), reason and mode (grpc, http)",
      labelNames: ["decision", "reason", "mode"],
      registers,
    });
    this.#checkDuration = new Histogram({
      name: "keygate_check_duration_seconds",
      help: "Time from a Check arriving to its answer, by mode",
      labelNames: ["mode"],
      buckets: CHECK_BUCKETS,
      registers,
    });
    this.#cache = new Counter({
      name: "keygate_cache_lookups_total",
      help: "Snapshot lookups by cache layer (l1, l2) and result (hit, negative, miss)",
      labelNames: ["layer", "result"],
      registers,
    });
    this.#ioDuration = new Histogram({
      name: "keygate_backend_duration_seconds",
      help: "Latency of store and Redis calls on the Check path, by backend and operation",
      labelNames: ["backend", "op"],
      buckets: IO_BUCKETS,
      registers,
    });
    this.#ioErrors = new Counter({
      name: "keygate_backend_errors_total",
      help: "Failed store and Redis calls on the Check path, by backend and operation",
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
    // Every listener's series exists from the start, so a dashboard shows 0 rather than nothing.
    for (const listener of LISTENERS) {
      this.#connections.labels(listener).set(0);
      this.#connectionsRejected.labels(listener).inc(0);
      this.#tlsHandshakeFailures.labels(listener).inc(0);
    }
    const sizes = this.#queueSizes;
    new Gauge({
      name: "keygate_write_behind_pending",
      help: "Entries waiting to be written to the store, by queue",
      labelNames: ["queue"],
      registers,
      collect() {
        for (const [queue, size] of sizes) this.set({ queue }, size());
      },
    });
  }

  /** Counts one answered Check and observes its duration; reason "OK" is an allow, "UNAVAILABLE" an error. */
  recordCheck(mode: "grpc" | "http", reason: string, startedAtMs: number, endedAtMs: number): void {
    const id = `${mode}|${reason}`;
    let child = this.#checkChildren.get(id);
    if (child === undefined) {
      const decision = reason === "OK" ? "allow" : reason === "UNAVAILABLE" || reason === "INTERNAL" ? "error" : "deny";
      child = this.#checks.labels(decision, reason, mode);
      this.#checkChildren.set(id, child);
    }
    child.inc();
    let duration = this.#durationChildren.get(mode);
    if (duration === undefined) {
      duration = this.#checkDuration.labels(mode);
      this.#durationChildren.set(mode, duration);
    }
    duration.observe((endedAtMs - startedAtMs) / 1000);
  }

  cacheResult(layer: "l1" | "l2", result: "hit" | "negative" | "miss"): void {
    const id = `${layer}|${result}`;
    let child = this.#cacheChildren.get(id);
    if (child === undefined) {
      child = this.#cache.labels(layer, result);
      this.#cacheChildren.set(id, child);
    }
    child.inc();
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

  /** Counts a TLS handshake that failed on a listener. */
  tlsHandshakeFailed(listener: ListenerName): void {
    this.#tlsHandshakeFailures.labels(listener).inc();
  }

  /** Reports a write-behind queue's size at each scrape. */
  watchQueue(queue: string, size: () => number): void {
    this.#queueSizes.set(queue, size);
  }
}
