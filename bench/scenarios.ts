import type { DataFile, ScenarioData } from "./data.js";
import type { FixedRequest } from "./h2load.js";
import { closedLoopSaturation, fixedRates, oneKey, pass, saturation } from "./measure.js";
import type { FixedRateResult, LoadSettings, OneKeyResult, PhaseResult } from "./measure.js";
import type { Target } from "./targets.js";

/** Every scenario, in report order. */
export const SCENARIOS = ["hot", "cold", "mixed", "flood", "flood-malformed"] as const;
/** A scenario's name. */
export type ScenarioName = (typeof SCENARIOS)[number];

/** What each scenario sends and in what state it finds keygate. */
export const SCENARIO_DESCRIPTIONS: Record<ScenarioName, string> = {
  hot: "distinct valid keys (unlimited plan), all in L1 after a warm-up pass over every one",
  cold: "first touch of each valid key: a fresh keygate (and an emptied Redis) per run, its code warmed first with flood's unknown and malformed keys (no valid key cached), then every request a different key until the keys run out, so each is a store lookup (L1 hit % shows any wrap-around)",
  mixed: "95% valid, 3% malformed, 1% unknown but well-formed, 1% revoked; metered plan (1000 requests/60 s per account), after one warm-up pass",
  flood: "50% malformed, 50% unknown but well-formed keys (distinct, never stored; misses cached 5 s)",
  "flood-malformed": "100% malformed keys: refused by shape and checksum, no lookup",
};

/** One scenario against one target. */
export interface ScenarioResult {
  target: string;
  scenario: ScenarioName;
  data: { entries: number; composition: Record<string, number> };
  warmUp: { requests: number; seconds: number; errors: number } | null;
  saturation: PhaseResult;
  /** Saturation with rategen's closed loop (the server saturated, many keys); null without rategen. */
  closedLoop: PhaseResult | null;
  /** One run per fixed rate of the bench run, in the order given. */
  fixedRates: FixedRateResult[];
}

/** Every scenario of one target, and h2load's one-key run against it (null without h2load). */
export interface TargetResults {
  scenarios: ScenarioResult[];
  oneKey: OneKeyResult | null;
}

/** How to start keygate in one mode, and how to empty its shared cache between cold runs. */
export interface KeygateMode {
  readonly name: string;
  start(label: string): Promise<Target>;
  resetShared(): Promise<void>;
}

type Log = (message: string) => void;

function result(target: string, scenario: ScenarioName, data: DataFile, sat: PhaseResult, closed: PhaseResult | null, fixed: FixedRateResult[], warm: PhaseResult | null): ScenarioResult {
  return {
    target,
    scenario,
    data: { entries: data.entries, composition: data.composition },
    warmUp: warm === null ? null : { requests: warm.ghz.requests, seconds: warm.ghz.seconds, errors: warm.ghz.errors },
    saturation: sat,
    closedLoop: closed,
    fixedRates: fixed,
  };
}

function fileOf(data: ScenarioData, scenario: ScenarioName): DataFile {
  return scenario === "flood-malformed" ? data.floodMalformed : data[scenario];
}

/** What one scenario measured on one target. */
interface ScenarioParts {
  warm: PhaseResult | null;
  fixed: FixedRateResult[];
  sat: PhaseResult;
  closed: PhaseResult | null;
}

/** How one target runs its scenarios: its name, each scenario's warm-up, and its closed loop's length. */
interface ScenarioRunner {
  name: string;
  /** The warm-up pass before a scenario's first run, or null for none. */
  warmUp(scenario: ScenarioName, file: DataFile): Promise<PhaseResult | null>;
  /** Requests of a scenario's closed loop, or undefined for the run's duration. */
  closedRequests(scenario: ScenarioName, file: DataFile): number | undefined;
}

/**
 * Every scenario of `scenarios` on one target. By default every scenario's warm-up and fixed
 * rates come first, then every scenario's saturation runs: a fixed rate is measured at that rate,
 * not while the process collects what a saturation run left behind (node:http2 makes each
 * request's header values in the old generation, so a saturation run fills it for a mark-compact
 * that would otherwise fall in the next window). With settings.saturationFirst, scenario by
 * scenario: warm-up, saturation, closed loop, fixed rates.
 */
