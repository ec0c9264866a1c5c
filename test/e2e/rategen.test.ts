import { spawnSync } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { constants, createServer } from "node:http2";
import type { Http2Server, Http2Session, ServerHttp2Stream } from "node:http2";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { sizeDelimitedEncode } from "@bufbuild/protobuf/wire";
import { afterAll, describe, expect, it } from "vitest";
import { checkRequest } from "../../bench/data.js";
import type { DataFile } from "../../bench/data.js";
import { findRategen, runRategen } from "../../bench/rategen.js";
import { CheckRequestSchema } from "../../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import { requireServer } from "../harness/ports.js";

// rategen against real node:http2 servers that answer in every way a gRPC server can, and one
// that stalls: what it counts and what it charges the stall.
const root = resolve(import.meta.dirname, "../..");

function rategenPresent(): boolean {
  if (findRategen() !== null) return true;
  if (spawnSync("go", ["version"], { stdio: "ignore" }).status !== 0) return false;
  spawnSync("bash", [join(root, "bench/install-rategen.sh")], { stdio: "inherit", timeout: 300_000 });
  return findRategen() !== null;
}

const rategen = requireServer("rategen (the bench's fixed-rate latency generator)", rategenPresent(), "run bash bench/install-rategen.sh (needs Go)") ? findRategen() : null;

const dir = mkdtempSync(join(tmpdir(), "keygate-rategen-test-"));
const servers: Http2Server[] = [];
const sessions = new Set<Http2Session>();
afterAll(async () => {
  // Streams left unanswered on purpose would keep close() waiting.
  for (const session of sessions) session.destroy();
  for (const server of servers) await new Promise((done) => server.close(done));
  rmSync(dir, { recursive: true, force: true });
});

function dataFile(entries: number): DataFile {
  const path = join(dir, `data-${entries}.bin`);
  const messages = Array.from({ length: entries }, (_, i) => sizeDelimitedEncode(CheckRequestSchema, checkRequest(`kg_live_notarealkey${String(i).padStart(6, "0")}`, i)));
  writeFileSync(path, Buffer.concat(messages));
  return { path, entries, format: "binary", composition: { valid: entries } };
}

const GRPC_HEADERS = { ":status": 200, "content-type": "application/grpc" };
const EMPTY_MESSAGE = Buffer.from([0, 0, 0, 0, 0]);

function answerOk(stream: ServerHttp2Stream): void {
  if (stream.destroyed) return;
  stream.respond(GRPC_HEADERS, { waitForTrailers: true });
  stream.once("wantTrailers", () => stream.sendTrailers({ "grpc-status": "0" }));
  stream.end(EMPTY_MESSAGE);
}

/** Serves every request body it reads to completion with `answer(arrival index, stream)`. */
async function serve(answer: (i: number, stream: ServerHttp2Stream) => void): Promise<number> {
  const server = createServer();
  servers.push(server);
  let arrivals = 0;
  server.on("session", (session) => {
    sessions.add(session);
    session.once("close", () => sessions.delete(session));
  });
  server.on("stream", (stream) => {
    stream.on("error", () => undefined);
    stream.resume();
    stream.on("end", () => answer(arrivals++, stream));
  });
  await new Promise<void>((done) => server.listen(0, "127.0.0.1", done));
  const address = server.address();
  if (address === null || typeof address === "string") throw new Error("no TCP address");
  return address.port;
}

