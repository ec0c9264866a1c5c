import { ROOT_CONTEXT, SpanKind, SpanStatusCode, trace } from "@opentelemetry/api";
import type { Attributes, Context, Span, TextMapGetter, Tracer } from "@opentelemetry/api";
import { W3CTraceContextPropagator } from "@opentelemetry/core";
import { ATTR_DB_SYSTEM_NAME, ATTR_HTTP_REQUEST_METHOD, ATTR_URL_PATH } from "@opentelemetry/semantic-conventions";
import type { HeaderBag } from "../authz/headers.js";
import type { Decision } from "../authz/pipeline.js";
import { DENIALS } from "../authz/reasons.js";
import { redactText } from "../keys/redact.js";

/** The decision span's name. */
export const CHECK_SPAN = "keygate.check";
/** The child span of a key lookup in the store (SQLite or MongoDB). */
export const STORE_LOOKUP_SPAN = "keygate.store.lookup";
/** The child span of an L2 read in Redis. */
export const REDIS_L2_GET_SPAN = "keygate.redis.l2_get";
/** The child span of the rate, quota and credit step in Redis. */
export const REDIS_CHARGE_SPAN = "keygate.redis.charge";
/** The child span of reading the limits in Redis for a refused known key's headers (charges nothing). */
export const REDIS_PEEK_SPAN = "keygate.redis.peek";

/** Where a decision's key snapshot came from: L1, L2, the store, or another Check's read of it. */
export type CacheTier = "l1" | "l2" | "store" | "shared";

/** Where a Check came in. */
export type EntryPoint = "grpc" | "http";

/** Attribute names of keygate's own span attributes. */
export const TraceAttr = {
  entry: "keygate.entry",
  decision: "keygate.decision",
  reason: "keygate.reason",
  code: "keygate.code",
  keyId: "keygate.key.id",
  ownerId: "keygate.owner.id",
  requiredScopes: "keygate.route.required_scopes",
  cacheTier: "keygate.cache.tier",
} as const;

/**
 * One decision's span, and the context its backend calls start their spans in. It exists only
 * while tracing is on: with tracing off a Check carries `undefined` and builds nothing.
 */
export class DecisionTrace {
  /** Which layer answered the lookup; set by the pipeline and the lookup as they go. */
  cacheTier: CacheTier | undefined = undefined;
  readonly #tracer: Tracer;
  readonly span: Span;
  readonly #parent: Context;
  // Built on the first child: a decision from L1 has none, and skips it.
  #context: Context | undefined = undefined;

  constructor(tracer: Tracer, span: Span, parent: Context) {
    this.#tracer = tracer;
    this.span = span;
    this.#parent = parent;
  }

  /** Starts a child span for one backend call; the caller ends it (see `traced`). */
  child(name: string, attributes: Attributes): Span {
    this.#context ??= trace.setSpan(this.#parent, this.span);
    return this.#tracer.startSpan(name, { kind: SpanKind.CLIENT, attributes }, this.#context);
  }
}

// Envoy and Node hand headers over with lower-case names; a repeated header is an array, and the
// propagator reads its first value. The trace headers are read only within their W3C sizes (a
// traceparent of 55 characters; a tracestate of 32 entries, 512 characters kept), and copied: a
// span queued for export would otherwise keep the client's whole header alive (OpenTelemetry's
// TraceState keeps the raw text; the ids are slices of it), up to 64 KiB a span.
const MAX_TRACEPARENT = 55;
const MAX_TRACESTATE = 512;
const HEADER_GETTER: TextMapGetter<HeaderBag> = {
  get: (carrier, key) => {
    const value = carrier.get(key);
    const first = typeof value === "string" || value === undefined ? value : value[0];
    if (first === undefined) return undefined;
    const most = key === "traceparent" ? MAX_TRACEPARENT : key === "tracestate" ? MAX_TRACESTATE : Infinity;
    if (first.length > most) return undefined;
    // Every span of the trace exports the tracestate as it came, and a client (or its SDK) can put
    // its key there: one with anything redactText recognises as a secret is dropped whole (the
    // parent link, from traceparent, stays). Only those shapes: a key cut across list members, or
    // encoded otherwise (base64, say), is not recognised and goes out as sent.
    if (key === "tracestate" && redactText(first) !== first) return undefined;
    return copied(first);
  },
  keys: (carrier) => [...carrier.names()],
};

/** A string of its own, not a view into the (larger) text it was cut from. */
function copied(text: string): string {
  return Buffer.from(text, "utf8").toString("utf8");
}

/** The most of a request method a span or a log line keeps (a proxy may pass one of 60 KiB). */
export const MAX_LOGGED_METHOD = 32;

/**
 * The request method as a span or a log line keeps it: cut to MAX_LOGGED_METHOD characters, with
 * anything shaped like a secret replaced (Envoy passes the client's method as it came, and nginx's
 * X-Original-Method too, so a client's key can arrive as the method; spans never pass the log's
 * scrubber).
 */
