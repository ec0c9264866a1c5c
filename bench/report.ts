import { spawnSync } from "node:child_process";
import { mkdirSync, writeFileSync } from "node:fs";
import { cpus, loadavg, release, totalmem } from "node:os";
import { join, resolve } from "node:path";
import type { MemoryResult } from "./memory.js";
import { round } from "./processes.js";
import type { ProfiledRun } from "./profile.js";
import type { ScenarioName, ScenarioResult } from "./scenarios.js";

const root = resolve(import.meta.dirname, "..");
const MB = 1024 * 1024;

/** The machine and code a run measured. */
export interface MachineInfo {
  cores: number;
  cpuModel: string;
  totalMemoryBytes: number;
  os: string;
  benchNode: string;
  keygateNode: string;
  gitCommit: string;
  /** True when the work tree had uncommitted changes: the figures are of those. */
  gitDirty: boolean;
  loadAverageAtStart: number[];
}

function command(cmd: string, args: string[]): string {
  const result = spawnSync(cmd, args, { cwd: root, encoding: "utf8" });
  return result.status === 0 ? result.stdout.trim() : "";
}

/** Cores, CPU, memory, Node versions and the git commit. */
export function machineInfo(keygateNode: string): MachineInfo {
  const list = cpus();
  return {
    cores: list.length,
    cpuModel: list[0]?.model ?? "unknown",
    totalMemoryBytes: totalmem(),
    os: `${process.platform} ${release()}`,
    benchNode: process.version,
    keygateNode: command(keygateNode, ["--version"]) || "unknown",
    gitCommit: command("git", ["rev-parse", "HEAD"]) || "unknown",
    gitDirty: command("git", ["status", "--porcelain"]) !== "",
    loadAverageAtStart: loadavg().map((l) => round(l, 2)),
  };
}

/** keygate against the ceiling for one scenario and mode. */
export interface Ratio {
  target: string;
  scenario: ScenarioName;
  /** keygate's saturation throughput over the no-op server's, same requests, same run. */
  throughput: number;
  /** The no-op server's CPU per Check over keygate's: the share of a core's capacity keygate keeps. */
  cpuEfficiency: number;
}

/** Ratios of every keygate result to the no-op result of the same scenario. */
export function ratios(results: readonly ScenarioResult[]): Ratio[] {
  const noop = new Map(results.filter((r) => r.target === "noop").map((r) => [r.scenario, r]));
  return results.flatMap((r) => {
    const ceiling = noop.get(r.scenario);
    if (r.target === "noop" || ceiling === undefined) return [];
    return [
      {
        target: r.target,
        scenario: r.scenario,
        throughput: round(r.saturation.ghz.rps / Math.max(1e-9, ceiling.saturation.ghz.rps), 2),
        cpuEfficiency: round(ceiling.saturation.cpuMicrosPerCheck / Math.max(1e-9, r.saturation.cpuMicrosPerCheck), 2),
      },
    ];
  });
}

/** One line of the budget in DESIGN.md and issue 6, with where this run stands. */
export interface BudgetLine {
  goal: string;
  measured: string;
  met: boolean | null;
}

function find(results: readonly ScenarioResult[], target: string, scenario: ScenarioName): ScenarioResult | undefined {
  return results.find((r) => r.target === target && r.scenario === scenario);
}

