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
import type { HeaderBag } from "../authz/credential.js";
import type { Decision, DecisionPipeline } from "../authz/pipeline.js";
import { encodeCheckResponse } from "../authz/to-envoy.js";
import { CheckRequestSchema, CheckResponseSchema } from "../gen/envoy/service/auth/v3/external_auth_pb.js";
import { CheckRequestViewSchema } from "../gen/keygate/authz/v1/check_view_pb.js";
import type { CheckRequestView } from "../gen/keygate/authz/v1/check_view_pb.js";
import {
  HealthCheckRequestSchema,
  HealthCheckResponse_ServingStatus,
  HealthCheckResponseSchema,
} from "../gen/grpc/health/v1/health_pb.js";
import type { HealthCheckRequest, HealthCheckResponse } from "../gen/grpc/health/v1/health_pb.js";
import { create } from "@bufbuild/protobuf";
import type { Metrics } from "./metrics.js";
import type { Readiness } from "./readiness.js";
import { createServer as createNetServer } from "node:net";
import type { Socket } from "node:net";
import { awaitOpening, trackConnections } from "./connections.js";
import type { ListenerLimits } from "./connections.js";
import { listen } from "./http-lifecycle.js";

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
    requestSerialize: (message: CheckRequestView) => Buffer.from(toBinary(CheckRequestViewSchema, message)),
    requestDeserialize: (bytes: Buffer) => fromBinary(CheckRequestViewSchema, bytes, DECODE),
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
} as const;

/**
 * GRPC_SERVER_OPTIONS with this listener's timeouts. A connection with no call for the idle
 * timeout gets GOAWAY (clients reconnect for their next call, none fails). Every connection is
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
  };
}

/** grpc-js definition of the standard grpc.health.v1.Health service. */
export const healthDefinition = {
  Check: method("/grpc.health.v1.Health/Check", HealthCheckRequestSchema, HealthCheckResponseSchema),
  Watch: method("/grpc.health.v1.Health/Watch", HealthCheckRequestSchema, HealthCheckResponseSchema, true),
} satisfies ServiceDefinition;

const HEALTH_SERVICES = new Set(["", "envoy.service.auth.v3.Authorization"]);
const EMPTY_HEADERS: HeaderBag = {};
const NO_NAMES: readonly string[] = [];
const utf8 = new TextDecoder();

/** The header fields of an HttpRequest, as Envoy's message and keygate's view both hold them. */
export interface RequestHeaders {
  headers: { [name: string]: string };
  headerMap?: { headers: ReadonlyArray<{ key: string; value: string; rawValue: Uint8Array }> };
}

/**
 * Envoy sends headers in `headers`, or, with encode_raw_headers on, in `header_map` with the
 * value in raw_value. Repeated names in header_map become arrays, which the credential step
 * refuses. One pass, constant work a header.
 */
export function headersOf(http: RequestHeaders | undefined): HeaderBag {
  if (http === undefined) return EMPTY_HEADERS;
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
  return Object.fromEntries(byName);
}

/** What the gRPC authz server needs. */
export interface GrpcAuthzDeps {
  pipeline: DecisionPipeline;
  readiness: Readiness;
  metrics: Metrics;
  logger: Logger;
  nowMs: () => number;
  /** Timeouts and connection cap of this listener. */
  limits: ListenerLimits;
}

/** A started gRPC listener. */
export interface StartedServer {
  port: number;
  /** Stops accepting, waits up to `graceMs` for in-flight calls, then closes. */
  stop(graceMs: number): Promise<void>;
}

