import { randomUUID } from "node:crypto";
import { fromBinary, toBinary } from "@bufbuild/protobuf";
import type { Message } from "@bufbuild/protobuf";
import type { GenMessage } from "@bufbuild/protobuf/codegenv2";
import { Server, ServerCredentials, status as GrpcStatus } from "@grpc/grpc-js";
import type {
  ChannelOptions,
  MethodDefinition,
  sendUnaryData,
  ServerUnaryCall,
  ServerWritableStream,
  ServiceDefinition,
  UntypedServiceImplementation,
} from "@grpc/grpc-js";
import type { Logger } from "pino";
import { HeaderList, NO_HEADERS, RecordHeaders } from "../authz/headers.js";
import type { HeaderBag } from "../authz/headers.js";
import type { Decision, DecisionPipeline } from "../authz/pipeline.js";
import { checkRequestView, decodeCheckRequest } from "../authz/check-request.js";
import type { DecodedCheckRequest } from "../authz/check-request.js";
import { encodeCheckResponse } from "../authz/to-envoy.js";
import { CheckRequestSchema, CheckResponseSchema } from "../gen/envoy/service/auth/v3/external_auth_pb.js";
import { CheckRequestViewSchema } from "../gen/keygate/authz/v1/check_view_pb.js";
import {
  HealthCheckRequestSchema,
  HealthCheckResponse_ServingStatus,
  HealthCheckResponseSchema,
} from "../gen/grpc/health/v1/health_pb.js";
import type { HealthCheckRequest, HealthCheckResponse } from "../gen/grpc/health/v1/health_pb.js";
import { create } from "@bufbuild/protobuf";
import { LogThrottle, errorKind } from "../log-throttle.js";
import { failureReason } from "./metrics.js";
import type { Metrics } from "./metrics.js";
import type { Readiness } from "./readiness.js";
import type { Socket } from "node:net";
import { awaitOpening, trackConnections } from "./connections.js";
import type { ListenerLimits } from "./connections.js";
import { listen } from "./http-lifecycle.js";
// grpc-h2 imports only types from this module, so there is no import cycle at run time.
import { CHECK_UNAVAILABLE_MESSAGE, MAX_CONCURRENT_STREAMS, createH2GrpcServer, echoedName } from "./grpc-h2.js";
import type { H2ServerDeps } from "./grpc-h2.js";
import type { GrpcEngine } from "../config.js";
import type { DecisionTrace, DecisionTracer, EntryPoint } from "../tracing/tracing.js";
import { echoedRequestId } from "../authz/reasons.js";
import type { AccessLog } from "./access-log.js";
import { createAcceptor } from "./tls.js";
import type { ListenerTls } from "./tls.js";

const DECODE = { readUnknownFields: false };

/** A grpc-js method definition whose messages are coded by protobuf-es schemas. */
function method<I extends Message, O extends Message>(
  path: string,
  input: GenMessage<I>,
  output: GenMessage<O>,
  responseStream = false,
): MethodDefinition<I, O> {
  return {
    path,
    requestStream: false,
    responseStream,
    requestSerialize: (message: I) => Buffer.from(toBinary(input, message)),
    requestDeserialize: (bytes: Buffer) => fromBinary(input, bytes, DECODE),
    responseSerialize: (message: O) => Buffer.from(toBinary(output, message)),
    responseDeserialize: (bytes: Buffer) => fromBinary(output, bytes, DECODE),
  };
}

/** grpc-js definition of envoy.service.auth.v3.Authorization. */
export const authorizationDefinition = {
  Check: method("/envoy.service.auth.v3.Authorization/Check", CheckRequestSchema, CheckResponseSchema),
} satisfies ServiceDefinition;

/**
 * The server's side of Check. A request decodes as keygate.authz.v1.CheckRequestView, the
 * fields keygate reads under Envoy's numbers, so nothing else of it is built into objects.
 * Answers leave the handler already encoded (encodeCheckResponse): serializing one is wrapping
 * its bytes.
 */
