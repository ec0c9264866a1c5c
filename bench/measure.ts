import type { DataFile } from "./data.js";
import { runGhz } from "./ghz.js";
import type { GhzResult, RunLength } from "./ghz.js";
import { checkCounts, scrape } from "./metrics.js";
import type { CheckCounts } from "./metrics.js";
import { cpuSeconds, measureResources, round } from "./processes.js";
import type { ResourceUse } from "./processes.js";
import type { Target } from "./targets.js";

/** How ghz drives one kind of run. */
export interface LoadShape {
  connections: number;
  concurrency: number;
  /** GOMAXPROCS of ghz: 1 leaves the other core to the server on a 2-core machine. */
  cpus: number;
}

/** Load settings of a whole bench run. */
export interface LoadSettings {
  ghz: string;
  saturation: LoadShape;
  fixedRate: LoadShape & { rps: number };
  seconds: number;
}

/** One ghz run against one target, with the target's own CPU, memory and decision counts. */
export interface PhaseResult {
  ghz: GhzResult;
  resources: ResourceUse;
  /** Server CPU per answered Check: independent of how fast the load generator is. */
  cpuMicrosPerCheck: number;
  /** keygate's own counts over the run (from /metrics); null for the no-op server. */
  checks: CheckCounts | null;
  /** CPU cores used by each backend server (Redis, MongoDB-wire) during the run. */
  backendCores: Record<string, number>;
}

/** What to send in one run. */
interface RunSpec {
  data: DataFile;
  shape: LoadShape;
  length: RunLength;
  rps?: number;
}

/** Runs ghz once against `target`, measuring the target's process around it. */
export async function measure(target: Target, settings: LoadSettings, spec: RunSpec): Promise<PhaseResult> {
  const before = target.adminPort === null ? null : await scrape(target.adminPort);
  const end = measureResources(target.process.pid);
  const companions = (target.companions ?? []).map((c) => ({ ...c, before: cpuSeconds(c.pid) }));
  const startedAt = performance.now();
  const ghz = await runGhz(settings.ghz, {
    port: target.grpcPort,
    data: spec.data,
    connections: spec.shape.connections,
    concurrency: spec.shape.concurrency,
    cpus: spec.shape.cpus,
    length: spec.length,
    ...(spec.rps === undefined ? {} : { rps: spec.rps }),
  });
  const resources = end();
  const wallSeconds = Math.max(1e-9, (performance.now() - startedAt) / 1000);
  const backendCores: Record<string, number> = {};
  for (const c of companions) backendCores[c.name] = round((cpuSeconds(c.pid) - c.before) / wallSeconds, 2);
  const checks = before === null || target.adminPort === null ? null : checkCounts(before, await scrape(target.adminPort));
  const answered = Math.max(1, ghz.requests);
  return { ghz, resources, cpuMicrosPerCheck: round((resources.cpuSeconds * 1e6) / answered, 1), checks, backendCores };
}

/** Saturation: as fast as ghz can drive it, for the run's duration. */
export function saturation(target: Target, settings: LoadSettings, data: DataFile): Promise<PhaseResult> {
  return measure(target, settings, { data, shape: settings.saturation, length: { durationSeconds: settings.seconds } });
}

/** Fixed rate: `rps` Checks a second for the run's duration. */
export function fixedRate(target: Target, settings: LoadSettings, data: DataFile): Promise<PhaseResult> {
  return measure(target, settings, { data, shape: settings.fixedRate, length: { durationSeconds: settings.seconds }, rps: settings.fixedRate.rps });
}

/** One pass over the first `total` entries of `data` at saturation: warm-ups and touches. */
export function pass(target: Target, settings: LoadSettings, data: DataFile, total = data.entries): Promise<PhaseResult> {
  return measure(target, settings, { data, shape: settings.saturation, length: { total } });
}
