import { spawnSync } from "node:child_process";
import { mkdirSync, writeFileSync } from "node:fs";
import { cpus, loadavg, release, totalmem } from "node:os";
import { join, resolve } from "node:path";
import type { LoadTool } from "./ghz.js";
import type { FixedRateResult, LoadSettings, OneKeyResult, PhaseResult } from "./measure.js";
import type { MemoryResult } from "./memory.js";
import type { CheckCounts } from "./metrics.js";
import { round } from "./processes.js";
import { ONE_KEY_PROFILE, busyMicrosPerCheck, costByCategory } from "./profile.js";
import type { ProfiledRun } from "./profile.js";
import type { ScenarioName, ScenarioResult, TurnRun, TurnScenario } from "./scenarios.js";
import { CEILING, NOOPS } from "./targets.js";

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

/** A scenario saturated by rategen's closed loop rather than ghz. */
export type ClosedLoopScenario = `${ScenarioName} (closed loop)`;

export function closedLoopName(scenario: ScenarioName): ClosedLoopScenario {
  return `${scenario} (closed loop)`;
}

/** A target against the ceiling (the raw node:http2 no-op) for one scenario or the one-key run. */
export interface Ratio {
  target: string;
  scenario: ScenarioName | ClosedLoopScenario | "one-key";
  /** The target's saturation throughput over the ceiling's, same requests, same run. */
  throughput: number;
  /** The target's CPU per Check over the ceiling's: 1.5 means half again the ceiling's cost. */
  cpu: number;
}

/** Ratios of every target but the ceiling to the ceiling's result of the same scenario, and of h2load's one-key runs. */
export function ratios(results: readonly ScenarioResult[], oneKey: readonly OneKeyResult[]): Ratio[] {
  const ceiling = new Map(results.filter((r) => r.target === CEILING).map((r) => [r.scenario, r]));
  const of = (target: string, scenario: Ratio["scenario"], phase: PhaseResult, c: PhaseResult): Ratio => ({
    target,
    scenario,
    throughput: round(phase.ghz.rps / Math.max(1e-9, c.ghz.rps), 2),
    cpu: round(phase.cpuMicrosPerCheck / Math.max(1e-9, c.cpuMicrosPerCheck), 2),
  });
  const scenarioRatios = results.flatMap((r): Ratio[] => {
    const c = ceiling.get(r.scenario);
    if (r.target === CEILING || c === undefined) return [];
    return [of(r.target, r.scenario, r.saturation, c.saturation)];
  });
  const closedRatios = results.flatMap((r): Ratio[] => {
    const c = ceiling.get(r.scenario)?.closedLoop;
    if (r.target === CEILING || c === undefined || c === null || r.closedLoop === null) return [];
    return [of(r.target, closedLoopName(r.scenario), r.closedLoop, c)];
  });
  const c1 = oneKey.find((o) => o.target === CEILING);
  const oneKeyRatios = c1 === undefined
    ? []
    : oneKey
        .filter((o) => o.target !== CEILING)
        .map((o): Ratio => ({
          target: o.target,
          scenario: "one-key",
          throughput: round(o.h2load.rps / Math.max(1e-9, c1.h2load.rps), 2),
          cpu: round(o.cpuMicrosPerCheck / Math.max(1e-9, c1.cpuMicrosPerCheck), 2),
        }));
  return [...scenarioRatios, ...closedRatios, ...oneKeyRatios];
}

/** One line of the budget in DESIGN.md and issue 13, with where this run stands. */
export interface BudgetLine {
  goal: string;
  measured: string;
  met: boolean | null;
}

function find(results: readonly ScenarioResult[], target: string, scenario: ScenarioName): ScenarioResult | undefined {
  return results.find((r) => r.target === target && r.scenario === scenario);
}

