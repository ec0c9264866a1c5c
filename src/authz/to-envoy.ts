import { create, toBinary } from "@bufbuild/protobuf";
import { BinaryWriter, WireType } from "@bufbuild/protobuf/wire";
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
import { headersToRemove, identityHeaderNames, identityHeaders } from "./identity.js";
import { limitHeaders } from "./rate-headers.js";
import type { Allow, Decision, Deny } from "./pipeline.js";
import { DENIALS, errorBody } from "./reasons.js";
import type { DenyReason } from "./reasons.js";

// Messages are only read when encoded, so constant parts are shared between responses.
const OK_STATUS = create(StatusSchema, { code: 0 });

/** The namespace Envoy files keygate's dynamic metadata under. */
export const METADATA_NAMESPACE = "envoy.filters.http.ext_authz";

// Field numbers of envoy/service/auth/v3/external_auth.proto and envoy/config/core/v3/base.proto.
const CheckResponseField = { deniedResponse: 2, okResponse: 3 } as const;
const OkHttpResponseField = { headersToRemove: 5, responseHeadersToAdd: 6 } as const;
const DeniedHttpResponseField = { headers: 2, body: 3 } as const;
const HeaderValueOptionField = { header: 1, appendAction: 3 } as const;
const HeaderValueField = { key: 1, value: 2 } as const;

function header(key: string, value: string): HeaderValueOption {
  // OVERWRITE replaces any client-sent value of the same name, so identity cannot be spoofed.
  return create(HeaderValueOptionSchema, {
    header: { key, value },
    appendAction: HeaderValueOption_HeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD,
  });
}

/** The metadata an allow files under METADATA_NAMESPACE, for Envoy's access log and rate-limit filters. */
function identityMetadata(snapshot: KeySnapshot): { [field: string]: string } {
  const { key, account } = snapshot;
  return {
    key_id: key.id,
    owner_id: key.ownerId,
    project_id: key.projectId ?? "",
    plan: account.plan,
    role: account.role,
    mode: key.mode,
    scopes: key.scopes.join(","),
  };
}

/**
 * The parts of an allow that depend only on the key, encoded. Only the bytes are kept per cached
 * key (message objects for them would cost several times more memory, and only toCheckResponse,
 * which tests use, needs those: it builds them when asked). The bytes are held as latin1 strings,
 * one character a byte: a string is one V8 heap object, where a Buffer adds an ArrayBuffer, a
 * backing store and its bookkeeping, about 200 bytes more per key.
 */
interface EnvoyIdentity {
  /** OkHttpResponse { headers } encoded. */
  okHead: string;
  /** CheckResponse { dynamic_metadata } encoded: the field's tag, length and Struct. */
  metadataField: string;
}

// Built once per cached snapshot: the same key's identity headers and metadata every time.
const identities = new WeakMap<KeySnapshot, EnvoyIdentity>();

function envoyIdentity(snapshot: KeySnapshot): EnvoyIdentity {
  let identity = identities.get(snapshot);
  if (identity === undefined) {
    const okHead = toBinary(OkHttpResponseSchema, create(OkHttpResponseSchema, { headers: identityHeaderOptions(snapshot) }));
    const metadataField = toBinary(CheckResponseSchema, create(CheckResponseSchema, { dynamicMetadata: identityMetadata(snapshot) }));
    identity = { okHead: latin1(okHead), metadataField: latin1(metadataField) };
    identities.set(snapshot, identity);
  }
  return identity;
}

function latin1(bytes: Uint8Array): string {
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString("latin1");
}

function identityHeaderOptions(snapshot: KeySnapshot): HeaderValueOption[] {
  return identityHeaders(snapshot).map(([k, v]) => header(k, v));
}

/** What of an allow changes per request: headers to strip, and the caller's limit headers. */
function allowRest(decision: Allow, clientHeaderNames: Iterable<string>, nowMs: number): { remove: string[]; add: ReadonlyArray<[string, string]> } {
  const remove = headersToRemove(clientHeaderNames, identityHeaderNames(decision.snapshot), decision.credentialHeaders);
  return { remove, add: decision.limits === null ? [] : limitHeaders(decision.limits, nowMs) };
}

/** What of a denial changes per request: Retry-After and limit headers, and the body. */
function denialRest(decision: Deny, requestId: string, nowMs: number): { headers: Array<[string, string]>; body: string } {
  const headers: Array<[string, string]> = [];
  if (decision.retryAfterSeconds !== undefined) headers.push(["retry-after", String(decision.retryAfterSeconds)]);
  if (decision.limits !== undefined) headers.push(...limitHeaders(decision.limits, nowMs));
  return { headers, body: errorBody(DENIALS[decision.reason], decision.message, requestId) };
}

/**
 * Maps a decision to Envoy's CheckResponse message. `clientHeaderNames` are the request's header
 * names. The server sends encodeCheckResponse's bytes, which are this message's encoding.
 */
