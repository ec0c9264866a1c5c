import diagnostics from "node:diagnostics_channel";
import { connect as h2Connect, constants as h2 } from "node:http2";
import type { ClientHttp2Session, ClientHttp2Stream, IncomingHttpHeaders, OutgoingHttpHeaders, ServerHttp2Stream } from "node:http2";
import type { Socket } from "node:net";
import v8 from "node:v8";
import vm from "node:vm";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { Client as GrpcClient, credentials, Metadata, status as GrpcStatus } from "@grpc/grpc-js";
import type { ClientReadableStream, ServiceError } from "@grpc/grpc-js";
import fc from "fast-check";
import { afterEach, describe, expect, it } from "vitest";
import type { CheckInput, Decision } from "../../src/authz/pipeline.js";
import { ConfigError, loadConfig } from "../../src/config.js";
import type { GrpcEngine } from "../../src/config.js";
import { CheckRequestSchema, CheckResponseSchema } from "../../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import type { CheckRequest, CheckResponse } from "../../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import { HealthCheckRequestSchema, HealthCheckResponse_ServingStatus } from "../../src/gen/grpc/health/v1/health_pb.js";
import type { HealthCheckRequest, HealthCheckResponse } from "../../src/gen/grpc/health/v1/health_pb.js";
import { authorizationDefinition, createGrpcAuthzServer, healthDefinition } from "../../src/server/grpc-authz.js";
import type { StartedServer } from "../../src/server/grpc-authz.js";
import { encodeGrpcMessage, MAX_CONCURRENT_STREAMS, MAX_MESSAGE_BYTES, parseGrpcTimeoutMs } from "../../src/server/grpc-h2.js";
import { createLogger } from "../../src/server/logger.js";
import { Metrics } from "../../src/server/metrics.js";
import { Readiness } from "../../src/server/readiness.js";
import type { DecisionTracer } from "../../src/tracing/tracing.js";
import { until, untilValue } from "../harness/poll.js";
import { FailingTracer, UnrecordableTracer } from "../harness/tracers.js";
import { H2_PREFACE, H2_SETTINGS, h2Frame, hpackLiterals, openSocket } from "../harness/sockets.js";

// The same cases run against both engines that can serve the gRPC port: keygate's own server on
// node:http2 and @grpc/grpc-js. grpc-js is the reference client throughout; raw node:http2 client
// streams send what no gRPC client would. Where grpc-js's server departs from the gRPC spec, the
// table below says so, and the case asserts each engine's exact answer.

const CHECK_PATH = authorizationDefinition.Check.path;
const ENGINES: GrpcEngine[] = ["h2", "grpc-js"];
const WAIT_MS = 10_000;

// The pipeline is the test's: a Check with x-test-hold waits for release(), one with x-test-throw
// fails to decide, any other is the missing-credential denial, which carries the request's id.
const DENIAL: Decision = { allow: false, reason: "MISSING_CREDENTIAL", message: "No API key was sent." };
// A Check with x-test-long-message gets a denial whose answer is about 6 MiB: its message is 1 MiB
// of a control character, which the JSON body writes as \u0001.
const LONG_DENIAL: Decision = { ...DENIAL, message: "\u0001".repeat(1024 * 1024) };
const MiB = 1024 * 1024;

class ControlledPipeline {
  readonly held: Array<(decision: Decision) => void> = [];
  readonly paths: string[] = [];
  decided = 0;
  decide(input: CheckInput): Decision | Promise<Decision> {
    this.decided += 1;
    this.paths.push(input.path);
    if (input.headers.get("x-test-throw") === "1") throw new Error("store down");
    if (input.headers.get("x-test-hold") === "1") return new Promise<Decision>((resolve) => this.held.push(resolve));
    if (input.headers.get("x-test-long-message") === "1") return LONG_DENIAL;
    return DENIAL;
  }
  release(): void {
    for (const resolve of this.held.splice(0)) resolve(DENIAL);
  }
}

interface Running {
  server: StartedServer;
  pipeline: ControlledPipeline;
  metrics: Metrics;
  readiness: Readiness;
  url: string;
  stopped: boolean;
}

const running: Running[] = [];
const clients: GrpcClient[] = [];
const sessions: ClientHttp2Session[] = [];

interface StartOptions {
  tracer?: DecisionTracer;
  requestTimeoutMs?: number;
  heldRequestBytes?: { perConnection: number; perListener: number };
}

async function start(engine: GrpcEngine, options: StartOptions = {}): Promise<Running> {
  const pipeline = new ControlledPipeline();
  const readiness = new Readiness();
  readiness.setReady(true);
  const metrics = new Metrics({ defaultMetrics: false });
  const grpc = createGrpcAuthzServer({
    pipeline,
    readiness,
    metrics,
    tracer: options.tracer,
    logger: createLogger("silent"),
    nowMs: () => Date.now(),
    limits: { headersTimeoutMs: 10_000, requestTimeoutMs: options.requestTimeoutMs ?? 30_000, idleTimeoutMs: 60_000, maxConnections: 1000 },
    engine,
    heldRequestBytes: options.heldRequestBytes,
  });
  const server = await grpc.start("127.0.0.1", 0);
  const entry = { server, pipeline, metrics, readiness, url: `http://127.0.0.1:${server.port}`, stopped: false };
  running.push(entry);
  return entry;
}

async function stop(entry: Running, graceMs = 5000): Promise<void> {
  if (entry.stopped) return;
  entry.stopped = true;
  entry.readiness.drain();
  await entry.server.stop(graceMs);
}

afterEach(async () => {
  for (const client of clients.splice(0)) client.close();
  for (const session of sessions.splice(0)) session.destroy();
  for (const entry of running.splice(0)) {
    entry.pipeline.release();
    await stop(entry, 0);
  }
});

function grpcClient(entry: Running): GrpcClient {
  const client = new GrpcClient(`127.0.0.1:${entry.server.port}`, credentials.createInsecure());
  clients.push(client);
  return client;
}

/** A health Watch of `service`, and the statuses it has streamed so far. */
function openWatch(entry: Running, service: string): { watch: ClientReadableStream<HealthCheckResponse>; statuses: HealthCheckResponse_ServingStatus[] } {
  const def = healthDefinition.Watch;
  const statuses: HealthCheckResponse_ServingStatus[] = [];
  const watch = grpcClient(entry).makeServerStreamRequest<HealthCheckRequest, HealthCheckResponse>(
    def.path,
    def.requestSerialize,
    def.responseDeserialize,
    create(HealthCheckRequestSchema, { service }),
  );
  watch.on("data", (message: HealthCheckResponse) => statuses.push(message.status));
  watch.on("error", () => undefined);
  return { watch, statuses };
}

function checkRequest(id: string, headers: Record<string, string> = {}): CheckRequest {
  return create(CheckRequestSchema, { attributes: { request: { http: { id, method: "GET", path: "/v1/decks", headers } } } });
}

/** The request id a denial's JSON body carries. */
function requestIdOf(response: CheckResponse): string {
  if (response.httpResponse.case !== "deniedResponse") throw new Error(`expected a denial, got ${response.httpResponse.case ?? "nothing"}`);
  const body: unknown = JSON.parse(response.httpResponse.value.body);
  if (typeof body !== "object" || body === null || !("requestId" in body) || typeof body.requestId !== "string") throw new Error("denial body without requestId");
  return body.requestId;
}

type Outcome<T> = { ok: true; value: T } | { ok: false; code: number; details: string };

function unary<I, O>(client: GrpcClient, path: string, serialize: (m: I) => Buffer, deserialize: (b: Buffer) => O, request: I, metadata = new Metadata()): Promise<Outcome<O>> {
  return new Promise((resolve) => {
    client.makeUnaryRequest<I, O>(path, serialize, deserialize, request, metadata, (error: ServiceError | null, response?: O) => {
      if (error !== null) resolve({ ok: false, code: error.code, details: error.details });
      else if (response === undefined) resolve({ ok: false, code: -1, details: "no response" });
      else resolve({ ok: true, value: response });
    });
  });
}

function check(client: GrpcClient, request: CheckRequest, path = CHECK_PATH): Promise<Outcome<CheckResponse>> {
  const def = authorizationDefinition.Check;
  return unary(client, path, def.requestSerialize, def.responseDeserialize, request);
}

