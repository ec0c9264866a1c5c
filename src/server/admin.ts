import { createServer as createHttp1Server } from "node:http";
import type { IncomingMessage, ServerResponse } from "node:http";
import { createServer as createHttp2Server } from "node:http2";
import type { Http2ServerRequest, Http2ServerResponse, Http2Session } from "node:http2";
import { createServer as createNetServer } from "node:net";
import type { Socket } from "node:net";
import { createContextValues } from "@connectrpc/connect";
import type { ConnectRouter } from "@connectrpc/connect";
import { connectNodeAdapter } from "@connectrpc/connect-node";
import type { Logger } from "pino";
import { AuthFailureLimiter } from "../admin/auth.js";
import type { AdminAuth } from "../admin/auth.js";
import { adminAuthInterceptor, sourceAddressKey } from "../admin/handlers.js";
import type { StartedServer } from "./grpc-authz.js";
import { listen } from "./http-lifecycle.js";
import type { Metrics } from "./metrics.js";
import type { Readiness } from "./readiness.js";

/** What the admin server needs. */
export interface AdminServerDeps {
  routes: (router: ConnectRouter) => void;
  auth: AdminAuth;
  readiness: Readiness;
  metrics: Metrics;
  logger: Logger;
  /** Extra readiness probe (the store's ping); a throw means not ready. */
  probe: () => Promise<void>;
}

type AnyRequest = IncomingMessage | Http2ServerRequest;
type AnyResponse = ServerResponse | Http2ServerResponse;

// The client connection preface of cleartext HTTP/2 starts with these bytes.
const H2_PREFACE_START = "PRI";

/**
 * Builds the admin listener: KeyAdmin over Connect (gRPC, gRPC-Web and JSON), plus /healthz,
 * /readyz and /metrics. HTTP/1.1 and cleartext HTTP/2 share one port: the first bytes of a
 * connection pick the server.
 */
export function createAdminServer(deps: AdminServerDeps): { start(host: string, port: number): Promise<StartedServer> } {
  const connect = connectNodeAdapter({
    routes: deps.routes,
    interceptors: [adminAuthInterceptor(deps.auth, new AuthFailureLimiter(), deps.logger)],
    // Unknown JSON keys ("__proto__", "constructor", typos) are refused rather than dropped.
    jsonOptions: { ignoreUnknownFields: false },
    contextValues: (req) => createContextValues().set(sourceAddressKey, req.socket.remoteAddress ?? ""),
  });

  function plain(res: AnyResponse, status: number, contentType: string, body: string): void {
    res.writeHead(status, { "content-type": contentType });
    res.end(body);
  }

  function handle(req: AnyRequest, res: AnyResponse): void {
    const path = (req.url ?? "/").split("?")[0];
    if (path === "/healthz") return plain(res, 200, "text/plain", "ok\n");
    if (path === "/readyz") {
      if (!deps.readiness.serving) return plain(res, 503, "text/plain", "not ready: draining or starting\n");
      deps.probe().then(
        () => plain(res, 200, "text/plain", "ready\n"),
        (error: unknown) => {
          deps.logger.warn({ err: error }, "readiness probe failed");
          plain(res, 503, "text/plain", "not ready: store unreachable\n");
        },
      );
      return;
    }
    if (path === "/metrics") {
      deps.metrics.registry.metrics().then(
        (text) => plain(res, 200, deps.metrics.registry.contentType, text),
        () => plain(res, 500, "text/plain", "metrics unavailable\n"),
      );
      return;
    }
    connect(req, res);
  }

  return {
    async start(host, port) {
      const http1 = createHttp1Server(handle);
      const http2 = createHttp2Server(handle);
      const sessions = new Set<Http2Session>();
      const sockets = new Set<Socket>();
      let inFlight = 0;
      http1.on("request", (_req: IncomingMessage, res: ServerResponse) => {
        inFlight += 1;
        res.once("close", () => (inFlight -= 1));
      });
      http2.on("session", (session: Http2Session) => {
        sessions.add(session);
        session.once("close", () => sessions.delete(session));
      });
      const tcp = createNetServer((socket: Socket) => {
        sockets.add(socket);
        socket.once("close", () => sockets.delete(socket));
        socket.once("error", () => socket.destroy());
        socket.once("data", (chunk: Buffer) => {
          socket.pause();
          socket.unshift(chunk);
          if (chunk.subarray(0, 3).toString("latin1") === H2_PREFACE_START) {
            // The HTTP/2 session reads the unshifted bytes itself; resuming would drop them.
            http2.emit("connection", socket);
          } else {
            http1.emit("connection", socket);
            socket.resume();
          }
        });
      });
      const boundPort = await listen(tcp, host, port);
      return {
        port: boundPort,
        async stop(graceMs) {
          const tcpClosed = new Promise<void>((resolve) => tcp.close(() => resolve()));
          for (const session of sessions) session.close();
          http1.closeIdleConnections();
          // Sockets were handed to the HTTP servers by hand, so they are closed here: once the
          // in-flight calls are done, or when the grace period is over.
          const deadline = Date.now() + graceMs;
          while (Date.now() < deadline && (inFlight > 0 || sessions.size > 0)) {
            await new Promise((resolve) => setTimeout(resolve, 20));
            http1.closeIdleConnections();
          }
          for (const session of sessions) session.destroy();
          for (const socket of sockets) socket.destroy();
          await tcpClosed;
        },
      };
    },
  };
}
