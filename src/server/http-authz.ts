import { randomUUID } from "node:crypto";
import { STATUS_CODES, createServer } from "node:http";
import { createServer as createHttpsServer } from "node:https";
import type { IncomingMessage, ServerResponse } from "node:http";
import { Socket } from "node:net";
import type { Duplex } from "node:stream";
import { CONNECT_REFUSAL, RouteRefusal } from "../authz/routes.js";
import type { Logger } from "pino";
import { RecordHeaders } from "../authz/headers.js";
import type { HeaderBag } from "../authz/headers.js";
import type { HttpAuthzProxy } from "../config.js";
import type { Decision, DecisionPipeline } from "../authz/pipeline.js";
import { renderDeniedEcho, toHttpAnswer, unavailableAnswer, withDenialHeaders } from "../authz/to-http.js";
import type { HttpAnswer } from "../authz/to-http.js";
import { failureReason } from "./metrics.js";
import type { Metrics } from "./metrics.js";
import type { Readiness } from "./readiness.js";
import { closeHttpServer, listen } from "./http-lifecycle.js";
import { closeAfterAnswer, lastAnswerDecided, stopReading, timeoutCheckIntervalMs, trackConnections } from "./connections.js";
import type { ListenerLimits } from "./connections.js";
import { undecidedCheckLog } from "./grpc-authz.js";
import type { StartedServer } from "./grpc-authz.js";
import { OriginalRequestReader } from "./original-request.js";
import type { DecisionTrace, DecisionTracer } from "../tracing/tracing.js";
import { echoedRequestId } from "../authz/reasons.js";
import type { AccessLog } from "./access-log.js";
import { trackHandshakes } from "./tls.js";
import type { Handshakes, ListenerTls } from "./tls.js";

/** Largest request head the HTTP authorization port reads (request line and headers). */
export const MAX_HEADER_BYTES = 64 * 1024;
/**
 * Largest body the HTTP authorization port reads through (and throws away) to keep a connection
 * alive: a proxy that forwards a small body (Traefik's forwardBody, Envoy's with_request_body)
 * keeps its connection. A larger body, or one of unknown length, is not read: the answer closes
 * the connection.
 */
export const MAX_DRAINED_BODY_BYTES = 64 * 1024;

/**
 * Whether a request announces a body too large to read through, or of unknown length (chunked).
 * Node's parser has refused a Content-Length that is not digits. On the normal path (no body, or
 * a small one) this costs two header lookups and a comparison.
 */
function announcesLargeBody(req: IncomingMessage): boolean {
  const length = req.headers["content-length"];
  return req.headers["transfer-encoding"] !== undefined || (length !== undefined && Number(length) > MAX_DRAINED_BODY_BYTES);
}

/** What the HTTP authz server needs. */
export interface HttpAuthzDeps {
  /** Only `decide` is called, so tests can hand in a pipeline they control. */
  pipeline: Pick<DecisionPipeline, "decide">;
  readiness: Readiness;
  /**
   * /readyz's check of the store, shared with the admin port's (it rejects when the store does
   * not answer); none: /readyz reflects starting and draining only.
   */
  probe?: () => Promise<void>;
  metrics: Metrics;
  logger: Logger;
  nowMs: () => number;
  /** The proxy in front (KEYGATE_HTTP_AUTHZ_PROXY): where the judged method and path come from. */
  proxy: HttpAuthzProxy;
  /** Timeouts and connection cap of this listener. */
  limits: ListenerLimits;
  /** Decision spans; undefined when tracing is off. */
  tracer?: DecisionTracer | undefined;
  /** The sampled access log; undefined when it is off. */
  accessLog?: AccessLog | undefined;
  /** TLS on this listener (ALPN http/1.1), or null for plain HTTP. */
  tls?: ListenerTls | null;
  /** The monotonic clock that spaces out repeated log lines (default performance.now); tests step it. */
  logClockMs?: () => number;
}

function firstHeader(req: IncomingMessage, name: string): string | undefined {
  const value = req.headers[name];
  return Array.isArray(value) ? value[0] : value;
}

/**
 * The headers the pipeline reads, with every repeated header as the array of its values. Node
 * keeps only the first Authorization and joins other repeats with ", ", so without this a second
 * credential header would never reach extractCredential, which refuses it.
 */