/** The fixed-rate run of a scenario at `rps`, if the run measured that rate. */
function atRate(r: ScenarioResult | undefined, rps: number): FixedRateResult | undefined {
  return r?.fixedRates.find((f) => f.targetRps === rps);
}

const GOAL_STORE_KEYS = 1_000_000;
const GOAL_CACHED_KEYS = 100_000;

/**
 * Where the run stands against issue 13's goals, per keygate target; `met` is null when the run
 * did not measure it (or, for memory, measured it at smaller sizes than the goal names).
 */
export function budget(results: readonly ScenarioResult[], oneKey: readonly OneKeyResult[], memory: MemoryResult | null, rates: readonly number[], turns: readonly Turns[] = []): BudgetLine[] {
  const all = ratios(results, oneKey);
  const ratio = (target: string, scenario: Ratio["scenario"]): Ratio | undefined => all.find((r) => r.target === target && r.scenario === scenario);
  const line = (goal: string, value: number | undefined, ok: (v: number) => boolean, show: (v: number) => string): BudgetLine =>
    value === undefined ? { goal, measured: "not measured", met: null } : { goal, measured: show(value), met: ok(value) };
  const times = (v: number): string => `${v.toFixed(2)}x`;
  const ms = (v: number): string => `${v.toFixed(2)} ms`;
  const keygates = [...new Set([...results.map((r) => r.target), ...turns.map((x) => x.keygate.target)])].filter((t) => !(t in NOOPS));
  const lines: BudgetLine[] = [];
  for (const t of keygates) {
    lines.push(line(`${t} hot (ghz, many keys): CPU per Check <= 1.5x ${CEILING}`, ratio(t, "hot")?.cpu, (v) => v <= 1.5, times));
    lines.push(line(`${t} hot (rategen closed loop, many keys, server saturated): CPU per Check <= 1.5x ${CEILING}`, ratio(t, closedLoopName("hot"))?.cpu, (v) => v <= 1.5, times));
    const inTurns = (scenario: TurnScenario, limit: number): void => {
      const x = turns.find((y) => y.scenario === scenario && y.keygate.target === t);
      if (x !== undefined) lines.push(line(`${t} ${scenario} (rategen closed loop, in turns with ${CEILING}, median of ${x.keygate.micros.length}): CPU per Check <= ${limit}x ${CEILING}`, x.ratio ?? undefined, (v) => v <= limit, times));
    };
    inTurns("hot", 1.5);
    lines.push(line(`${t} one key (h2load): CPU per Check <= 1.5x ${CEILING}`, ratio(t, "one-key")?.cpu, (v) => v <= 1.5, times));
    lines.push(line(`${t} flood-malformed: CPU per Check <= 1.2x ${CEILING}`, ratio(t, "flood-malformed")?.cpu, (v) => v <= 1.2, times));
    lines.push(line(`${t} flood-malformed (rategen closed loop): CPU per Check <= 1.2x ${CEILING}`, ratio(t, closedLoopName("flood-malformed"))?.cpu, (v) => v <= 1.2, times));
    inTurns("flood-malformed", 1.2);
    const p99 = rates.includes(3000) ? atRate(find(results, t, "hot"), 3000)?.ghz.latencyMs.p99 : undefined;
    lines.push(line(`${t} hot: p99 <= 2 ms at 3000 Checks/s`, p99, (v) => v <= 2, ms));
    // Judged embedded only: on MongoDB-wire, lookups the flood scenario queued can still finish
    // during flood-malformed, which runs right after it on the same process.
    const malformed = t.startsWith("embedded") ? find(results, t, "flood-malformed") : undefined;
    if (t.startsWith("embedded")) lines.push(line(`${t} flood-malformed: no store query`, malformed === undefined ? undefined : (malformed.saturation.checks?.backendCalls["store find_snapshot"] ?? 0), (v) => v === 0, (v) => `${v} store lookups`));
    const hot = find(results, t, "hot")?.saturation.cpuMicrosPerCheck;
    const cold = find(results, t, "cold");
    if (t.startsWith("embedded")) {
      lines.push(line(`${t} cold (SQLite): CPU per Check <= 2x hot`, hot === undefined || cold === undefined ? undefined : cold.saturation.cpuMicrosPerCheck / Math.max(1e-9, hot), (v) => v <= 2, times));
      const hotClosed = find(results, t, "hot")?.closedLoop?.cpuMicrosPerCheck;
      const coldClosed = cold?.closedLoop?.cpuMicrosPerCheck;
      lines.push(line(`${t} cold (SQLite, rategen closed loop): CPU per Check <= 2x hot`, hotClosed === undefined || coldClosed === undefined ? undefined : coldClosed / Math.max(1e-9, hotClosed), (v) => v <= 2, times));
    } else {
      const coldAt1000 = rates.includes(1000) ? atRate(cold, 1000) : undefined;
      const coldLine = line(`${t} cold (MongoDB-wire): p99 <= 10 ms at 1000 Checks/s`, coldAt1000?.ghz.latencyMs.p99, (v) => v <= 10, ms);
      // The backend's own pauses hold the lookups sent during them: said beside the figure.
      const stalls = coldAt1000 === undefined ? [] : Object.entries(coldAt1000.backendPauses);
      lines.push(
        stalls.length === 0
          ? coldLine
          : { ...coldLine, measured: `${coldLine.measured} (${stalls.map(([name, p]) => `${name} stopped for GC ${p.over10Ms} times over 10 ms in that run, longest ${p.maxMs.toFixed(0)} ms, ${p.totalMs.toFixed(0)} ms in all`).join("; ")})` },
      );
      const lookups = cold?.saturation.checks?.backendCalls["store find_snapshot"];
      const checks = Object.values(cold?.saturation.checks?.reasons ?? {}).reduce((a, b) => a + b, 0);
      lines.push({ goal: `${t} cold (MongoDB-wire): one round trip per cold key`, measured: lookups === undefined || checks === 0 ? "not measured" : `${(lookups / checks).toFixed(2)} store lookups per Check (round trips per lookup are not counted here)`, met: null });
    }
  }
  const fullSize = memory !== null && memory.storeKeys >= GOAL_STORE_KEYS && memory.cachedKeys >= GOAL_CACHED_KEYS;
  const sizes = memory === null ? "" : ` (${memory.storeKeys.toLocaleString("en-US")} stored, ${memory.cachedKeys.toLocaleString("en-US")} cached${fullSize ? "" : ": smaller than the goal's sizes, not judged"})`;
  const memoryLine = (goal: string, value: number | undefined, ok: (v: number) => boolean, show: (v: number) => string): BudgetLine => {
    const l = line(goal, value, ok, (v) => `${show(v)}${sizes}`);
    return fullSize ? l : { ...l, met: null };
  };
  // Judged after a memory-reducing GC: what keygate's data holds. A plain full GC leaves V8's
  // free pages resident for reuse, which the next line reports beside the RSS under load.
  lines.push(memoryLine("RSS after a memory-reducing GC <= 250 MB with 1,000,000 keys stored, 100,000 cached", memory?.afterTouchAfterGc.reduced.rss, (v) => v <= 250 * MB, (v) => `${(v / MB).toFixed(0)} MB`));
  lines.push(memoryLine("RSS per cached key after a memory-reducing GC < 1,000 bytes", memory?.reducedRssBytesPerCachedKey, (v) => v < 1000, (v) => `${v} bytes`));
  if (memory !== null) {
    lines.push({
      goal: "RSS with V8's free pages kept (not judged)",
      measured: `${(memory.afterTouchAfterGc.rss / MB).toFixed(0)} MB after a plain full GC (${memory.rssBytesPerCachedKey} bytes per cached key), ${(memory.rssAfterTouchBytes / MB).toFixed(0)} MB right after the load without GC`,
      met: null,
    });
  }
  return lines;
}