/** Where the run stands against the budget; `met` is null when the run did not measure it. */
export function budget(results: readonly ScenarioResult[], rates: readonly Ratio[]): BudgetLine[] {
  const ratio = (target: string, scenario: ScenarioName): Ratio | undefined => rates.find((r) => r.target === target && r.scenario === scenario);
  const line = (goal: string, value: number | undefined, ok: (v: number) => boolean, show: (v: number) => string): BudgetLine =>
    value === undefined ? { goal, measured: "not measured", met: null } : { goal, measured: show(value), met: ok(value) };
  const p99 = (target: string, scenario: ScenarioName): number | undefined => find(results, target, scenario)?.fixedRate.ghz.latencyMs.p99;
  const malformedLookups = find(results, "embedded", "flood-malformed")?.saturation.checks?.backendCalls["store find_snapshot"];
  return [
    line("hot, embedded: >= 0.8 of the no-op throughput", ratio("embedded", "hot")?.throughput, (v) => v >= 0.8, (v) => `${v.toFixed(2)}x`),
    line("hot, Redis + MongoDB: >= 0.6 of the no-op throughput", ratio("redis-mongo", "hot")?.throughput, (v) => v >= 0.6, (v) => `${v.toFixed(2)}x`),
    line("hot, embedded: p99 <= 2 ms at the fixed rate", p99("embedded", "hot"), (v) => v <= 2, (v) => `${v.toFixed(2)} ms`),
    line("hot, Redis + MongoDB: p99 <= 2 ms at the fixed rate", p99("redis-mongo", "hot"), (v) => v <= 2, (v) => `${v.toFixed(2)} ms`),
    line("cold, MongoDB: p99 <= 10 ms at the fixed rate", p99("redis-mongo", "cold"), (v) => v <= 10, (v) => `${v.toFixed(2)} ms`),
    line("cold, embedded: p99 <= 10 ms at the fixed rate", p99("embedded", "cold"), (v) => v <= 10, (v) => `${v.toFixed(2)} ms`),
    line("flood: no store query for malformed keys", malformedLookups ?? (find(results, "embedded", "flood-malformed") === undefined ? undefined : 0), (v) => v === 0, (v) => `${v} store lookups`),
    line("flood, malformed keys: >= the no-op throughput", ratio("embedded", "flood-malformed")?.throughput, (v) => v >= 1, (v) => `${v.toFixed(2)}x`),
  ];
}

function pad(cells: readonly string[], widths: readonly number[]): string {
  return cells.map((c, i) => (i < 2 ? c.padEnd(widths[i] ?? 0) : c.padStart(widths[i] ?? 0))).join("  ");
}

function table(header: readonly string[], rows: readonly string[][]): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? "").length)));
  const rule = widths.map((w) => "-".repeat(w)).join("  ");
  return [pad(header, widths), rule, ...rows.map((r) => pad(r, widths))].join("\n");
}

function denials(r: ScenarioResult): string {
  const reasons: Record<string, number> = {};
  for (const phase of [r.saturation, r.fixedRate]) {
    for (const [reason, n] of Object.entries(phase.checks?.reasons ?? {})) if (reason !== "OK") reasons[reason] = (reasons[reason] ?? 0) + n;
  }
  const total = Object.values(reasons).reduce((a, b) => a + b, 0);
  return total === 0 ? (r.saturation.checks === null ? "n/a" : "0") : String(total);
}

/** Share of lookups answered by L1 (hits and cached misses) during saturation; malformed keys never look up. */
function l1HitPercent(r: ScenarioResult): string {
  const cache = r.saturation.checks?.cache;
  if (cache === undefined) return "-";
  const answered = (cache["l1 hit"] ?? 0) + (cache["l1 negative"] ?? 0);
  const lookups = answered + (cache["l1 miss"] ?? 0);
  return lookups === 0 ? "-" : ((100 * answered) / lookups).toFixed(1);
}

/** CPU of Redis plus the MongoDB-wire server during saturation; "-" where there are none. */
function backendCores(r: ScenarioResult): string {
  const values = Object.values(r.saturation.backendCores);
  return values.length === 0 ? "-" : values.reduce((a, b) => a + b, 0).toFixed(2);
}

