import { noQuotaAllowance } from "../limits/limits.js";
import type { ChargeResult } from "../limits/limits.js";

/** Why a request was refused. Several reasons share one public code. */
export type DenyReason =
  | "MISSING_CREDENTIAL"
  | "MALFORMED_KEY"
  | "UNKNOWN_KEY"
  | "KEY_REVOKED"
  | "KEY_ROTATED"
  | "KEY_EXPIRED"
  | "KEY_DISABLED"
  | "PROJECT_MISMATCH"
  | "PLAN_REQUIRED"
  | "UNKNOWN_PLAN"
  | "MISSING_SCOPE"
  | "MISSING_ROLE"
  | "RATE_LIMITED"
  | "QUOTA_EXCEEDED"
  | "INSUFFICIENT_CREDITS"
  | "CONFLICTING_REQUEST"
  | "PROXY_MISCONFIGURED"
  | "INVALID_PATH"
  | "ROUTE_MISCONFIGURED";

/** The public face of a denial: HTTP status, error code and wording. */
export interface DenialSpec {
  httpStatus: 400 | 401 | 402 | 403 | 429 | 500;
  code: string;
  title: string;
  message: string;
  retryable: boolean;
  /** google.rpc.Code carried in CheckResponse.status. */
  grpcCode: number;
}

const UNAUTHENTICATED = 16;
const PERMISSION_DENIED = 7;
const RESOURCE_EXHAUSTED = 8;
const INVALID_ARGUMENT_CODE = 3;
const INTERNAL_CODE = 13;

/** The one table from reason to status, code and message, shared by every entry point. */
export const DENIALS: Readonly<Record<DenyReason, DenialSpec>> = {
  MISSING_CREDENTIAL: {
    httpStatus: 401,
    code: "UNAUTHENTICATED",
    title: "Sign in required",
    message: 'An API key is required. Send it as "Authorization: Bearer <key>" or "X-API-Key: <key>".',
    retryable: false,
    grpcCode: UNAUTHENTICATED,
  },
  MALFORMED_KEY: {
    httpStatus: 401,
    code: "UNAUTHENTICATED",
    title: "Sign in required",
    message: "The API key is malformed. Check that it was copied whole.",
    retryable: false,
    grpcCode: UNAUTHENTICATED,
  },
  UNKNOWN_KEY: {
    httpStatus: 401,
    code: "UNAUTHENTICATED",
    title: "Sign in required",
    message: "Invalid or expired API key.",
    retryable: false,
    grpcCode: UNAUTHENTICATED,
  },
  KEY_REVOKED: {
    httpStatus: 401,
    code: "KEY_REVOKED",
    title: "API key revoked",
    message: "This API key has been revoked.",
    retryable: false,
    grpcCode: UNAUTHENTICATED,
  },
  KEY_ROTATED: {
    httpStatus: 401,
    code: "KEY_REVOKED",
    title: "API key revoked",
    message: "This API key was rotated and its grace period has ended. Use its replacement.",
    retryable: false,
    grpcCode: UNAUTHENTICATED,
  },
  KEY_EXPIRED: {
    httpStatus: 401,
    code: "KEY_EXPIRED",
    title: "API key expired",
    message: "This API key has expired.",
    retryable: false,
    grpcCode: UNAUTHENTICATED,
  },
  KEY_DISABLED: {
    httpStatus: 401,
    code: "KEY_DISABLED",
    title: "API key disabled",
    message: "This API key is disabled. Ask the API's owner to enable it again.",
    retryable: false,
    grpcCode: UNAUTHENTICATED,
  },
  PROJECT_MISMATCH: {
    httpStatus: 403,
    code: "FORBIDDEN",
    title: "Access denied",
    message: "This API key is locked to another project.",
    retryable: false,
    grpcCode: PERMISSION_DENIED,
  },
  PLAN_REQUIRED: {
    httpStatus: 402,
    code: "PLAN_REQUIRED",
    title: "Plan required",
    message: "This API key is valid, but its account has no active subscription.",
    retryable: false,
    grpcCode: PERMISSION_DENIED,
  },
  // The account's plan is not in the policy in force (renamed or removed since the account was put
  // on it). Refused, never judged on another plan's limits; a reason of its own, so
  // keygate_checks_total{reason="UNKNOWN_PLAN"} tells the operator's mistake from a lapsed subscription.
  UNKNOWN_PLAN: {
    httpStatus: 402,
    code: "PLAN_REQUIRED",
    title: "Plan required",
    message: "This API key is valid, but its account is on a plan that is not configured. Ask the API's owner to move the account to a configured plan.",
    retryable: false,
    grpcCode: PERMISSION_DENIED,
  },
  MISSING_SCOPE: {
    httpStatus: 403,
    code: "FORBIDDEN",
    title: "Access denied",
    message: "This API key does not have the required scope.",
    retryable: false,
    grpcCode: PERMISSION_DENIED,
  },
  MISSING_ROLE: {
    httpStatus: 403,
    code: "FORBIDDEN",
    title: "Access denied",
    message: "This API key's account does not have the role this route requires.",
    retryable: false,
    grpcCode: PERMISSION_DENIED,
  },
  RATE_LIMITED: {
    httpStatus: 429,
    code: "RATE_LIMITED",
    title: "Too many requests",
    message: "The rate limit was exceeded. Retry after the time in the Retry-After header.",
    retryable: true,
    grpcCode: RESOURCE_EXHAUSTED,
  },
  QUOTA_EXCEEDED: {
    httpStatus: 402,
    code: "QUOTA_EXCEEDED",
    title: "Quota exceeded",
    message: "The daily quota is used up.",
    retryable: true,
    grpcCode: RESOURCE_EXHAUSTED,
  },
  INSUFFICIENT_CREDITS: {
    httpStatus: 402,
    code: "INSUFFICIENT_CREDITS",
    title: "Insufficient credits",
    message: "The account has run out of credits.",
    retryable: false,
    grpcCode: RESOURCE_EXHAUSTED,
  },
  // HTTP mode only: the request names its original method or path twice, with different values.
  CONFLICTING_REQUEST: {
    httpStatus: 400,
    code: "CONFLICTING_REQUEST",
    title: "Bad request",
    message: "The request names its original method or path more than once, with different values.",
    retryable: false,
    grpcCode: INVALID_ARGUMENT_CODE,
  },
  // HTTP mode only: the source KEYGATE_HTTP_AUTHZ_PROXY names is missing. Only a bare /check gets
  // it, which Envoy never sends, so no failure_mode_allow can turn this 500 into an allow.
  PROXY_MISCONFIGURED: {
    httpStatus: 500,
    code: "PROXY_MISCONFIGURED",
    title: "Proxy misconfigured",
    message: "keygate cannot tell which request to judge: KEYGATE_HTTP_AUTHZ_PROXY must name the proxy in front of it.",
    retryable: false,
    grpcCode: INTERNAL_CODE,
  },
  // A path (or a method's letter case) that servers could read differently; refused before the
  // key is looked up. The message names what is wrong (routes.ts), never echoing the request.
  INVALID_PATH: {
    httpStatus: 400,
    code: "INVALID_REQUEST",
    title: "Invalid request",
    message: "The request path or method is not in canonical form, so it is refused.",
    retryable: false,
    grpcCode: INVALID_ARGUMENT_CODE,
  },
  // gRPC only: Envoy's per-route context_extensions are unusable (a cost that is not a number).
  // A denial, not a gRPC error, which failure_mode_allow would turn into an allow.
  ROUTE_MISCONFIGURED: {
    httpStatus: 500,
    code: "ROUTE_MISCONFIGURED",
    title: "Gateway misconfigured",
    message: "The gateway's per-route settings for this request are invalid. This is a gateway configuration error.",
    retryable: false,
    grpcCode: INTERNAL_CODE,
  },
};