function pad(cells: readonly string[], widths: readonly number[], left: number): string {
  return cells.map((c, i) => (i < left ? c.padEnd(widths[i] ?? 0) : c.padStart(widths[i] ?? 0))).join("  ");
}

function table(header: readonly string[], rows: readonly string[][], left = 2): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? "").length)));
  const rule = widths.map((w) => "-".repeat(w)).join("  ");
  return [pad(header, widths, left), rule, ...rows.map((r) => pad(r, widths, left))].join("\n");
}

function phases(r: ScenarioResult): PhaseResult[] {
  return [r.saturation, ...r.fixedRates];
}

function denials(r: ScenarioResult): string {
  const reasons: Record<string, number> = {};
  for (const phase of phases(r)) {
    for (const [reason, n] of Object.entries(phase.checks?.reasons ?? {})) if (reason !== "OK") reasons[reason] = (reasons[reason] ?? 0) + n;
  }
  const total = Object.values(reasons).reduce((a, b) => a + b, 0);
  return total === 0 ? (r.saturation.checks === null ? "n/a" : "0") : String(total);
}

function errorsOf(phase: PhaseResult): number {
  return phase.ghz.errors + (phase.checks?.decisions["error"] ?? 0);
}

/** Share of lookups answered by L1 (hits and cached misses) during a run; malformed keys never look up. */
function l1HitPercentOf(phase: PhaseResult): string {
  const cache = phase.checks?.cache;
  if (cache === undefined) return "-";
  const answered = (cache["l1 hit"] ?? 0) + (cache["l1 negative"] ?? 0);
  const lookups = answered + (cache["l1 miss"] ?? 0);
  return lookups === 0 ? "-" : ((100 * answered) / lookups).toFixed(1);
}

