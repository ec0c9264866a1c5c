import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { z } from "zod";
import { round } from "./processes.js";
import type { Target } from "./targets.js";

const root = resolve(import.meta.dirname, "..");

const callFrameSchema = z.object({ functionName: z.string(), url: z.string(), lineNumber: z.number() });
const cpuProfileSchema = z.object({
  nodes: z.array(z.object({ id: z.number(), callFrame: callFrameSchema })),
  startTime: z.number(),
  endTime: z.number(),
  samples: z.array(z.number()),
  timeDeltas: z.array(z.number()),
});

/** One function's share of the sampled CPU time. */
export interface HotFunction {
  functionName: string;
  location: string;
  category: string;
  selfMs: number;
  selfPercent: number;
}

/** The self-time summary of a .cpuprofile over a window. */
export interface ProfileSummary {
  /** Samples in the window, and the share of them that was idle. */
  samples: number;
  windowSeconds: number;
  idlePercent: number;
  /** Percentages are of the non-idle samples. */
  top: HotFunction[];
  byCategory: Array<{ category: string; selfPercent: number }>;
}

function relativeLocation(url: string, line: number): string {
  if (url === "") return "";
  const path = url.startsWith("file://") ? fileURLToPath(url) : url;
  const shown = path.startsWith(`${root}/`) ? path.slice(root.length + 1) : path;
  return `${shown}:${line + 1}`;
}

/** Where a function lives: a package, node's internals, keygate's own code, or V8 itself. */
export function categoryOf(functionName: string, url: string): string {
  if (url === "") return functionName.startsWith("(") ? functionName : "(native)";
  if (url.startsWith("node:")) return "node internals";
  const modules = url.lastIndexOf("/node_modules/");
  if (modules >= 0) {
    const parts = url.slice(modules + "/node_modules/".length).split("/");
    return (parts[0] ?? "").startsWith("@") ? `${parts[0] ?? ""}/${parts[1] ?? ""}` : (parts[0] ?? "");
  }
  const path = url.startsWith("file://") ? fileURLToPath(url) : url;
  if (path.startsWith(join(root, "src")) || path.startsWith(join(root, "dist"))) return `keygate ${path.slice(root.length + 1).split("/").slice(0, 2).join("/")}`;
  return "other";
}

/**
 * Self time per function from a .cpuprofile, counting only samples taken between
 * `fromEndMs` and `toEndMs` before the profile's end (the measured run, not start-up or warm-up).
 */
export function summarizeProfile(text: string, window: { fromEndMs: number; toEndMs: number }, topN = 25): ProfileSummary {
  const profile = cpuProfileSchema.parse(JSON.parse(text));
  const frames = new Map(profile.nodes.map((n) => [n.id, n.callFrame]));
  const from = profile.endTime - window.fromEndMs * 1000;
  const to = profile.endTime - window.toEndMs * 1000;
  const selfSamples = new Map<number, number>();
  let time = profile.startTime;
  let counted = 0;
  profile.samples.forEach((nodeId, i) => {
    time += profile.timeDeltas[i] ?? 0;
    if (time < from || time > to) return;
    selfSamples.set(nodeId, (selfSamples.get(nodeId) ?? 0) + 1);
    counted++;
  });
  const byFunction = new Map<string, HotFunction>();
  let idle = 0;
  for (const [nodeId, n] of selfSamples) {
    const frame = frames.get(nodeId);
    if (frame === undefined) continue;
    if (frame.functionName === "(idle)") {
      idle += n;
      continue;
    }
    const location = relativeLocation(frame.url, frame.lineNumber);
    const key = `${frame.functionName}@${location}`;
    const entry = byFunction.get(key) ?? { functionName: frame.functionName || "(anonymous)", location, category: categoryOf(frame.functionName, frame.url), selfMs: 0, selfPercent: 0 };
    entry.selfMs += n;
    byFunction.set(key, entry);
  }
  const busy = Math.max(1, counted - idle);
  const msPerSample = counted > 0 ? (to - from) / 1000 / counted : 0;
  const functions = [...byFunction.values()].map((f) => ({ ...f, selfPercent: round((100 * f.selfMs) / busy, 1), selfMs: round(f.selfMs * msPerSample, 1) }));
  const categories = new Map<string, number>();
  for (const f of functions) categories.set(f.category, (categories.get(f.category) ?? 0) + f.selfPercent);
  return {
    samples: counted,
    windowSeconds: round((to - from) / 1e6, 2),
    idlePercent: round((100 * idle) / Math.max(1, counted), 1),
    top: functions.sort((a, b) => b.selfPercent - a.selfPercent).slice(0, topN),
    byCategory: [...categories].map(([category, selfPercent]) => ({ category, selfPercent: round(selfPercent, 1) })).sort((a, b) => b.selfPercent - a.selfPercent),
  };
}