export const authorizationServerDefinition = {
  Check: {
    path: authorizationDefinition.Check.path,
    requestStream: false,
    responseStream: false,
    requestSerialize: (message: DecodedCheckRequest) => Buffer.from(toBinary(CheckRequestViewSchema, checkRequestView(message))),
    requestDeserialize: (bytes: Buffer) => decodeCheck(bytes),
    responseSerialize: (bytes: Uint8Array) => Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength),
    responseDeserialize: (bytes: Buffer): Uint8Array => bytes,
  },
} satisfies ServiceDefinition;

/**
 * grpc-js server options that shape what a call costs, shared by keygate's listener and the
 * bench's no-op ceiling; grpcServerOptions adds the listener's timeouts (per connection, not per call).
 */
export const GRPC_SERVER_OPTIONS = {
  "grpc.keepalive_permit_without_calls": 1,
  // keygate serves no channelz service, so the per-call channelz bookkeeping is left off.
  "grpc.enable_channelz": 0,
  // node:http2's per-session memory check, in MB (Node's default, which the h2 engine keeps);
  // grpc-js turns it off unless told. Off, 140 KB of HEADERS whose values repeat one HPACK table
  // entry held about 250 MiB on two connections, for as long as the client kept the streams open.
  "grpc-node.max_session_memory": 10,
} as const;

/**
 * GRPC_SERVER_OPTIONS with this listener's timeouts. A connection with no call for the idle
 * timeout gets GOAWAY (clients reconnect for their next call; one sent as the GOAWAY crosses it
 * is not taken, so a proxy's pool should close idle connections first: deploy/envoy's 55 s). Every connection is
 * pinged once per idle timeout and closed if the ping goes unanswered for the headers timeout:
 * a peer that vanished, or one holding a half-sent call open without speaking HTTP/2, loses its
 * connection, while a live stream such as Health Watch answers the pings and stays.
 */
export function grpcServerOptions(limits: ListenerLimits): ChannelOptions {
  return {
    ...GRPC_SERVER_OPTIONS,
    "grpc.max_connection_idle_ms": limits.idleTimeoutMs,
    "grpc.keepalive_time_ms": limits.idleTimeoutMs,
    "grpc.keepalive_timeout_ms": limits.headersTimeoutMs,
    // The h2 engine's stream cap; its bounds on held request bytes and the arrival timeout are
    // its own (grpc-js holds at most a 4 MiB message a stream).
    "grpc.max_concurrent_streams": MAX_CONCURRENT_STREAMS,
  };
}

/** grpc-js definition of the standard grpc.health.v1.Health service. */
export const healthDefinition = {
  Check: method("/grpc.health.v1.Health/Check", HealthCheckRequestSchema, HealthCheckResponseSchema),
  Watch: method("/grpc.health.v1.Health/Watch", HealthCheckRequestSchema, HealthCheckResponseSchema, true),
} satisfies ServiceDefinition;

const HEALTH_SERVICES = new Set(["", "envoy.service.auth.v3.Authorization"]);
const NO_NAMES: readonly string[] = [];
// ignoreBOM: a leading BOM stays in the value (and fails the key's format), as Envoy's string
// fields and the HTTP mode keep it; the default decoder drops it, and the key would pass.
const utf8 = new TextDecoder("utf-8", { ignoreBOM: true });

/** The header fields of an HttpRequest, as Envoy's message and keygate's view both hold them. */
export interface RequestHeaders {
  headers: HeaderList;
  headerMap?: { headers: ReadonlyArray<{ key: string; value: string; rawValue: Uint8Array }> };
}

/**
 * Envoy sends headers in `headers`, or, with encode_raw_headers on, in `header_map` with the
 * value in raw_value. Repeated names in header_map become arrays, which the credential step
 * refuses. One pass, constant work a header.
 */
