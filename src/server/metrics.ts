import { Counter, Registry, collectDefaultMetrics } from "prom-client";

/** Prometheus metrics of one keygate process. */
export class Metrics {
  readonly registry = new Registry();
  readonly decisions: Counter<"entry" | "result" | "reason">;
  readonly failures: Counter<"entry">;
  readonly #children = new Map<string, Counter.Internal>();

  constructor(options: { defaultMetrics: boolean } = { defaultMetrics: true }) {
    if (options.defaultMetrics) collectDefaultMetrics({ register: this.registry });
    this.decisions = new Counter({
      name: "keygate_decisions_total",
      help: "Check decisions by entry point, result and reason",
      labelNames: ["entry", "result", "reason"],
      registers: [this.registry],
    });
    this.failures = new Counter({
      name: "keygate_check_failures_total",
      help: "Checks that could not be decided (store or cache failure)",
      labelNames: ["entry"],
      registers: [this.registry],
    });
  }

  /** Counts a decision; label children are cached so the hot path does no label hashing. */
  countDecision(entry: string, reason: string): void {
    const id = `${entry}|${reason}`;
    let child = this.#children.get(id);
    if (child === undefined) {
      child = this.decisions.labels(entry, reason === "OK" ? "allow" : "deny", reason);
      this.#children.set(id, child);
    }
    child.inc();
  }
}
