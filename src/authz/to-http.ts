import { identityHeaders, spoofedIdentityHeaders } from "./identity.js";
import { limitHeaders } from "./rate-headers.js";
import type { Decision } from "./pipeline.js";
import { DENIALS, errorBody } from "./reasons.js";

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
    const remove = spoofedIdentityHeaders(clientHeaderNames, granted);
    if (decision.credentialHeader !== "") remove.unshift(decision.credentialHeader);
    // Envoy's HTTP ext_authz service reads this list and strips the headers before upstream.
    if (remove.length > 0) headers["x-envoy-auth-headers-to-remove"] = remove.join(",");
    if (decision.limits !== null) for (const [k, v] of limitHeaders(decision.limits, nowMs)) headers[k] = v;
    return { status: 200, headers, body: "" };
  }
  const spec = DENIALS[decision.reason];
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
      requestId,
    }),
  };
}