/** The scenario name of the profiled one-key runs (h2load), keygate's and the ceiling's. */
export const ONE_KEY_PROFILE = "one key (h2load)";

/** A profiled run: what ran, its throughput while profiled, and the profile of the server during it. */
export interface ProfiledRun {
  /** The server profiled: "embedded" (keygate) or a no-op's name. */
  target: string;
  /** What was profiled, e.g. "hot saturation (ghz, many keys)". */
  scenario: string;
  rps: number;
  profile: ProfileSummary;
  /** Where the whole .cpuprofile was kept, if it was. */
  file?: string;
}

/**
 * Runs `measured` against a server (keygate or a no-op) started with --cpu-prof (after `warm`),
 * then SIGTERM so that node writes the profile, which is cut to the measured run. `measured`
 * returns its throughput.
 */
export async function profileRun(
  target: string,
  scenario: string,
  start: (label: string, nodeArgs: readonly string[]) => Promise<Target>,
  warm: (target: Target) => Promise<unknown>,
  measured: (target: Target) => Promise<number>,
  keepAs?: string,
): Promise<ProfiledRun> {
  const dir = mkdtempSync(join(tmpdir(), "keygate-cpuprof-"));
  try {
    const server = await start(`${target} (--cpu-prof)`, ["--cpu-prof", "--cpu-prof-dir", dir]);
    let rps: number;
    let startedAt: number;
    let endedAt: number;
    try {
      await warm(server);
      startedAt = performance.now();
      rps = await measured(server);
      endedAt = performance.now();
    } finally {
      await server.stop();
    }
    const exitedAt = performance.now();
    const file = readdirSync(dir).find((name) => name.endsWith(".cpuprofile"));
    if (file === undefined) throw new Error(`${target} wrote no .cpuprofile into ${dir}`);
    const text = readFileSync(join(dir, file), "utf8");
    const profile = summarizeProfile(text, { fromEndMs: exitedAt - startedAt, toEndMs: exitedAt - endedAt });
    // The whole profile is kept beside the results, for Chrome DevTools or speedscope.
    if (keepAs !== undefined) writeFileSync(keepAs, text);
    return { target, scenario, rps, profile, ...(keepAs === undefined ? {} : { file: keepAs }) };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/**
 * Busy main-thread time per Check in a profiled run: the window's non-idle share of one core over
 * the Checks a second answered while profiled (NaN with none).
 */
export function busyMicrosPerCheck(run: ProfiledRun): number {
  if (!(run.rps > 0)) return Number.NaN;
  return ((100 - run.profile.idlePercent) / 100) * (1e6 / run.rps);
}

/** One place code lives, in µs of busy main thread a Check in two profiled runs. */
export interface CategoryCost {
  category: string;
  target: number;
  ceiling: number;
}

/**
 * Where `target` spends its busy time a Check next to `ceiling` (the same load on a no-op), by
 * where the code lives: `target`'s categories in its order, then any only `ceiling` has.
 */
export function costByCategory(target: ProfiledRun, ceiling: ProfiledRun): CategoryCost[] {
  const micros = (run: ProfiledRun) => {
    const busy = busyMicrosPerCheck(run);
    return new Map(run.profile.byCategory.map((c) => [c.category, (c.selfPercent / 100) * busy]));
  };
  const a = micros(target);
  const b = micros(ceiling);
  const names = [...a.keys(), ...[...b.keys()].filter((name) => !a.has(name))];
  return names.map((category) => ({ category, target: round(a.get(category) ?? 0, 2), ceiling: round(b.get(category) ?? 0, 2) }));
}
