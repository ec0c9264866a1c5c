import { randomUUID } from "node:crypto";
import { createServer } from "node:http";
import type { IncomingMessage, ServerResponse } from "node:http";
import type { Logger } from "pino";
import type { HeaderBag } from "../authz/credential.js";
import type { Decision, DecisionPipeline } from "../authz/pipeline.js";
import { renderDeniedEcho, toHttpAnswer, unavailableAnswer, withDenialHeaders } from "../authz/to-http.js";
import type { HttpAnswer } from "../authz/to-http.js";
import type { Metrics } from "./metrics.js";
import type { Readiness } from "./readiness.js";
import { closeHttpServer, listen } from "./http-lifecycle.js";
import type { StartedServer } from "./grpc-authz.js";

/** What the HTTP authz server needs. */
export interface HttpAuthzDeps {
  pipeline: DecisionPipeline;
  readiness: Readiness;
  metrics: Metrics;
  logger: Logger;
  nowMs: () => number;
}

const CHECK_PREFIX = "/check";

function firstHeader(req: IncomingMessage, name: string): string | undefined {
  const value = req.headers[name];
  return Array.isArray(value) ? value[0] : value;
}

/**
 * The original request as the proxy describes it. Envoy's HTTP service appends the path to
 * /check; nginx and Caddy call /check and send X-Original-URI / X-Forwarded-Uri.
 */
export function originalRequest(req: IncomingMessage): { method: string; path: string } | null {
  const url = req.url ?? "/";
  if (url !== CHECK_PREFIX && !url.startsWith(`${CHECK_PREFIX}/`) && !url.startsWith(`${CHECK_PREFIX}?`)) return null;
  const below = url.startsWith(`${CHECK_PREFIX}/`) ? url.slice(CHECK_PREFIX.length) : "";
  const path = below || firstHeader(req, "x-forwarded-uri") || firstHeader(req, "x-original-uri") || "/";
  const method = firstHeader(req, "x-forwarded-method") || firstHeader(req, "x-original-method") || req.method || "GET";
  return { method, path };
}

/**
 * The headers the pipeline reads, with every repeated header as the array of its values. Node
 * keeps only the first Authorization and joins other repeats with ", ", so without this a second
 * credential header would never reach extractCredential, which refuses it.
 */
export function headerBag(req: IncomingMessage, distinctNameCount: number): HeaderBag {
  // As many raw lines as distinct names means nothing repeats: the common path allocates nothing.
  if (req.rawHeaders.length === distinctNameCount * 2) return req.headers;
  const bag: Record<string, string | string[] | undefined> = { ...req.headers };
  for (const [name, values] of Object.entries(req.headersDistinct)) {
    if (values !== undefined && values.length > 1) bag[name] = values;
  }
  return bag;
}

function send(res: ServerResponse, answer: HttpAnswer): void {
  res.writeHead(answer.status, answer.headers);
  res.end(answer.body);
}

/** Builds the HTTP authorization server for nginx auth_request, Caddy forward_auth and Envoy's HTTP service. */
export function createHttpAuthzServer(deps: HttpAuthzDeps): { start(host: string, port: number): Promise<StartedServer> } {
  const { pipeline, metrics, logger, readiness } = deps;

  function handle(req: IncomingMessage, res: ServerResponse): void {
    const url = req.url ?? "/";
    if (url === "/healthz") {
      res.writeHead(200, { "content-type": "text/plain" }).end("ok\n");
      return;
    }
    if (url === "/readyz") {
      res.writeHead(readiness.serving ? 200 : 503, { "content-type": "text/plain" }).end(readiness.serving ? "ready\n" : "not ready\n");
      return;
    }
    if (url === "/denied") {
      req.resume();
      const requestId = firstHeader(req, "x-request-id") || randomUUID();
      send(res, renderDeniedEcho(firstHeader(req, "x-keygate-status"), firstHeader(req, "x-keygate-body"), requestId));
      return;
    }
    const startedAt = performance.now();
    const original = originalRequest(req);
    if (original === null) {
      res.writeHead(404, { "content-type": "application/json" }).end('{"success":false,"error":{"code":"NOT_FOUND","message":"use /check"}}');
      return;
    }
    // The body of an authorization subrequest is never read; drain it so keep-alive works.
    req.resume();
    const requestId = firstHeader(req, "x-request-id") || randomUUID();
    const headerNames = Object.keys(req.headers);
    const denialHeaders = req.headers["x-keygate-denial-headers"] === "1";
    const reply = (answer: HttpAnswer): void => send(res, denialHeaders ? withDenialHeaders(answer) : answer);
    const answer = (decision: Decision): void => {
      reply(toHttpAnswer(decision, headerNames, requestId, deps.nowMs()));
      const reason = decision.allow ? "OK" : decision.reason;
      metrics.recordCheck("http", reason, startedAt, performance.now());
      if (logger.isLevelEnabled("debug")) logger.debug({ requestId, keyId: decision.snapshot?.key.id, decision: reason, mode: "http" }, "check");
    };
    const fail = (error: unknown): void => {
      metrics.recordCheck("http", "UNAVAILABLE", startedAt, performance.now());
      logger.warn({ err: error }, "check could not be decided");
      reply(unavailableAnswer(requestId));
    };
    try {
      const decision = pipeline.decide({ method: original.method, path: original.path, headers: headerBag(req, headerNames.length), contextExtensions: undefined });
      if (decision instanceof Promise) decision.then(answer, fail);
      else answer(decision);
    } catch (error) {
      fail(error);
    }
  }

  return {
    async start(host, port) {
      const server = createServer({ keepAliveTimeout: 65_000 }, handle);
      const boundPort = await listen(server, host, port);
      return { port: boundPort, stop: (graceMs) => closeHttpServer(server, graceMs) };
    },
  };
}
