/**
 * rategen (bench/rategen, Go): the bench's open-loop load generator for latency at fixed rates.
 * Request i is sent at start + i/rate whatever happened to earlier ones, and its latency runs from
 * that scheduled time to its trailers, so a server that stalls is charged for every request that
 * waited behind the stall. With `concurrency` instead of a rate it runs closed loop: that many
 * calls in flight, each sent as soon as another ends, which saturates the server with many keys
 * while spending little of its own core on each answer (it reads the grpc-status and nothing else;
 * ghz decodes every CheckResponse).
 */
import { createHash } from "node:crypto";
import { readdirSync, readFileSync } from "node:fs";
import { join, resolve } from "node:path";
import { z } from "zod";
import type { DataFile } from "./data.js";
import { cacheBinDir, executable } from "./ghz.js";
import type { GhzResult } from "./ghz.js";
import { spawnTracked } from "./processes.js";

const root = resolve(import.meta.dirname, "..");
const SOURCE_DIR = join(root, "bench", "rategen");

function sha256(data: string | Buffer): string {
  return createHash("sha256").update(data).digest("hex");
}

/**
 * A hash of rategen's source: go.mod, go.sum and every .go file. The same as
 * bench/install-rategen.sh computes: sha256 over `sha256sum`'s lines ("<hex>  <name>\n") in C
 * sort order, first 16 hex digits.
 */
export function rategenSourceHash(): string {
  const names = readdirSync(SOURCE_DIR)
    .filter((name) => name === "go.mod" || name === "go.sum" || name.endsWith(".go"))
    // Code-unit order, which is C sort order for these ASCII names.
    .sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
  const lines = names.map((name) => `${sha256(readFileSync(join(SOURCE_DIR, name)))}  ${name}\n`).join("");
  return sha256(lines).slice(0, 16);
}

/** Where bench/install-rategen.sh puts the binary of the current source. */
export function rategenInstallPath(): string {
  return join(cacheBinDir(), `rategen-${rategenSourceHash()}`);
}

/** rategen built from the current source; null when it is not (an older source's binary is not used). */
export function findRategen(): string | null {
  const path = rategenInstallPath();
  return executable(path) ? path : null;
}

/**
 * One rategen run for `seconds`, round-robin over `connections`: open loop at `rps` calls a
 * second, or closed loop with `concurrency` calls in flight (at most `requests` of them, when set).
 */
export type RategenRun = RategenCommon & ({ rps: number } | { concurrency: number; requests?: number });

interface RategenCommon {
  port: number;
  data: DataFile;
  seconds: number;
  connections: number;
  /** GOMAXPROCS of rategen; default: all cores. */
  cpus?: number;
  timeoutSeconds?: number;
  maxInflight?: number;
}

const ms = z.number().nonnegative().nullable();
const count = z.number().int().nonnegative();
const reportSchema = z.object({
  tool: z.literal("rategen"),
  concurrency: count,
  timer: z.string(),
  scheduled: count,
  sent: count,
  completed: count,
  dropped: count,
  timedOut: count,
  transportErrors: count,
  seconds: z.number().nonnegative(),
  rps: z.number().nonnegative(),
  statusCodes: z.record(z.string(), count),
  errorMessages: z.record(z.string(), count),
  latencyMs: z.object({ mean: ms, p50: ms, p90: ms, p99: ms, p999: ms, max: ms }),
  sendLagMs: z.object({ p50: ms, p99: ms, max: ms }),
});

const orNaN = (v: number | null): number => v ?? Number.NaN;

/**
 * Parses rategen's JSON report into the shape ghz's runs have. Timeouts count as
 * DeadlineExceeded, as ghz counts its own; errors are every call that was not a gRPC OK answer:
 * other statuses, timeouts, transport errors and dropped requests.
 */
export function parseRategenReport(text: string): GhzResult {
  const lastLine = text.trim().split("\n").at(-1) ?? "";
  const report = reportSchema.parse(JSON.parse(lastLine));
  const statusCodes: Record<string, number> = { ...report.statusCodes };
  if (report.timedOut > 0) statusCodes["DeadlineExceeded"] = (statusCodes["DeadlineExceeded"] ?? 0) + report.timedOut;
  const notOk = Object.entries(statusCodes).reduce((sum, [code, n]) => (code === "OK" ? sum : sum + n), 0);
  const errorMessages: Record<string, number> = { ...report.errorMessages };
  if (report.dropped > 0) errorMessages["dropped: more than -max-inflight calls in flight"] = report.dropped;
  if (report.timedOut > 0) errorMessages["no answer within the timeout"] = report.timedOut;
  const lat = report.latencyMs;
  return {
    tool: "rategen",
    requests: report.completed,
    seconds: report.seconds,
    rps: report.rps,
    latencyMs: { average: orNaN(lat.mean), p50: orNaN(lat.p50), p90: orNaN(lat.p90), p99: orNaN(lat.p99), max: orNaN(lat.max) },
    statusCodes,
    errors: notOk + report.transportErrors + report.dropped,
    errorMessages,
    endReason: report.concurrency > 0 ? `closed loop: ${report.concurrency} in flight, ${report.sent} sent` : `open loop: ${report.scheduled} scheduled, ${report.sent} sent`,
    openLoop: {
      scheduled: report.scheduled,
      sent: report.sent,
      dropped: report.dropped,
      timedOut: report.timedOut,
      transportErrors: report.transportErrors,
      p999Ms: orNaN(lat.p999),
      sendLagMs: { p50: orNaN(report.sendLagMs.p50), p99: orNaN(report.sendLagMs.p99), max: orNaN(report.sendLagMs.max) },
      timer: report.timer,
    },
  };
}

const TIMEOUT_SECONDS = 10;
// Past its schedule rategen waits at most the timeout for answers; this bounds a stalled one.
const DEADLINE_MARGIN_MS = 60_000;

/** Runs rategen against 127.0.0.1:port on the load core and parses its report. */
export async function runRategen(rategen: string, run: RategenRun): Promise<GhzResult> {
  if (run.data.format !== "binary") throw new Error(`rategen: ${run.data.path}: reads binary data files only (--data-format binary)`);
  const timeoutSeconds = run.timeoutSeconds ?? TIMEOUT_SECONDS;
  const args = [
    ...["-port", String(run.port), "-data", run.data.path],
    ...("rps" in run ? ["-rate", String(run.rps)] : ["-concurrency", String(run.concurrency), ...(run.requests === undefined ? [] : ["-requests", String(run.requests)])]),
    ...["-duration", String(run.seconds), "-connections", String(run.connections)],
    ...["-timeout", `${timeoutSeconds}s`],
    ...(run.maxInflight === undefined ? [] : ["-max-inflight", String(run.maxInflight)]),
  ];
  const env: Record<string, string> = run.cpus === undefined ? {} : { GOMAXPROCS: String(run.cpus) };
  const child = spawnTracked("rategen", rategen, args, { cwd: root, env, role: "load" });
  const deadline = setTimeout(() => void child.stop("SIGKILL"), (run.seconds + timeoutSeconds) * 1000 + DEADLINE_MARGIN_MS);
  const code = await child.exit.finally(() => clearTimeout(deadline));
  if (code !== 0) throw new Error(`rategen exited with ${String(code)}:\n${child.output()}`);
  return parseRategenReport(child.stdout());
}