/** CPU of Redis plus the MongoDB-wire server during a run; "-" where there are none. */
function backendCoresOf(phase: PhaseResult): string {
  const values = Object.values(phase.backendCores);
  return values.length === 0 ? "-" : values.reduce((a, b) => a + b, 0).toFixed(2);
}

/** One target's runs of a scenario in turns. */
export interface TurnTarget {
  target: string;
  /** CPU µs per Check of each run, in round order. */
  micros: number[];
  median: number;
  /** Calls that were not gRPC OK, over every run. */
  errors: number;
}

/** A scenario's closed loop on the ceiling and keygate in turns (runInTurns). */
export interface Turns {
  scenario: TurnScenario;
  ceiling: TurnTarget;
  keygate: TurnTarget;
  /** keygate's median over the ceiling's; null when a run failed a call or measured nothing. */
  ratio: number | null;
}

function median(values: readonly number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const middle = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? (sorted[middle] as number) : ((sorted[middle - 1] as number) + (sorted[middle] as number)) / 2;
}

/** The runs of `scenario` in turns by target, their medians and the ratio; null without runs of both. */
export function summarizeTurns(runs: readonly TurnRun[], ceiling: string, keygate: string, scenario: TurnScenario = "hot"): Turns | null {
  const of = (target: string): TurnTarget | null => {
    const mine = runs.filter((r) => r.target === target && r.scenario === scenario);
    if (mine.length === 0) return null;
    const micros = mine.map((r) => r.cpuMicrosPerCheck);
    return { target, micros, median: round(median(micros), 2), errors: mine.reduce((sum, r) => sum + r.errors, 0) };
  };
  const c = of(ceiling);
  const k = of(keygate);
  if (c === null || k === null) return null;
  const valid = c.errors === 0 && k.errors === 0 && c.median > 0;
  return { scenario, ceiling: c, keygate: k, ratio: valid ? round(k.median / c.median, 3) : null };
}