async function runScenarios(target: Target, settings: LoadSettings, data: ScenarioData, scenarios: readonly ScenarioName[], runner: ScenarioRunner, log: Log): Promise<Map<ScenarioName, ScenarioParts>> {
  const out = new Map<ScenarioName, ScenarioParts>();
  const warmUp = async (scenario: ScenarioName, file: DataFile, what: string): Promise<PhaseResult | null> => {
    const warm = await runner.warmUp(scenario, file);
    log(`${runner.name}: ${scenario}${what}${warm === null ? "" : ` (warm-up: ${warm.ghz.requests} requests in ${warm.ghz.seconds.toFixed(1)} s)`}`);
    return warm;
  };
  const saturate = async (scenario: ScenarioName, file: DataFile): Promise<{ sat: PhaseResult; closed: PhaseResult | null }> => {
    const sat = await saturation(target, settings, file);
    const closed = await closedLoopSaturation(target, settings, file, runner.closedRequests(scenario, file));
    return { sat, closed };
  };
  if (settings.saturationFirst) {
    for (const scenario of scenarios) {
      const file = fileOf(data, scenario);
      const warm = await warmUp(scenario, file, "");
      const { sat, closed } = await saturate(scenario, file);
      out.set(scenario, { warm, sat, closed, fixed: await fixedRates(target, settings, file) });
    }
    return out;
  }
  const latency = new Map<ScenarioName, { warm: PhaseResult | null; fixed: FixedRateResult[] }>();
  for (const scenario of scenarios) {
    const file = fileOf(data, scenario);
    const warm = await warmUp(scenario, file, ", fixed rates");
    latency.set(scenario, { warm, fixed: await fixedRates(target, settings, file) });
  }
  for (const scenario of scenarios) {
    const measured = latency.get(scenario);
    if (measured === undefined) continue;
    log(`${runner.name}: ${scenario}, saturation`);
    out.set(scenario, { ...measured, ...(await saturate(scenario, fileOf(data, scenario))) });
  }
  return out;
}

const NOOP_WARM_UP_REQUESTS = 5000;

/** A no-op server: the same requests as every keygate scenario, then h2load's one key. */
export async function runNoopScenarios(name: string, noop: Target, settings: LoadSettings, data: ScenarioData, request: FixedRequest, log: Log): Promise<TargetResults> {
  // Warm the no-op's JIT and connections first, as keygate's hot and mixed are warmed, so the
  // ceiling's first scenario is not charged for start-up.
  await pass(noop, settings, data.hot, Math.min(data.hot.entries, NOOP_WARM_UP_REQUESTS));
  const parts = await runScenarios(noop, settings, data, settings.scenarios, {
    name,
    warmUp: () => Promise.resolve(null),
    // Cold's keys once each, as keygate's cold run sends them.
    closedRequests: (scenario, file) => (scenario === "cold" ? file.entries : undefined),
  }, log);
  const out: ScenarioResult[] = [];
  for (const [scenario, p] of parts) out.push(result(name, scenario, fileOf(data, scenario), p.sat, p.closed, p.fixed, null));
  if (settings.h2load !== null) log(`${name}: one key (h2load)`);
  return { scenarios: out, oneKey: await oneKey(name, noop, settings, request) };
}

/**
 * Checks that warm a fresh process's code before a cold run: flood's unknown and malformed keys
 * take the whole lookup path (L2, the store, the caches' misses) and cache no valid key. A
 * process that just started runs its first second of Checks unoptimized, and at 1,000/s that
 * backlog, not the cold lookups, was the tail.
 */
const COLD_WARM_UP_REQUESTS = 5000;

/**
 * Warms a fresh process for a cold run: unknown and malformed keys (the lookup path, caching no
 * valid key), then valid keys kept out of the cold data (the allow path, compiled before it is
 * measured, as hot's warm-up compiles its own), each once: no key of the measured run is cached.
 */
async function warmForCold(target: Target, settings: LoadSettings, data: ScenarioData): Promise<PhaseResult> {
  const lookups = await pass(target, settings, data.flood, Math.min(data.flood.entries, COLD_WARM_UP_REQUESTS));
  if (data.coldWarm.entries === 0) return lookups;
  const allows = await pass(target, settings, data.coldWarm, data.coldWarm.entries);
  return { ...allows, ghz: { ...allows.ghz, requests: lookups.ghz.requests + allows.ghz.requests, seconds: lookups.ghz.seconds + allows.ghz.seconds, errors: lookups.ghz.errors + allows.ghz.errors } };
}

/** Cold saturation with rategen's closed loop, on a fresh process: each of the cold keys once at most. */
async function coldClosedLoop(mode: KeygateMode, settings: LoadSettings, data: ScenarioData, log: Log): Promise<PhaseResult | null> {
  if (settings.rategen === null || data.cold.format !== "binary") return null;
  await mode.resetShared();
  const target = await mode.start(`keygate ${mode.name} (cold, closed loop)`);
  try {
    await warmForCold(target, settings, data);
    log(`${mode.name}: cold saturation (rategen closed loop)`);
    return await closedLoopSaturation(target, settings, data.cold, data.cold.entries);
  } finally {
    await target.stop();
  }
}

