import { createServer as createHttp1Server } from "node:http";
import type { IncomingMessage, OutgoingHttpHeaders, ServerResponse } from "node:http";
import { constants as http2Constants, createServer as createHttp2Server } from "node:http2";
import type { Http2ServerRequest, Http2ServerResponse, Http2Session, ServerHttp2Stream } from "node:http2";
import type { Socket } from "node:net";
import { Code, ConnectError, createContextValues } from "@connectrpc/connect";
import type { ConnectRouter } from "@connectrpc/connect";
import { codeToHttpStatus, errorToJson } from "@connectrpc/connect/protocol-connect";
import { contentTypeRegExp as grpcContentType, setTrailerStatus } from "@connectrpc/connect/protocol-grpc";
import { contentTypeRegExp as grpcWebContentType } from "@connectrpc/connect/protocol-grpc-web";
import type { Logger } from "pino";
import { AdminGate, admittedGenerationKey } from "../admin/auth.js";
import type { AdminAuth } from "../admin/auth.js";
import { NO_PERMISSIONS, adminAuthInterceptor, adminIdentityKey, adminOwnersKey, adminPermissionsKey, sourceAddressKey } from "../admin/handlers.js";
import { METHOD_PERMISSIONS, missingPermission } from "../admin/permissions.js";
import type { Permission } from "../admin/permissions.js";
import { awaitOpening, closeAfterAnswer, lastAnswerDecided, lingeringClose, stopAfterAnswer, stopReading, timeoutCheckIntervalMs, trackConnections } from "./connections.js";
import { scrubbedConnectHandler } from "./connect-scrub.js";
import type { ListenerLimits } from "./connections.js";
import type { StartedServer } from "./grpc-authz.js";
import { listen } from "./http-lifecycle.js";
import type { Metrics } from "./metrics.js";
import type { Readiness } from "./readiness.js";
import { createAcceptor } from "./tls.js";
import type { ListenerTls } from "./tls.js";

/** What the admin server needs. */
export interface AdminServerDeps {
  routes: (router: ConnectRouter) => void;
  auth: AdminAuth;
  readiness: Readiness;
  metrics: Metrics;
  logger: Logger;
  /** Extra readiness probe (the store's ping, shared: sharedPing); a throw means not ready. */
  probe: () => Promise<void>;
  /** Largest request message, as sent and after decompression. */
  maxBodyBytes: number;
  limits: ListenerLimits;
  /** TLS on this listener (ALPN h2 and http/1.1), or null for cleartext. */
  tls?: ListenerTls | null;
}

type AnyRequest = IncomingMessage | Http2ServerRequest;
type AnyResponse = ServerResponse | Http2ServerResponse;

/** `res.writeHead` on either response type: @types/node 24's two overload sets do not unify, so each is called as itself. */
function writeHead(res: AnyResponse, status: number, headers: OutgoingHttpHeaders): void {
  if ("stream" in res) res.writeHead(status, headers);
  else res.writeHead(status, headers);
}

// Concurrent streams one admin HTTP/2 connection may open; each may hold a flow-control window of body.
const MAX_CONCURRENT_STREAMS = 100;
/**
 * Answers one HTTP/1.1 admin connection may have waiting: the request that brings it to this many
 * is answered last ("Connection: close"), and nothing pipelined behind it is read. Node pauses a
 * pipelining socket only once answers are queued for writing; /readyz and /metrics answer later,
 * so each request of a read chunk (~1,700 of 34 bytes in 64 KiB) was run and its answer held.
 */
const MAX_PIPELINED_ANSWERS = 8;
/** Node's own answer to a request head that did not arrive within the headers timeout. */
const HEAD_TIMEOUT_ANSWER = "HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n\r\n";
// CreateKey and RotateKey answer with a secret shown once: no KeyAdmin answer, whatever its
// method, protocol or outcome, may be kept by a cache between the caller and keygate.
const NO_STORE = "no-store";

