/** Prometheus series by their full name with labels, e.g. `keygate_checks_total{decision="allow",…}`. */
export type Samples = Map<string, number>;

const SAMPLE_LINE = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)/;
const LABEL = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;

/** Parses Prometheus text exposition into samples. */
export function parseSamples(text: string): Samples {
  const samples: Samples = new Map();
  for (const line of text.split("\n")) {
    if (line.startsWith("#")) continue;
    const match = SAMPLE_LINE.exec(line);
    if (match === null) continue;
    const value = Number(match[3]);
    if (Number.isFinite(value)) samples.set(`${match[1] ?? ""}${match[2] ?? ""}`, value);
  }
  return samples;
}

/** Reads keygate's /metrics from its admin port. */
export async function scrape(adminPort: number): Promise<Samples> {
  const response = await fetch(`http://127.0.0.1:${adminPort}/metrics`);
  if (!response.ok) throw new Error(`GET /metrics answered ${response.status}`);
  return parseSamples(await response.text());
}

function labelsOf(series: string): Record<string, string> {
  const start = series.indexOf("{");
  const labels: Record<string, string> = {};
  if (start < 0) return labels;
  for (const match of series.slice(start).matchAll(LABEL)) labels[match[1] ?? ""] = match[2] ?? "";
  return labels;
}

function nameOf(series: string): string {
  const start = series.indexOf("{");
  return start < 0 ? series : series.slice(0, start);
}

/** Sums the increase of every series of `name`, grouped by the value of `label`. */
function deltaBy(before: Samples, after: Samples, name: string, group: (labels: Record<string, string>) => string | null): Record<string, number> {
  const out: Record<string, number> = {};
  for (const [series, value] of after) {
    if (nameOf(series) !== name) continue;
    const key = group(labelsOf(series));
    if (key === null) continue;
    const delta = value - (before.get(series) ?? 0);
    if (delta !== 0) out[key] = (out[key] ?? 0) + delta;
  }
  return out;
}

/** What keygate itself counted during one run: decisions, cache layers and backend calls. */
export interface CheckCounts {
  /** gRPC Checks by decision: allow, deny, error. */
  decisions: Record<string, number>;
  /** gRPC Checks by reason: OK, MALFORMED_KEY, UNKNOWN_KEY, KEY_REVOKED, RATE_LIMITED, … */
  reasons: Record<string, number>;
  /** Snapshot lookups by layer and result, e.g. "l1 hit", "l2 miss". */
  cache: Record<string, number>;
  /** Store and Redis calls on the Check path, e.g. "store find_snapshot", "redis charge". */
  backendCalls: Record<string, number>;
  /** The same calls that took over 10 ms (keygate_backend_duration_seconds above its 0.01 bucket). */
  backendOver10Ms: Record<string, number>;
  /**
   * keygate's GC pauses by kind (major, minor, incremental, weakcb), from prom-client's
   * nodejs_gc_duration_seconds: how many, their total, and how many took over 10 ms.
   */
  gc: Record<string, GcPauses>;
}

/** GC pauses of one kind during a run. */
export interface GcPauses {
  count: number;
  totalMs: number;
  over10Ms: number;
}

function gcPauses(before: Samples, after: Samples): Record<string, GcPauses> {
  const byKind = (labels: Record<string, string>) => labels["kind"] ?? null;
  const counts = deltaBy(before, after, "nodejs_gc_duration_seconds_count", byKind);
  const sums = deltaBy(before, after, "nodejs_gc_duration_seconds_sum", byKind);
  const within10Ms = deltaBy(before, after, "nodejs_gc_duration_seconds_bucket", (l) => (l["le"] === "0.01" ? (l["kind"] ?? null) : null));
  const out: Record<string, GcPauses> = {};
  for (const [kind, count] of Object.entries(counts)) {
    out[kind] = { count, totalMs: Math.round((sums[kind] ?? 0) * 10_000) / 10, over10Ms: count - (within10Ms[kind] ?? 0) };
  }
  return out;
}

/** The difference between two scrapes, gRPC mode only. */
export function checkCounts(before: Samples, after: Samples): CheckCounts {
  const backendCalls = deltaBy(before, after, "keygate_backend_duration_seconds_count", (l) => `${l["backend"] ?? ""} ${l["op"] ?? ""}`);
  const grpc = (pick: string) => (labels: Record<string, string>) => (labels["mode"] === "grpc" ? (labels[pick] ?? "") : null);
  return {
    decisions: deltaBy(before, after, "keygate_checks_total", grpc("decision")),
    reasons: deltaBy(before, after, "keygate_checks_total", grpc("reason")),
    cache: deltaBy(before, after, "keygate_cache_lookups_total", (l) => `${l["layer"] ?? ""} ${l["result"] ?? ""}`),
    backendCalls,
    backendOver10Ms: over(backendCalls, deltaBy(before, after, "keygate_backend_duration_seconds_bucket", (l) => (l["le"] === "0.01" ? `${l["backend"] ?? ""} ${l["op"] ?? ""}` : null))),
    gc: gcPauses(before, after),
  };
}

/** Of each series' `total`, how many are not in `within`; series with none are left out. */
function over(total: Record<string, number>, within: Record<string, number>): Record<string, number> {
  const out: Record<string, number> = {};
  for (const [series, count] of Object.entries(total)) {
    const slow = count - (within[series] ?? 0);
    if (slow > 0) out[series] = slow;
  }
  return out;
}

/** One gauge's value, e.g. nodejs_heap_size_used_bytes. */
export function gauge(samples: Samples, name: string): number | null {
  return samples.get(name) ?? null;
}