export function headersOf(http: RequestHeaders | undefined): HeaderBag {
  if (http === undefined) return NO_HEADERS;
  const raw = http.headerMap?.headers;
  if (raw === undefined || raw.length === 0) return http.headers;
  // Grouped in a Map, not an object: a client's header named __proto__ is a header like any
  // other, never the object's prototype (Object.fromEntries defines it as an own property).
  const byName = new Map<string, string | string[]>();
  for (const entry of raw) {
    const name = entry.key.toLowerCase();
    const value = entry.rawValue.length > 0 ? utf8.decode(entry.rawValue) : entry.value;
    const existing = byName.get(name);
    if (existing === undefined) byName.set(name, value);
    else if (typeof existing === "string") byName.set(name, [existing, value]);
    else existing.push(value);
  }
  return new RecordHeaders(Object.fromEntries(byName));
}

/**
 * The one place a Check request's bytes become the view check() reads; both engines call it,
 * so a decoder is swapped in this single line.
 */
export function decodeCheck(bytes: Uint8Array): DecodedCheckRequest {
  return decodeCheckRequest(bytes);
}

/** What the gRPC authz server needs. */
export interface GrpcAuthzDeps {
  /** Only `decide` is called, so tests can hand in a pipeline they control. */
  pipeline: Pick<DecisionPipeline, "decide">;
  readiness: Readiness;
  metrics: Metrics;
  logger: Logger;
  nowMs: () => number;
  /** Timeouts and connection cap of this listener. */
  limits: ListenerLimits;
  /** Which server implementation answers (KEYGATE_GRPC_ENGINE). */
  engine: GrpcEngine;
  /** Decision spans; undefined when tracing is off. */
  tracer?: DecisionTracer | undefined;
  /** The sampled access log; undefined when it is off. */
  accessLog?: AccessLog | undefined;
  /** TLS on this listener (ALPN h2), or null for cleartext HTTP/2. */
  tls?: ListenerTls | null;
  /** Bounds on the request bytes the h2 engine's calls hold (default HELD_REQUEST_BYTES). */
  heldRequestBytes?: H2ServerDeps["heldRequestBytes"];
  /** The monotonic clock that spaces out repeated log lines (default performance.now); tests step it. */
  logClockMs?: () => number;
}

/** A started gRPC listener. */
export interface StartedServer {
  port: number;
  /** Stops accepting, waits up to `graceMs` for in-flight calls, then closes. */
  stop(graceMs: number): Promise<void>;
}

/**
 * Receives a Check's answer: the encoded CheckResponse (gRPC-framed when the core was made
 * `framed`), or null when the key could not be decided (the engine answers UNAVAILABLE). It
 * must not throw: it may run from a promise.
 */
export type CheckReply<T> = (target: T, answer: Uint8Array | null) => void;

/** Check and health as both engines serve them: the engine only moves bytes and statuses. */
export interface AuthzCore {
  decodeCheck(bytes: Uint8Array): DecodedCheckRequest;
  /** Decides one Check and hands the answer to `reply(target, …)`, at once or later. */
  check<T>(request: DecodedCheckRequest, target: T, reply: CheckReply<T>): void;
  /**
   * Decides Checks that arrived together, in their order, and hands each answer to
   * `reply(targets[i], …)`: every decision first, then every answer's encoding, then every reply,
   * so each step's code and data stay in the CPU's caches across the batch (what a Check costs on
   * a busy core is mostly those caches' misses). A Check that waits on a backend is answered when
   * its decision comes, as with `check`.
   */
  checkAll<T>(requests: readonly DecodedCheckRequest[], targets: readonly T[], reply: CheckReply<T>): void;
  /** SERVING or NOT_SERVING for the services keygate reports on, null for any other (NOT_FOUND). */
  servingStatus(service: string): HealthCheckResponse_ServingStatus | null;
  readiness: Readiness;
}

/**
 * The request id Check answers and logs with: the x-request-id header, else the Check's own id,
 * else a new one. Envoy's x-request-id is the id it forwards to the API and logs; the Check's id
 * is only its stream id (a random number found in no log). An id a client could have chosen is
 * taken only within echoedRequestId's bounds (128 printable characters): a 60,000-character one
 * would otherwise go whole into every log line.
 */
function requestIdOf(request: DecodedCheckRequest, headers: HeaderBag): string {
  const header = headers.get("x-request-id");
  return echoedRequestId(typeof header === "string" ? header : "") || echoedRequestId(request.attributes?.request?.http?.id ?? "") || randomUUID();
}