export function headerBag(req: IncomingMessage, distinctNameCount: number): HeaderBag {
  // As many raw lines as distinct names means nothing repeats: the common path allocates nothing.
  if (req.rawHeaders.length === distinctNameCount * 2) return new RecordHeaders(req.headers);
  // Spread and fromEntries define own properties: a header named __proto__ stays a header.
  const repeated = Object.entries(req.headersDistinct).filter(([, values]) => values !== undefined && values.length > 1);
  return new RecordHeaders({ ...req.headers, ...Object.fromEntries(repeated) });
}

const UNREADABLE_REFUSAL = new RouteRefusal(
  "INVALID_PATH",
  "The request could not be read as HTTP/1.1 (a method HTTP servers do not know, or bytes HTTP does not allow in the request line or a header), so it is refused.",
);

/**
 * An answer written on a socket node:http no longer serves, and the connection closed after it.
 * The answer to a HEAD has no body: a client reads none, and would take one for the next answer.
 */
function endWith(socket: Duplex, answer: HttpAnswer, toHead = false): void {
  const body = toHead ? Buffer.alloc(0) : Buffer.from(answer.body);
  const head = [`HTTP/1.1 ${answer.status} ${STATUS_CODES[answer.status] ?? ""}`];
  for (const [name, value] of Object.entries(answer.headers)) head.push(`${name}: ${value}`);
  head.push(`content-length: ${body.length}`, "connection: close", "", "");
  socket.end(Buffer.concat([Buffer.from(head.join("\r\n"), "latin1"), body]));
}

function send(res: ServerResponse, answer: HttpAnswer): void {
  res.writeHead(answer.status, answer.headers);
  res.end(answer.body);
}

