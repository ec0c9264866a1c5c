import type { DataFile } from "./data.js";
import { runGhz } from "./ghz.js";
import { pausesDuring, readJvmPauses } from "./jvm-gc.js";
import type { PauseSummary } from "./jvm-gc.js";
import type { GhzResult, RunLength } from "./ghz.js";
import { probeCheck, runH2load } from "./h2load.js";
import type { FixedRequest, H2loadResult, ProbeResult } from "./h2load.js";
import { checkCounts, scrape } from "./metrics.js";
import type { CheckCounts } from "./metrics.js";
import type { ScenarioName } from "./scenarios.js";
import { cpuSeconds, measureResources, round } from "./processes.js";
import type { ResourceUse } from "./processes.js";
import { runRategen } from "./rategen.js";
import type { Target } from "./targets.js";

/** How the load generator drives one kind of run. */
export interface LoadShape {
  connections: number;
  /** ghz's workers; rategen has none (open loop). */
  concurrency: number;
  /** GOMAXPROCS of ghz and rategen: 1 leaves the other core to the server on a 2-core machine. */
  cpus: number;
}

/** Load settings of a whole bench run. */
export interface LoadSettings {
  ghz: string;
  /** rategen, which measures the fixed-rate runs when set (binary data files); null: ghz does. */
  rategen: string | null;
  saturation: LoadShape;
  /** Latency is measured at each of `rates` Checks a second. */
  fixedRate: LoadShape & { rates: readonly number[] };
  /** h2load with one key; null when h2load is not installed. */
  h2load: { path: string; clients: number; streams: number } | null;
  seconds: number;
  /** The scenarios to run, in report order. */
  scenarios: readonly ScenarioName[];
  /**
   * false (the default): every scenario's fixed rates run before any saturation run on the
   * process, so a fixed rate is measured at that rate, not while the process collects what a
   * saturation run left in its old generation. true: each scenario's saturation runs, then its
   * fixed rates (--saturation-first).
   */
  saturationFirst: boolean;
}

/** One load-generator run against one target, with the target's own CPU, memory and decision counts. */
export interface PhaseResult {
  /** The load generator's figures: ghz's, or rategen's at fixed rates (`ghz.tool` says which). */
  ghz: GhzResult;
  resources: ResourceUse;
  /** Server CPU per answered Check: independent of how fast the load generator is. */
  cpuMicrosPerCheck: number;
  /** keygate's own counts over the run (from /metrics); null for the no-op server. */
  checks: CheckCounts | null;
  /** CPU cores used by each backend server (Redis, MongoDB-wire) during the run. */
  backendCores: Record<string, number>;
  /** Stop-the-world GC pauses of each Java backend (the MongoDB-wire server) that overlapped the run. */
  backendPauses: Record<string, PauseSummary>;
}

/** What to send in one run. */
interface RunSpec {
  data: DataFile;
  shape: LoadShape;
  length: RunLength;
  rps?: number;
  /** rategen's closed loop with the shape's concurrency, at most `requests` calls when set. */
  closed?: { requests?: number };
}

// A timed run that got no answer at all (ghz still connecting on a starved machine) says nothing
// about the server; it is run again, up to this many times, before its zero is reported.
const EMPTY_RUN_RETRIES = 2;

/** Runs the load generator against `target`, measuring the target's process around it. */
export async function measure(target: Target, settings: LoadSettings, spec: RunSpec): Promise<PhaseResult> {
  let result = await measureOnce(target, settings, spec);
  for (let retry = 1; retry <= EMPTY_RUN_RETRIES && result.ghz.requests === 0 && "durationSeconds" in spec.length; retry++) {
    process.stderr.write(`bench: ${target.label}: ${result.ghz.tool} got no answer in ${spec.length.durationSeconds} s; running it again (${retry} of ${EMPTY_RUN_RETRIES})\n`);
    result = await measureOnce(target, settings, spec);
  }
  return result;
}

/** A fixed-rate run by time goes to rategen when it is there and can read the data; the rest to ghz. */
function drive(target: Target, settings: LoadSettings, spec: RunSpec): Promise<GhzResult> {
  if (spec.closed !== undefined && settings.rategen !== null && "durationSeconds" in spec.length) {
    return runRategen(settings.rategen, {
      port: target.grpcPort,
      data: spec.data,
      concurrency: spec.shape.concurrency,
      ...(spec.closed.requests === undefined ? {} : { requests: spec.closed.requests }),
      seconds: spec.length.durationSeconds,
      connections: spec.shape.connections,
      cpus: spec.shape.cpus,
    });
  }
  if (spec.rps !== undefined && settings.rategen !== null && spec.data.format === "binary" && "durationSeconds" in spec.length) {
    return runRategen(settings.rategen, {
      port: target.grpcPort,
      data: spec.data,
      rps: spec.rps,
      seconds: spec.length.durationSeconds,
      connections: spec.shape.connections,
      cpus: spec.shape.cpus,
    });
  }
  return runGhz(settings.ghz, {
    port: target.grpcPort,
    data: spec.data,
    connections: spec.shape.connections,
    concurrency: spec.shape.concurrency,
    cpus: spec.shape.cpus,
    length: spec.length,
    ...(spec.rps === undefined ? {} : { rps: spec.rps }),
  });
}

