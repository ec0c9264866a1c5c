import { create, toBinary } from "@bufbuild/protobuf";
import { WireType } from "@bufbuild/protobuf/wire";
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
import type { CheckSnapshot } from "../store/store.js";
import { IDENTITY_FIELDS, PROJECT_FIELD, grantedHeaderNames, headersToRemove, identityHeaders, identityValues } from "./identity.js";
import { limitHeaders } from "./rate-headers.js";
import { directLimits, sizeLimitHeaders, writeLimitHeaders } from "./limit-headers.js";
import { ADD_TAG, APPEND_ACTION, HEADER_TAG, KEY_TAG, VALUE_TAG, copyBytes, fieldBytes, nameField, utf8Length, writeAppendAction, writeOptionHead, writeString, writeText, writeVarint } from "./wire.js";
import type { Allow, Decision, Deny } from "./pipeline.js";
import { DENIALS, denialSpec, errorBody } from "./reasons.js";
import type { DenyReason } from "./reasons.js";

// Messages are only read when encoded, so constant parts are shared between responses.
const OK_STATUS = create(StatusSchema, { code: 0 });

/** The namespace Envoy files keygate's dynamic metadata under. */
export const METADATA_NAMESPACE = "envoy.filters.http.ext_authz";

// Field numbers of envoy/service/auth/v3/external_auth.proto and envoy/config/core/v3/base.proto.
const CheckResponseField = { deniedResponse: 2, okResponse: 3, dynamicMetadata: 4 } as const;
const OkHttpResponseField = { headers: 2, headersToRemove: 5, responseHeadersToAdd: 6 } as const;
// google/protobuf/struct.proto: Struct.fields (map entries: key 1, value 2) and Value.string_value.
const StructField = { fields: 1 } as const;
const MapEntryField = { key: 1, value: 2 } as const;
const ValueField = { stringValue: 3 } as const;
const DeniedHttpResponseField = { headers: 2, body: 3 } as const;

function header(key: string, value: string): HeaderValueOption {
  // OVERWRITE replaces any client-sent value of the same name, so identity cannot be spoofed.
  return create(HeaderValueOptionSchema, {
    header: { key, value },
    appendAction: HeaderValueOption_HeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD,
  });
}

const NO_HEADERS: ReadonlyArray<[string, string]> = [];
// The metadata fields go out in the order keygate has always written them, scopes last.
const METADATA_ORDER: readonly number[] = [0, 1, 2, 4, 5, 6, 3];

function identityMetadata(snapshot: CheckSnapshot): { [field: string]: string } {
  const values = identityValues(snapshot);
  const metadata: { [field: string]: string } = {};
  for (const i of METADATA_ORDER) metadata[(IDENTITY_FIELDS[i] as (typeof IDENTITY_FIELDS)[number]).metadata] = values[i] as string;
  return metadata;
}

function identityHeaderOptions(snapshot: CheckSnapshot): HeaderValueOption[] {
  return identityHeaders(snapshot).map(([k, v]) => header(k, v));
}

/** What of an allow changes per request: headers to strip, and the caller's limit headers. */
function allowRest(decision: Allow, clientHeaderNames: Iterable<string>, nowMs: number): { remove: string[]; add: ReadonlyArray<[string, string]> } {
  const remove = headersToRemove(clientHeaderNames, grantedHeaderNames(decision.snapshot, decision.forwarded), decision.credentialHeaders);
  return { remove, add: decision.limits === null ? [] : limitHeaders(decision.limits, nowMs) };
}