function healthCheck(client: GrpcClient, service: string): Promise<Outcome<HealthCheckResponse>> {
  const def = healthDefinition.Check;
  return unary(client, def.path, def.requestSerialize, def.responseDeserialize, create(HealthCheckRequestSchema, { service }));
}

/** What a raw HTTP/2 exchange came back with. */
interface RawAnswer {
  headers: IncomingHttpHeaders;
  trailers: IncomingHttpHeaders | null;
  body: Buffer;
  rstCode: number;
}

function rawSession(entry: Running): ClientHttp2Session {
  const session = h2Connect(entry.url);
  session.on("error", () => undefined);
  sessions.push(session);
  return session;
}

/**
 * Sends one stream: the request headers, then each chunk as its own write (awaited, so each
 * leaves as its own DATA frame), then END_STREAM unless `end` is false.
 */
async function raw(entry: Running, chunks: Uint8Array[], options: { headers?: OutgoingHttpHeaders; path?: string; end?: boolean; session?: ClientHttp2Session } = {}): Promise<RawAnswer> {
  const session = options.session ?? rawSession(entry);
  const stream = session.request({
    ":method": "POST",
    ":path": options.path ?? CHECK_PATH,
    "content-type": "application/grpc",
    te: "trailers",
    ...options.headers,
  });
  stream.on("error", () => undefined);
  const answer: RawAnswer = { headers: {}, trailers: null, body: Buffer.alloc(0), rstCode: 0 };
  const parts: Buffer[] = [];
  stream.on("response", (headers) => (answer.headers = headers));
  stream.on("trailers", (trailers) => (answer.trailers = trailers));
  stream.on("data", (chunk: Buffer) => parts.push(chunk));
  // With `end: false` the client's half stays open: the answer is complete when the server's
  // half ends (h2 also resets the stream; grpc-js leaves it open).
  const closed = new Promise<void>((resolve) => {
    stream.once("close", () => resolve());
    if (options.end === false) stream.once("end", () => resolve());
  });
  for (const chunk of chunks) {
    if (stream.closed) break;
    await new Promise<void>((resolve) => stream.write(chunk, () => resolve()));
  }
  if (options.end !== false && !stream.closed) stream.end();
  await closed;
  answer.body = Buffer.concat(parts);
  answer.rstCode = stream.rstCode ?? 0;
  if (!stream.closed) stream.close(h2.NGHTTP2_CANCEL);
  return answer;
}

/** The grpc-status of a raw answer: from the trailers, or the headers of a trailers-only one. */
function grpcStatusOf(answer: RawAnswer): number | undefined {
  const value = answer.trailers?.["grpc-status"] ?? answer.headers["grpc-status"];
  return typeof value === "string" ? Number(value) : undefined;
}

function framed(message: Uint8Array, flag = 0): Buffer {
  const out = Buffer.alloc(5 + message.length);
  out[0] = flag;
  out.writeUInt32BE(message.length, 1);
  out.set(message, 5);
  return out;
}

function checkBytes(id: string): Uint8Array {
  return toBinary(CheckRequestSchema, checkRequest(id));
}

/** The CheckResponse of a raw answer that must be OK with exactly one framed message. */
function checkResponseOf(answer: RawAnswer): CheckResponse {
  expect(answer.headers[":status"]).toBe(200);
  expect(grpcStatusOf(answer)).toBe(GrpcStatus.OK);
  expect(answer.body.readUInt8(0)).toBe(0);
  expect(answer.body.readUInt32BE(1)).toBe(answer.body.length - 5);
  return fromBinary(CheckResponseSchema, answer.body.subarray(5));
}

/**
 * Where grpc-js's server and the gRPC spec part, each engine's exact answer. h2 follows the spec
 * (and grpc-java / grpc-go); grpc-js answers as its own server code does.
 */
interface Departures {
  cardinality: number;
  compressedIdentity: number;
  notPost: { httpStatus: number; grpcStatus: number | undefined };
  timeoutJunk: number;
  timeoutWithSpace: boolean;
}
const DEPARTURES: Record<GrpcEngine, Departures> = {
  // A unary call with zero or two messages, or a truncated one: INTERNAL. A compressed flag
  // with no grpc-encoding cannot be decoded: UNIMPLEMENTED. A method other than POST: 405.
  // grpc-timeout is exactly 1-8 digits and a unit, anything else INTERNAL.
  h2: {
    cardinality: GrpcStatus.INTERNAL,
    compressedIdentity: GrpcStatus.UNIMPLEMENTED,
    notPost: { httpStatus: 405, grpcStatus: undefined },
    timeoutJunk: GrpcStatus.INTERNAL,
    timeoutWithSpace: false,
  },
  // grpc-js answers a cardinality fault with UNIMPLEMENTED, reads a compressed flag without
  // grpc-encoding as uncompressed, does not look at :method (Node's client ends a GET at its
  // headers, so grpc-js answers it as a call with no message), and finds a timeout anywhere in
  // the value (its pattern is unanchored and allows spaces before the unit).
  "grpc-js": {
    cardinality: GrpcStatus.UNIMPLEMENTED,
    compressedIdentity: GrpcStatus.OK,
    notPost: { httpStatus: 200, grpcStatus: GrpcStatus.UNIMPLEMENTED },
    timeoutJunk: GrpcStatus.OK,
    timeoutWithSpace: true,
  },
};

