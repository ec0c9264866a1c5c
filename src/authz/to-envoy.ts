import { create } from "@bufbuild/protobuf";
import { HeaderValueOption_HeaderAppendAction, HeaderValueOptionSchema } from "../gen/envoy/config/core/v3/base_pb.js";
import type { HeaderValueOption } from "../gen/envoy/config/core/v3/base_pb.js";
import {
  CheckResponseSchema,
  DeniedHttpResponseSchema,
  OkHttpResponseSchema,
} from "../gen/envoy/service/auth/v3/external_auth_pb.js";
import type { CheckResponse } from "../gen/envoy/service/auth/v3/external_auth_pb.js";
import { StatusSchema } from "../gen/google/rpc/status_pb.js";
import type { Status } from "../gen/google/rpc/status_pb.js";
import { HttpStatusSchema } from "../gen/envoy/type/v3/http_status_pb.js";
import type { HttpStatus } from "../gen/envoy/type/v3/http_status_pb.js";
import type { KeySnapshot } from "../store/store.js";
import { identityHeaders, spoofedIdentityHeaders } from "./identity.js";
import { limitHeaders } from "./rate-headers.js";
import type { Decision } from "./pipeline.js";
import { DENIALS, errorBody } from "./reasons.js";
import type { DenyReason } from "./reasons.js";

// Messages are only read when encoded, so constant parts are shared between responses.
const OK_STATUS = create(StatusSchema, { code: 0 });

/** The namespace Envoy files keygate's dynamic metadata under. */
export const METADATA_NAMESPACE = "envoy.filters.http.ext_authz";

function header(key: string, value: string): HeaderValueOption {
  // OVERWRITE replaces any client-sent value of the same name, so identity cannot be spoofed.
  return create(HeaderValueOptionSchema, {
    header: { key, value },
    appendAction: HeaderValueOption_HeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD,
  });
}

interface EnvoyIdentity {
  headers: HeaderValueOption[];
  metadata: { [field: string]: string };
}

// Built once per cached snapshot: the same key's identity headers and metadata every time.
const identities = new WeakMap<KeySnapshot, EnvoyIdentity>();

function envoyIdentity(snapshot: KeySnapshot): EnvoyIdentity {
  let identity = identities.get(snapshot);
  if (identity === undefined) {
    const { key, account } = snapshot;
    identity = {
      headers: identityHeaders(snapshot).map(([k, v]) => header(k, v)),
      metadata: {
        key_id: key.id,
        owner_id: key.ownerId,
        project_id: key.projectId ?? "",
        plan: account.plan,
        mode: key.mode,
        scopes: key.scopes.join(","),
      },
    };
    identities.set(snapshot, identity);
  }
  return identity;
}

/** Maps a decision to Envoy's CheckResponse. `clientHeaderNames` are the request's header names. */
export function toCheckResponse(decision: Decision, clientHeaderNames: Iterable<string>, requestId: string, nowMs: number): CheckResponse {
  if (decision.allow) {
    const identity = envoyIdentity(decision.snapshot);
    const remove = spoofedIdentityHeaders(clientHeaderNames, identityHeaders(decision.snapshot));
    if (decision.credentialHeader !== "") remove.unshift(decision.credentialHeader);
    return create(CheckResponseSchema, {
      status: OK_STATUS,
      httpResponse: {
        case: "okResponse",
        value: create(OkHttpResponseSchema, {
          headers: identity.headers,
          headersToRemove: remove,
          responseHeadersToAdd: decision.limits === null ? [] : limitHeaders(decision.limits, nowMs).map(([k, v]) => header(k, v)),
        }),
      },
      dynamicMetadata: identity.metadata,
    });
  }
  const parts = denialParts(decision.reason);
  let headers = parts.headers;
  if (decision.retryAfterSeconds !== undefined || decision.limits !== undefined) {
    headers = parts.headers.slice();
    if (decision.retryAfterSeconds !== undefined) headers.push(header("retry-after", String(decision.retryAfterSeconds)));
    if (decision.limits !== undefined) for (const [k, v] of limitHeaders(decision.limits, nowMs)) headers.push(header(k, v));
  }
  return create(CheckResponseSchema, {
    status: parts.status,
    httpResponse: {
      case: "deniedResponse",
      value: create(DeniedHttpResponseSchema, {
        status: parts.httpStatus,
        headers,
        body: errorBody(DENIALS[decision.reason], decision.message, requestId),
      }),
    },
  });
}

/** The parts of a denial that depend only on its reason. */
interface DenialParts {
  status: Status;
  httpStatus: HttpStatus;
  /** Shared by every answer for the reason: extend a copy, never this array. */
  headers: HeaderValueOption[];
}

// Built once per reason: a flood of bad keys is answered without rebuilding them.
const DENIAL_PARTS = new Map<DenyReason, DenialParts>();

function denialParts(reason: DenyReason): DenialParts {
  let parts = DENIAL_PARTS.get(reason);
  if (parts === undefined) {
    const spec = DENIALS[reason];
    const headers = [header("content-type", "application/json")];
    if (spec.httpStatus === 401) headers.push(header("www-authenticate", "Bearer"));
    parts = {
      status: create(StatusSchema, { code: spec.grpcCode, message: spec.code }),
      httpStatus: create(HttpStatusSchema, { code: spec.httpStatus }),
      headers,
    };
    DENIAL_PARTS.set(reason, parts);
  }
  return parts;
}