/** Builds the Envoy ext_authz gRPC server (Check and health). `start` binds it. */
export function createGrpcAuthzServer(deps: GrpcAuthzDeps): { start(host: string, port: number): Promise<StartedServer> } {
  const { pipeline, metrics, logger, readiness } = deps;

  function check(call: ServerUnaryCall<CheckRequestView, Uint8Array>, callback: sendUnaryData<Uint8Array>): void {
    const startedAt = performance.now();
    const http = call.request.attributes?.request?.http;
    const headers = headersOf(http);
    let decision: Decision | Promise<Decision>;
    try {
      decision = pipeline.decide({
        method: http?.method ?? "",
        path: http?.path ?? "/",
        headers,
        contextExtensions: call.request.attributes?.contextExtensions,
      });
    } catch (error) {
      fail(error, callback, startedAt);
      return;
    }
    const answer = (d: Decision): void => {
      const requestId = http?.id || (typeof headers["x-request-id"] === "string" ? headers["x-request-id"] : "") || randomUUID();
      // Only an allow needs the request's header names (to strip spoofed identity headers).
      callback(null, encodeCheckResponse(d, d.allow ? Object.keys(headers) : NO_NAMES, requestId, deps.nowMs()));
      const reason = d.allow ? "OK" : d.reason;
      metrics.recordCheck("grpc", reason, startedAt, performance.now());
      // The client's answer names the bad setting; the operator's log also gets its value.
      if (reason === "ROUTE_MISCONFIGURED") logger.error({ requestId, contextExtensions: call.request.attributes?.contextExtensions }, "bad per-route settings from the proxy");
      if (logger.isLevelEnabled("debug")) logger.debug({ requestId, keyId: d.snapshot?.key.id, decision: reason, mode: "grpc" }, "check");
    };
    if (decision instanceof Promise) decision.then(answer, (error: unknown) => fail(error, callback, startedAt));
    else answer(decision);
  }

  function fail(error: unknown, callback: sendUnaryData<Uint8Array>, startedAt: number): void {
    metrics.recordCheck("grpc", "UNAVAILABLE", startedAt, performance.now());
    // Only a failure to decide gets here (bad per-route settings are a ROUTE_MISCONFIGURED
    // denial): Envoy's failure_mode_allow decides what happens, keygate never guesses.
    logger.warn({ err: error }, "check could not be decided");
    callback({ code: GrpcStatus.UNAVAILABLE, details: "the key could not be checked right now" });
  }

  function servingStatus(service: string): HealthCheckResponse | null {
    if (!HEALTH_SERVICES.has(service)) return null;
    return create(HealthCheckResponseSchema, {
      status: readiness.serving ? HealthCheckResponse_ServingStatus.SERVING : HealthCheckResponse_ServingStatus.NOT_SERVING,
    });
  }

  // Health Watch streams never end on their own; shutdown ends them after NOT_SERVING went out.
  const watchers = new Set<ServerWritableStream<HealthCheckRequest, HealthCheckResponse>>();

  const health: UntypedServiceImplementation = {
    Check(call: ServerUnaryCall<HealthCheckRequest, HealthCheckResponse>, callback: sendUnaryData<HealthCheckResponse>) {
      const answer = servingStatus(call.request.service);
      if (answer === null) callback({ code: GrpcStatus.NOT_FOUND, details: `unknown service "${call.request.service}"` });
      else callback(null, answer);
    },
    Watch(call: ServerWritableStream<HealthCheckRequest, HealthCheckResponse>) {
      const send = (): void => {
        call.write(
          servingStatus(call.request.service) ??
            create(HealthCheckResponseSchema, { status: HealthCheckResponse_ServingStatus.SERVICE_UNKNOWN }),
        );
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
      const { limits } = deps;
      const server = new Server(grpcServerOptions(limits));
      server.addService(authorizationServerDefinition, { Check: check });
      server.addService(healthDefinition, health);
      // keygate owns the TCP listener and hands grpc-js only connections that opened with the
      // HTTP/2 preface and SETTINGS in time, so it can cap them and close silent ones.
      const injector = server.createConnectionInjector(ServerCredentials.createInsecure());
      const opening = new Set<Socket>();
      const tcp = createNetServer((socket: Socket) => {
        opening.add(socket);
        socket.once("close", () => opening.delete(socket));
        awaitOpening(socket, limits.headersTimeoutMs, false, () => {
          opening.delete(socket);
          injector.injectConnection(socket);
        });
      });
      trackConnections(tcp, "grpc", limits, metrics);
      const boundPort = await listen(tcp, host, port);
      return {
        port: boundPort,
        stop: (graceMs) =>
          new Promise<void>((resolve) => {
            tcp.close();
            for (const socket of opening) socket.destroy();
            for (const call of watchers) call.end();
            watchers.clear();
            const force = setTimeout(() => server.forceShutdown(), graceMs);
            server.tryShutdown(() => {
              clearTimeout(force);
              resolve();
            });
          }),
      };
    },
  };
}