describe.each(ENGINES)("gRPC conformance, engine %s", (engine) => {
  const departs = DEPARTURES[engine];

  describe("happy", () => {
    it("a Check from grpc-js is answered with the CheckResponse of its own request", async () => {
      const entry = await start(engine);
      const outcome = await check(grpcClient(entry), checkRequest("req-1"));
      if (!outcome.ok) throw new Error(`Check failed: ${outcome.code} ${outcome.details}`);
      expect(requestIdOf(outcome.value)).toBe("req-1");
    });

    it("a message split across DATA frames byte by byte is reassembled", async () => {
      const entry = await start(engine);
      const bytes = framed(checkBytes("split"));
      const chunks = [...bytes].map((byte) => Uint8Array.of(byte));
      const answer = await raw(entry, chunks);
      expect(requestIdOf(checkResponseOf(answer))).toBe("split");
      expect(answer.trailers?.["grpc-status"]).toBe("0");
    });

    it("an empty message is an empty CheckRequest (decided: no credential)", async () => {
      const entry = await start(engine);
      const answer = await raw(entry, [framed(new Uint8Array(0))]);
      const response = checkResponseOf(answer);
      expect(response.httpResponse.case).toBe("deniedResponse");
      expect(entry.pipeline.decided).toBe(1);
    });

    it("application/grpc+proto is served like application/grpc", async () => {
      const entry = await start(engine);
      const answer = await raw(entry, [framed(checkBytes("proto"))], { headers: { "content-type": "application/grpc+proto" } });
      expect(requestIdOf(checkResponseOf(answer))).toBe("proto");
    });

    it("1000 concurrent Checks on one session are each answered with their own request's id", async () => {
      const entry = await start(engine);
      const client = grpcClient(entry);
      const ids = Array.from({ length: 1000 }, (_, i) => `pipelined-${i}`);
      const outcomes = await Promise.all(ids.map((id) => check(client, checkRequest(id))));
      const answered = outcomes.map((o) => (o.ok ? requestIdOf(o.value) : `failed ${o.code}`));
      expect(answered).toEqual(ids);
      expect(entry.pipeline.decided).toBe(1000);
    });
  });

  describe("error", () => {
    it("two messages on a unary call", async () => {
      const entry = await start(engine);
      const answer = await raw(entry, [Buffer.concat([framed(checkBytes("a")), framed(checkBytes("b"))])]);
      expect(answer.headers[":status"]).toBe(200);
      expect(grpcStatusOf(answer)).toBe(departs.cardinality);
      expect(answer.body.length).toBe(0);
      expect(entry.pipeline.decided).toBe(0);
    });

    it("a frame cut short, then END_STREAM", async () => {
      const entry = await start(engine);
      const whole = framed(checkBytes("cut"));
      const answer = await raw(entry, [whole.subarray(0, whole.length - 3)]);
      expect(grpcStatusOf(answer)).toBe(departs.cardinality);
      expect(answer.body.length).toBe(0);
      expect(entry.pipeline.decided).toBe(0);
    });

    it("a prefix cut short, then END_STREAM", async () => {
      const entry = await start(engine);
      const answer = await raw(entry, [Uint8Array.of(0, 0, 0)]);
      expect(grpcStatusOf(answer)).toBe(departs.cardinality);
      expect(entry.pipeline.decided).toBe(0);
    });

    it("no message at all", async () => {
      const entry = await start(engine);
      const answer = await raw(entry, []);
      expect(grpcStatusOf(answer)).toBe(departs.cardinality);
      expect(entry.pipeline.decided).toBe(0);
    });

    it("the compressed flag with no grpc-encoding", async () => {
      const entry = await start(engine);
      const answer = await raw(entry, [framed(checkBytes("flag"), 1)]);
      expect(grpcStatusOf(answer)).toBe(departs.compressedIdentity);
      if (engine === "h2") expect(answer.headers["grpc-accept-encoding"]).toBe("identity");
    });

    it("an unknown grpc-encoding with the compressed flag: UNIMPLEMENTED, naming identity as accepted", async () => {
      const entry = await start(engine);
      const answer = await raw(entry, [framed(checkBytes("snappy"), 1)], { headers: { "grpc-encoding": "snappy" } });
      expect(answer.headers[":status"]).toBe(200);
      expect(grpcStatusOf(answer)).toBe(GrpcStatus.UNIMPLEMENTED);
      expect(entry.pipeline.decided).toBe(0);
      if (engine === "h2") expect(answer.headers["grpc-accept-encoding"]).toBe("identity");
    });

    it("a content-type that is not gRPC is refused with HTTP 415", async () => {
      const entry = await start(engine);
      const answer = await raw(entry, [framed(checkBytes("json"))], { headers: { "content-type": "application/json" } });
      expect(answer.headers[":status"]).toBe(415);
      expect(answer.headers["grpc-status"]).toBeUndefined();
      expect(entry.pipeline.decided).toBe(0);
    });

    it("GET instead of POST", async () => {
      const entry = await start(engine);
      const answer = await raw(entry, [framed(checkBytes("get"))], { headers: { ":method": "GET" } });
      expect(answer.headers[":status"]).toBe(departs.notPost.httpStatus);
      expect(grpcStatusOf(answer)).toBe(departs.notPost.grpcStatus);
      if (engine === "h2") expect(answer.headers.allow).toBe("POST");
    });

    it("a message over 4 MiB is refused on its prefix with RESOURCE_EXHAUSTED", async () => {
      const entry = await start(engine);
      const prefix = Buffer.alloc(5);
      prefix.writeUInt32BE(MAX_MESSAGE_BYTES + 1, 1);
      // Only the prefix and a little of the body are sent: the refusal must not wait for the rest.
      const answer = await raw(entry, [prefix, Buffer.alloc(1024)], { end: false });
      expect(grpcStatusOf(answer)).toBe(GrpcStatus.RESOURCE_EXHAUSTED);
      expect(entry.pipeline.decided).toBe(0);
    });

    it("a message of exactly 4 MiB is read and decided", async () => {
      const entry = await start(engine);
      // A CheckRequest padded to exactly the limit with an unknown field (15, length-delimited,
      // its length a 4-byte varint), which decoding skips.
      const head = checkBytes("big");
      const padLength = MAX_MESSAGE_BYTES - head.length - 1 - 4;
      const varint = Uint8Array.of((padLength & 0x7f) | 0x80, ((padLength >> 7) & 0x7f) | 0x80, ((padLength >> 14) & 0x7f) | 0x80, padLength >> 21);
      const message = Buffer.concat([head, Uint8Array.of((15 << 3) | 2), varint, Buffer.alloc(padLength)]);
      expect(message.length).toBe(MAX_MESSAGE_BYTES);
      const answer = await raw(entry, [framed(message)]);
      expect(requestIdOf(checkResponseOf(answer))).toBe("big");
    });

    it("a Check that cannot be decided in its grpc-timeout is answered DEADLINE_EXCEEDED by the server", async () => {
      const entry = await start(engine);
      const request = framed(toBinary(CheckRequestSchema, checkRequest("slow", { "x-test-hold": "1" })));
      const answer = await raw(entry, [request], { headers: { "grpc-timeout": "50m" } });
      expect(answer.headers[":status"]).toBe(200);
      expect(grpcStatusOf(answer)).toBe(GrpcStatus.DEADLINE_EXCEEDED);
      expect(answer.body.length).toBe(0);
      // The decision arriving after the deadline writes nothing and breaks nothing.
      entry.pipeline.release();
      const after = await check(grpcClient(entry), checkRequest("after"));
      expect(after.ok).toBe(true);
    });

    it("each call ends at its own grpc-timeout, whatever other calls wait with the same or another", async () => {
      const entry = await start(engine);
      const session = rawSession(entry);
      const held = (id: string): Buffer => framed(toBinary(CheckRequestSchema, checkRequest(id, { "x-test-hold": "1" })));
      const long = raw(entry, [held("long")], { session, headers: { "grpc-timeout": "60S" } });
      const short = raw(entry, [held("short")], { session, headers: { "grpc-timeout": "50m" } });
      // Answered at once, it leaves the 60 s list ahead of the held call (a 60 s deadline, so a
      // loaded machine cannot turn it into DEADLINE_EXCEEDED).
      const quick = await raw(entry, [framed(checkBytes("quick"))], { session, headers: { "grpc-timeout": "60S" } });
      expect(grpcStatusOf(quick)).toBe(GrpcStatus.OK);
      expect(requestIdOf(checkResponseOf(quick))).toBe("quick");
      expect(grpcStatusOf(await short)).toBe(GrpcStatus.DEADLINE_EXCEEDED);
      // The same timeout again after its earlier calls are gone, on a request that never ends.
      const unfinished = await raw(entry, [framed(checkBytes("open"))], { session, headers: { "grpc-timeout": "50m" }, end: false });
      expect(grpcStatusOf(unfinished)).toBe(GrpcStatus.DEADLINE_EXCEEDED);
      // The 60 s call was neither ended with the 50 ms ones nor kept from its answer.
      entry.pipeline.release();
      const answered = await long;
      expect(grpcStatusOf(answered)).toBe(GrpcStatus.OK);
      expect(requestIdOf(checkResponseOf(answered))).toBe("long");
    });

    it("a client's many distinct grpc-timeouts each end their call (past the shared lists, a timer per call)", async () => {
      const entry = await start(engine);
      const session = rawSession(entry);
      const answers = await Promise.all(
        Array.from({ length: 80 }, (_, i) =>
          raw(entry, [framed(toBinary(CheckRequestSchema, checkRequest(`t${i}`, { "x-test-hold": "1" })))], { session, headers: { "grpc-timeout": `${40 + i}m` } }),
        ),
      );
      expect(answers.map(grpcStatusOf)).toEqual(answers.map(() => GrpcStatus.DEADLINE_EXCEEDED));
    });

    it("grpc-js's own deadline reaches the server as grpc-timeout and ends a held Check", async () => {
      const entry = await start(engine);
      const client = grpcClient(entry);
      const def = authorizationDefinition.Check;
      const outcome = await new Promise<Outcome<CheckResponse>>((resolve) => {
        client.makeUnaryRequest<CheckRequest, CheckResponse>(
          def.path,
          def.requestSerialize,
          def.responseDeserialize,
          checkRequest("deadline", { "x-test-hold": "1" }),
          new Metadata(),
          { deadline: Date.now() + 100 },
          (error: ServiceError | null) => resolve(error === null ? { ok: false, code: -1, details: "answered" } : { ok: false, code: error.code, details: error.details }),
        );
      });
      expect(outcome).toEqual(expect.objectContaining({ ok: false, code: GrpcStatus.DEADLINE_EXCEEDED }));
    });

    const malformedTimeouts = ["abc", "5", "S", "10x", "1 S"];
    it.each(malformedTimeouts)("a malformed grpc-timeout %j is INTERNAL, naming the value", async (timeout) => {
      const entry = await start(engine);
      const answer = await raw(entry, [framed(checkBytes("t"))], { headers: { "grpc-timeout": timeout } });
      expect(answer.headers[":status"]).toBe(200);
      expect(grpcStatusOf(answer)).toBe(departs.timeoutWithSpace && timeout === "1 S" ? GrpcStatus.OK : GrpcStatus.INTERNAL);
      if (grpcStatusOf(answer) === GrpcStatus.INTERNAL) {
        const message = answer.headers["grpc-message"];
        expect(typeof message === "string" && decodeURIComponent(message)).toBe(`Invalid grpc-timeout value "${timeout}"`);
      }
    });

    const junkTimeouts = ["-1S", "1.5S", "123456789S", "1SS"];
    it.each(junkTimeouts)("a grpc-timeout %j with a valid value inside it", async (timeout) => {
      const entry = await start(engine);
      const answer = await raw(entry, [framed(checkBytes("t"))], { headers: { "grpc-timeout": timeout } });
      expect(grpcStatusOf(answer)).toBe(departs.timeoutJunk);
    });

    it("a Check that fails to decide is UNAVAILABLE, never an answer", async () => {
      const entry = await start(engine);
      const outcome = await check(grpcClient(entry), checkRequest("down", { "x-test-throw": "1" }));
      expect(outcome).toEqual({ ok: false, code: GrpcStatus.UNAVAILABLE, details: "the key could not be checked right now" });
    });

    it("a Check whose trace cannot be opened is UNAVAILABLE and counted, and the next is served", async () => {
      const entry = await start(engine, { tracer: new FailingTracer() });
      const client = grpcClient(entry);
      const unavailable = { ok: false, code: GrpcStatus.UNAVAILABLE, details: "the key could not be checked right now" };
      expect(await check(client, checkRequest("first"))).toEqual(unavailable);
      expect(await check(client, checkRequest("second"))).toEqual(unavailable);
      expect(entry.pipeline.decided).toBe(0);
      const counted = (await entry.metrics.registry.getSingleMetric("keygate_checks_total")?.get())?.values ?? [];
      expect(counted.map((v) => ({ reason: v.labels["reason"], value: v.value }))).toEqual([{ reason: "UNAVAILABLE", value: 2 }]);
    });

    it("an unknown method of a known service is UNIMPLEMENTED", async () => {
      const entry = await start(engine);
      const outcome = await check(grpcClient(entry), checkRequest("x"), "/envoy.service.auth.v3.Authorization/Nope");
      expect(outcome).toEqual({ ok: false, code: GrpcStatus.UNIMPLEMENTED, details: "The server does not implement the method /envoy.service.auth.v3.Authorization/Nope" });
    });

    it("an unknown service is UNIMPLEMENTED, as a trailers-only answer", async () => {
      const entry = await start(engine);
      const outcome = await check(grpcClient(entry), checkRequest("x"), "/foo.Bar/Baz");
      expect(outcome).toEqual({ ok: false, code: GrpcStatus.UNIMPLEMENTED, details: "The server does not implement the method /foo.Bar/Baz" });
      const answer = await raw(entry, [framed(checkBytes("x"))], { path: "/foo.Bar/Baz" });
      expect(answer.headers[":status"]).toBe(200);
      expect(answer.headers["grpc-status"]).toBe(String(GrpcStatus.UNIMPLEMENTED));
      expect(answer.trailers).toBeNull();
      expect(answer.body.length).toBe(0);
    });
  });

  describe("health", () => {
    it("Check: SERVING for the server and for Authorization, NOT_SERVING once draining, NOT_FOUND for others", async () => {
      const entry = await start(engine);
      const client = grpcClient(entry);
      for (const service of ["", "envoy.service.auth.v3.Authorization"]) {
        const outcome = await healthCheck(client, service);
        expect(outcome.ok && outcome.value.status).toBe(HealthCheckResponse_ServingStatus.SERVING);
      }
      // A service name that needs percent-encoding in grpc-message comes back intact.
      expect(await healthCheck(client, "nope ü%")).toEqual({ ok: false, code: GrpcStatus.NOT_FOUND, details: 'unknown service "nope ü%"' });
      entry.readiness.drain();
      const draining = await healthCheck(client, "");
      expect(draining.ok && draining.value.status).toBe(HealthCheckResponse_ServingStatus.NOT_SERVING);
    });

    it("Watch: the status now, every change, and the end with OK on drain", async () => {
      const entry = await start(engine);
      let ended: { code: number } | null = null;
      const { watch, statuses } = openWatch(entry, "envoy.service.auth.v3.Authorization");
      watch.on("status", (status: { code: number }) => (ended = status));
      await until(() => statuses.length === 1, WAIT_MS, "the first status");
      entry.readiness.setReady(false);
      await until(() => statuses.length === 2, WAIT_MS, "NOT_SERVING");
      entry.readiness.setReady(true);
      await until(() => statuses.length === 3, WAIT_MS, "SERVING again");
      await stop(entry);
      await until(() => ended !== null, WAIT_MS, "the end of the Watch");
      const { SERVING, NOT_SERVING } = HealthCheckResponse_ServingStatus;
      expect(statuses).toEqual([SERVING, NOT_SERVING, SERVING, NOT_SERVING]);
      expect(ended).toEqual(expect.objectContaining({ code: GrpcStatus.OK }));
    });

    it("Watch of an unknown service streams SERVICE_UNKNOWN", async () => {
      const entry = await start(engine);
      const { watch, statuses } = openWatch(entry, "other");
      await until(() => statuses.length === 1, WAIT_MS, "the first status");
      expect(statuses).toEqual([HealthCheckResponse_ServingStatus.SERVICE_UNKNOWN]);
      watch.cancel();
    });
  });

  describe("drain", () => {
    it("stop() lets an in-flight Check finish, sends GOAWAY, and refuses new connections", async () => {
      const entry = await start(engine);
      const client = grpcClient(entry);
      expect((await check(client, checkRequest("warm"))).ok).toBe(true);
      const session = rawSession(entry);
      const goaway = new Promise<number>((resolve) => session.once("goaway", (code: number) => resolve(code)));
      const inFlight = raw(entry, [framed(toBinary(CheckRequestSchema, checkRequest("in-flight", { "x-test-hold": "1" })))], { session });
      const heldByClient = check(client, checkRequest("in-flight-2", { "x-test-hold": "1" }));
      await until(() => entry.pipeline.held.length === 2, WAIT_MS, "both Checks to reach the pipeline");
      let stopped = false;
      const stopping = stop(entry, 10_000).then(() => (stopped = true));
      expect(await goaway).toBe(h2.NGHTTP2_NO_ERROR);
      // A new connection is refused: the listener is closed.
      const refused = await new Promise<string>((resolve) => {
        const fresh = h2Connect(entry.url);
        fresh.on("error", (error: Error & { code?: string }) => resolve(error.code ?? "error"));
        fresh.on("connect", () => resolve("connected"));
      });
      expect(refused).toBe("ECONNREFUSED");
      expect(stopped).toBe(false);
      entry.pipeline.release();
      expect(requestIdOf(checkResponseOf(await inFlight))).toBe("in-flight");
      const second = await heldByClient;
      expect(second.ok && requestIdOf(second.value)).toBe("in-flight-2");
      await stopping;
      expect(stopped).toBe(true);
    });

    it("stop() cuts calls still in flight after the grace period", async () => {
      const entry = await start(engine);
      const inFlight = raw(entry, [framed(toBinary(CheckRequestSchema, checkRequest("stuck", { "x-test-hold": "1" })))]);
      await until(() => entry.pipeline.held.length === 1, WAIT_MS, "the Check to reach the pipeline");
      await stop(entry, 50);
      const answer = await inFlight;
      expect(grpcStatusOf(answer)).toBeUndefined();
      // The late decision lands on a closed stream without harm.
      entry.pipeline.release();
    });
  });

  describe("security", () => {
    it("a path whose bytes are not UTF-8 (Envoy passes a client's :path on as it came) is decided, never a gRPC error failure_mode_allow would allow", async () => {
      const entry = await start(engine);
      const bytes = Buffer.from(toBinary(CheckRequestSchema, create(CheckRequestSchema, { attributes: { request: { http: { id: "latin1", method: "GET", path: "/v1/decks?q=@@@" } } } })));
      const at = bytes.indexOf("@@@");
      expect(at).toBeGreaterThan(0);
      bytes[at] = 0xe9; // Latin-1 "é": not UTF-8.
      const answer = await raw(entry, [framed(bytes)]);
      expect(grpcStatusOf(answer)).toBe(GrpcStatus.OK);
      expect(requestIdOf(checkResponseOf(answer))).toBe("latin1");
      expect(entry.pipeline.paths).toEqual(["/v1/decks?q=\uFFFD@@"]);
    });

    it("a denial echoes a request id of at most 128 printable ASCII characters, and one keygate made for any other", async () => {
      const entry = await start(engine);
      const client = grpcClient(entry);
      const echoed = async (request: CheckRequest): Promise<{ id: string; answerBytes: number }> => {
        const outcome = await check(client, request);
        if (!outcome.ok) throw new Error(`Check failed: ${outcome.code} ${outcome.details}`);
        return { id: requestIdOf(outcome.value), answerBytes: toBinary(CheckResponseSchema, outcome.value).length };
      };
      const longest = "r".repeat(128);
      expect((await echoed(checkRequest(longest))).id).toBe(longest);
      expect((await echoed(checkRequest(' "~\\'))).id).toBe(' "~\\');
      // Any other is not the client's to put in answers and logs: a fresh id of keygate's own.
      const MADE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
      for (const id of ["r".repeat(129), "req-\u00e9", "req\n1", "req\u007f"]) expect((await echoed(checkRequest(id))).id).toMatch(MADE);
      // From x-request-id when Envoy's id is empty: bounded the same way.
      expect((await echoed(checkRequest("", { "x-request-id": "h".repeat(128) }))).id).toBe("h".repeat(128));
      expect((await echoed(checkRequest("", { "x-request-id": "h".repeat(129) }))).id).toMatch(MADE);
      // The largest Check, all of it the id: echoed and JSON-escaped (\u0001) it made a 24 MiB answer.
      const largest = await echoed(checkRequest("\u0001".repeat(MAX_MESSAGE_BYTES - 4096)));
      expect(largest.id).toMatch(MADE);
      expect(largest.answerBytes).toBeLessThan(1024);
    });

    it(`a connection may open at most ${MAX_CONCURRENT_STREAMS} streams at once (SETTINGS_MAX_CONCURRENT_STREAMS)`, async () => {
      const entry = await start(engine);
      const session = rawSession(entry);
      await new Promise<void>((resolve) => session.once("remoteSettings", () => resolve()));
      expect(session.remoteSettings.maxConcurrentStreams).toBe(MAX_CONCURRENT_STREAMS);
    });

    it("a client reset while its Check is being decided does not disturb the server", async () => {
      const entry = await start(engine);
      const session = rawSession(entry);
      const stream = session.request({ ":method": "POST", ":path": CHECK_PATH, "content-type": "application/grpc", te: "trailers" });
      stream.on("error", () => undefined);
      stream.end(framed(toBinary(CheckRequestSchema, checkRequest("reset", { "x-test-hold": "1" }))));
      await until(() => entry.pipeline.held.length === 1, WAIT_MS, "the Check to reach the pipeline");
      stream.close(h2.NGHTTP2_CANCEL);
      await new Promise<void>((resolve) => stream.once("close", () => resolve()));
      entry.pipeline.release();
      const after = await raw(entry, [framed(checkBytes("after-reset"))], { session });
      expect(requestIdOf(checkResponseOf(after))).toBe("after-reset");
    });

    it("a client reset in the middle of a message does not disturb the server", async () => {
      const entry = await start(engine);
      const session = rawSession(entry);
      const stream = session.request({ ":method": "POST", ":path": CHECK_PATH, "content-type": "application/grpc", te: "trailers" });
      stream.on("error", () => undefined);
      const whole = framed(checkBytes("half"));
      await new Promise<void>((resolve) => stream.write(whole.subarray(0, 8), () => resolve()));
      stream.close(h2.NGHTTP2_CANCEL);
      await new Promise<void>((resolve) => stream.once("close", () => resolve()));
      const after = await raw(entry, [framed(checkBytes("after-half"))], { session });
      expect(requestIdOf(checkResponseOf(after))).toBe("after-half");
      expect(entry.pipeline.decided).toBe(1);
    });

    it("arbitrary bytes, chunked arbitrarily, always end in an HTTP or gRPC status and never stop the server", async () => {
      const entry = await start(engine);
      const session = rawSession(entry);
      const paths = [CHECK_PATH, healthDefinition.Check.path, "/foo.Bar/Baz"];
      const timeouts = [undefined, "1S", "abc", "0n", "99999999H"];
      await fc.assert(
        fc.asyncProperty(
          fc.array(fc.uint8Array({ maxLength: 48 }), { maxLength: 6 }),
          fc.boolean(),
          fc.constantFrom(...paths),
          fc.constantFrom(...timeouts),
          async (chunks, validPrefix, path, timeout) => {
            // Half the runs start with a well-formed prefix for the bytes that follow, so the
            // bodies reach the decoders rather than stopping at the length check.
            const sent = validPrefix ? [framed(Buffer.concat(chunks)).subarray(0, 5), ...chunks] : chunks;
            const answer = await raw(entry, sent, { session, path, headers: timeout === undefined ? {} : { "grpc-timeout": timeout } });
            const status = Number(answer.headers[":status"]);
            expect(status === 200 ? grpcStatusOf(answer) : status).toBeTypeOf("number");
            expect([200, 415]).toContain(status);
          },
        ),
        { numRuns: 150 },
      );
      const after = await check(grpcClient(entry), checkRequest("after-fuzz"));
      expect(after.ok && requestIdOf(after.value)).toBe("after-fuzz");
    });

    it("streams that announce 4 MiB messages and send 1 byte cost memory for the bytes sent, not the announced length", async () => {
      const entry = await start(engine);
      const session = rawSession(entry);
      const STREAMS = 100;
      const prefix = Buffer.alloc(6);
      prefix.writeUInt32BE(MAX_MESSAGE_BYTES, 1);
      const before = process.memoryUsage().arrayBuffers;
      const streams = Array.from({ length: STREAMS }, () => {
        const stream = session.request({ ":method": "POST", ":path": CHECK_PATH, "content-type": "application/grpc", te: "trailers" });
        stream.on("error", () => undefined);
        stream.write(prefix);
        return stream;
      });
      // Frames of one session are read in order: once a later Check is answered, every prefix
      // above has been read by the server.
      const after = await raw(entry, [framed(checkBytes("after-prefixes"))], { session });
      expect(requestIdOf(checkResponseOf(after))).toBe("after-prefixes");
      const grownBytes = process.memoryUsage().arrayBuffers - before;
      // Allocating the announced length would be STREAMS × 4 MiB = 400 MiB.
      expect(grownBytes).toBeLessThan(64 * 1024 * 1024);
      for (const stream of streams) stream.close(h2.NGHTTP2_CANCEL);
      expect(entry.pipeline.decided).toBe(1);
    });

    it("a session destroyed with Checks pending leaves the server serving", async () => {
      const entry = await start(engine);
      const session = rawSession(entry);
      const pending = Array.from({ length: 20 }, (_, i) =>
        raw(entry, [framed(toBinary(CheckRequestSchema, checkRequest(`gone-${i}`, { "x-test-hold": "1" })))], { session }),
      );
      await until(() => entry.pipeline.held.length === 20, WAIT_MS, "the Checks to reach the pipeline");
      session.destroy();
      await Promise.all(pending);
      entry.pipeline.release();
      const after = await check(grpcClient(entry), checkRequest("after-destroy"));
      expect(after.ok && requestIdOf(after.value)).toBe("after-destroy");
    });
  });
});

