import type { DataFile, ScenarioData } from "./data.js";
import { fixedRate, pass, saturation } from "./measure.js";
import type { LoadSettings, PhaseResult } from "./measure.js";
import type { Target } from "./targets.js";

/** Every scenario, in report order. */
export const SCENARIOS = ["hot", "cold", "mixed", "flood", "flood-malformed"] as const;
/** A scenario's name. */
export type ScenarioName = (typeof SCENARIOS)[number];

/** What each scenario sends and in what state it finds keygate. */
export const SCENARIO_DESCRIPTIONS: Record<ScenarioName, string> = {
  hot: "distinct valid keys (unlimited plan), all in L1 after a warm-up pass over every one",
  cold: "first touch of each valid key: a fresh keygate (and an emptied Redis) per run, every request a different key until the keys run out, so each is a store lookup (L1 hit % shows any wrap-around)",
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
  fixedRate: PhaseResult;
}

/** How to start keygate in one mode, and how to empty its shared cache between cold runs. */
export interface KeygateMode {
  readonly name: string;
  start(label: string): Promise<Target>;
  resetShared(): Promise<void>;
}

type Log = (message: string) => void;

function result(target: string, scenario: ScenarioName, data: DataFile, sat: PhaseResult, fixed: PhaseResult, warm: PhaseResult | null): ScenarioResult {
  return {
    target,
    scenario,
    data: { entries: data.entries, composition: data.composition },
    warmUp: warm === null ? null : { requests: warm.ghz.requests, seconds: warm.ghz.seconds, errors: warm.ghz.errors },
    saturation: sat,
    fixedRate: fixed,
  };
}

function fileOf(data: ScenarioData, scenario: ScenarioName): DataFile {
  return scenario === "flood-malformed" ? data.floodMalformed : data[scenario];
}

/** The no-op ceiling: the same requests as every keygate scenario. */
export async function runNoopScenarios(noop: Target, settings: LoadSettings, data: ScenarioData, log: Log): Promise<ScenarioResult[]> {
  const out: ScenarioResult[] = [];
  for (const scenario of SCENARIOS) {
    log(`noop: ${scenario}`);
    const file = fileOf(data, scenario);
    const sat = await saturation(noop, settings, file);
    const fixed = await fixedRate(noop, settings, file);
    out.push(result("noop", scenario, file, sat, fixed, null));
  }
  return out;
}

/** Cold: each run on a fresh process (and emptied Redis), every request a key it has not seen. */
async function runCold(mode: KeygateMode, settings: LoadSettings, data: ScenarioData, log: Log): Promise<{ sat: PhaseResult; fixed: PhaseResult; next: Target }> {
  await mode.resetShared();
  const first = await mode.start(`keygate ${mode.name} (cold saturation)`);
  let sat: PhaseResult;
  try {
    log(`${mode.name}: cold saturation`);
    // By duration: ghz cannot stop at whichever comes first of a count and a time. Keys run out
    // (and wrap to cached ones) only past entries/seconds Checks a second; "L1 hit %" shows it.
    sat = await saturation(first, settings, data.cold);
  } finally {
    await first.stop();
  }
  await mode.resetShared();
  const next = await mode.start(`keygate ${mode.name}`);
  try {
    log(`${mode.name}: cold fixed rate`);
    const fixed = await fixedRate(next, settings, data.cold);
    return { sat, fixed, next };
  } catch (error) {
    await next.stop();
    throw error;
  }
}

/** All scenarios against one keygate mode; the target after cold serves the rest. */
export async function runKeygateScenarios(mode: KeygateMode, settings: LoadSettings, data: ScenarioData, log: Log): Promise<ScenarioResult[]> {
  const cold = await runCold(mode, settings, data, log);
  const target = cold.next;
  const out = new Map<ScenarioName, ScenarioResult>();
  out.set("cold", result(mode.name, "cold", data.cold, cold.sat, cold.fixed, null));
  try {
    for (const scenario of SCENARIOS) {
      if (scenario === "cold") continue;
      const file = fileOf(data, scenario);
      // Hot and mixed are measured in steady state: every key of the data file seen once before.
      const warm = scenario === "hot" || scenario === "mixed" ? await pass(target, settings, file) : null;
      log(`${mode.name}: ${scenario}${warm === null ? "" : ` (warm-up: ${warm.ghz.requests} requests in ${warm.ghz.seconds.toFixed(1)} s)`}`);
      const sat = await saturation(target, settings, file);
      const fixed = await fixedRate(target, settings, file);
      out.set(scenario, result(mode.name, scenario, file, sat, fixed, warm));
    }
  } finally {
    await target.stop();
  }
  return SCENARIOS.flatMap((s) => {
    const r = out.get(s);
    return r === undefined ? [] : [r];
  });
}