/** A scenario in turns as the report prints it: each target's runs and median, then the ratio. */
export function turnsText(turns: Turns): string {
  const row = (t: TurnTarget): string => `  ${t.target.padEnd(12)} ${t.micros.map((m) => m.toFixed(1)).join(", ")} us/chk (median ${t.median.toFixed(2)})${t.errors === 0 ? "" : `, ${t.errors} calls not gRPC OK`}`;
  return [
    `${turns.scenario} in turns (rategen closed loop, many keys, ${turns.keygate.micros.length} rounds; each run a fresh, warmed process; the two alternate which goes first):`,
    row(turns.ceiling),
    row(turns.keygate),
    `  ${turns.keygate.target} / ${turns.ceiling.target}: ${turns.ratio === null ? "not judged (a call failed)" : `${turns.ratio.toFixed(3)}x`} (medians)`,
  ].join("\n");
}

/** Saturation with ghz: one row per target and scenario. */
export function resultsTable(results: readonly ScenarioResult[], rates: readonly Ratio[]): string {
  const header = ["target", "scenario", "sat rps", "x h2 rps", "CPU us/chk", "x h2 CPU", "L1 hit %", "server cores", "backend cores", "peak RSS MB", "errors", "denials"];
  const rows = results.map((r) => {
    const rate = rates.find((x) => x.target === r.target && x.scenario === r.scenario);
    const peak = Math.max(...phases(r).map((p) => p.resources.peakRssBytes));
    return [
      r.target,
      r.scenario,
      Math.round(r.saturation.ghz.rps).toString(),
      rate === undefined ? "-" : rate.throughput.toFixed(2),
      r.saturation.cpuMicrosPerCheck.toFixed(0),
      rate === undefined ? "-" : rate.cpu.toFixed(2),
      l1HitPercentOf(r.saturation),
      r.saturation.resources.cpuCores.toFixed(2),
      backendCoresOf(r.saturation),
      (peak / MB).toFixed(0),
      String(phases(r).reduce((sum, p) => sum + errorsOf(p), 0)),
      denials(r),
    ];
  });
  return table(header, rows);
}

/** Saturation with rategen's closed loop: one row per target and scenario it ran. */
export function closedLoopTable(results: readonly ScenarioResult[], rates: readonly Ratio[]): string {
  const header = ["target", "scenario", "sat rps", "x h2 rps", "CPU us/chk", "x h2 CPU", "L1 hit %", "server cores", "backend cores", "p50 ms", "p99 ms", "errors"];
  const rows = results.flatMap((r) => {
    const c = r.closedLoop;
    if (c === null) return [];
    const rate = rates.find((x) => x.target === r.target && x.scenario === closedLoopName(r.scenario));
    return [
      [
        r.target,
        r.scenario,
        Math.round(c.ghz.rps).toString(),
        rate === undefined ? "-" : rate.throughput.toFixed(2),
        c.cpuMicrosPerCheck.toFixed(0),
        rate === undefined ? "-" : rate.cpu.toFixed(2),
        l1HitPercentOf(c),
        c.resources.cpuCores.toFixed(2),
        backendCoresOf(c),
        c.ghz.latencyMs.p50.toFixed(2),
        c.ghz.latencyMs.p99.toFixed(2),
        String(errorsOf(c)),
      ],
    ];
  });
  return table(header, rows);
}

/** The load generators that measured the fixed-rate rows, in first-use order. */
export function fixedRateTools(results: readonly ScenarioResult[]): LoadTool[] {
  return [...new Set(results.flatMap((r) => r.fixedRates.map((f) => f.ghz.tool)))];
}

/** The title of the fixed-rate table: which tool, and how it drove the load. */
export function latencyHeading(results: readonly ScenarioResult[], settings: LoadSettings): string {
  const tools = fixedRateTools(results);
  const { connections, concurrency } = settings.fixedRate;
  if (tools.length === 1 && tools[0] === "rategen") {
    return `rategen (open loop), many keys, latency at fixed rates (${connections} connections; from each request's scheduled send time)`;
  }
  const ghz = `ghz, many keys, latency at fixed rates (${connections} connections, ${concurrency} workers)`;
  return tools.includes("rategen") ? `${ghz}; rows marked rategen are open loop` : ghz;
}