/** Opens a Check stream on `session` and writes `bytes` without ending it; resolves once they are written. */
async function openUnended(session: ClientHttp2Session, bytes: Uint8Array, headers: OutgoingHttpHeaders = {}): Promise<ClientHttp2Stream> {
  const stream = session.request({ ":method": "POST", ":path": CHECK_PATH, "content-type": "application/grpc", te: "trailers", ...headers });
  stream.on("error", () => undefined);
  if (bytes.length > 0) await new Promise<void>((resolve) => stream.write(bytes, () => resolve()));
  return stream;
}

/** The first `bytes` of a framed message that declares `declared` bytes: a message still arriving. */
function messageStart(declared: number, bytes: number): Buffer {
  const out = Buffer.alloc(5 + bytes, 0x61);
  out[0] = 0;
  out.writeUInt32BE(declared, 1);
  return out;
}

/** A CheckRequest whose framed size is about `bytes`. */
function paddedCheck(id: string, bytes: number): Buffer {
  return framed(toBinary(CheckRequestSchema, checkRequest(id, { "x-pad": "p".repeat(bytes) })));
}

// The h2 engine's own bounds (grpc-js holds a message per stream until it is whole, without
// them): a request must arrive within the request timeout, and what calls hold is capped per
// connection and per listener. Each case hangs on a server without the bound.
describe("h2 engine, bounds on what calls hold", () => {
  it("a request that has not arrived within the request timeout is answered DEADLINE_EXCEEDED, never decided", async () => {
    const entry = await start("h2", { requestTimeoutMs: 300 });
    const session = rawSession(entry);
    const halfMessage = await raw(entry, [messageStart(1000, 10)], { session, end: false });
    const headersOnly = await raw(entry, [], { session, end: false });
    for (const answer of [halfMessage, headersOnly]) {
      expect(grpcStatusOf(answer)).toBe(GrpcStatus.DEADLINE_EXCEEDED);
      expect(answer.headers["grpc-message"]).toBe(encodeGrpcMessage("the request did not arrive within the request timeout (KEYGATE_REQUEST_TIMEOUT_SECONDS)"));
    }
    // A whole message without END_STREAM has not arrived either.
    const unended = await raw(entry, [framed(checkBytes("unended"))], { session, end: false });
    expect(grpcStatusOf(unended)).toBe(GrpcStatus.DEADLINE_EXCEEDED);
    expect(entry.pipeline.decided).toBe(0);
    const after = await raw(entry, [framed(checkBytes("after-timeouts"))], { session });
    expect(requestIdOf(checkResponseOf(after))).toBe("after-timeouts");
  });

  it("once its request has arrived, a call keeps its own grpc-timeout past the request timeout", async () => {
    const entry = await start("h2", { requestTimeoutMs: 300 });
    const answer = await raw(entry, [framed(toBinary(CheckRequestSchema, checkRequest("held", { "x-test-hold": "1" })))], { headers: { "grpc-timeout": "1500m" } });
    expect(grpcStatusOf(answer)).toBe(GrpcStatus.DEADLINE_EXCEEDED);
    expect(answer.headers["grpc-message"]).toBe("Deadline exceeded");
    expect(entry.pipeline.decided).toBe(1);
  });

  it("a Watch whose request has arrived outlives the request timeout", async () => {
    const entry = await start("h2", { requestTimeoutMs: 300 });
    const { watch, statuses } = openWatch(entry, "");
    await until(() => statuses.length === 1, WAIT_MS, "the first status");
    // A request opened after the Watch timing out shows the request timeout has passed for the Watch too.
    const late = await raw(entry, [], { end: false });
    expect(grpcStatusOf(late)).toBe(GrpcStatus.DEADLINE_EXCEEDED);
    entry.readiness.setReady(false);
    await until(() => statuses.length === 2, WAIT_MS, "NOT_SERVING on the Watch");
    expect(statuses).toEqual([HealthCheckResponse_ServingStatus.SERVING, HealthCheckResponse_ServingStatus.NOT_SERVING]);
    watch.cancel();
  });

  it("a connection's calls hold at most its bound of request bytes; a call past it is RESOURCE_EXHAUSTED and what a call held is let go when it ends", async () => {
    const entry = await start("h2", { heldRequestBytes: { perConnection: 64 * 1024, perListener: 1024 * 1024 } });
    const session = rawSession(entry);
    const first = await openUnended(session, messageStart(200_000, 40 * 1024));
    const refused = await raw(entry, [messageStart(200_000, 30 * 1024)], { session, end: false });
    expect(grpcStatusOf(refused)).toBe(GrpcStatus.RESOURCE_EXHAUSTED);
    expect(refused.headers["grpc-message"]).toBe(encodeGrpcMessage("this connection's calls hold too many request bytes; end or cancel some calls"));
    // What still fits is decided.
    const small = await raw(entry, [framed(checkBytes("small"))], { session });
    expect(requestIdOf(checkResponseOf(small))).toBe("small");
    // Once the first call is gone, a Check that needs its room is decided.
    first.close(h2.NGHTTP2_CANCEL);
    const big = await untilValue(
      () => raw(entry, [paddedCheck("big", 50 * 1024)], { session }),
      (answer) => grpcStatusOf(answer) === GrpcStatus.OK,
      WAIT_MS,
      "a 50 KiB Check decided once the first call's bytes are let go",
    );
    expect(requestIdOf(checkResponseOf(big.value))).toBe("big");
    expect(entry.pipeline.decided).toBe(2);
  });

  it("the listener's calls hold at most its bound of request bytes, whichever connections they come on", async () => {
    const entry = await start("h2", { heldRequestBytes: { perConnection: 64 * 1024, perListener: 96 * 1024 } });
    const answers = [rawSession(entry), rawSession(entry)].map((session) => raw(entry, [messageStart(200_000, 60 * 1024)], { session, end: false }));
    const refused = await Promise.race(answers);
    expect(grpcStatusOf(refused)).toBe(GrpcStatus.RESOURCE_EXHAUSTED);
    expect(refused.headers["grpc-message"]).toBe(encodeGrpcMessage("keygate holds too many request bytes right now; retry"));
    // The call that fits is still held, and a small Check beside it is decided.
    const small = await raw(entry, [framed(checkBytes("small"))]);
    expect(requestIdOf(checkResponseOf(small))).toBe("small");
  });

  // node:http2 hands a stream its DATA as slices of the whole socket read they came in (up to
  // 64 KiB): a call that kept such a slice of a few bytes would keep the whole read alive.
  it("a message sent a byte per socket read holds the bytes sent, not the reads they came in", async () => {
    const entry = await start("h2");
    const { socket, frames } = await openRawSession(entry);
    try {
      // A path that tells any byte lost, doubled or moved in reassembly.
      const path = `/v1/${Array.from({ length: 3000 }, (_, i) => String.fromCharCode(97 + ((i * 7 + (i >> 5)) % 26))).join("")}`;
      const whole = framed(toBinary(CheckRequestSchema, create(CheckRequestSchema, { attributes: { request: { http: { id: "bytewise", method: "GET", path } } } })));
      socket.write(Buffer.concat([h2Frame(0x4, 0x1, 0), checkHeadersFrame(1), h2Frame(FRAME_DATA, 0, 1, whole.subarray(0, 5))]));
      const before = arrayBuffersAfterGc();
      const BYTES = 2200;
      for (let i = 5; i < 5 + BYTES; i++) await writeAll(socket, inReadOfItsOwn(h2Frame(FRAME_DATA, 0, 1, whole.subarray(i, i + 1))));
      await everythingRead(socket, frames);
      const grown = arrayBuffersAfterGc() - before;
      // The call holds 2,200 bytes; with a view of each read it held about 137 MiB.
      expect(grown).toBeLessThan(4 * MiB);
      socket.write(h2Frame(FRAME_DATA, FLAG_END_STREAM, 1, whole.subarray(5 + BYTES)));
      await until(() => frames.some((frame) => frame.streamId === 1 && (frame.flags & FLAG_END_STREAM) === 1), WAIT_MS, "the answer on stream 1");
      expectAnsweredOnce(frames, [1]);
      expect(entry.pipeline.paths).toEqual([path]);
    } finally {
      socket.destroy();
    }
  });

  it("Checks whose whole message came in a read but whose request has not ended hold their messages, not the reads", async () => {
    const entry = await start("h2");
    const { socket, frames } = await openRawSession(entry);
    try {
      socket.write(h2Frame(0x4, 0x1, 0));
      const streamIds = Array.from({ length: 200 }, (_, i) => 1 + 2 * i);
      const before = arrayBuffersAfterGc();
      for (const id of streamIds) await writeAll(socket, inReadOfItsOwn(Buffer.concat([checkHeadersFrame(id), h2Frame(FRAME_DATA, 0, id, framed(checkBytes(`unended-${id}`)))])));
      await everythingRead(socket, frames);
      const grown = arrayBuffersAfterGc() - before;
      // About 40 bytes a message; with a view of each read, 200 reads of 64 KiB (12.5 MiB).
      expect(grown).toBeLessThan(2 * MiB);
      expect(entry.pipeline.decided).toBe(0);
      socket.write(Buffer.concat(streamIds.map((id) => h2Frame(FRAME_DATA, FLAG_END_STREAM, id))));
      await until(() => streamIds.every((id) => frames.some((frame) => frame.streamId === id && (frame.flags & FLAG_END_STREAM) === 1)), WAIT_MS, "the 200 answers");
      expectAnsweredOnce(frames, streamIds);
      expect(entry.pipeline.decided).toBe(streamIds.length);
    } finally {
      socket.destroy();
    }
  });

  it("an answer the client does not take within the request timeout is reset (CANCEL) and let go", async () => {
    const requestTimeoutMs = 2000;
    const entry = await start("h2", { requestTimeoutMs });
    const before = arrayBuffersAfterGc();
    // A window of 0 for the server's DATA: the answer's HEADERS come, its DATA never can.
    const session = h2Connect(entry.url, { settings: { initialWindowSize: 0 } });
    session.on("error", () => undefined);
    sessions.push(session);
    const stream = session.request({ ":method": "POST", ":path": CHECK_PATH, "content-type": "application/grpc", te: "trailers" });
    stream.on("error", () => undefined);
    const status = new Promise<unknown>((resolve) => stream.once("response", (headers) => resolve(headers[h2.HTTP2_HEADER_STATUS])));
    stream.end(framed(toBinary(CheckRequestSchema, checkRequest("untaken", { "x-test-long-message": "1" }))));
    expect(await status).toBe(200);
    const answeredAt = performance.now();
    // The answer (about 6 MiB) waits in keygate for the window.
    expect(arrayBuffersAfterGc() - before).toBeGreaterThan(5 * MiB);
    await until(() => stream.closed, WAIT_MS, "keygate to reset the stream whose answer is not taken");
    expect(stream.rstCode).toBe(h2.NGHTTP2_CANCEL);
    // Not before the request timeout (less the time the answer's HEADERS took to arrive).
    expect(performance.now() - answeredAt).toBeGreaterThan(requestTimeoutMs / 2);
    expect(arrayBuffersAfterGc() - before).toBeLessThan(1 * MiB);
    // A client that reads its answers on the same server is answered in full.
    const taken = await raw(entry, [framed(checkBytes("taken"))]);
    expect(requestIdOf(checkResponseOf(taken))).toBe("taken");
  });
});