/** Cold: each run on a fresh process (and emptied Redis), every request a key it has not seen. */
async function runCold(mode: KeygateMode, settings: LoadSettings, data: ScenarioData, log: Log): Promise<{ sat: PhaseResult; closed: PhaseResult | null; fixed: FixedRateResult[]; warm: PhaseResult; next: Target }> {
  await mode.resetShared();
  const first = await mode.start(`keygate ${mode.name} (cold saturation)`);
  let sat: PhaseResult;
  try {
    await warmForCold(first, settings, data);
    log(`${mode.name}: cold saturation`);
    // By duration: ghz cannot stop at whichever comes first of a count and a time. Keys run out
    // (and wrap to cached ones) only past entries/seconds Checks a second; "L1 hit %" shows it.
    sat = await saturation(first, settings, data.cold);
  } finally {
    await first.stop();
  }
  const closed = await coldClosedLoop(mode, settings, data, log);
  await mode.resetShared();
  const next = await mode.start(`keygate ${mode.name}`);
  try {
    const warm = await warmForCold(next, settings, data);
    log(`${mode.name}: cold fixed rates`);
    // Every rate on the same process: a later rate's keys wrap to ones an earlier rate cached
    // only past entries/seconds Checks a second, which "L1 hit %" of saturation would not show.
    const fixed = await fixedRates(next, settings, data.cold);
    return { sat, closed, fixed, warm, next };
  } catch (error) {
    await next.stop();
    throw error;
  }
}

/** All scenarios against one keygate mode, then h2load's one key; the target after cold serves the rest. */
export async function runKeygateScenarios(mode: KeygateMode, settings: LoadSettings, data: ScenarioData, request: FixedRequest, log: Log): Promise<TargetResults> {
  const out = new Map<ScenarioName, ScenarioResult>();
  let target: Target;
  if (settings.scenarios.includes("cold")) {
    const cold = await runCold(mode, settings, data, log);
    target = cold.next;
    out.set("cold", result(mode.name, "cold", data.cold, cold.sat, cold.closed, cold.fixed, cold.warm));
  } else {
    target = await mode.start(`keygate ${mode.name}`);
  }
  try {
    const parts = await runScenarios(target, settings, data, settings.scenarios.filter((s) => s !== "cold"), {
      name: mode.name,
      // Hot and mixed are measured in steady state: every key of the data file seen once before.
      warmUp: (scenario, file) => (scenario === "hot" || scenario === "mixed" ? pass(target, settings, file) : Promise.resolve(null)),
      closedRequests: () => undefined,
    }, log);
    for (const [scenario, p] of parts) out.set(scenario, result(mode.name, scenario, fileOf(data, scenario), p.sat, p.closed, p.fixed, p.warm));
    if (settings.h2load !== null) log(`${mode.name}: one key (h2load)`);
    const single = await oneKey(mode.name, target, settings, request);
    const scenarios = SCENARIOS.flatMap((s) => {
      const r = out.get(s);
      return r === undefined ? [] : [r];
    });
    return { scenarios, oneKey: single };
  } finally {
    await target.stop();
  }
}

/** The scenarios measured in turns with the ceiling: each goal's CPU ratio (hot <= 1.5, flood-malformed <= 1.2). */
export const TURN_SCENARIOS = ["hot", "flood-malformed"] as const;
/** A scenario measured in turns. */
export type TurnScenario = (typeof TURN_SCENARIOS)[number];

/** One measured run in turns: which scenario and target, its CPU per Check, and the calls that failed. */
export interface TurnRun {
  scenario: TurnScenario;
  target: string;
  round: number;
  cpuMicrosPerCheck: number;
  checks: number;
  errors: number;
}

/**
 * Each of `scenarios`' closed loop on the ceiling and on keygate in turns, `rounds` times,
 * alternating which goes first: each run on a fresh process, warmed as the scenario runs warm it
 * (the no-op's JIT and connections; for hot, every one of keygate's hot keys in L1), then measured
 * for the run's length. Two runs of a full bench are minutes apart, and this machine's speed
 * drifts over minutes by more than the goals' margins; runs in turns see the same stretch. Empty
 * without rategen.
 */
export async function runInTurns(
  targets: ReadonlyArray<{ name: string; start(): Promise<Target>; keygate: boolean }>,
  settings: LoadSettings,
  data: ScenarioData,
  scenarios: readonly TurnScenario[],
  rounds: number,
  log: Log,
): Promise<TurnRun[]> {
  if (settings.rategen === null) return [];
  const runs: TurnRun[] = [];
  for (let round = 1; round <= rounds; round++) {
    const order = round % 2 === 1 ? targets : [...targets].reverse();
    for (const scenario of scenarios) {
      const file = fileOf(data, scenario);
      if (file.format !== "binary") return [];
      for (const t of order) {
        log(`${scenario} in turns, round ${round} of ${rounds}: ${t.name}`);
        const target = await t.start();
        try {
          await pass(target, settings, file, t.keygate ? file.entries : Math.min(file.entries, NOOP_WARM_UP_REQUESTS));
          const closed = await closedLoopSaturation(target, settings, file);
          if (closed === null) return [];
          runs.push({ scenario, target: t.name, round, cpuMicrosPerCheck: closed.cpuMicrosPerCheck, checks: closed.ghz.requests, errors: closed.ghz.errors });
        } finally {
          await target.stop();
        }
      }
    }
  }
  return runs;
}