/** The note that says which tool measured fixed-rate latency, how, and why rategen did not if it did not. */
export function latencyNote(results: readonly ScenarioResult[], settings: LoadSettings, rategenWanted: boolean): string {
  const tools = fixedRateTools(results);
  const parts: string[] = [];
  if (tools.includes("rategen")) {
    parts.push(
      "fixed-rate latency measured by rategen (bench/rategen): open loop, request i sent at start + i/rate whatever earlier answers did, latency from its scheduled send time to its trailers, so every request queued behind a stall is charged for it; lag p99 is how late rategen itself wrote requests",
    );
  }
  if (tools.includes("ghz")) {
    const why = !rategenWanted ? "--no-rategen" : settings.rategen === null ? "rategen is not built (bash bench/install-rategen.sh, needs Go)" : "rategen reads binary data files only";
    parts.push(`fixed-rate latency measured by ghz (closed loop, ${settings.fixedRate.concurrency} workers) because ${why}: latency from each call's own send, without the time a call waited for a worker, and ghz's own scheduling adds to the tail`);
  }
  return parts.length === 0 ? "no fixed-rate runs" : parts.join("; ");
}

function orDash(value: number | undefined): string {
  return value === undefined || Number.isNaN(value) ? "-" : value.toFixed(2);
}

/** Backend calls over 10 ms during a run, of all its backend calls ("0 of 0" with none). */
function slowIo(checks: CheckCounts): string {
  const slow = Object.values(checks.backendOver10Ms).reduce((n, c) => n + c, 0);
  const all = Object.values(checks.backendCalls).reduce((n, c) => n + c, 0);
  return `${slow} of ${all}`;
}

/** A Java backend's stop-the-world pauses over 10 ms in a run, with the longest: "-" without one. */
function backendGc(phase: PhaseResult): string {
  const pauses = Object.values(phase.backendPauses);
  if (pauses.length === 0) return "-";
  const over = pauses.reduce((n, p) => n + p.over10Ms, 0);
  const longest = Math.max(...pauses.map((p) => p.maxMs));
  return over === 0 ? "0" : `${over} (max ${longest.toFixed(0)})`;
}

/** Latency at each fixed rate: one row per target, scenario and rate. */
export function latencyTable(results: readonly ScenarioResult[]): string {
  const header = ["target", "scenario", "tool", "rate/s", "got/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms", "lag p99 ms", "server cores", "CPU us/chk", "GC >10ms", "major GC ms", "I/O >10ms", "backend GC >10ms", "errors"];
  const rows = results.flatMap((r) =>
    r.fixedRates.map((f) => [
      r.target,
      r.scenario,
      f.ghz.tool,
      String(f.targetRps),
      Math.round(f.ghz.rps).toString(),
      f.ghz.latencyMs.p50.toFixed(2),
      f.ghz.latencyMs.p90.toFixed(2),
      f.ghz.latencyMs.p99.toFixed(2),
      orDash(f.ghz.openLoop?.p999Ms),
      f.ghz.latencyMs.max.toFixed(2),
      orDash(f.ghz.openLoop?.sendLagMs.p99),
      f.resources.cpuCores.toFixed(2),
      f.cpuMicrosPerCheck.toFixed(0),
      f.checks === null ? "-" : String(Object.values(f.checks.gc).reduce((n, g) => n + g.over10Ms, 0)),
      f.checks === null ? "-" : (f.checks.gc["major"]?.totalMs ?? 0).toFixed(1),
      f.checks === null ? "-" : slowIo(f.checks),
      backendGc(f),
      String(errorsOf(f)),
    ]),
  );
  return table(header, rows, 3);
}