v8.setFlagsFromString("--expose-gc");
const exposedGc: unknown = vm.runInNewContext("gc");

/** The process's array buffer bytes, once two full collections have run. */
function arrayBuffersAfterGc(): number {
  if (typeof exposedGc !== "function") throw new Error("gc is not exposed");
  exposedGc();
  exposedGc();
  return process.memoryUsage().arrayBuffers;
}

/** An HTTP/2 frame of an unknown type (0x20), which the server reads and ignores (RFC 9113 §5.5). */
function unknownFrame(length: number): Buffer {
  return h2Frame(0x20, 0, 0, Buffer.alloc(length, 0x7a));
}

/**
 * `bytes` padded with ignored frames to just under 64 KiB, the most node:http2 reads from a
 * socket at once: sent one after another, each comes in a read of its own.
 */
function inReadOfItsOwn(bytes: Buffer): Buffer {
  return Buffer.concat([unknownFrame(16_384), unknownFrame(16_384), unknownFrame(16_384), unknownFrame(16_000 - bytes.length), bytes]);
}

async function writeAll(socket: Socket, bytes: Buffer): Promise<void> {
  if (!socket.write(bytes)) await new Promise<void>((resolve) => socket.once("drain", () => resolve()));
}

/** Resolves once keygate has acknowledged a PING sent now, so has read every byte sent before it. */
async function everythingRead(socket: Socket, frames: readonly WireFrame[]): Promise<void> {
  const acks = (): number => frames.filter((frame) => frame.type === FRAME_PING && (frame.flags & 0x1) === 1).length;
  const before = acks();
  socket.write(h2Frame(FRAME_PING, 0, 0, Buffer.alloc(8)));
  await until(() => acks() > before, WAIT_MS, "keygate's PING ack");
}