/** The connection's peer address, read (and so kept by Node) while it can be. */
function peerAddress(socket: Socket): string {
  return socket.remoteAddress ?? "";
}

/** The body size a request declares, or null when it declares none (chunked, or HTTP/2). */
function declaredLength(req: AnyRequest): number | null {
  const value = req.headers["content-length"];
  return value !== undefined && /^\d{1,15}$/.test(value) ? Number(value) : null;
}

function isHttp2(req: AnyRequest): req is Http2ServerRequest {
  return "stream" in req;
}

/** Whether an HTTP/1.1 request announces a body (RFC 9112 §6.3): a length other than 0, or a transfer coding. */
function announcesBody(req: IncomingMessage): boolean {
  return req.headers["transfer-encoding"] !== undefined || (declaredLength(req) ?? 0) > 0;
}

/**
 * The last segment of a KeyAdmin path as a log line names it: a KeyAdmin method by its name, any
 * other text by its length only. The logger redacts admin tokens by their exact text, which a cut
 * could split, and a path no token admitted is the caller's to fill.
 */
function loggedMethod(path: string): { method: string } | { methodLength: number } {
  const method = path.slice(path.lastIndexOf("/") + 1);
  return METHOD_PERMISSIONS.has(method) ? { method } : { methodLength: method.length };
}

/**
 * Answers a KeyAdmin call with an error without reading its body, in the caller's protocol:
 * gRPC and gRPC-Web as a trailers-only response (grpc-status in the headers), Connect as the
 * JSON error with its HTTP status. The request's stream is then reset (HTTP/2) or its
 * connection closed with a lingering close (HTTP/1.1), so an unread body is never read through.
 */
function refuse(req: AnyRequest, res: AnyResponse, code: Code, message: string): void {
  const contentType = req.headers["content-type"] ?? "";
  const error = new ConnectError(message, code);
  let status: number;
  let headers: OutgoingHttpHeaders;
  let body: string;
  if (grpcContentType.test(contentType) || grpcWebContentType.test(contentType)) {
    status = 200;
    headers = { "content-type": contentType, "cache-control": NO_STORE };
    setTrailerStatus(new Headers(), error).forEach((value, name) => (headers[name] = value));
    body = "";
  } else {
    status = codeToHttpStatus(code);
    headers = { "content-type": "application/json", "cache-control": NO_STORE };
    body = JSON.stringify(errorToJson(error, undefined));
  }
  if (isHttp2(req)) {
    const stream: ServerHttp2Stream = req.stream;
    if (stream.destroyed || stream.headersSent) return;
    stream.respond({ ":status": status, ...headers }, { endStream: body === "" });
    if (body !== "") stream.end(body);
    // RFC 9113 §8.1: once answered, the server may tell the client to stop sending with NO_ERROR.
    if (!stream.endAfterHeaders) stopAfterAnswer(stream);
    return;
  }
  // The body is not read: the answer ends the connection, and no request pipelined behind it runs.
  if (!("stream" in res)) closeAfterAnswer(req.socket, res);
  writeHead(res, status, headers);
  res.end(body);
}

/**
 * Builds the admin listener: KeyAdmin over Connect (gRPC, gRPC-Web and JSON), plus /healthz,
 * /readyz and /metrics. HTTP/1.1 and cleartext HTTP/2 share one port: the first bytes of a
 * connection pick the server. A KeyAdmin call is admitted (failed-login limit, then token) and
 * its declared size checked before a byte of its body is read.
 */