/** How often the warn line for one kind of outage error is written; every such Check is counted. */
const UNDECIDED_LOG_INTERVAL_MS = 60_000;
/** Kinds of outage error remembered for that; past it they start over. */
const MAX_UNDECIDED_KINDS = 256;

/**
 * Writes the warn line of a Check that an outage left undecided (UNAVAILABLE): once a minute for
 * each kind of error (its name and message, numbers aside), with how many more there were since. During an
 * outage every Check of a key no cache holds fails, and anyone can send such keys (a made-up one
 * with a valid checksum needs no secret): a line with its stack for each would fill the log, and
 * cached keys' Checks would wait behind its writes (pino writes on the event loop).
 * keygate_checks_total{reason="UNAVAILABLE"} counts every one. A defect (INTERNAL) is not
 * passed here: each of those is logged, with its request id.
 */
export function undecidedCheckLog(logger: Logger, mode: EntryPoint, logClockMs?: () => number): (error: unknown) => void {
  const logged = new LogThrottle(UNDECIDED_LOG_INTERVAL_MS, MAX_UNDECIDED_KINDS, logClockMs);
  return (error) => {
    const since = logged.due(errorKind(error));
    if (since !== null) logger.warn({ err: error, mode, since }, "check could not be decided");
  };
}

/** How often the error line for one set of bad per-route settings is written; every such Check is counted. */
const MISCONFIGURED_LOG_INTERVAL_MS = 60_000;
/** Sets of bad per-route settings remembered for that; past it they start over. */
const MAX_MISCONFIGURED_SETTINGS = 256;
/**
 * The context_extensions RouteTable.requirements reads: the only ones a ROUTE_MISCONFIGURED
 * line shows. The others are the proxy's (or a client's) own, in whatever number and size.
 */
const ROUTE_SETTINGS = ["required_scopes", "project_id", "cost", "metered", "min_role", "quota"] as const;
/**
 * The longest per-route setting value its error line shows. A longer one is shown by its length
 * alone: a proxy's settings are short, and a cut piece of a long one could hold part of a secret
 * (a key, a hash, the pepper) that no longer has its shape or its whole text for the log's
 * scrubber to find. A short one is shown whole, and scrubbed like every field of the line.
 */
const MAX_LOGGED_SETTING = 64;

/** A setting's value as its error line shows it (and as its throttle tells sets of settings apart). */
function settingShown(value: string): string {
  return value.length <= MAX_LOGGED_SETTING ? value : `[${value.length} characters, not shown]`;
}

/**
 * Builds the engine-independent Check and health logic. `framed`: answers come with their gRPC
 * message prefix (the h2 engine writes them as they are; grpc-js frames messages itself).
 */