describe("KEYGATE_GRPC_ENGINE", () => {
  it("is h2 unless set, takes grpc-js, and refuses anything else naming the variable", () => {
    expect(loadConfig({}).grpcEngine).toBe("h2");
    expect(loadConfig({ KEYGATE_GRPC_ENGINE: "grpc-js" }).grpcEngine).toBe("grpc-js");
    expect(() => loadConfig({ KEYGATE_GRPC_ENGINE: "grpc" })).toThrow(new ConfigError("invalid environment: KEYGATE_GRPC_ENGINE: must be one of h2, grpc-js"));
  });
});

describe("h2 engine units", () => {
  it("grpc-timeout: every unit, at most 8 digits", () => {
    expect(parseGrpcTimeoutMs("1H")).toBe(3_600_000);
    expect(parseGrpcTimeoutMs("2M")).toBe(120_000);
    expect(parseGrpcTimeoutMs("3S")).toBe(3000);
    expect(parseGrpcTimeoutMs("250m")).toBe(250);
    expect(parseGrpcTimeoutMs("1500u")).toBe(1.5);
    expect(parseGrpcTimeoutMs("2000000n")).toBe(2);
    expect(parseGrpcTimeoutMs("99999999S")).toBe(99_999_999_000);
    for (const bad of ["", "S", "123456789S", "1s", "1 S", " 1S", "1SS", "+1S", "1e3m"]) expect(parseGrpcTimeoutMs(bad)).toBeNull();
  });

  it("grpc-message is percent-encoded as the spec says, and grpc-js decodes it back", () => {
    expect(encodeGrpcMessage("plain text: ok")).toBe("plain text: ok");
    expect(encodeGrpcMessage("100%")).toBe("100%25");
    expect(encodeGrpcMessage("ü\n")).toBe("%C3%BC%0A");
    for (const text of ["a%b", "ünïcödé ✓", "tab\there", "\u0000"]) expect(decodeURIComponent(encodeGrpcMessage(text))).toBe(text);
  });
});