/**
 * QUOTA_EXCEEDED of a daily quota of 0 (the plan, or test mode, includes none of its requests):
 * the same status and code, and counted under the same reason, but not retryable, as midnight
 * brings another 0 (and it carries no Retry-After).
 */
export const NO_QUOTA_ALLOWANCE: DenialSpec = {
  ...DENIALS.QUOTA_EXCEEDED,
  message: "The plan includes no requests (a daily quota of 0).",
  retryable: false,
};

/** The spec a denial is answered with: its reason's, or NO_QUOTA_ALLOWANCE for a quota of 0. */
export function denialSpec(denial: { reason: DenyReason; limits?: ChargeResult | undefined }): DenialSpec {
  if (denial.reason === "QUOTA_EXCEEDED" && denial.limits !== undefined && noQuotaAllowance(denial.limits.quota)) return NO_QUOTA_ALLOWANCE;
  return DENIALS[denial.reason];
}

/**
 * The JSON error body, identical for gRPC denied_response and the HTTP mode. It echoes the
 * request id only when it is at most MAX_ECHOED_REQUEST_ID printable ASCII characters, and an
 * empty one otherwise.
 */
export function errorBody(spec: DenialSpec, message: string, requestId: string): string {
  const echoed = JSON.stringify(echoedRequestId(requestId));
  // The standard wording is the common case (every bad-key flood), so its prefix is kept.
  if (message === spec.message) {
    let prefix = STANDARD_PREFIXES.get(spec);
    if (prefix === undefined) {
      prefix = bodyPrefix(spec, message);
      STANDARD_PREFIXES.set(spec, prefix);
    }
    return `${prefix}${echoed}}`;
  }
  return `${bodyPrefix(spec, message)}${echoed}}`;
}

/**
 * Longest request id a denial echoes: room for a UUID (Envoy's x-request-id), a W3C traceparent
 * or an AWS trace header. The id is the client's to choose (Envoy passes x-request-id on), and
 * the whole of a 4 MiB Check could be one: echoed, and JSON-escaped six bytes to a control
 * character, it would make a denial 24 MiB.
 */
export const MAX_ECHOED_REQUEST_ID = 128;

/** The request id an answer echoes: `requestId` when isEchoable, else "". */
export function echoedRequestId(requestId: string): string {
  return isEchoable(requestId) ? requestId : "";
}

/** At most MAX_ECHOED_REQUEST_ID characters, each printable ASCII (0x20-0x7E). */
function isEchoable(requestId: string): boolean {
  if (requestId.length > MAX_ECHOED_REQUEST_ID) return false;
  for (let i = 0; i < requestId.length; i++) {
    const c = requestId.charCodeAt(i);
    if (c < 0x20 || c > 0x7e) return false;
  }
  return true;
}

const STANDARD_PREFIXES = new Map<DenialSpec, string>();

/** Everything of the body before the request id's value: `{"success":false,"error":{…},"requestId":`. */
function bodyPrefix(spec: DenialSpec, message: string): string {
  const error = { title: spec.title, message, retryable: spec.retryable, statusCode: spec.httpStatus, code: spec.code };
  return `{"success":false,"error":${JSON.stringify(error)},"requestId":`;
}