export function createAuthzCore(deps: Omit<GrpcAuthzDeps, "limits" | "engine">, framed: boolean): AuthzCore {
  const { pipeline, metrics, logger, readiness, tracer, accessLog } = deps;
  const warnUndecided = undecidedCheckLog(logger, "grpc", deps.logClockMs);

  function fail(error: unknown, startedAt: number, request: DecodedCheckRequest, headers: HeaderBag, trace: DecisionTrace | undefined): void {
    const reason = failureReason(error);
    metrics.recordCheck("grpc", reason, startedAt, performance.now());
    // Only a failure to decide gets here (bad per-route settings are a ROUTE_MISCONFIGURED
    // denial): Envoy's failure_mode_allow decides what happens, keygate never guesses.
    if (reason === "INTERNAL") logger.error({ err: error, requestId: requestIdOf(request, headers) }, "check could not be decided");
    else warnUndecided(error);
    if (trace !== undefined) tracer?.fail(trace, error);
    if (accessLog !== undefined) {
      const http = request.attributes?.request?.http;
      accessLog.failed("grpc", http?.method ?? "", http?.path ?? "/", requestIdOf(request, headers), startedAt, reason);
    }
  }

  /** The encoded answer to a decision, or null (logged and counted) when it cannot be encoded. */
  function encode(d: Decision, request: DecodedCheckRequest, headers: HeaderBag, requestId: string, startedAt: number, trace: DecisionTrace | undefined): Uint8Array | null {
    try {
      // Only an allow needs the request's header names (to strip spoofed identity headers).
      return encodeCheckResponse(d, d.allow ? headers.names() : NO_NAMES, requestId, deps.nowMs(), framed);
    } catch (error) {
      fail(error, startedAt, request, headers, trace);
      return null;
    }
  }

  /**
   * Counts, traces and logs an answered decision. It runs after the answer is handed over, and a
   * fault in it is logged, never thrown: it must not hold the batch's later answers.
   */
  function record(d: Decision, request: DecodedCheckRequest, requestId: string, startedAt: number, trace: DecisionTrace | undefined): void {
    try {
      recordAnswered(d, request, requestId, startedAt, trace);
    } catch (error) {
      logger.error({ err: error, requestId }, "an answered check could not be recorded");
    }
  }

  /** Each set of bad per-route settings logged lately. */
  const misconfiguredLogged = new LogThrottle(MISCONFIGURED_LOG_INTERVAL_MS, MAX_MISCONFIGURED_SETTINGS, deps.logClockMs);

  function recordAnswered(d: Decision, request: DecodedCheckRequest, requestId: string, startedAt: number, trace: DecisionTrace | undefined): void {
    const reason = d.allow ? "OK" : d.reason;
    metrics.recordCheck("grpc", reason, startedAt, performance.now());
    if (trace !== undefined) tracer?.finish(trace, d);
    if (accessLog !== undefined) {
      const http = request.attributes?.request?.http;
      accessLog.decided("grpc", d, http?.method ?? "", http?.path ?? "/", requestId, startedAt);
    }
    // The client's answer names the bad setting; the operator's log also gets its value (a short
    // one whole, a long one by its length), once a minute for each set of settings (with how many
    // more there were since): a client can send such Checks as fast as it likes, while the
    // settings are the proxy's, a handful.
    // keygate_checks_total{reason="ROUTE_MISCONFIGURED"} counts every one.
    if (reason === "ROUTE_MISCONFIGURED") logMisconfigured(request.attributes?.contextExtensions ?? {}, requestId);
    if (logger.isLevelEnabled("debug")) logger.debug({ requestId, keyId: d.snapshot?.key.id, decision: reason, mode: "grpc" }, "check");
  }

  /**
   * The error line of a ROUTE_MISCONFIGURED Check: keygate's settings only, a long value by its
   * length (settingShown). A client talking to the Check port can send a value of up to the 4 MiB
   * message limit, a new one each time: whole, each would be kept as a throttle key, scanned for
   * secrets character by character and written out.
   */
  function logMisconfigured(extensions: Readonly<Record<string, string>>, requestId: string): void {
    const contextExtensions: Record<string, string> = {};
    for (const name of ROUTE_SETTINGS) {
      const value = extensions[name];
      if (value !== undefined) contextExtensions[name] = settingShown(value);
    }
    const since = misconfiguredLogged.due(JSON.stringify(contextExtensions));
    if (since === null) return;
    logger.error({ requestId, contextExtensions, since }, "bad per-route settings from the proxy");
  }

  /** Answers a decision that came later (it waited on a backend). */
  function answerLater<T>(d: Decision, request: DecodedCheckRequest, headers: HeaderBag, startedAt: number, target: T, reply: CheckReply<T>, trace: DecisionTrace | undefined): void {
    const requestId = requestIdOf(request, headers);
    const bytes = encode(d, request, headers, requestId, startedAt, trace);
    reply(target, bytes);
    if (bytes !== null) record(d, request, requestId, startedAt, trace);
  }

  function checkAll<T>(requests: readonly DecodedCheckRequest[], targets: readonly T[], reply: CheckReply<T>): void {
    const count = requests.length;
    // What each Check's later steps need; a slot left undefined is a Check already answered.
    const decided: Array<Decision | undefined> = new Array<Decision | undefined>(count);
    const headersOfCheck: HeaderBag[] = new Array<HeaderBag>(count);
    const startedAts: number[] = new Array<number>(count);
    const traces: Array<DecisionTrace | undefined> = new Array<DecisionTrace | undefined>(count);
    for (let i = 0; i < count; i++) {
      const request = requests[i] as DecodedCheckRequest;
      const target = targets[i] as T;
      const startedAt = performance.now();
      const http = request.attributes?.request?.http;
      let headers: HeaderBag = NO_HEADERS;
      let trace: DecisionTrace | undefined;
      let decision: Decision | Promise<Decision>;
      // Whatever fails before a decision (reading the headers, opening the span, deciding) makes
      // this Check UNAVAILABLE, counted and logged, and leaves the others of the batch alone.
      try {
        headers = headersOf(http);
        const method = http?.method ?? "";
        const path = http?.path ?? "/";
        // The proxy's traceparent is read only when tracing is on; off, this is the one check.
        trace = tracer === undefined ? undefined : tracer.start("grpc", method, path, headers);
        decision = pipeline.decide({ method, path, headers, contextExtensions: request.attributes?.contextExtensions, trace });
      } catch (error) {
        fail(error, startedAt, request, headers, trace);
        reply(target, null);
        continue;
      }
      if (decision instanceof Promise) {
        decision.then(
          (d) => answerLater(d, request, headers, startedAt, target, reply, trace),
          (error: unknown) => {
            fail(error, startedAt, request, headers, trace);
            reply(target, null);
          },
        );
        continue;
      }
      decided[i] = decision;
      headersOfCheck[i] = headers;
      startedAts[i] = startedAt;
      traces[i] = trace;
    }
    const requestIds: string[] = new Array<string>(count);
    const answers: Array<Uint8Array | null> = new Array<Uint8Array | null>(count);
    for (let i = 0; i < count; i++) {
      const d = decided[i];
      if (d === undefined) continue;
      const request = requests[i] as DecodedCheckRequest;
      const headers = headersOfCheck[i] as HeaderBag;
      const requestId = requestIdOf(request, headers);
      requestIds[i] = requestId;
      answers[i] = encode(d, request, headers, requestId, startedAts[i] as number, traces[i]);
    }
    for (let i = 0; i < count; i++) {
      const d = decided[i];
      if (d === undefined) continue;
      const bytes = answers[i] as Uint8Array | null;
      reply(targets[i] as T, bytes);
      if (bytes !== null) record(d, requests[i] as DecodedCheckRequest, requestIds[i] as string, startedAts[i] as number, traces[i]);
    }
  }

  return {
    decodeCheck,
    readiness,
    check(request, target, reply) {
      checkAll([request], [target], reply);
    },
    checkAll,
    servingStatus(service) {
      if (!HEALTH_SERVICES.has(service)) return null;
      return readiness.serving ? HealthCheckResponse_ServingStatus.SERVING : HealthCheckResponse_ServingStatus.NOT_SERVING;
    },
  };
}