// node:http2 publishes each server stream's close on this channel before the stream's 'close'
// listeners run; what a stream still holds is read on the next turn, after them.
const STREAM_CLOSE_CHANNEL = "http2.server.stream.close";

/** node:events' table of an emitter's listeners (`_events`), by name. */
function listenerTable(emitter: NodeJS.EventEmitter): Record<string, unknown> {
  return (emitter as unknown as { _events: Record<string, unknown> })._events;
}

describe("h2 engine, closed streams", () => {
  it("keeps only its shared 'error' handler on a stream after 'close', so what the other listeners held can die young", async () => {
    const entry = await start("h2");
    const left: string[][] = [];
    // A listener table the stream has dropped must point to nothing: it may sit in the old
    // generation, where anything it points to outlives every young-generation GC.
    const stillHeld: string[][] = [];
    const onClose = (message: unknown): void => {
      const stream = (message as { stream: ServerHttp2Stream }).stream;
      const table = listenerTable(stream);
      setImmediate(() => {
        left.push(stream.eventNames().map(String));
        stillHeld.push(table === listenerTable(stream) ? [] : Object.keys(table).filter((name) => table[name] !== undefined));
      });
    };
    diagnostics.subscribe(STREAM_CLOSE_CHANNEL, onClose);
    try {
      const client = grpcClient(entry);
      // An answer at once, one that waits on the pipeline, and one the pipeline fails to decide.
      const answered = check(client, checkRequest("req-now"));
      const held = check(client, checkRequest("req-held", { "x-test-hold": "1" }));
      await until(() => entry.pipeline.held.length === 1, WAIT_MS, "the held Check to reach the pipeline");
      entry.pipeline.release();
      const failed = check(client, checkRequest("req-throw", { "x-test-throw": "1" }));
      const outcomes = await Promise.all([answered, held, failed]);
      expect(outcomes.map((outcome) => (outcome.ok ? "ok" : outcome.code))).toEqual(["ok", "ok", GrpcStatus.UNAVAILABLE]);
      await until(() => left.length === 3, WAIT_MS, "three closed streams");
      expect(left).toEqual([["error"], ["error"], ["error"]]);
      expect(stillHeld).toEqual([[], [], []]);
    } finally {
      diagnostics.unsubscribe(STREAM_CLOSE_CHANNEL, onClose);
    }
  });
});