/** Builds the HTTP authorization server for nginx auth_request, Caddy forward_auth and Envoy's HTTP service. */
export function createHttpAuthzServer(deps: HttpAuthzDeps): { start(host: string, port: number): Promise<StartedServer> } {
  const { pipeline, metrics, logger, readiness, tracer, accessLog } = deps;
  const source = new OriginalRequestReader(deps.proxy);
  const warnUndecided = undecidedCheckLog(logger, "http", deps.logClockMs);
  let misconfigurationLogged = false;
  // Once stop is called, every answer closes its connection: a proxy's busy keep-alive connection
  // then ends with the Check in flight, instead of taking new Checks until the grace is over and
  // being cut with one in flight (closeHttpServer closes only the connections idle at the time).
  let draining = false;
  // The answer to the last request handed to `handle` on each connection (res.req is the request):
  // node:http reports a parse error in that request's body as it does a request it cannot read.
  const handedOver = new WeakMap<Duplex, ServerResponse>();

  function handle(req: IncomingMessage, res: ServerResponse): void {
    // A request pipelined behind an answer that closes the connection is never answered: deciding
    // it would charge its key's rate, quota and credits for nothing.
    if (lastAnswerDecided(req.socket)) return stopReading(req.socket);
    handedOver.set(req.socket, res);
    if (draining) res.setHeader("connection", "close");
    // Node reads an unread body through after the answer, and the next request's after that:
    // unbounded work for a caller on any path, /healthz included. The answer ends the connection.
    const unread = announcesLargeBody(req);
    if (unread) closeAfterAnswer(req.socket, res);
    const url = req.url ?? "/";
    if (url === "/healthz") {
      res.writeHead(200, { "content-type": "text/plain" }).end("ok\n");
      return;
    }
    if (url === "/readyz") {
      if (!readiness.serving) {
        res.writeHead(503, { "content-type": "text/plain" }).end("not ready: draining or starting\n");
        return;
      }
      if (deps.probe === undefined) {
        res.writeHead(200, { "content-type": "text/plain" }).end("ready\n");
        return;
      }
      // The probe logs a failed ping itself, once however many probes it answers.
      deps.probe().then(
        () => res.writeHead(200, { "content-type": "text/plain" }).end("ready\n"),
        () => res.writeHead(503, { "content-type": "text/plain" }).end("not ready: store unreachable\n"),
      );
      return;
    }
    if (url === "/denied") {
      if (!unread) req.resume();
      const requestId = echoedRequestId(firstHeader(req, "x-request-id") ?? "") || randomUUID();
      send(res, renderDeniedEcho(firstHeader(req, "x-keygate-status"), firstHeader(req, "x-keygate-body"), requestId));
      return;
    }
    const startedAt = performance.now();
    const headerNames = Object.keys(req.headers);
    const original = source.read(req, req.rawHeaders.length !== headerNames.length * 2);
    if (original === null) {
      res.writeHead(404, { "content-type": "application/json" }).end('{"success":false,"error":{"code":"NOT_FOUND","message":"use /check"}}');
      return;
    }
    // The body of an authorization subrequest is never read; a small one is drained so keep-alive works.
    if (!unread) req.resume();
    // A client's id, within the bounds an answer echoes (it goes into every log line too).
    const requestId = echoedRequestId(firstHeader(req, "x-request-id") ?? "") || randomUUID();
    const denialHeaders = req.headers["x-keygate-denial-headers"] === "1";
    const reply = (answer: HttpAnswer): void => {
      if (draining) res.setHeader("connection", "close");
      send(res, denialHeaders ? withDenialHeaders(answer) : answer);
    };
    const method = original.ok ? original.method : (req.method ?? "");
    const path = original.ok ? original.path : url;
    let trace: DecisionTrace | undefined;
    // Recording runs after the answer is sent: a fault in it is logged and changes no answer.
    const record = (decision: Decision): void => {
      const reason = decision.allow ? "OK" : decision.reason;
      metrics.recordCheck("http", reason, startedAt, performance.now());
      if (trace !== undefined) tracer?.finish(trace, decision);
      if (accessLog !== undefined) accessLog.decided("http", decision, method, path, requestId, startedAt);
      if (logger.isLevelEnabled("debug")) logger.debug({ requestId, keyId: decision.snapshot?.key.id, decision: reason, mode: "http" }, "check");
    };
    const answer = (decision: Decision): void => {
      reply(toHttpAnswer(decision, headerNames, requestId, deps.nowMs()));
      try {
        record(decision);
      } catch (error) {
        logger.error({ err: error, requestId }, "an answered check could not be recorded");
      }
    };
    const fail = (error: unknown): void => {
      const reason = failureReason(error);
      metrics.recordCheck("http", reason, startedAt, performance.now());
      if (reason === "INTERNAL") logger.error({ err: error, requestId }, "check could not be decided");
      else warnUndecided(error);
      if (trace !== undefined) tracer?.fail(trace, error);
      if (accessLog !== undefined) accessLog.failed("http", method, path, requestId, startedAt, reason);
      reply(unavailableAnswer(requestId));
    };
    // A fault before the decision (opening the span here) is a 503, counted and logged, as a
    // failure to decide is: never a thrown request handler.
    try {
      // The proxy's traceparent is read only when tracing is on; off, this is the one check.
      trace = tracer === undefined ? undefined : tracer.start("http", method, path, new RecordHeaders(req.headers));
    } catch (error) {
      fail(error);
      return;
    }
    if (!original.ok) {
      // Every request fails the same way until the setting or the proxy is fixed: say it once.
      if (original.refusal.reason === "PROXY_MISCONFIGURED" && !misconfigurationLogged) {
        misconfigurationLogged = true;
        logger.error({ requestId }, original.refusal.message);
      }
      answer(original.refusal);
      return;
    }
    try {
      const decision = pipeline.decide({ method, path, headers: headerBag(req, headerNames.length), contextExtensions: undefined, trace });
      if (decision instanceof Promise) {
        decision.then((d) => {
          try {
            answer(d);
          } catch (error) {
            fail(error);
          }
        }, fail);
      } else answer(decision);
    } catch (error) {
      fail(error);
    }
  }

  /**
   * node:http hands a CONNECT to the 'connect' event, never to the request handler, and closes
   * the connection when nothing listens: to Envoy's HTTP service (which sends the client's own
   * method) an error, which failure_mode_allow turns into an allow of the tunnel. A CONNECT is
   * answered as the decision answers one wherever it arrives: 400 INVALID_REQUEST, then closed.
   */
  function refuseConnect(req: IncomingMessage, socket: Duplex): void {
    socket.on("error", () => socket.destroy());
    const startedAt = performance.now();
    const requestId = echoedRequestId(firstHeader(req, "x-request-id") ?? "") || randomUUID();
    const answer = toHttpAnswer(CONNECT_REFUSAL, Object.keys(req.headers), requestId, deps.nowMs());
    endWith(socket, req.headers["x-keygate-denial-headers"] === "1" ? withDenialHeaders(answer) : answer);
    metrics.recordCheck("http", CONNECT_REFUSAL.reason, startedAt, performance.now());
    accessLog?.decided("http", CONNECT_REFUSAL, "CONNECT", req.url ?? "", requestId, startedAt);
  }

  /**
   * A request node:http cannot read (a method outside http.METHODS, which Envoy's HTTP service
   * passes on as the client sent it, or bytes HTTP does not allow in the request line or a
   * header) gets keygate's JSON refusal rather than Node's bare 400: a denial in keygate's form,
   * which a proxy passes to the client. Heads over the limit and timeouts answer as Node would.
   * Only a request of its own is answered, counted and logged: never the body of a request
   * handed to `handle`, which has its one answer (node:http reports both through clientError).
   */
  function refuseUnreadable(error: NodeJS.ErrnoException, socket: Duplex): void {
    if (error.code === "ECONNRESET" || !socket.writable) {
      socket.destroy();
      return;
    }
    // Behind an answer that ends the connection (closeAfterAnswer): the rest of the chunked body
    // of the request it answers (a chunk node:http cannot parse), or a request pipelined behind
    // it, which `handle` would not run either (stopReading). That answer, written or still being
    // decided, is the connection's last, and its lingering close ends the connection.
    if (socket instanceof Socket && lastAnswerDecided(socket)) return stopReading(socket);
    const last = handedOver.get(socket);
    // The body of a request handed over, still arriving at the request timeout: that request
    // has its answer, and the connection cannot be read on.
    if (last !== undefined && !last.req.complete) {
      socket.destroy();
      return;
    }
    // Pipelined behind a Check still being decided: refused once that answer is written, so that
    // the answers keep their order.
    if (last !== undefined && !last.writableFinished) {
      last.once("finish", () => refuseUnreadable(error, socket));
      return;
    }
    // As Node answers them.
    if (error.code === "HPE_HEADER_OVERFLOW") socket.end("HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\n\r\n");
    else if (error.code === "ERR_HTTP_REQUEST_TIMEOUT") socket.end("HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n\r\n");
    else {
      // The parser may have read the method before what it refused (Node passes the bytes it read).
      const read: unknown = (error as { rawPacket?: unknown }).rawPacket;
      const toHead = Buffer.isBuffer(read) && read.subarray(0, 5).toString("latin1") === "HEAD ";
      const startedAt = performance.now();
      const requestId = randomUUID();
      endWith(socket, toHttpAnswer(UNREADABLE_REFUSAL, [], requestId, deps.nowMs()), toHead);
      // Counted and logged as the refusal it is; the method and path are not known.
      metrics.recordCheck("http", UNREADABLE_REFUSAL.reason, startedAt, performance.now());
      accessLog?.decided("http", UNREADABLE_REFUSAL, "", "", requestId, startedAt);
    }
  }

  return {
    async start(host, port) {
      const { limits } = deps;
      const tls = deps.tls ?? null;
      const options = {
        // The proxies pass every client header on to the check (nginx takes up to 32 KiB of them,
        // Caddy 1 MiB): Node's 16 KiB would refuse (431) a request with a large cookie jar that
        // the API itself would take. 64 KiB, as Envoy's own default (max_request_headers_kb: 60).
        maxHeaderSize: MAX_HEADER_BYTES,
        headersTimeout: limits.headersTimeoutMs,
        requestTimeout: limits.requestTimeoutMs,
        // Above nginx's 60 s upstream keepalive_timeout by default, so the proxy closes first.
        keepAliveTimeout: limits.idleTimeoutMs,
        connectionsCheckingInterval: timeoutCheckIntervalMs(limits),
      };
      let server;
      let handshakes: Handshakes | null = null;
      if (tls === null) {
        server = createServer(options, handle);
      } else {
        server = createHttpsServer({ ...options, ...tls.serverOptions(), handshakeTimeout: limits.headersTimeoutMs }, handle);
        handshakes = trackHandshakes(server);
        tls.attach(server);
      }
      // Node answers "Expect: 100-continue" with 100 Continue itself unless told otherwise: a body
      // this port will not read is not invited.
      server.on("checkContinue", (req: IncomingMessage, res: ServerResponse) => {
        if (!announcesLargeBody(req) && !lastAnswerDecided(req.socket)) res.writeContinue();
        handle(req, res);
      });
      server.on("connect", refuseConnect);
      server.on("clientError", refuseUnreadable);
      // A peer that stops reading our answer, or goes silent mid-request, is cut after this.
      server.timeout = limits.requestTimeoutMs;
      trackConnections(server, "http", limits, deps.metrics);
      const boundPort = await listen(server, host, port);
      return {
        port: boundPort,
        stop: (graceMs) => {
          draining = true;
          const closed = closeHttpServer(server, graceMs);
          // node:http holds a connection only once its handshake is done: one still in it at
          // stop() would be served after its grace, and hold the close until it ends.
          handshakes?.stop();
          return closed;
        },
      };
    },
  };
}