/** The results table: one row per target and scenario. */
export function resultsTable(results: readonly ScenarioResult[], rates: readonly Ratio[], rps: number): string {
  const header = ["target", "scenario", "sat rps", "x noop", "CPU us/chk", "x noop CPU", "L1 hit %", "p50 ms", "p90 ms", "p99 ms", `@${rps}/s got`, "CPU cores", "backend cores", "peak RSS MB", "errors", "denials"];
  const rows = results.map((r) => {
    const rate = rates.find((x) => x.target === r.target && x.scenario === r.scenario);
    const fixed = r.fixedRate.ghz;
    const errors = r.saturation.ghz.errors + fixed.errors + (r.saturation.checks?.decisions["error"] ?? 0) + (r.fixedRate.checks?.decisions["error"] ?? 0);
    return [
      r.target,
      r.scenario,
      Math.round(r.saturation.ghz.rps).toString(),
      rate === undefined ? "-" : rate.throughput.toFixed(2),
      r.saturation.cpuMicrosPerCheck.toFixed(0),
      rate === undefined ? "-" : rate.cpuEfficiency.toFixed(2),
      l1HitPercent(r),
      fixed.latencyMs.p50.toFixed(2),
      fixed.latencyMs.p90.toFixed(2),
      fixed.latencyMs.p99.toFixed(2),
      Math.round(fixed.rps).toString(),
      r.fixedRate.resources.cpuCores.toFixed(2),
      backendCores(r),
      (Math.max(r.saturation.resources.peakRssBytes, r.fixedRate.resources.peakRssBytes) / MB).toFixed(0),
      String(errors),
      denials(r),
    ];
  });
  return table(header, rows);
}

/** The memory figures as text. */
export function memoryText(memory: MemoryResult): string {
  const b = memory.l1Bounds;
  return [
    `memory (embedded): ${memory.storeKeys.toLocaleString("en-US")} keys in SQLite (${(memory.databaseBytes / MB).toFixed(0)} MB), ${memory.touchedKeys.toLocaleString("en-US")} distinct keys touched once`,
    `  L1 bounds: maxEntries ${b.maxEntries}, ttl ${b.ttlSeconds} s; negative: maxEntries ${b.negativeMaxEntries}, ttl ${b.negativeTtlSeconds} s`,
    `  RSS after start ${(memory.rssAfterStartBytes / MB).toFixed(0)} MB, after touch ${(memory.rssAfterTouchBytes / MB).toFixed(0)} MB, peak ${(memory.peakRssBytes / MB).toFixed(0)} MB` +
      (memory.heapUsedBytes === null ? "" : `, V8 heap used ${(memory.heapUsedBytes / MB).toFixed(0)} MB`),
    `  touch: ${memory.touch.requests} requests in ${memory.touch.seconds.toFixed(1)} s, ${memory.touch.storeLookups} store lookups, ${memory.touch.errors} errors; filler insert ${memory.filler.keys} keys in ${memory.filler.seconds.toFixed(1)} s`,
  ].join("\n");
}

/** The profile summary as text. */
export function profileText(profiled: ProfiledRun): string {
  const p = profiled.profile;
  const lines = [
    `cpu profile (embedded, hot saturation, ${Math.round(profiled.run.ghz.rps)} rps while profiled): ${p.samples} samples over ${p.windowSeconds} s, ${p.idlePercent}% idle; self time, % of busy samples:`,
    ...p.top.slice(0, 15).map((f) => `  ${f.selfPercent.toFixed(1).padStart(5)}%  ${f.functionName}  (${f.location || f.category})`),
    "  by where the code lives:",
    ...p.byCategory.slice(0, 12).map((c) => `  ${c.selfPercent.toFixed(1).padStart(5)}%  ${c.category}`),
  ];
  return lines.join("\n");
}

/** Writes the results JSON into `dir` as <timestamp>.json and returns its path. */
export function writeResults(dir: string, results: unknown, startedAt: Date): string {
  mkdirSync(dir, { recursive: true });
  const path = join(dir, `${startedAt.toISOString().replace(/[:.]/g, "-")}.json`);
  writeFileSync(path, `${JSON.stringify(results, null, 2)}\n`);
  return path;
}