/** h2load with one key: one row per target. */
export function oneKeyTable(oneKey: readonly OneKeyResult[], rates: readonly Ratio[]): string {
  const header = ["target", "rps", "x h2 rps", "CPU us/chk", "x h2 CPU", "HTTP 200", "failed", "gRPC OK", "gRPC errors", "allows", "p50 ms", "p90 ms", "p99 ms", "server cores"];
  const rows = oneKey.map((o) => {
    const rate = rates.find((x) => x.target === o.target && x.scenario === "one-key");
    return [
      o.target,
      Math.round(o.h2load.rps).toString(),
      rate === undefined ? "-" : rate.throughput.toFixed(2),
      o.cpuMicrosPerCheck.toFixed(0),
      rate === undefined ? "-" : rate.cpu.toFixed(2),
      String(o.h2load.http200),
      String(o.h2load.failed),
      String(o.grpcOk),
      o.grpcErrors === null ? "n/a" : String(o.grpcErrors),
      o.allows === null ? "n/a" : String(o.allows),
      o.h2load.latencyMs.p50.toFixed(2),
      o.h2load.latencyMs.p90.toFixed(2),
      o.h2load.latencyMs.p99.toFixed(2),
      o.resources.cpuCores.toFixed(2),
    ];
  });
  return table(header, rows, 1);
}

/** Resident MB by mapping after the touch, with the growth since start (the five largest). */
function residentLines(atStart: MemoryResult["atStartAfterGc"], afterTouch: MemoryResult["afterTouchAfterGc"]): string[] {
  const after = afterTouch.residentByMapping;
  if (after === null || after === undefined) return [];
  const before = new Map((atStart.residentByMapping ?? []).map((m) => [m.mapping, m.kb]));
  const parts = after.slice(0, 5).map((m) => `${m.mapping} ${(m.kb / 1024).toFixed(0)} MB (+${((m.kb - (before.get(m.mapping) ?? 0)) / 1024).toFixed(0)})`);
  const spaces = (afterTouch.heapSpaces ?? [])
    .filter((s) => s.physical >= MB)
    .map((s) => `${s.space} ${(s.used / MB).toFixed(0)}/${(s.physical / MB).toFixed(0)}`);
  return [
    `  resident after touch by mapping (after GC; growth since start): ${parts.join(", ")}`,
    ...(spaces.length === 0 ? [] : [`  V8 spaces after touch (after GC; MB used/resident): ${spaces.join(", ")}`]),
  ];
}

/** The memory figures as text. */
export function memoryText(memory: MemoryResult): string {
  const b = memory.l1Bounds;
  const mb = (bytes: number): string => `${(bytes / MB).toFixed(0)} MB`;
  const g0 = memory.atStartAfterGc;
  const g1 = memory.afterTouchAfterGc;
  return [
    `memory (embedded): ${memory.storeKeys.toLocaleString("en-US")} keys in SQLite (${mb(memory.databaseBytes)}), ${memory.touchedKeys.toLocaleString("en-US")} distinct keys touched once, ${memory.cachedKeys.toLocaleString("en-US")} cached`,
    `  L1 bounds: maxEntries ${b.maxEntries}, ttl ${b.ttlSeconds} s; negative: maxEntries ${b.negativeMaxEntries}, ttl ${b.negativeTtlSeconds} s`,
    `  after forced GC (--expose-gc, bench/gc-probe.mjs): RSS ${mb(g0.rss)} after start, ${mb(g1.rss)} after touch; V8 heap used ${mb(g0.heapUsed)} -> ${mb(g1.heapUsed)}; external ${mb(g1.external)}`,
    `  per cached key after GC: ${memory.rssBytesPerCachedKey} bytes of RSS, ${memory.heapBytesPerCachedKey} bytes of V8 heap`,
    `  after a memory-reducing GC (V8's last resort: free pages returned): RSS ${mb(g0.reduced.rss)} after start, ${mb(g1.reduced.rss)} after touch, ${memory.reducedRssBytesPerCachedKey} bytes per cached key; V8 heap ${mb(g1.reduced.heapUsed)} used of ${mb(g1.reduced.heapTotal)}`,
    `  without GC: RSS ${mb(memory.rssAfterStartBytes)} after start, ${mb(memory.rssAfterTouchBytes)} after touch, peak ${mb(memory.peakRssBytes)}` +
      (memory.heapUsedBytes === null ? "" : `, V8 heap used ${mb(memory.heapUsedBytes)}`),
    ...(memory.writeBehind === null
      ? []
      : [`  after-touch GC figures read once the write-behind had written the ${memory.writeBehind.pendingAfterTouch.toLocaleString("en-US")} entries (usage rows, last-used times) not yet in the store after the touch, ${memory.writeBehind.drainSeconds.toFixed(1)} s later`]),
    ...residentLines(g0, g1),
    `  touch: ${memory.touch.requests} requests in ${memory.touch.seconds.toFixed(1)} s, ${memory.touch.storeLookups} store lookups, ${memory.touch.errors} errors; filler insert ${memory.filler.keys} keys in ${memory.filler.seconds.toFixed(1)} s`,
  ].join("\n");
}

