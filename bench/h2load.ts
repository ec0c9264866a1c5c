import { accessSync, constants, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { delimiter, join, resolve } from "node:path";
import { fromBinary, toBinary } from "@bufbuild/protobuf";
import { Client, credentials } from "@grpc/grpc-js";
import type { ServiceError } from "@grpc/grpc-js";
import { CheckRequestSchema, CheckResponseSchema } from "../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import type { CheckRequest } from "../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import { spawnTracked } from "./processes.js";

const root = resolve(import.meta.dirname, "..");
const CHECK_PATH = "/envoy.service.auth.v3.Authorization/Check";
const PROBE_DEADLINE_MS = 10_000;

/** h2load on PATH (Debian nghttp2-client), or null. */
export function findH2load(): string | null {
  for (const dir of (process.env["PATH"] ?? "").split(delimiter)) {
    if (dir === "") continue;
    try {
      accessSync(join(dir, "h2load"), constants.X_OK);
      return join(dir, "h2load");
    } catch {
      // Not in this directory.
    }
  }
  return null;
}

/** One CheckRequest as h2load sends it: a gRPC frame (flag 0, 4-byte length) written to a file once. */
export interface FixedRequest {
  path: string;
  /** The encoded CheckRequest, without the frame header. */
  message: Uint8Array;
}

/** Encodes `request` as one uncompressed gRPC frame into `path`. */
export function writeFixedRequest(path: string, request: CheckRequest): FixedRequest {
  const message = toBinary(CheckRequestSchema, request);
  const frame = Buffer.alloc(5 + message.length);
  frame.writeUInt32BE(message.length, 1);
  frame.set(message, 5);
  writeFileSync(path, frame);
  return { path, message };
}

/** What grpc-js (the reference client) got for the fixed request. */
export interface ProbeResult {
  /** gRPC status code (0 is OK). */
  grpcStatus: number;
  /** The CheckResponse's own status: 0 is an allow. Null when the call failed. */
  checkStatus: number | null;
  allowed: boolean;
}

/** Sends the exact message h2load sends, once, with grpc-js, and reads the answer. */
export function probeCheck(port: number, message: Uint8Array): Promise<ProbeResult> {
  const client = new Client(`127.0.0.1:${port}`, credentials.createInsecure());
  const identity = (b: Buffer): Buffer => b;
  return new Promise<ProbeResult>((done) => {
    client.makeUnaryRequest<Buffer, Buffer>(CHECK_PATH, identity, identity, Buffer.from(message), { deadline: Date.now() + PROBE_DEADLINE_MS }, (error: ServiceError | null, value?: Buffer) => {
      if (error !== null || value === undefined) {
        done({ grpcStatus: error?.code ?? 2, checkStatus: null, allowed: false });
        return;
      }
      const response = fromBinary(CheckResponseSchema, value);
      const checkStatus = response.status?.code ?? 0;
      done({ grpcStatus: 0, checkStatus, allowed: checkStatus === 0 && response.httpResponse.case === "okResponse" });
    });
  }).finally(() => client.close());
}

/** One h2load run. */
export interface H2loadRun {
  port: number;
  request: FixedRequest;
  clients: number;
  /** Concurrent streams per client. */
  streams: number;
  seconds: number;
  /** More request headers, as `name: value` (e.g. a grpc-timeout, as Envoy sends with every Check). */
  headers?: readonly string[];
}

/** What one h2load run measured. h2load sees HTTP status only; gRPC status is in trailers it does not read. */
export interface H2loadResult {
  /** Streams that ended with HTTP 200. */
  http200: number;
  /** Streams that failed, errored, timed out or answered another HTTP status. */
  failed: number;
  seconds: number;
  /** HTTP 200 answers a second. */
  rps: number;
  /** Latency of HTTP 200 answers, from h2load's per-request log. */
  latencyMs: { p50: number; p90: number; p99: number; max: number };
  statusCodes: Record<string, number>;
}

const FINISHED = /finished in ([\d.]+)(m?s)/;

function percentile(sorted: readonly number[], p: number): number {
  if (sorted.length === 0) return Number.NaN;
  return sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)] ?? Number.NaN;
}

/** Parses h2load's stdout and its --log-file (start µs, HTTP status, µs to end of response). */
export function parseH2load(stdout: string, log: string): H2loadResult {
  const finished = FINISHED.exec(stdout);
  if (finished === null) throw new Error(`h2load printed no "finished in":\n${stdout.slice(-2000)}`);
  const seconds = Number(finished[1]) / (finished[2] === "ms" ? 1000 : 1);
  const statusCodes: Record<string, number> = {};
  const latencies: number[] = [];
  for (const line of log.split("\n")) {
    const [, status, elapsed] = line.split("\t");
    if (status === undefined || elapsed === undefined) continue;
    statusCodes[status] = (statusCodes[status] ?? 0) + 1;
    if (status === "200") latencies.push(Number(elapsed) / 1000);
  }
  latencies.sort((a, b) => a - b);
  const total = Object.values(statusCodes).reduce((a, b) => a + b, 0);
  return {
    http200: latencies.length,
    failed: total - latencies.length,
    seconds,
    rps: seconds > 0 ? latencies.length / seconds : 0,
    latencyMs: { p50: percentile(latencies, 50), p90: percentile(latencies, 90), p99: percentile(latencies, 99), max: latencies.at(-1) ?? Number.NaN },
    statusCodes,
  };
}

const DEADLINE_MARGIN_MS = 60_000;

/** Runs h2load (one thread) with the fixed request against 127.0.0.1:port for `seconds`, on the load core. */
export async function runH2load(h2load: string, run: H2loadRun): Promise<H2loadResult> {
  const dir = mkdtempSync(join(tmpdir(), "keygate-h2load-"));
  try {
    const log = join(dir, "requests.tsv");
    const args = [
      ...["--threads", "1", "--clients", String(run.clients), "--max-concurrent-streams", String(run.streams)],
      ...["--duration", String(run.seconds), "--data", run.request.path, "--log-file", log],
      ...["--header", "content-type: application/grpc", "--header", "te: trailers"],
      ...(run.headers ?? []).flatMap((header) => ["--header", header]),
      `http://127.0.0.1:${run.port}${CHECK_PATH}`,
    ];
    const child = spawnTracked("h2load", h2load, args, { cwd: root, env: {}, role: "load" });
    const deadline = setTimeout(() => void child.stop("SIGKILL"), run.seconds * 1000 + DEADLINE_MARGIN_MS);
    const code = await child.exit.finally(() => clearTimeout(deadline));
    if (code !== 0) throw new Error(`h2load exited with ${String(code)}:\n${child.output()}`);
    return parseH2load(child.stdout(), readFileSync(log, "utf8"));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}
