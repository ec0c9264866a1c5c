import { grantedHeaderNames, headersToRemove, identityHeaders } from "./identity.js";
import { limitHeaders } from "./rate-headers.js";
import type { Decision } from "./pipeline.js";
import { DENIALS, denialSpec, echoedRequestId, errorBody } from "./reasons.js";

/** An HTTP-mode answer: what nginx, Caddy, Traefik or Envoy's HTTP service receive. */
export interface HttpAnswer {
  status: number;
  headers: Record<string, string>;
  body: string;
}

/** Maps a decision to the HTTP answer. Allow is 200 with identity headers; deny mirrors gRPC. */
export function toHttpAnswer(decision: Decision, clientHeaderNames: Iterable<string>, requestId: string, nowMs: number): HttpAnswer {
  if (decision.allow) {
    const granted = identityHeaders(decision.snapshot);
    const headers: Record<string, string> = Object.fromEntries(granted);
    // Always present, empty for a key without a project: a proxy that copies a fixed list of
    // headers (Caddy's copy_headers) must not be left to copy a client-sent value or nothing.
    headers["x-keygate-project-id"] ??= "";
    for (const [name, value] of decision.forwarded) headers[name] = value;
    // Each forwarded name too, empty where the key has no value (or one keygate will not put in a
    // header): Caddy 2.6 copies a listed name the answer lacks as its placeholder text.
    if (decision.forwardHeaders !== undefined) for (const name of decision.forwardHeaders) headers[name] ??= "";
    const remove = headersToRemove(clientHeaderNames, grantedHeaderNames(decision.snapshot, decision.forwarded), decision.credentialHeaders);
    // Envoy's HTTP ext_authz service reads this list and strips the headers before upstream.
    if (remove.length > 0) headers["x-envoy-auth-headers-to-remove"] = remove.join(",");
    if (decision.limits !== null) for (const [k, v] of limitHeaders(decision.limits, nowMs)) headers[k] = v;
    return { status: 200, headers, body: "" };
  }
  const spec = denialSpec(decision);
  const headers: Record<string, string> = { "content-type": "application/json" };
  if (spec.httpStatus === 401) headers["www-authenticate"] = "Bearer";
  if (decision.retryAfterSeconds !== undefined) headers["retry-after"] = String(decision.retryAfterSeconds);
  if (decision.limits !== undefined) for (const [k, v] of limitHeaders(decision.limits, nowMs)) headers[k] = v;
  return { status: spec.httpStatus, headers, body: errorBody(spec, decision.message, requestId) };
}

/** The answer when the store or cache fails and the key cannot be decided. */
export function unavailableAnswer(requestId: string): HttpAnswer {
  return {
    status: 503,
    headers: { "content-type": "application/json", "retry-after": "1" },
    body: JSON.stringify({
      success: false,
      error: {
        title: "Service unavailable",
        message: "The API key could not be checked right now. Retry shortly.",
        retryable: true,
        statusCode: 503,
        code: "UNAVAILABLE",
      },
      requestId: echoedRequestId(requestId),
    }),
  };
}

/** Statuses the denial echo will render (every denial's, and 503); anything else is a failure to decide. */
const ECHO_STATUSES = new Set<number>([...Object.values(DENIALS).map((spec) => spec.httpStatus), 503]);

/**
 * nginx's auth_request passes on only 2xx, 401 and 403 and drops the subrequest's body. When the
 * proxy asks for it (X-Keygate-Denial-Headers), a denial also carries its status and body in
 * X-Keygate-Status / X-Keygate-Body (base64url), so the proxy's error page can have keygate
 * render the exact answer again through /denied, without a second decision.
 */
export function withDenialHeaders(answer: HttpAnswer): HttpAnswer {
  if (answer.status < 400) return answer;
  return {
    ...answer,
    headers: { ...answer.headers, "x-keygate-status": String(answer.status), "x-keygate-body": Buffer.from(answer.body, "utf8").toString("base64url") },
  };
}

/** Renders a denial from the headers `withDenialHeaders` added, for the proxy's error page. */
export function renderDeniedEcho(statusText: string | undefined, bodyBase64: string | undefined, requestId: string): HttpAnswer {
  const status = Number(statusText);
  if (!ECHO_STATUSES.has(status) || bodyBase64 === undefined || !/^[A-Za-z0-9_-]*$/.test(bodyBase64)) return unavailableAnswer(requestId);
  const body = Buffer.from(bodyBase64, "base64url").toString("utf8");
  // nginx already passes on the WWW-Authenticate of a 401 from the auth subrequest.
  return { status, headers: { "content-type": "application/json" }, body };
}