/** Builds the Envoy ext_authz gRPC server (Check and health) on the configured engine. `start` binds it. */
export function createGrpcAuthzServer(deps: GrpcAuthzDeps): { start(host: string, port: number): Promise<StartedServer> } {
  if (deps.engine === "h2") return createH2GrpcServer(createAuthzCore(deps, true), { limits: deps.limits, metrics: deps.metrics, logger: deps.logger, tls: deps.tls ?? null, heldRequestBytes: deps.heldRequestBytes });
  return createGrpcJsServer(createAuthzCore(deps, false), deps.limits, deps.metrics, deps.tls ?? null);
}

function replyGrpcJs(callback: sendUnaryData<Uint8Array>, answer: Uint8Array | null): void {
  if (answer === null) callback({ code: GrpcStatus.UNAVAILABLE, details: CHECK_UNAVAILABLE_MESSAGE });
  else callback(null, answer);
}

/** The grpc-js engine: @grpc/grpc-js behind keygate's own TCP listener. */
function createGrpcJsServer(core: AuthzCore, limits: ListenerLimits, metrics: Metrics, tls: ListenerTls | null): { start(host: string, port: number): Promise<StartedServer> } {
  const { readiness } = core;
  const responseFor = (service: string): HealthCheckResponse =>
    create(HealthCheckResponseSchema, { status: core.servingStatus(service) ?? HealthCheckResponse_ServingStatus.SERVICE_UNKNOWN });

  // Health Watch streams never end on their own; shutdown ends them after NOT_SERVING went out.
  const watchers = new Set<ServerWritableStream<HealthCheckRequest, HealthCheckResponse>>();

  const health: UntypedServiceImplementation = {
    Check(call: ServerUnaryCall<HealthCheckRequest, HealthCheckResponse>, callback: sendUnaryData<HealthCheckResponse>) {
      if (core.servingStatus(call.request.service) === null) callback({ code: GrpcStatus.NOT_FOUND, details: `unknown service "${echoedName(call.request.service)}"` });
      else callback(null, responseFor(call.request.service));
    },
    Watch(call: ServerWritableStream<HealthCheckRequest, HealthCheckResponse>) {
      const send = (): void => {
        call.write(responseFor(call.request.service));
      };
      send();
      const unsubscribe = readiness.onChange(send);
      watchers.add(call);
      const forget = (): void => {
        unsubscribe();
        watchers.delete(call);
      };
      call.on("cancelled", forget);
      call.on("close", forget);
    },
  };

  return {
    async start(host, port) {
      const server = new Server(grpcServerOptions(limits));
      server.addService(authorizationServerDefinition, {
        Check(call: ServerUnaryCall<DecodedCheckRequest, Uint8Array>, callback: sendUnaryData<Uint8Array>) {
          core.check(call.request, callback, replyGrpcJs);
        },
      });
      server.addService(healthDefinition, health);
      // keygate owns the TCP listener and hands grpc-js only connections that opened with the
      // HTTP/2 preface and SETTINGS in time, so it can cap them and close silent ones. With TLS,
      // keygate's listener terminates it too (one reloadable context for both engines), so
      // grpc-js gets decrypted sockets and insecure credentials either way.
      const injector = server.createConnectionInjector(ServerCredentials.createInsecure());
      const opening = new Set<Socket>();
      const sockets = new Set<Socket>();
      let onSocketClosed = (): void => undefined;
      const acceptor = createAcceptor(tls, limits.headersTimeoutMs, (socket: Socket) => {
        opening.add(socket);
        sockets.add(socket);
        socket.once("close", () => {
          opening.delete(socket);
          sockets.delete(socket);
          onSocketClosed();
        });
        awaitOpening(socket, limits.headersTimeoutMs, false, () => {
          opening.delete(socket);
          // grpc-js would serve a connection injected after its shutdown began.
          if (acceptor.stopped) return void socket.destroy();
          injector.injectConnection(socket);
        });
      });
      trackConnections(acceptor.server, "grpc", limits, metrics);
      const boundPort = await listen(acceptor.server, host, port);
      return {
        port: boundPort,
        stop: (graceMs) =>
          new Promise<void>((resolve) => {
            // Connections not yet handed to grpc-js (in their TLS handshake, or before their
            // opening bytes) are closed: only those serving at stop() get the grace.
            acceptor.stop();
            for (const socket of opening) socket.destroy();
            for (const call of watchers) call.end();
            watchers.clear();
            // Stopped means grpc-js has shut down and every connection is gone. grpc-js alone is
            // not enough: depending on the Node version it may not track injected sessions and
            // report done while their calls still run.
            let shutDown = false;
            const finish = (): void => {
              if (!shutDown || sockets.size > 0) return;
              clearTimeout(force);
              resolve();
            };
            const force = setTimeout(() => {
              server.forceShutdown();
              // With channelz off grpc-js does not track injected sessions, so forceShutdown
              // alone leaves a stuck call's connection open: its socket is cut here.
              for (const socket of sockets) socket.destroy();
            }, graceMs);
            onSocketClosed = finish;
            server.tryShutdown(() => {
              shutDown = true;
              finish();
            });
          }),
      };
    },
  };
}