/** What of a denial changes per request: Retry-After and limit headers, and the body. */
function denialRest(decision: Deny, requestId: string, nowMs: number): { headers: Array<[string, string]>; body: string } {
  const headers: Array<[string, string]> = [];
  if (decision.retryAfterSeconds !== undefined) headers.push(["retry-after", String(decision.retryAfterSeconds)]);
  if (decision.limits !== undefined) headers.push(...limitHeaders(decision.limits, nowMs));
  return { headers, body: errorBody(denialSpec(decision), decision.message, requestId) };
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
          headers: [...identityHeaderOptions(decision.snapshot), ...decision.forwarded.map(([k, v]) => header(k, v))],
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
 * The wire encoding of toCheckResponse's message, byte for byte, without protobuf-es's reflective
 * encoder: an allow is written field by field, a denial's fixed parts are kept encoded per reason
 * (status, standard headers). Fields are written in field-number order as protobuf-es writes them, and an
 * embedded message's encoding is the concatenation of its fixed part's and the request's part's,
 * which hold disjoint fields in ascending order.
 */
export function encodeCheckResponse(decision: Decision, clientHeaderNames: Iterable<string>, requestId: string, nowMs: number, framed = false): Uint8Array {
  const prefix = framed ? FRAME_PREFIX_BYTES : 0;
  return decision.allow ? encodeAllow(decision, clientHeaderNames, nowMs, prefix) : encodeDeny(decision, requestId, nowMs, prefix);
}

/**
 * With `framed`, the answer comes as gRPC sends a message (flag 0 for uncompressed, the length
 * big-endian, then the message) in the same buffer, so a server on node:http2 neither allocates
 * nor copies it again.
 */
const FRAME_PREFIX_BYTES = 5;

/** An output buffer for a message of `size` bytes after `prefix` bytes of gRPC framing (0 or 5). */
function outputBuffer(prefix: number, size: number): Buffer {
  const out = Buffer.allocUnsafe(prefix + size);
  if (prefix !== 0) {
    out[0] = 0;
    out.writeUInt32BE(size, 1);
  }
  return out;
}

// The per-request parts are written field by field: protobuf-es's reflective toBinary costs more
// than the rest of a cached Check. The encoding test holds them to toBinary's bytes.

// Tags of the length-delimited fields an allow writes per request, and HeaderValueOption's
// append_action (field 3, varint) set to OVERWRITE_IF_EXISTS_OR_ADD.
const IDENTITY_TAG = (OkHttpResponseField.headers << 3) | WireType.LengthDelimited;
const REMOVE_TAG = (OkHttpResponseField.headersToRemove << 3) | WireType.LengthDelimited;
const METADATA_TAG = (CheckResponseField.dynamicMetadata << 3) | WireType.LengthDelimited;
const STRUCT_ENTRY_TAG = (StructField.fields << 3) | WireType.LengthDelimited;
const ENTRY_VALUE_TAG = (MapEntryField.value << 3) | WireType.LengthDelimited;
const STRING_VALUE_TAG = (ValueField.stringValue << 3) | WireType.LengthDelimited;
// Each identity header name as HeaderValue.key's field, and metadata name as a map entry's key field.
const IDENTITY_HEADERS: readonly Buffer[] = IDENTITY_FIELDS.map((field) => nameField(KEY_TAG, field.header));
const METADATA_NAMES: readonly Buffer[] = IDENTITY_FIELDS.map((field) => nameField((MapEntryField.key << 3) | WireType.LengthDelimited, field.metadata));


/**
 * Room for an identity's two runs of encoded bytes, ok_response header fields and Struct
 * entries, cut from an arena made once and left uninitialized: only the rooms used take memory,
 * and filling one allocates nothing (small buffers of their own would pin Node's 8 KiB pool
 * slabs). `headers` and `metadata` are the parts filled; nothing past them is read.
 */
class EncodedRooms {
  readonly headersRoom: Buffer;
  readonly metadataRoom: Buffer;
  headers: Buffer;
  metadata: Buffer;

  constructor(arena: Buffer, at: number, headersRoom: number, metadataRoom: number) {
    this.headersRoom = arena.subarray(at, at + headersRoom);
    this.metadataRoom = arena.subarray(at + headersRoom, at + headersRoom + metadataRoom);
    this.headers = this.headersRoom.subarray(0, 0);
    this.metadata = this.metadataRoom.subarray(0, 0);
  }

  /** The rooms' first `headersBytes` and `metadataBytes` are the filled parts. */
  fill(headersBytes: number, metadataBytes: number): void {
    this.headers = this.headersRoom.subarray(0, headersBytes);
    this.metadata = this.metadataRoom.subarray(0, metadataBytes);
  }
}

/** `count` slots made by `make`, each with rooms of `bytes` in one arena. */
function slotTable<T>(count: number, bytes: number, make: (arena: Buffer, at: number) => T): T[] {
  const arena = Buffer.allocUnsafeSlow(count * bytes);
  return Array.from({ length: count }, (_, i) => make(arena, i * bytes));
}

/**
 * The encoded identity of keys that keep coming: each one's identity headers (the start of
 * ok_response) and metadata entries (the Struct's fields), kept per snapshot in a small
 * direct-mapped table. Every KEEP_EVERY-th answer not served from the table keeps its key's
 * identity in the key's slot, so a key that keeps coming is soon answered by copying two
 * buffers, while traffic spread over many keys pays a comparison per answer and a copy per
 * KEEP_EVERY. Snapshots are never changed in place: a revoked, rescoped or re-planned key comes
 * back as a new snapshot, which its slot does not match. The table is bounded (IDENTITY_SLOTS
 * slots of SLOT_BYTES, in one buffer), so the memory per cached key stays that of L1.
 */
class IdentitySlot extends EncodedRooms {
  /** The snapshot whose identity the slot holds, or null. */
  snapshot: CheckSnapshot | null = null;

  constructor(arena: Buffer, at: number) {
    super(arena, at, HEADERS_ROOM, METADATA_ROOM);
  }

  /** Holds the identity of `snapshot`, copied from an answer's bytes. */
  keep(snapshot: CheckSnapshot, answer: Buffer, headersAt: number, headersEnd: number, metadataAt: number, metadataEnd: number): void {
    this.snapshot = snapshot;
    this.fill(answer.copy(this.headersRoom, 0, headersAt, headersEnd), answer.copy(this.metadataRoom, 0, metadataAt, metadataEnd));
  }

  clear(): void {
    this.snapshot = null;
    this.fill(0, 0);
  }
}
const IDENTITY_SLOTS = 1024;
const KEEP_EVERY = 16;
// Room a slot has for a key's identity. An identity too long for it (a long list of scopes, say)
// is never kept.
const HEADERS_ROOM = 512;
const METADATA_ROOM = 384;
const identitySlots = slotTable(IDENTITY_SLOTS, HEADERS_ROOM + METADATA_ROOM, (arena, at) => new IdentitySlot(arena, at));
/** Answers not served from the table, counted to pick every KEEP_EVERY-th. */
let unkept = 0;

/** A key's slot: by the last three characters of its id (a ULID's, which vary most). */
function identitySlot(snapshot: CheckSnapshot): IdentitySlot {
  const id = snapshot.key.id;
  const n = id.length;
  const index = (id.charCodeAt(n - 1) + 61 * id.charCodeAt(n - 2) + 3721 * id.charCodeAt(n - 3)) & (IDENTITY_SLOTS - 1);
  // A shorter id reads NaN, which picks slot 0.
  return identitySlots[index] as IdentitySlot;
}

/** Forgets every kept identity, and makes the next answer not served from the table keep its key's (tests of the table). */
export function clearIdentitySlots(): void {
  unkept = KEEP_EVERY - 1;
  for (const slot of identitySlots) slot.clear();
}

/**
 * An allow in one buffer: the OK status, the ok_response field (the key's identity headers, then
 * headers_to_remove and response_headers_to_add), then the key's identity metadata. The identity
 * comes from the key's slot when it holds it, else it is encoded here from the cached fields,
 * names and framing from per-process constants.
 */
function encodeAllow(decision: Allow, clientHeaderNames: Iterable<string>, nowMs: number, prefix: number): Uint8Array {
  const { snapshot } = decision;
  const { key } = snapshot;
  const remove = headersToRemove(clientHeaderNames, grantedHeaderNames(decision.snapshot, decision.forwarded), decision.credentialHeaders);
  // The limit headers are written from the numbers (limit-headers.ts) unless one of them is not
  // a plain count, which takes the general path through limitHeaders' strings.
  const limits = decision.limits;
  const direct = limits === null || directLimits(limits, nowMs);
  const add = direct ? NO_HEADERS : limitHeaders(limits, nowMs);
  const { forwarded } = decision;
  const slot = identitySlot(snapshot);
  const kept = slot.snapshot === snapshot;
  // Unless kept: the key's own values (its project "" when it has none) and their UTF-8 sizes,
  // and the encoded fields it shares with every key of its scopes, plan, role and mode.
  const projectId = key.projectId ?? "";
  const idBytes = kept ? 0 : utf8Length(key.id);
  const ownerBytes = kept ? 0 : utf8Length(key.ownerId);
  const projectBytes = kept ? 0 : utf8Length(projectId);
  const shared = kept ? NO_SHARED : sharedIdentity(snapshot);
  const withProject = key.projectId !== null;
  let okLength = 0;
  let structLength = 0;
  if (kept) {
    okLength = slot.headers.length;
    structLength = slot.metadata.length;
  } else {
    okLength = identityHeaderBytes(ID_FIELD, idBytes) + identityHeaderBytes(OWNER_FIELD, ownerBytes) + (withProject ? identityHeaderBytes(PROJECT_FIELD, projectBytes) : 0) + shared.headers.length;
    structLength = metadataFieldBytes(ID_FIELD, idBytes) + metadataFieldBytes(OWNER_FIELD, ownerBytes) + metadataFieldBytes(PROJECT_FIELD, projectBytes) + shared.metadata.length;
  }
  // UTF-8 sizes of each forwarded, then added, header's key, value and HeaderValue (three a header).
  const sizes = forwarded.length + add.length === 0 ? NO_SIZES : new Array<number>((forwarded.length + add.length) * 3);
  okLength += sizeHeaders(forwarded, sizes, 0);
  for (const name of remove) okLength += fieldBytes(utf8Length(name));
  okLength += sizeHeaders(add, sizes, forwarded.length * 3);
  if (direct && limits !== null) okLength += sizeLimitHeaders(limits, nowMs);
  const out = outputBuffer(prefix, OK_STATUS_FIELD.length + fieldBytes(okLength) + fieldBytes(structLength));
  out.set(OK_STATUS_FIELD, prefix);
  let at = prefix + OK_STATUS_FIELD.length;
  out[at++] = OK_RESPONSE_TAG;
  at = writeVarint(out, at, okLength);
  const headersAt = at;
  if (kept) {
    out.set(slot.headers, at);
    at += slot.headers.length;
  } else {
    at = writeIdentityHeader(out, at, ID_FIELD, key.id, idBytes);
    at = writeIdentityHeader(out, at, OWNER_FIELD, key.ownerId, ownerBytes);
    if (withProject) at = writeIdentityHeader(out, at, PROJECT_FIELD, projectId, projectBytes);
    at = copyBytes(out, at, shared.headers);
  }
  const headersEnd = at;
  at = writeHeaders(out, at, IDENTITY_TAG, forwarded, sizes, 0);
  for (const name of remove) at = writeString(out, at, REMOVE_TAG, name, utf8Length(name));
  at = writeHeaders(out, at, ADD_TAG, add, sizes, forwarded.length * 3);
  if (direct && limits !== null) at = writeLimitHeaders(out, at, limits, nowMs);
  out[at++] = METADATA_TAG;
  at = writeVarint(out, at, structLength);
  if (kept) {
    out.set(slot.metadata, at);
    return out;
  }
  const metadataAt = at;
  at = writeMetadataEntry(out, at, ID_FIELD, key.id, idBytes);
  at = writeMetadataEntry(out, at, OWNER_FIELD, key.ownerId, ownerBytes);
  at = writeMetadataEntry(out, at, PROJECT_FIELD, projectId, projectBytes);
  at = copyBytes(out, at, shared.metadata);
  if (++unkept % KEEP_EVERY === 0 && headersEnd - headersAt <= HEADERS_ROOM && at - metadataAt <= METADATA_ROOM) {
    slot.keep(snapshot, out, headersAt, headersEnd, metadataAt, at);
  }
  return out;
}

// IDENTITY_FIELDS' indexes of the values each key has of its own: its id and owner (and project,
// PROJECT_FIELD). The fields after them, from SHARED_FROM on, are the scopes, plan, role and mode,
// which come from small configured sets; they are last in the headers and in the metadata alike
// (METADATA_ORDER), so their encoding is one run of bytes in each, kept per combination.
const ID_FIELD = 0;
const OWNER_FIELD = 1;
const SHARED_FROM = 3;
if (PROJECT_FIELD !== SHARED_FROM - 1 || METADATA_ORDER.slice(0, SHARED_FROM).some((field, m) => field !== m)) {
  throw new Error("to-envoy: the key's own identity fields must come first in the headers and the metadata");
}

/** The encoded identity fields from SHARED_FROM on: ok_response header fields, and Struct entries. */
interface SharedIdentity {
  readonly headers: Uint8Array;
  readonly metadata: Uint8Array;
}
const NO_SHARED: SharedIdentity = { headers: new Uint8Array(0), metadata: new Uint8Array(0) };

/**
 * A slot of the table of shared identity fields: the combination it holds (scopes, plan, role,
 * mode) and their encoding. A combination too long for the rooms (a long list of scopes) is
 * encoded for its answer alone.
 */
class SharedSlot extends EncodedRooms implements SharedIdentity {
  scopes: readonly string[] = [];
  plan = "";
  role = "";
  mode = "";
  inUse = false;

  constructor(arena: Buffer, at: number) {
    super(arena, at, SHARED_HEADERS_ROOM, SHARED_METADATA_ROOM);
  }

  holds(key: CheckSnapshot["key"], account: CheckSnapshot["account"]): boolean {
    return this.inUse && this.plan === account.plan && this.role === account.role && this.mode === key.mode && sameList(this.scopes, key.scopes);
  }

  /** Holds the combination of `values` (IDENTITY_FIELDS' order, from SHARED_FROM on) when it fits; false when not. */
  hold(key: CheckSnapshot["key"], account: CheckSnapshot["account"], values: readonly string[]): boolean {
    this.inUse = false;
    const sizes = sharedSizes(values);
    if (sizes.headers > SHARED_HEADERS_ROOM || sizes.metadata > SHARED_METADATA_ROOM) return false;
    this.fill(writeSharedHeaders(this.headersRoom, values), writeSharedMetadata(this.metadataRoom, values));
    this.scopes = key.scopes;
    this.plan = account.plan;
    this.role = account.role;
    this.mode = key.mode;
    this.inUse = true;
    return true;
  }
}
const SHARED_SLOTS = 64;
const SHARED_HEADERS_ROOM = 256;
const SHARED_METADATA_ROOM = 256;
const sharedSlots = slotTable(SHARED_SLOTS, SHARED_HEADERS_ROOM + SHARED_METADATA_ROOM, (arena, at) => new SharedSlot(arena, at));

function sameList(a: readonly string[], b: readonly string[]): boolean {
  if (a === b) return true;
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

/** A few of a text's characters and its length, for picking a slot. */
function textHash(text: string): number {
  const n = text.length;
  return n === 0 ? 0 : n * 31 + text.charCodeAt(0) * 7 + text.charCodeAt(n - 1);
}

/**
 * The encoded scopes, plan, role and mode of a key: from their slot of the table when it holds
 * them (a few comparisons, of shared copies as L1 keeps them), else encoded into it.
 */
function sharedIdentity(snapshot: CheckSnapshot): SharedIdentity {
  const { key, account } = snapshot;
  const { scopes } = key;
  const last = scopes.length - 1;
  const hash = ((textHash(account.plan) * 31 + textHash(account.role)) * 31 + textHash(key.mode)) * 31 + scopes.length * 17 + (last < 0 ? 0 : textHash(scopes[0] as string) + textHash(scopes[last] as string));
  const slot = sharedSlots[hash & (SHARED_SLOTS - 1)] as SharedSlot;
  if (slot.holds(key, account)) return slot;
  const values = identityValues(snapshot).slice(SHARED_FROM);
  if (slot.hold(key, account, values)) return slot;
  const sizes = sharedSizes(values);
  const headers = Buffer.allocUnsafe(sizes.headers);
  const metadata = Buffer.allocUnsafe(sizes.metadata);
  writeSharedHeaders(headers, values);
  writeSharedMetadata(metadata, values);
  return { headers, metadata };
}

/** Bytes of the shared fields' encodings; `values` from SHARED_FROM on. */
function sharedSizes(values: readonly string[]): { headers: number; metadata: number } {
  let headers = 0;
  let metadata = 0;
  for (let i = SHARED_FROM; i < IDENTITY_FIELDS.length; i++) {
    const bytes = utf8Length(values[i - SHARED_FROM] as string);
    headers += identityHeaderBytes(i, bytes);
    metadata += metadataFieldBytes(i, bytes);
  }
  return { headers, metadata };
}

/** The shared fields as ok_response headers into `out` from 0, in IDENTITY_FIELDS' order; returns their bytes. */
function writeSharedHeaders(out: Buffer, values: readonly string[]): number {
  let at = 0;
  for (let i = SHARED_FROM; i < IDENTITY_FIELDS.length; i++) {
    const value = values[i - SHARED_FROM] as string;
    at = writeIdentityHeader(out, at, i, value, utf8Length(value));
  }
  return at;
}

/** The shared fields as Struct entries into `out` from 0, in METADATA_ORDER; returns their bytes. */
function writeSharedMetadata(out: Buffer, values: readonly string[]): number {
  let at = 0;
  for (let m = SHARED_FROM; m < METADATA_ORDER.length; m++) {
    const i = METADATA_ORDER[m] as number;
    const value = values[i - SHARED_FROM] as string;
    at = writeMetadataEntry(out, at, i, value, utf8Length(value));
  }
  return at;
}

const NO_SIZES: number[] = new Array<number>(0);

/** Bytes of identity field `i`'s header (a HeaderValueOption field) with a value of `valueBytes`. */
function identityHeaderBytes(i: number, valueBytes: number): number {
  return fieldBytes(fieldBytes(headerValueBytes(IDENTITY_HEADERS[i] as Buffer, valueBytes)) + APPEND_ACTION.length);
}

/** Bytes of identity field `i`'s metadata entry (a Struct fields entry) with a value of `valueBytes`. */
function metadataFieldBytes(i: number, valueBytes: number): number {
  return fieldBytes(metadataEntryBytes(i, valueBytes));
}

/** Identity field `i`'s header, an ok_response headers field; returns the position after it. */
function writeIdentityHeader(out: Buffer, at: number, i: number, value: string, bytes: number): number {
  const pos = writeOptionHead(out, at, IDENTITY_TAG, IDENTITY_HEADERS[i] as Buffer, bytes);
  return writeAppendAction(out, bytes === 0 ? pos : writeText(out, pos, value, bytes));
}

/** Identity field `i`'s metadata entry (a string_value, written even when empty); returns the position after it. */
function writeMetadataEntry(out: Buffer, at: number, i: number, value: string, bytes: number): number {
  let pos = at;
  out[pos++] = STRUCT_ENTRY_TAG;
  pos = writeVarint(out, pos, metadataEntryBytes(i, bytes));
  pos = copyBytes(out, pos, METADATA_NAMES[i] as Buffer);
  out[pos++] = ENTRY_VALUE_TAG;
  pos = writeVarint(out, pos, fieldBytes(bytes));
  return writeString(out, pos, STRING_VALUE_TAG, value, bytes);
}

/**
 * Measures headers written as HeaderValueOption fields: puts each one's key bytes, value bytes
 * and HeaderValue bytes in `sizes` from `offset`, and returns the bytes of all the fields.
 */
function sizeHeaders(headers: ReadonlyArray<readonly [string, string]>, sizes: number[], offset: number): number {
  let total = 0;
  for (let i = 0; i < headers.length; i++) {
    const [k, v] = headers[i] as readonly [string, string];
    const keyBytes = utf8Length(k);
    const valueBytes = utf8Length(v);
    const headerBytes = (keyBytes === 0 ? 0 : fieldBytes(keyBytes)) + (valueBytes === 0 ? 0 : fieldBytes(valueBytes));
    sizes[offset + i * 3] = keyBytes;
    sizes[offset + i * 3 + 1] = valueBytes;
    sizes[offset + i * 3 + 2] = headerBytes;
    total += fieldBytes(fieldBytes(headerBytes) + APPEND_ACTION.length);
  }
  return total;
}

/** Writes headers measured by sizeHeaders as HeaderValueOption fields with `tag`; returns the position after them. */
function writeHeaders(out: Buffer, at: number, tag: number, headers: ReadonlyArray<readonly [string, string]>, sizes: number[], offset: number): number {
  let pos = at;
  for (let i = 0; i < headers.length; i++) {
    const [k, v] = headers[i] as readonly [string, string];
    const keyBytes = sizes[offset + i * 3] as number;
    const valueBytes = sizes[offset + i * 3 + 1] as number;
    const headerBytes = sizes[offset + i * 3 + 2] as number;
    out[pos++] = tag;
    pos = writeVarint(out, pos, fieldBytes(headerBytes) + APPEND_ACTION.length);
    out[pos++] = HEADER_TAG;
    pos = writeVarint(out, pos, headerBytes);
    if (keyBytes !== 0) pos = writeString(out, pos, KEY_TAG, k, keyBytes);
    if (valueBytes !== 0) pos = writeString(out, pos, VALUE_TAG, v, valueBytes);
    pos = writeAppendAction(out, pos);
  }
  return pos;
}

/** An identity header's HeaderValue: its encoded key field, then the value field unless empty. */
function headerValueBytes(name: Buffer, valueBytes: number): number {
  return name.length + (valueBytes === 0 ? 0 : fieldBytes(valueBytes));
}

/** A Struct map entry: the encoded name, then the Value (a string_value, written even when empty). */
function metadataEntryBytes(field: number, valueBytes: number): number {
  return (METADATA_NAMES[field] as Buffer).length + fieldBytes(fieldBytes(valueBytes));
}



/**
 * A denial in one buffer: the reason's status, then the denied_response field: the reason's
 * encoded status and standard headers, this request's Retry-After and limit headers, and the
 * JSON body. A flood of bad keys is answered with one allocation each.
 */
function encodeDeny(decision: Deny, requestId: string, nowMs: number, prefix: number): Uint8Array {
  const parts = denialParts(decision.reason);
  const rest = denialRest(decision, requestId, nowMs);
  const sizes = new Array<number>(rest.headers.length * 3);
  const bodyBytes = utf8Length(rest.body);
  const deniedLength = parts.deniedHead.length + sizeHeaders(rest.headers, sizes, 0) + (bodyBytes === 0 ? 0 : fieldBytes(bodyBytes));
  const out = outputBuffer(prefix, parts.statusField.length + fieldBytes(deniedLength));
  out.set(parts.statusField, prefix);
  let at = prefix + parts.statusField.length;
  out[at++] = DENIED_RESPONSE_TAG;
  at = writeVarint(out, at, deniedLength);
  out.set(parts.deniedHead, at);
  at += parts.deniedHead.length;
  at = writeHeaders(out, at, DENIED_HEADER_TAG, rest.headers, sizes, 0);
  if (bodyBytes !== 0) writeString(out, at, BODY_TAG, rest.body, bodyBytes);
  return out;
}

// CheckResponse.denied_response's tag, and DeniedHttpResponse's headers and body tags.
const DENIED_RESPONSE_TAG = (CheckResponseField.deniedResponse << 3) | WireType.LengthDelimited;
const DENIED_HEADER_TAG = (DeniedHttpResponseField.headers << 3) | WireType.LengthDelimited;
const BODY_TAG = (DeniedHttpResponseField.body << 3) | WireType.LengthDelimited;

// CheckResponse.ok_response's tag: field 3, length-delimited.
const OK_RESPONSE_TAG = (CheckResponseField.okResponse << 3) | WireType.LengthDelimited;



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