describe.runIf(rategen !== null)("rategen (open-loop fixed-rate load generator; closed loop for saturation)", () => {
  const bin = rategen ?? "";

  it("counts each way a call can end: OK in trailers, a trailers-only status, a reset, HTTP 503 without grpc-status, no answer", { timeout: 60_000 }, async () => {
    const port = await serve((i, stream) => {
      switch (i % 5) {
        case 0:
          answerOk(stream);
          break;
        case 1:
          stream.respond({ ...GRPC_HEADERS, "grpc-status": "16", "grpc-message": "no key" }, { endStream: true });
          break;
        case 2:
          stream.close(constants.NGHTTP2_REFUSED_STREAM);
          break;
        case 3:
          stream.respond({ ":status": 503 }, { endStream: true });
          break;
        default:
        // Never answered: rategen's timeout ends it.
      }
    });
    const result = await runRategen(bin, { port, data: dataFile(7), rps: 250, seconds: 1, connections: 2, timeoutSeconds: 0.5 });
    expect(result.tool).toBe("rategen");
    expect(result.openLoop).toMatchObject({ scheduled: 250, sent: 250, dropped: 0, timedOut: 50, transportErrors: 100 });
    // Answered with a grpc-status: OK and Unauthenticated; latencies are theirs.
    expect(result.requests).toBe(100);
    expect(result.statusCodes).toEqual({ OK: 50, Unauthenticated: 50, DeadlineExceeded: 50 });
    expect(result.errorMessages).toEqual({
      "stream reset by the server: REFUSED_STREAM": 50,
      "HTTP status 503 without grpc-status": 50,
      "no answer within the timeout": 50,
    });
    expect(result.errors).toBe(200);
    expect(result.latencyMs.p50).toBeGreaterThan(0);
  });

  it("is open loop: a server that holds its answers for 500 ms is charged for every request scheduled behind the stall", { timeout: 60_000 }, async () => {
    const HOLD_MS = 500;
    let releaseAt: number | null = null;
    const port = await serve((_, stream) => {
      const now = performance.now();
      releaseAt ??= now + HOLD_MS;
      if (now >= releaseAt) answerOk(stream);
      else setTimeout(() => answerOk(stream), releaseAt - now);
    });
    // 200 requests, one every 5 ms: the first 100 are scheduled during the stall.
    const result = await runRategen(bin, { port, data: dataFile(3), rps: 200, seconds: 1, connections: 2 });
    expect(result.openLoop).toMatchObject({ scheduled: 200, sent: 200, dropped: 0, timedOut: 0, transportErrors: 0 });
    expect(result.statusCodes).toEqual({ OK: 200 });
    expect(result.errors).toBe(0);
    // Request i (scheduled at 5i ms) waits at least 500 - 5i ms from its scheduled time, whenever it was
    // actually sent: the 21 slowest are at least 400 ms, and p90 is the 21st slowest of 200.
    // A closed-loop generator would send these late and measure only its own few waiting calls.
    expect(result.latencyMs.max).toBeGreaterThanOrEqual(HOLD_MS);
    expect(result.latencyMs.p90).toBeGreaterThanOrEqual(400);
  });

  it("drops requests beyond -max-inflight instead of sending them, and says so", { timeout: 60_000 }, async () => {
    const port = await serve(() => undefined);
    // 50 scheduled in 0.5 s; none times out (2 s) before the schedule ends, so exactly 10 are in flight.
    const result = await runRategen(bin, { port, data: dataFile(5), rps: 100, seconds: 0.5, connections: 2, timeoutSeconds: 2, maxInflight: 10 });
    expect(result.openLoop).toMatchObject({ scheduled: 50, sent: 10, dropped: 40, timedOut: 10, transportErrors: 0 });
    expect(result.requests).toBe(0);
    expect(result.errors).toBe(50);
    expect(result.errorMessages).toEqual({ "dropped: more than -max-inflight calls in flight": 40, "no answer within the timeout": 10 });
  });

  it("closed loop: keeps exactly -concurrency calls in flight, sends the next as one ends, and stops at -requests", { timeout: 60_000 }, async () => {
    // The server holds calls until eight are open, then answers them all: a ninth in flight
    // would show in mostOpen, and fewer than eight would never be answered.
    const held: ServerHttp2Stream[] = [];
    let mostOpen = 0;
    let answered = 0;
    const port = await serve((_, stream) => {
      held.push(stream);
      mostOpen = Math.max(mostOpen, held.length);
      if (held.length < 8) return;
      for (const s of held.splice(0)) answerOk(s);
      answered += 8;
    });
    const result = await runRategen(bin, { port, data: dataFile(5), concurrency: 8, requests: 296, seconds: 30, connections: 2 });
    expect(result.endReason).toBe("closed loop: 8 in flight, 296 sent");
    expect(result.openLoop).toMatchObject({ scheduled: 296, sent: 296, dropped: 0, timedOut: 0, transportErrors: 0 });
    expect(result.statusCodes).toEqual({ OK: 296 });
    expect(result.requests).toBe(296);
    expect(answered).toBe(296);
    expect(mostOpen).toBe(8);
  });

  it("closed loop: a server that never answers holds -concurrency calls, and the timeout ends them", { timeout: 60_000 }, async () => {
    let arrived = 0;
    const port = await serve(() => {
      arrived++;
    });
    const result = await runRategen(bin, { port, data: dataFile(5), concurrency: 6, seconds: 0.5, connections: 3, timeoutSeconds: 2 });
    // No call ends before the run's half second is over, so no seventh call is ever sent.
    expect(result.openLoop).toMatchObject({ scheduled: 6, sent: 6, dropped: 0, timedOut: 6, transportErrors: 0 });
    expect(arrived).toBe(6);
    expect(result.requests).toBe(0);
  });
});