export function toCheckResponse(decision: Decision, clientHeaderNames: Iterable<string>, requestId: string, nowMs: number): CheckResponse {
  if (decision.allow) {
    const rest = allowRest(decision, clientHeaderNames, nowMs);
    return create(CheckResponseSchema, {
      status: OK_STATUS,
      httpResponse: {
        case: "okResponse",
        value: create(OkHttpResponseSchema, {
          headers: identityHeaderOptions(decision.snapshot),
          headersToRemove: rest.remove,
          responseHeadersToAdd: rest.add.map(([k, v]) => header(k, v)),
        }),
      },
      dynamicMetadata: identityMetadata(decision.snapshot),
    });
  }
  const parts = denialParts(decision.reason);
  const rest = denialRest(decision, requestId, nowMs);
  return create(CheckResponseSchema, {
    status: parts.status,
    httpResponse: {
      case: "deniedResponse",
      value: create(DeniedHttpResponseSchema, {
        status: parts.httpStatus,
        headers: [...parts.headers, ...rest.headers.map(([k, v]) => header(k, v))],
        body: rest.body,
      }),
    },
  });
}

const OK_STATUS_FIELD = toBinary(CheckResponseSchema, create(CheckResponseSchema, { status: OK_STATUS }));

/**
 * The wire encoding of toCheckResponse's message, byte for byte, without encoding its fixed parts
 * again: they are kept encoded per key (identity headers, metadata) and per reason (status,
 * standard headers). Fields are written in field-number order as protobuf-es writes them, and an
 * embedded message's encoding is the concatenation of its fixed part's and the request's part's,
 * which hold disjoint fields in ascending order.
 */
export function encodeCheckResponse(decision: Decision, clientHeaderNames: Iterable<string>, requestId: string, nowMs: number): Uint8Array {
  if (decision.allow) return encodeAllow(decision, clientHeaderNames, nowMs);
  const parts = denialParts(decision.reason);
  const rest = encodeDenialRest(decision, requestId, nowMs);
  return join([parts.statusField, fieldHead(CheckResponseField.deniedResponse, parts.deniedHead.length + rest.length), parts.deniedHead, rest]);
}

// The per-request parts are written field by field: protobuf-es's reflective toBinary costs more
// than the rest of a cached Check. The encoding test holds them to toBinary's bytes.

// Tags of the length-delimited fields an allow writes per request, and HeaderValueOption's
// append_action (field 3, varint) set to OVERWRITE_IF_EXISTS_OR_ADD.
const REMOVE_TAG = (OkHttpResponseField.headersToRemove << 3) | WireType.LengthDelimited;
const ADD_TAG = (OkHttpResponseField.responseHeadersToAdd << 3) | WireType.LengthDelimited;
const HEADER_TAG = (HeaderValueOptionField.header << 3) | WireType.LengthDelimited;
const KEY_TAG = (HeaderValueField.key << 3) | WireType.LengthDelimited;
const VALUE_TAG = (HeaderValueField.value << 3) | WireType.LengthDelimited;
const APPEND_ACTION = [(HeaderValueOptionField.appendAction << 3) | WireType.Varint, HeaderValueOption_HeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD] as const;

/** Bytes of a length-delimited field holding `length` bytes, with its tag (one byte). */
function fieldBytes(length: number): number {
  return 1 + varintLength(length) + length;
}

/** A HeaderValue's encoding: key and value fields, each left out when empty (proto3). */
function headerValueBytes(keyBytes: number, valueBytes: number): number {
  return (keyBytes === 0 ? 0 : fieldBytes(keyBytes)) + (valueBytes === 0 ? 0 : fieldBytes(valueBytes));
}

/**
 * An allow in one buffer: the OK status, the ok_response field (the key's encoded identity
 * headers, then headers_to_remove and response_headers_to_add), then the key's encoded metadata.
 */
function encodeAllow(decision: Allow, clientHeaderNames: Iterable<string>, nowMs: number): Uint8Array {
  const { okHead, metadataField } = envoyIdentity(decision.snapshot);
  const { remove, add } = allowRest(decision, clientHeaderNames, nowMs);
  let restLength = 0;
  for (const name of remove) restLength += fieldBytes(Buffer.byteLength(name));
  // Sizes of each added header: [key bytes, value bytes, HeaderValue bytes], three per header.
  const sizes = new Array<number>(add.length * 3);
  for (let i = 0; i < add.length; i++) {
    const [k, v] = add[i] as [string, string];
    const keyBytes = Buffer.byteLength(k);
    const valueBytes = Buffer.byteLength(v);
    const headerBytes = headerValueBytes(keyBytes, valueBytes);
    sizes[i * 3] = keyBytes;
    sizes[i * 3 + 1] = valueBytes;
    sizes[i * 3 + 2] = headerBytes;
    restLength += fieldBytes(fieldBytes(headerBytes) + APPEND_ACTION.length);
  }
  const okLength = okHead.length + restLength;
  const out = Buffer.allocUnsafe(OK_STATUS_FIELD.length + fieldBytes(okLength) + metadataField.length);
  out.set(OK_STATUS_FIELD, 0);
  let at = OK_STATUS_FIELD.length;
  out[at++] = OK_RESPONSE_TAG;
  at = writeVarint(out, at, okLength);
  at += out.write(okHead, at, "latin1");
  for (const name of remove) at = writeString(out, at, REMOVE_TAG, name, Buffer.byteLength(name));
  for (let i = 0; i < add.length; i++) {
    const [k, v] = add[i] as [string, string];
    const keyBytes = sizes[i * 3] as number;
    const valueBytes = sizes[i * 3 + 1] as number;
    const headerBytes = sizes[i * 3 + 2] as number;
    out[at++] = ADD_TAG;
    at = writeVarint(out, at, fieldBytes(headerBytes) + APPEND_ACTION.length);
    out[at++] = HEADER_TAG;
    at = writeVarint(out, at, headerBytes);
    if (keyBytes !== 0) at = writeString(out, at, KEY_TAG, k, keyBytes);
    if (valueBytes !== 0) at = writeString(out, at, VALUE_TAG, v, valueBytes);
    out[at++] = APPEND_ACTION[0];
    out[at++] = APPEND_ACTION[1];
  }
  out.write(metadataField, at, "latin1");
  return out;
}