export function methodOnly(method: string): string {
  return redactText(method.length > MAX_LOGGED_METHOD ? `${method.slice(0, MAX_LOGGED_METHOD)}…` : method);
}

/**
 * The request path without its query string, which may carry anything, and with anything shaped
 * like a secret replaced (a client can put its key in the path too, a webhook-style URL or a
 * misconfigured SDK).
 */
export function pathOnly(path: string): string {
  const query = path.indexOf("?");
  const end = query === -1 ? path.length : query;
  // A path is refused past 16,384 characters, but a span and a log line keep 1,024 of any path
  // at most: a client can send one of 60,000, and each would go whole into the access log.
  if (end > MAX_LOGGED_PATH) return `${redactText(path.slice(0, MAX_LOGGED_PATH))}…`;
  return redactText(query === -1 ? path : path.slice(0, query));
}

/** The most of a request path a span or a log line keeps. */
export const MAX_LOGGED_PATH = 1024;

/**
 * Starts and ends decision spans. A Check's `traceparent` and `tracestate` headers (the
 * proxy's span) make the decision span its child; without them the decision starts a trace.
 */
export class DecisionTracer {
  readonly #tracer: Tracer;
  readonly #propagator = new W3CTraceContextPropagator();

  constructor(tracer: Tracer) {
    this.#tracer = tracer;
  }

  /** Opens the decision span of one Check. */
  start(entry: EntryPoint, method: string, path: string, headers: HeaderBag): DecisionTrace {
    const parent = this.#propagator.extract(ROOT_CONTEXT, headers, HEADER_GETTER);
    const span = this.#tracer.startSpan(
      CHECK_SPAN,
      { kind: SpanKind.SERVER, attributes: { [TraceAttr.entry]: entry, [ATTR_HTTP_REQUEST_METHOD]: methodOnly(method), [ATTR_URL_PATH]: pathOnly(path) } },
      parent,
    );
    return new DecisionTrace(this.#tracer, span, parent);
  }

  /** Ends the span with the decision: allow or deny, the reason, and the key by id (never its secret). */
  finish(traced: DecisionTrace, decision: Decision): void {
    const { span } = traced;
    if (span.isRecording()) {
      const attributes: Attributes = { [TraceAttr.decision]: decision.allow ? "allow" : "deny" };
      if (decision.allow) {
        attributes[TraceAttr.reason] = "OK";
        attributes[TraceAttr.code] = "OK";
        if (decision.route.requiredScopes.length > 0) attributes[TraceAttr.requiredScopes] = decision.route.requiredScopes.join(",");
      } else {
        attributes[TraceAttr.reason] = decision.reason;
        attributes[TraceAttr.code] = DENIALS[decision.reason].code;
      }
      const snapshot = decision.snapshot;
      if (snapshot !== undefined) {
        attributes[TraceAttr.keyId] = snapshot.key.id;
        attributes[TraceAttr.ownerId] = snapshot.account.ownerId;
      }
      if (traced.cacheTier !== undefined) attributes[TraceAttr.cacheTier] = traced.cacheTier;
      span.setAttributes(attributes);
    }
    span.end();
  }

  /** Ends the span of a Check that could not be decided (UNAVAILABLE). */
  fail(traced: DecisionTrace, error: unknown): void {
    const { span } = traced;
    span.setAttribute(TraceAttr.decision, "unavailable");
    if (traced.cacheTier !== undefined) span.setAttribute(TraceAttr.cacheTier, traced.cacheTier);
    failSpan(span, error);
    span.end();
  }
}

/** Marks a span failed; only the error's class is recorded, since its message may quote input. */
function failSpan(span: Span, error: unknown): void {
  const type = error instanceof Error ? error.name : typeof error;
  span.setAttribute("error.type", type);
  span.setStatus({ code: SpanStatusCode.ERROR, message: type });
}

/** Ends `span` when `promise` settles (marking it failed on a rejection) and returns the promise. */
export function traced<T>(span: Span, promise: Promise<T>): Promise<T> {
  promise.then(
    () => span.end(),
    (error: unknown) => {
      failSpan(span, error);
      span.end();
    },
  );
  return promise;
}

/** The attributes of a backend call's span: which system, and what was done. */
export function backendAttributes(system: string, operation: string): Attributes {
  return { [ATTR_DB_SYSTEM_NAME]: system, "db.operation.name": operation };
}

/** Runs one backend call as a child span of the decision: ended when its answer is in, failed if it throws or rejects. */
export function traceCall<T>(trace: DecisionTrace, name: string, attributes: Attributes, call: () => T | Promise<T>): T | Promise<T> {
  const span = trace.child(name, attributes);
  let result: T | Promise<T>;
  try {
    result = call();
  } catch (error) {
    failSpan(span, error);
    span.end();
    throw error;
  }
  if (result instanceof Promise) return traced(span, result);
  span.end();
  return result;
}