export function createAdminServer(deps: AdminServerDeps): { start(host: string, port: number): Promise<StartedServer> } {
  const { limits, logger, maxBodyBytes } = deps;
  const gate = new AdminGate(deps.auth);
  // The token of each admitted request: its id for the handlers' audit entries, its permissions,
  // and the tokens' generation, so that the interceptor checks it again after a reload.
  const admitted = new WeakMap<AnyRequest, { tokenId: string; permissions: ReadonlySet<Permission>; owners: ReadonlySet<string> | null; generation: number }>();
  const connect = scrubbedConnectHandler({
    routes: deps.routes,
    logger,
    interceptors: [adminAuthInterceptor(gate, logger)],
    // Unknown JSON keys ("__proto__", "constructor", typos) are refused rather than dropped.
    jsonOptions: { ignoreUnknownFields: false },
    // Bounds the body as read and each message after decompression: inflating stops at the limit.
    readMaxBytes: maxBodyBytes,
    contextValues: (req) =>
      createContextValues()
        .set(sourceAddressKey, req.socket.remoteAddress ?? "")
        .set(adminIdentityKey, admitted.get(req)?.tokenId ?? "")
        .set(adminPermissionsKey, admitted.get(req)?.permissions ?? NO_PERMISSIONS)
        .set(adminOwnersKey, admitted.get(req)?.owners ?? null)
        .set(admittedGenerationKey, admitted.get(req)?.generation ?? -1),
  });

  // Requests read on each HTTP/1.1 connection whose answers are not yet written out.
  const awaitingAnswers = new WeakMap<Socket, number>();
  /** Counts one more answer `socket` waits for, until `res` is done; returns how many it waits for. */
  function awaitAnswer(socket: Socket, res: ServerResponse): number {
    const waiting = (awaitingAnswers.get(socket) ?? 0) + 1;
    awaitingAnswers.set(socket, waiting);
    res.once("close", () => awaitingAnswers.set(socket, (awaitingAnswers.get(socket) ?? 1) - 1));
    return waiting;
  }

  function plain(res: AnyResponse, status: number, contentType: string, body: string): void {
    writeHead(res, status, { "content-type": contentType });
    res.end(body);
  }

  /** `admittedBody` runs once the call may send its body (for HTTP/1.1 "Expect: 100-continue"). */
  function keyAdmin(req: AnyRequest, res: AnyResponse, path: string, admittedBody?: () => void): void {
    // Carried by every answer written through `res`; refuse() names it itself (HTTP/2 answers on the stream).
    res.setHeader("cache-control", NO_STORE);
    const source = req.socket.remoteAddress ?? "";
    const admission = gate.admit(source, req.headers.authorization ?? null);
    if (!admission.ok) {
      if (admission.refusal === "blocked") return refuse(req, res, Code.ResourceExhausted, admission.message);
      logger.warn({ source, ...loggedMethod(path) }, "admin authentication failed");
      return refuse(req, res, Code.Unauthenticated, admission.message);
    }
    // A method the token may not call is refused here too, before its body is read.
    const method = path.slice(path.lastIndexOf("/") + 1);
    const needed = METHOD_PERMISSIONS.get(method);
    if (needed !== undefined && !admission.permissions.has(needed)) {
      logger.warn({ source, method, tokenId: admission.tokenId, needed }, "admin call refused: missing permission");
      return refuse(req, res, Code.PermissionDenied, missingPermission(admission.tokenId, needed, method));
    }
    const declared = declaredLength(req);
    if (declared !== null && declared > maxBodyBytes) {
      const message = `the request body is ${declared} bytes; the admin API accepts at most ${maxBodyBytes} (KEYGATE_ADMIN_MAX_BODY_BYTES)`;
      return refuse(req, res, Code.ResourceExhausted, message);
    }
    admitted.set(req, admission);
    admittedBody?.();
    connect(req, res);
  }

  /**
   * `admittedBody` is called only for an admitted KeyAdmin call: /healthz, /readyz and /metrics
   * read no body, so they never invite one with "100 Continue".
   */
  function handle(req: AnyRequest, res: AnyResponse, admittedBody?: () => void): void {
    // A request pipelined behind an answer that closes the connection is never answered: a
    // KeyAdmin call would change data (CreateKey) and its answer, a key's secret, would be lost.
    if (!isHttp2(req) && lastAnswerDecided(req.socket)) return stopReading(req.socket);
    // An answer given before the body was read through (a probe, an error mid-body such as a
    // message over the limit) ends the request: the rest is not read through, on any path. The
    // socket is taken now: Node may have let go of req.socket by the time the answer has finished.
    const socket = req.socket;
    res.once("finish", () => {
      if (req.complete) return;
      if (isHttp2(req)) stopAfterAnswer(req.stream);
      else lingeringClose(socket);
    });
    // A client that pipelines on without reading gets MAX_PIPELINED_ANSWERS answers, then the close
    // (RFC 9112 §9.3.2: it sends what was not answered again, on a new connection).
    if (!("stream" in res) && awaitAnswer(socket, res) >= MAX_PIPELINED_ANSWERS) closeAfterAnswer(socket, res);
    const path = (req.url ?? "/").split("?")[0] ?? "/";
    const probe = path === "/healthz" || path === "/readyz" || path === "/metrics";
    // A probe's body is not read through: Node would read it after the answer, and the next
    // request's after that, on a keep-alive connection no token was asked for.
    if (probe && !isHttp2(req) && !("stream" in res) && announcesBody(req)) closeAfterAnswer(socket, res);
    if (path === "/healthz") return plain(res, 200, "text/plain", "ok\n");
    if (path === "/readyz") {
      if (!deps.readiness.serving) return plain(res, 503, "text/plain", "not ready: draining or starting\n");
      deps.probe().then(
        () => plain(res, 200, "text/plain", "ready\n"),
        // The probe logs a failed ping itself, once however many probes it answers.
        () => plain(res, 503, "text/plain", "not ready: store unreachable\n"),
      );
      return;
    }
    if (path === "/metrics") {
      deps.metrics.render().then(
        (text) => plain(res, 200, deps.metrics.registry.contentType, text),
        () => plain(res, 500, "text/plain", "metrics unavailable\n"),
      );
      return;
    }
    keyAdmin(req, res, path, admittedBody);
  }

  /**
   * An HTTP/2 session with no stream open for the idle timeout is closed (GOAWAY, then cut if
   * the peer does not let it finish), and a stream still open after the request timeout is reset.
   */
  function guardSession(session: Http2Session): void {
    let open = 0;
    let idle: NodeJS.Timeout | undefined;
    const closeIdle = (): void => {
      session.close();
      setTimeout(() => session.destroy(), limits.headersTimeoutMs).unref();
    };
    const armIdle = (): void => {
      idle = setTimeout(closeIdle, limits.idleTimeoutMs);
      idle.unref();
    };
    armIdle();
    session.on("stream", (stream: ServerHttp2Stream) => {
      open += 1;
      clearTimeout(idle);
      const overdue = setTimeout(() => stream.close(http2Constants.NGHTTP2_CANCEL), limits.requestTimeoutMs);
      overdue.unref();
      stream.once("close", () => {
        clearTimeout(overdue);
        open -= 1;
        if (open === 0 && !session.closed && !session.destroyed) armIdle();
      });
    });
    session.once("close", () => clearTimeout(idle));
  }

  return {
    async start(host, port) {
      const http1 = createHttp1Server(
        {
          headersTimeout: limits.headersTimeoutMs,
          requestTimeout: limits.requestTimeoutMs,
          keepAliveTimeout: limits.idleTimeoutMs,
          connectionsCheckingInterval: timeoutCheckIntervalMs(limits),
        },
        handle,
      );
      // A peer that stops reading our answer, or goes silent mid-request, is cut after this.
      http1.timeout = limits.requestTimeoutMs;
      // Node enforces headersTimeout and requestTimeout from a check it starts on "listening";
      // this server never listens itself (the TCP server below hands it connections).
      http1.emit("listening");
      const http2 = createHttp2Server({ settings: { maxConcurrentStreams: MAX_CONCURRENT_STREAMS } }, handle);
      const sessions = new Set<Http2Session>();
      const sockets = new Set<Socket>();
      // The head deadline of each HTTP/1.1 connection until its first request arrives.
      const headDeadlines = new WeakMap<Socket, NodeJS.Timeout>();
      // Node's headers timeout starts when the connection is handed over, after awaitOpening has
      // waited for the opening bytes: alone it would let a head take twice the timeout ("P", a
      // prefix of the HTTP/2 preface, just before the first deadline, then a trickled head).
      const awaitHead = (socket: Socket, leftMs: number): void => {
        const timer = setTimeout(() => {
          if (socket.writable) socket.write(HEAD_TIMEOUT_ANSWER);
          socket.destroy();
        }, leftMs);
        timer.unref();
        headDeadlines.set(socket, timer);
        socket.once("close", () => clearTimeout(timer));
      };
      let inFlight = 0;
      const countInFlight = (req: IncomingMessage, res: ServerResponse): void => {
        clearTimeout(headDeadlines.get(req.socket));
        inFlight += 1;
        res.once("close", () => (inFlight -= 1));
      };
      http1.on("request", countInFlight);
      // curl and others ask before sending a large body: "100 Continue" only goes to an admitted
      // call, so a refused one never sends its body at all.
      http1.on("checkContinue", (req: IncomingMessage, res: ServerResponse) => {
        countInFlight(req, res);
        handle(req, res, () => res.writeContinue());
      });
      http2.on("session", (session: Http2Session) => {
        sessions.add(session);
        session.once("close", () => sessions.delete(session));
        guardSession(session);
      });
      // With TLS the opening is still read from the decrypted bytes; ALPN has told the client
      // which protocol to open with, so the two agree.
      const acceptor = createAcceptor(deps.tls ?? null, limits.headersTimeoutMs, (socket: Socket) => {
        // Node reads the peer's address when first asked and keeps it, but cannot once the peer has
        // reset the connection: asked now, a call the client reset still has its source (login
        // limits, the audit trail), where it had "".
        peerAddress(socket);
        sockets.add(socket);
        socket.once("close", () => sockets.delete(socket));
        awaitOpening(socket, limits.headersTimeoutMs, true, (opening, leftMs) => {
          // Only connections serving at stop() get the grace: one whose opening (or TLS
          // handshake) ends after it is closed, not served (an HTTP/2 session would get no GOAWAY).
          if (acceptor.stopped) {
            socket.destroy();
          } else if (opening === "http2") {
            // The HTTP/2 session reads the unshifted bytes itself; resuming would drop them.
            http2.emit("connection", socket);
          } else {
            awaitHead(socket, leftMs);
            http1.emit("connection", socket);
            socket.resume();
          }
        });
      });
      trackConnections(acceptor.server, "admin", limits, deps.metrics);
      const boundPort = await listen(acceptor.server, host, port);
      return {
        port: boundPort,
        async stop(graceMs) {
          // Also closes the connections still in their TLS handshake, which no set here holds.
          const tcpClosed = new Promise<void>((resolve) => acceptor.stop(resolve));
          for (const session of sessions) session.close();
          http1.closeIdleConnections();
          // Sockets were handed to the HTTP servers by hand, so they are closed here: once the
          // in-flight calls are done, or when the grace period is over.
          // The monotonic clock: a wall-clock step (NTP) must neither stretch nor cut the grace.
          const deadline = performance.now() + graceMs;
          while (performance.now() < deadline && (inFlight > 0 || sessions.size > 0)) {
            await new Promise((resolve) => setTimeout(resolve, 20));
            http1.closeIdleConnections();
          }
          for (const session of sessions) session.destroy();
          for (const socket of sockets) socket.destroy();
          http1.close();
          await tcpClosed;
        },
      };
    },
  };
}