/** Writes a length-delimited string field (`bytes` = its UTF-8 length); returns the position after it. */
function writeString(out: Buffer, at: number, tag: number, value: string, bytes: number): number {
  out[at] = tag;
  const start = writeVarint(out, at + 1, bytes);
  return start + out.write(value, start, "utf8");
}

/** DeniedHttpResponse { headers (the request's own), body } encoded. */
function encodeDenialRest(decision: Deny, requestId: string, nowMs: number): Uint8Array {
  const rest = denialRest(decision, requestId, nowMs);
  const writer = new BinaryWriter();
  for (const [k, v] of rest.headers) writeHeaderOption(writer, DeniedHttpResponseField.headers, k, v);
  if (rest.body !== "") writer.tag(DeniedHttpResponseField.body, WireType.LengthDelimited).string(rest.body);
  return writer.finish();
}

/** A HeaderValueOption field as header() builds it: the header, then OVERWRITE_IF_EXISTS_OR_ADD. */
function writeHeaderOption(writer: BinaryWriter, fieldNo: number, key: string, value: string): void {
  writer.tag(fieldNo, WireType.LengthDelimited).fork();
  writer.tag(HeaderValueOptionField.header, WireType.LengthDelimited).fork();
  if (key !== "") writer.tag(HeaderValueField.key, WireType.LengthDelimited).string(key);
  if (value !== "") writer.tag(HeaderValueField.value, WireType.LengthDelimited).string(value);
  writer.join();
  writer.tag(HeaderValueOptionField.appendAction, WireType.Varint).int32(HeaderValueOption_HeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD);
  writer.join();
}

// CheckResponse.ok_response's tag: field 3, length-delimited.
const OK_RESPONSE_TAG = (CheckResponseField.okResponse << 3) | WireType.LengthDelimited;

/** Bytes of `value` as a varint (value < 2^32). */
function varintLength(value: number): number {
  let length = 1;
  for (let rest = value >>> 7; rest !== 0; rest >>>= 7) length++;
  return length;
}

/** Writes `value` (< 2^32) as a varint at `at`; returns the position after it. */
function writeVarint(out: Uint8Array, at: number, value: number): number {
  let rest = value >>> 0;
  let pos = at;
  while (rest > 0x7f) {
    out[pos++] = (rest & 0x7f) | 0x80;
    rest >>>= 7;
  }
  out[pos++] = rest;
  return pos;
}

/** The tag and length of a length-delimited field whose payload follows. */
function fieldHead(fieldNo: number, length: number): Uint8Array {
  return new BinaryWriter().tag(fieldNo, WireType.LengthDelimited).uint32(length).finish();
}

function join(parts: Uint8Array[]): Uint8Array {
  return Buffer.concat(parts);
}

/** The parts of a denial that depend only on its reason. */
interface DenialParts {
  status: Status;
  httpStatus: HttpStatus;
  /** Shared by every answer for the reason: extend a copy, never this array. */
  headers: HeaderValueOption[];
  /** CheckResponse { status } encoded. */
  statusField: Uint8Array;
  /** DeniedHttpResponse { status, headers } encoded. */
  deniedHead: Uint8Array;
}

// Built once per reason: a flood of bad keys is answered without rebuilding them.
const DENIAL_PARTS = new Map<DenyReason, DenialParts>();

function denialParts(reason: DenyReason): DenialParts {
  let parts = DENIAL_PARTS.get(reason);
  if (parts === undefined) {
    const spec = DENIALS[reason];
    const headers = [header("content-type", "application/json")];
    if (spec.httpStatus === 401) headers.push(header("www-authenticate", "Bearer"));
    const status = create(StatusSchema, { code: spec.grpcCode, message: spec.code });
    const httpStatus = create(HttpStatusSchema, { code: spec.httpStatus });
    parts = {
      status,
      httpStatus,
      headers,
      statusField: toBinary(CheckResponseSchema, create(CheckResponseSchema, { status })),
      deniedHead: toBinary(DeniedHttpResponseSchema, create(DeniedHttpResponseSchema, { status: httpStatus, headers })),
    };
    DENIAL_PARTS.set(reason, parts);
  }
  return parts;
}