/** One HTTP/2 frame as read off the wire: its type, flags and stream. */
interface WireFrame {
  type: number;
  flags: number;
  streamId: number;
}

const FRAME_HEADERS = 0x1;
const FRAME_DATA = 0x0;
const FLAG_END_STREAM = 0x1;
const FRAME_RST_STREAM = 0x3;
const FRAME_PING = 0x6;

/** Calls `onRead` with the whole frames each 'data' event of a raw HTTP/2 socket completed. */
function readFrames(socket: Socket, onRead: (frames: WireFrame[]) => void): void {
  let pending = Buffer.alloc(0);
  socket.on("data", (chunk: Buffer) => {
    pending = Buffer.concat([pending, chunk]);
    const frames: WireFrame[] = [];
    while (pending.length >= 9 && pending.length >= 9 + pending.readUIntBE(0, 3)) {
      frames.push({ type: pending.readUInt8(3), flags: pending.readUInt8(4), streamId: pending.readUInt32BE(5) & 0x7fffffff });
      pending = pending.subarray(9 + pending.readUIntBE(0, 3));
    }
    onRead(frames);
  });
}

/** The HEADERS frame opening a Check on `streamId` (END_HEADERS; the request goes on). */
function checkHeadersFrame(streamId: number): Buffer {
  const headers = hpackLiterals([
    [":method", "POST"],
    [":scheme", "http"],
    [":path", CHECK_PATH],
    [":authority", "keygate"],
    ["content-type", "application/grpc"],
    ["te", "trailers"],
  ]);
  return h2Frame(FRAME_HEADERS, 0x4, streamId, headers);
}

/** A whole Check request on `streamId`: HEADERS, then its message in DATA with END_STREAM. */
function checkRequestFrames(streamId: number): Buffer[] {
  return [checkHeadersFrame(streamId), h2Frame(FRAME_DATA, FLAG_END_STREAM, streamId, framed(checkBytes(`req-${streamId}`)))];
}

describe("h2 engine, trailers in the answer's turn", () => {
  // The client here runs on keygate's own event loop, so it reads only between turns: an answer
  // whose trailers went out in the turn that ended its DATA arrives in one read; trailers a turn
  // later (node:http2's sendTrailers) arrive in a read of their own.
  it("sends an OK answer's trailers in the turn that ends its DATA, not a turn later", async () => {
    const entry = await start("h2");
    const socket = await openSocket(entry.server.port);
    // Each 'data' event is one read of what keygate wrote by then; the frames each read carried.
    const reads: WireFrame[][] = [];
    readFrames(socket, (frames) => reads.push(frames));
    try {
      socket.write(Buffer.concat([H2_PREFACE, H2_SETTINGS]));
      // The server's SETTINGS, then its acknowledgement of ours; then ours of its.
      await until(() => reads.flat().some((frame) => frame.type === 0x4 && (frame.flags & 0x1) === 1), WAIT_MS, "keygate's SETTINGS ack");
      socket.write(h2Frame(0x4, 0x1, 0));
      const streams = [1, 3, 5, 7, 9];
      for (const streamId of streams) {
        // One write with the request whole, then wait for the answer's END_STREAM.
        socket.write(Buffer.concat(checkRequestFrames(streamId)));
        await until(() => reads.flat().some((frame) => frame.streamId === streamId && (frame.flags & FLAG_END_STREAM) === 1), WAIT_MS, `the answer on stream ${streamId}`);
      }
      for (const streamId of streams) {
        const carrying = reads.filter((frames) => frames.some((frame) => frame.streamId === streamId));
        // One read held the whole answer: HEADERS, one DATA, then the trailers ending the stream.
        expect(carrying.map((frames) => frames.filter((frame) => frame.streamId === streamId).map((frame) => [frame.type, frame.flags & FLAG_END_STREAM]))).toEqual([
          [
            [FRAME_HEADERS, 0],
            [FRAME_DATA, 0],
            [FRAME_HEADERS, FLAG_END_STREAM],
          ],
        ]);
      }
    } finally {
      socket.destroy();
    }
  });
});

/** A raw HTTP/2 connection past the preface and keygate's SETTINGS ack, and every frame it reads. */
async function openRawSession(entry: Running): Promise<{ socket: Socket; frames: WireFrame[] }> {
  const socket = await openSocket(entry.server.port);
  const frames: WireFrame[] = [];
  readFrames(socket, (read) => frames.push(...read));
  try {
    socket.write(Buffer.concat([H2_PREFACE, H2_SETTINGS]));
    await until(() => frames.some((frame) => frame.type === 0x4 && (frame.flags & 0x1) === 1), WAIT_MS, "keygate's SETTINGS ack");
  } catch (error) {
    socket.destroy();
    throw error;
  }
  return { socket, frames };
}

/** Each stream got one whole answer: HEADERS, DATA, then trailers ending the stream. */
function expectAnsweredOnce(frames: readonly WireFrame[], streamIds: readonly number[]): void {
  for (const streamId of streamIds) {
    expect(frames.filter((frame) => frame.streamId === streamId).map((frame) => [frame.type, frame.flags & FLAG_END_STREAM])).toEqual([
      [FRAME_HEADERS, 0],
      [FRAME_DATA, 0],
      [FRAME_HEADERS, FLAG_END_STREAM],
    ]);
  }
}

describe("h2 engine, Checks that arrive together", () => {
  // One write of the client's, so one read of keygate's: three whole Check requests, then a reset
  // of the second. keygate decides a turn's first Check at once and the turn's others together
  // after its reads; a Check reset before then is neither decided nor charged.
  it("decides each Check of a read once, and never one the client reset in that read", async () => {
    const entry = await start("h2");
    const { socket, frames } = await openRawSession(entry);
    try {
      const cancel = Buffer.alloc(4);
      cancel.writeUInt32BE(0x8);
      socket.write(Buffer.concat([h2Frame(0x4, 0x1, 0), ...checkRequestFrames(1), ...checkRequestFrames(3), ...checkRequestFrames(5), h2Frame(FRAME_RST_STREAM, 0, 3, cancel)]));
      await until(() => [1, 5].every((id) => frames.some((frame) => frame.streamId === id && (frame.flags & FLAG_END_STREAM) === 1)), WAIT_MS, "the answers on streams 1 and 5");
      // A Check after them, in a write of its own: once it is answered, nothing of the first
      // write is still to be decided.
      socket.write(Buffer.concat(checkRequestFrames(7)));
      await until(() => frames.some((frame) => frame.streamId === 7 && (frame.flags & FLAG_END_STREAM) === 1), WAIT_MS, "the answer on stream 7");
      expect(entry.pipeline.decided).toBe(3);
      expect(frames.filter((frame) => frame.streamId === 3)).toEqual([]);
      // Streams 1, 5 and 7: HEADERS, DATA, then trailers ending the stream, each answered once.
      expectAnsweredOnce(frames, [1, 5, 7]);
    } finally {
      socket.destroy();
    }
  });

  it("a Check whose answer cannot be recorded holds none of the others of its read", async () => {
    const entry = await start("h2", { tracer: new UnrecordableTracer() });
    const { socket, frames } = await openRawSession(entry);
    try {
      socket.write(Buffer.concat([h2Frame(0x4, 0x1, 0), ...checkRequestFrames(1), ...checkRequestFrames(3), ...checkRequestFrames(5)]));
      await until(() => [1, 3, 5].every((id) => frames.some((frame) => frame.streamId === id && (frame.flags & FLAG_END_STREAM) === 1)), WAIT_MS, "the answers on streams 1, 3 and 5");
      expect(entry.pipeline.decided).toBe(3);
      // Each its decision (HEADERS, DATA, trailers), none a trailers-only UNAVAILABLE.
      expectAnsweredOnce(frames, [1, 3, 5]);
    } finally {
      socket.destroy();
    }
  });
});
