import { accessSync, constants, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { homedir, tmpdir } from "node:os";
import { delimiter, join, resolve } from "node:path";
import { z } from "zod";
import type { DataFile } from "./data.js";
import { spawnTracked } from "./processes.js";

const root = resolve(import.meta.dirname, "..");
const PROTO = "envoy/service/auth/v3/external_auth.proto";
const CALL = "envoy.service.auth.v3.Authorization/Check";

/** The directory the bench's install scripts put load generators in (KEYGATE_CACHE_DIR/bin). */
export function cacheBinDir(): string {
  const cache = process.env["KEYGATE_CACHE_DIR"] ?? join(homedir(), ".cache", "keygate");
  return join(cache, "bin");
}

/** Where bench/install-ghz.sh puts ghz. */
export function ghzInstallPath(): string {
  return join(cacheBinDir(), "ghz");
}

/** True when `path` is a file this process may execute. */
export function executable(path: string): boolean {
  try {
    accessSync(path, constants.X_OK);
    return true;
  } catch {
    return false;
  }
}

/** The ghz binary: bench/install-ghz.sh's, else one on PATH; null when there is none. */
export function findGhz(): string | null {
  const installed = ghzInstallPath();
  if (executable(installed)) return installed;
  for (const dir of (process.env["PATH"] ?? "").split(delimiter)) {
    if (dir !== "" && executable(join(dir, "ghz"))) return join(dir, "ghz");
  }
  return null;
}

/**
 * When a run ends: after a duration, or after a number of requests. Not both: ghz v0.120 turns
 * --max-duration into --duration and then ignores --total.
 */
export type RunLength = { durationSeconds: number } | { total: number };

/** One ghz run. */
export interface GhzRun {
  port: number;
  data: DataFile;
  connections: number;
  concurrency: number;
  length: RunLength;
  rps?: number;
  /** GOMAXPROCS of ghz; default: all cores. */
  cpus?: number;
}

// ghz reports durations as Go time.Duration: integer nanoseconds.
const ghzReportSchema = z.object({
  count: z.number(),
  total: z.number(),
  average: z.number(),
  fastest: z.number(),
  slowest: z.number(),
  rps: z.number(),
  endReason: z.string().optional(),
  errorDistribution: z.record(z.string(), z.number()).nullable().optional(),
  statusCodeDistribution: z.record(z.string(), z.number()).nullable().optional(),
  latencyDistribution: z.array(z.object({ percentage: z.number(), latency: z.number() })).nullable().optional(),
});

/** The load generator behind a result: ghz (closed loop, workers) or rategen (open loop, bench/rategen). */
export type LoadTool = "ghz" | "rategen";

/** What rategen reports beyond ghz's figures: the open-loop schedule and how well it was kept. */
export interface OpenLoopDetail {
  scheduled: number;
  sent: number;
  /** Not sent: more than rategen's -max-inflight calls were already in flight. */
  dropped: number;
  /** Calls with no answer within the timeout, counted from their scheduled send time. */
  timedOut: number;
  /** Streams reset, connections lost, answers without grpc-status. */
  transportErrors: number;
  p999Ms: number;
  /** How late rategen wrote requests against their schedule: large values mean the generator, not the server, fell behind. */
  sendLagMs: { p50: number; p99: number; max: number };
  /** How rategen waits for the next send time: "timerfd" on Linux. */
  timer: string;
}

/**
 * What one load-generator run measured (ghz, or rategen at fixed rates). ghz's latencies are of
 * successful calls only; rategen's are of every call answered with a grpc-status.
 */
export interface GhzResult {
  tool: LoadTool;
  requests: number;
  seconds: number;
  rps: number;
  latencyMs: { average: number; p50: number; p90: number; p99: number; max: number };
  /** gRPC status name to count; a DENIED CheckResponse is still "OK" here. */
  statusCodes: Record<string, number>;
  /** Calls that did not end in gRPC OK. */
  errors: number;
  errorMessages: Record<string, number>;
  endReason: string;
  /** rategen's schedule figures; absent for ghz. */
  openLoop?: OpenLoopDetail;
}

const NS_PER_MS = 1e6;

/** Parses ghz's `-O json` report. */
export function parseGhzReport(text: string): GhzResult {
  const report = ghzReportSchema.parse(JSON.parse(text));
  const percentile = (p: number): number => (report.latencyDistribution ?? []).find((d) => d.percentage === p)?.latency ?? Number.NaN;
  const statusCodes = report.statusCodeDistribution ?? {};
  const errors = Object.entries(statusCodes).reduce((sum, [code, n]) => (code === "OK" ? sum : sum + n), 0);
  return {
    tool: "ghz",
    requests: report.count,
    seconds: report.total / 1e9,
    rps: report.rps,
    latencyMs: {
      average: report.average / NS_PER_MS,
      p50: percentile(50) / NS_PER_MS,
      p90: percentile(90) / NS_PER_MS,
      p99: percentile(99) / NS_PER_MS,
      max: report.slowest / NS_PER_MS,
    },
    statusCodes,
    errors,
    errorMessages: report.errorDistribution ?? {},
    endReason: report.endReason ?? "",
  };
}

function ghzArgs(run: GhzRun, output: string): string[] {
  const args = [
    "--insecure",
    "--proto",
    join(root, "proto", PROTO),
    "--import-paths",
    join(root, "proto"),
    "--call",
    CALL,
    run.data.format === "binary" ? "--binary-file" : "--data-file",
    run.data.path,
    "--disable-template-functions",
    "--disable-template-data",
    "--connections",
    String(run.connections),
    "--concurrency",
    String(run.concurrency),
    "--timeout",
    "10s",
    // Calls still in flight when the duration ends are neither counted nor reported as errors.
    "--duration-stop",
    "ignore",
    "--format",
    "json",
    "--output",
    output,
  ];
  if ("total" in run.length) args.push("--total", String(run.length.total));
  else args.push("--duration", `${run.length.durationSeconds}s`);
  if (run.rps !== undefined) args.push("--rps", String(run.rps));
  if (run.cpus !== undefined) args.push("--cpus", String(run.cpus));
  args.push(`127.0.0.1:${run.port}`);
  return args;
}

// A run by request count has no duration limit in ghz; this bounds a stalled one.
const DEADLINE_MS = 600_000;

/** Runs ghz against 127.0.0.1:port and parses its report. */
export async function runGhz(ghz: string, run: GhzRun): Promise<GhzResult> {
  const dir = mkdtempSync(join(tmpdir(), "keygate-ghz-"));
  try {
    const output = join(dir, "report.json");
    const child = spawnTracked("ghz", ghz, ghzArgs(run, output), { cwd: root, env: {}, role: "load" });
    const deadline = setTimeout(() => void child.stop("SIGKILL"), DEADLINE_MS);
    const code = await child.exit.finally(() => clearTimeout(deadline));
    if (code !== 0) throw new Error(`ghz exited with ${String(code)}:\n${child.output()}`);
    return parseGhzReport(readFileSync(output, "utf8"));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}