async function measureOnce(target: Target, settings: LoadSettings, spec: RunSpec): Promise<PhaseResult> {
  const before = target.adminPort === null ? null : await scrape(target.adminPort);
  const end = measureResources(target.process.pid);
  const companions = (target.companions ?? []).map((c) => ({ ...c, before: cpuSeconds(c.pid) }));
  const startedAt = performance.now();
  const fromMs = Date.now();
  const ghz = await drive(target, settings, spec);
  const toMs = Date.now();
  const resources = end();
  const wallSeconds = Math.max(1e-9, (performance.now() - startedAt) / 1000);
  const backendCores: Record<string, number> = {};
  const backendPauses: Record<string, PauseSummary> = {};
  for (const c of companions) {
    backendCores[c.name] = round((cpuSeconds(c.pid) - c.before) / wallSeconds, 2);
    if (c.gcLog !== undefined) backendPauses[c.name] = pausesDuring(readJvmPauses(c.gcLog), fromMs, toMs);
  }
  const checks = before === null || target.adminPort === null ? null : checkCounts(before, await scrape(target.adminPort));
  const answered = Math.max(1, ghz.requests);
  return { ghz, resources, cpuMicrosPerCheck: round((resources.cpuSeconds * 1e6) / answered, 1), checks, backendCores, backendPauses };
}

/** Saturation: as fast as ghz can drive it, for the run's duration. */
export function saturation(target: Target, settings: LoadSettings, data: DataFile): Promise<PhaseResult> {
  return measure(target, settings, { data, shape: settings.saturation, length: { durationSeconds: settings.seconds } });
}

/**
 * Saturation with rategen's closed loop, the same connections and calls in flight as ghz's: many
 * keys, and a load generator that reads only each answer's grpc-status, so the server rather than
 * the generator sets the pace (ghz decodes every CheckResponse, and keygate's allows, with their
 * identity headers and metadata, cost it about twice a no-op's empty one). At most `requests`
 * calls when set (a cold run's keys, so none wraps to a cached one). Null without rategen or a
 * binary data file.
 */
export async function closedLoopSaturation(target: Target, settings: LoadSettings, data: DataFile, requests?: number): Promise<PhaseResult | null> {
  if (settings.rategen === null || data.format !== "binary") return null;
  return measure(target, settings, { data, shape: settings.saturation, length: { durationSeconds: settings.seconds }, closed: requests === undefined ? {} : { requests } });
}

/** One fixed-rate run: latency at a set number of Checks a second. */
export interface FixedRateResult extends PhaseResult {
  /** The rate asked of the load generator; `ghz.rps` is what it got. */
  targetRps: number;
}

/** Fixed rates: each of the run's rates for the run's duration, in turn. */
export async function fixedRates(target: Target, settings: LoadSettings, data: DataFile): Promise<FixedRateResult[]> {
  const out: FixedRateResult[] = [];
  for (const rps of settings.fixedRate.rates) {
    const phase = await measure(target, settings, { data, shape: settings.fixedRate, length: { durationSeconds: settings.seconds }, rps });
    out.push({ targetRps: rps, ...phase });
  }
  return out;
}

/** h2load driving one key (one fixed request) against one target, with the target's CPU and counts. */
export interface OneKeyResult {
  target: string;
  h2load: H2loadResult;
  /** grpc-js's answer to the same bytes just before and just after the run. */
  probe: { before: ProbeResult; after: ProbeResult };
  resources: ResourceUse;
  /**
   * Answers that were gRPC OK: HTTP 200 less keygate's own error decisions (h2load cannot read
   * grpc-status, which travels in trailers). For a no-op every HTTP 200 is its fixed OK.
   */
  grpcOk: number;
  /** Non-OK gRPC statuses keygate counted (decision "error"); null for a no-op. */
  grpcErrors: number | null;
  /** keygate's allows over the run; null for a no-op. */
  allows: number | null;
  cpuMicrosPerCheck: number;
  checks: CheckCounts | null;
}

/**
 * Saturation with h2load and one fixed request. The request must first be a gRPC OK allow when
 * grpc-js sends the same bytes, so HTTP 200 from h2load means what it claims.
 */
export async function oneKey(name: string, target: Target, settings: LoadSettings, request: FixedRequest): Promise<OneKeyResult | null> {
  if (settings.h2load === null) return null;
  const before = await probeCheck(target.grpcPort, request.message);
  if (before.grpcStatus !== 0 || !before.allowed) {
    throw new Error(`${name}: the fixed h2load request is not an allow (gRPC status ${before.grpcStatus}, Check status ${String(before.checkStatus)})`);
  }
  const scraped = target.adminPort === null ? null : await scrape(target.adminPort);
  const end = measureResources(target.process.pid);
  const run = { port: target.grpcPort, request, clients: settings.h2load.clients, streams: settings.h2load.streams, seconds: settings.seconds };
  let h2load = await runH2load(settings.h2load.path, run);
  for (let retry = 1; retry <= EMPTY_RUN_RETRIES && h2load.http200 === 0; retry++) {
    process.stderr.write(`bench: ${name}: h2load got no answer in ${settings.seconds} s; running it again (${retry} of ${EMPTY_RUN_RETRIES})\n`);
    h2load = await runH2load(settings.h2load.path, run);
  }
  const resources = end();
  const checks = scraped === null || target.adminPort === null ? null : checkCounts(scraped, await scrape(target.adminPort));
  const after = await probeCheck(target.grpcPort, request.message);
  const grpcErrors = checks === null ? null : (checks.decisions["error"] ?? 0);
  const grpcOk = Math.max(0, h2load.http200 - (grpcErrors ?? 0));
  return {
    target: name,
    h2load,
    probe: { before, after },
    resources,
    grpcOk,
    grpcErrors,
    allows: checks === null ? null : (checks.reasons["OK"] ?? 0),
    cpuMicrosPerCheck: round((resources.cpuSeconds * 1e6) / Math.max(1, grpcOk), 1),
    checks,
  };
}

/** One pass over the first `total` entries of `data` at saturation: warm-ups and touches. */
export function pass(target: Target, settings: LoadSettings, data: DataFile, total = data.entries): Promise<PhaseResult> {
  return measure(target, settings, { data, shape: settings.saturation, length: { total } });
}