/** The profile summary as text. */
export function profileText(profiled: ProfiledRun): string {
  const p = profiled.profile;
  const lines = [
    `cpu profile (${profiled.target}, ${profiled.scenario}, ${Math.round(profiled.rps)} rps while profiled): ${p.samples} samples over ${p.windowSeconds} s, ${p.idlePercent}% idle, ${busyMicrosPerCheck(profiled).toFixed(1)} us of busy main thread a Check; self time, % of busy samples:`,
    ...p.top.slice(0, 15).map((f) => `  ${f.selfPercent.toFixed(1).padStart(5)}%  ${f.functionName}  (${f.location || f.category})`),
    "  by where the code lives:",
    ...p.byCategory.slice(0, 12).map((c) => `  ${c.selfPercent.toFixed(1).padStart(5)}%  ${c.category}`),
    ...(profiled.file === undefined ? [] : [`  whole profile: ${profiled.file}`]),
  ];
  return lines.join("\n");
}

/**
 * keygate's profile next to the ceiling's under the same load (one key, h2load): busy main thread
 * a Check by where the code lives, in µs, and what keygate adds. Empty unless both were profiled.
 */
export function profileComparisonText(profiles: readonly ProfiledRun[], ceiling: string): string {
  const scenario = ONE_KEY_PROFILE;
  const target = profiles.find((p) => p.target === "embedded" && p.scenario === scenario);
  const noop = profiles.find((p) => p.target === ceiling && p.scenario === scenario);
  if (target === undefined || noop === undefined) return "";
  const rows = costByCategory(target, noop).map((c) => [c.category, c.target.toFixed(2), c.ceiling.toFixed(2), (c.target - c.ceiling).toFixed(2)]);
  const total = busyMicrosPerCheck(target);
  const ceilingTotal = busyMicrosPerCheck(noop);
  return [
    `busy main thread a Check, ${scenario}: embedded ${total.toFixed(1)} us, ${ceiling} ${ceilingTotal.toFixed(1)} us (${(total / ceilingTotal).toFixed(2)}x; CPU per Check above also counts the kernel's share), by where the code lives:`,
    table(["where", "embedded us", `${ceiling} us`, "added us"], rows, 1),
  ].join("\n");
}

/** Writes the results JSON into `dir` as <timestamp>.json and returns its path. */
export function writeResults(dir: string, results: unknown, startedAt: Date): string {
  mkdirSync(dir, { recursive: true });
  const path = join(dir, `${startedAt.toISOString().replace(/[:.]/g, "-")}.json`);
  writeFileSync(path, `${JSON.stringify(results, null, 2)}\n`);
  return path;
}
