import { BinaryReader, WireType } from "@bufbuild/protobuf/wire";
import type {
  AttributeContextView,
  CheckRequestView,
  HeaderMapView,
  HeaderValueView,
  HttpRequestView,
  RequestView,
} from "../gen/keygate/authz/v1/check_view_pb.js";
import { HeaderList } from "./headers.js";

/**
 * keygate.authz.v1.CheckRequestView as decodeCheckRequest gives it: the HTTP request's headers
 * map is a HeaderList (a name once, its last value) rather than an object.
 */
export type DecodedHttpRequest = Omit<HttpRequestView, "headers"> & { headers: HeaderList };
export type DecodedRequest = Omit<RequestView, "http"> & { http?: DecodedHttpRequest };
export type DecodedAttributes = Omit<AttributeContextView, "request"> & { request?: DecodedRequest };
export type DecodedCheckRequest = Omit<CheckRequestView, "attributes"> & { attributes?: DecodedAttributes };

// Field numbers of envoy/service/auth/v3/{external_auth,attribute_context}.proto and
// envoy/config/core/v3/base.proto, as keygate/authz/v1/check_view.proto mirrors them.
const CheckRequestField = { attributes: 1 } as const;
const AttributeContextField = { request: 4, contextExtensions: 10 } as const;
const RequestField = { http: 2 } as const;
const HttpRequestField = { id: 1, method: 2, headers: 3, path: 4, headerMap: 13 } as const;
const HeaderMapField = { headers: 1 } as const;
const HeaderValueField = { key: 1, value: 2, rawValue: 3 } as const;
const MapEntryField = { key: 1, value: 2 } as const;

// protobuf-es's default recursion limit. Unknown fields are skipped with what is left of it at
// the message's depth (CheckRequest is depth 1), so a deep group nest fails where it fails there.
const RECURSION_LIMIT = 100;
const Depth = { checkRequest: 1, attributeContext: 2, request: 3, httpRequest: 4, headerMap: 5, headerValue: 6 } as const;

/**
 * Decodes an envoy.service.auth.v3.CheckRequest into the fields Check reads, straight from the
 * wire: everything else Envoy sends (addresses, TLS, the body, query parameters, metadata) is
 * skipped without being built. The result equals `fromBinary(CheckRequestViewSchema, bytes)`,
 * the headers map read as a HeaderList (test/unit/check-request-decode.test.ts holds it to that),
 * including its merging of repeated message fields, last-one-wins map keys, and which malformed
 * inputs throw; except that invalid UTF-8 in a string reads as U+FFFD (LENIENT_UTF8) where
 * protobuf-es refuses the message.
 */
export function decodeCheckRequest(bytes: Uint8Array): DecodedCheckRequest {
  const reader = new BinaryReader(bytes);
  decoding = bytes;
  decodingText = Buffer.isBuffer(bytes) ? bytes : Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  decodingWhole = undefined;
  const message: DecodedCheckRequest = { $typeName: "keygate.authz.v1.CheckRequestView" };
  const end = bytes.byteLength;
  try {
    while (reader.pos < end) {
      const tag = readTag(reader);
      const fieldNo = tag >>> 3;
      const wireType: WireType = tag & 7;
      // Like protobuf-es, a known field is read as its declared type whatever its wire type says.
      if (fieldNo === CheckRequestField.attributes) message.attributes = readAttributeContext(reader, message.attributes);
      else skipField(reader, wireType, fieldNo, RECURSION_LIMIT - Depth.checkRequest);
    }
  } finally {
    decoding = NOTHING;
    decodingText = NO_TEXT;
    decodingWhole = undefined;
  }
  return message;
}

/**
 * The decoded request as protobuf-es's own view message, the headers back in an object (a name
 * as an own property, __proto__ too): what `fromBinary(CheckRequestViewSchema, bytes)` gives.
 */
export function checkRequestView(decoded: DecodedCheckRequest): CheckRequestView {
  const { attributes, ...rest } = decoded;
  if (attributes === undefined) return rest;
  const { request, ...attributesRest } = attributes;
  if (request === undefined) return { ...rest, attributes: attributesRest };
  const { http, ...requestRest } = request;
  if (http === undefined) return { ...rest, attributes: { ...attributesRest, request: requestRest } };
  const names = http.headers.names();
  const values = http.headers.values();
  const headers = Object.fromEntries(names.map((name, i) => [name, values[i] as string])) as { [key: string]: string };
  return { ...rest, attributes: { ...attributesRest, request: { ...requestRest, http: { ...http, headers } } } };
}

// The message decodeCheckRequest is reading (decoding is synchronous), for readTag's overflow
// check; the reader keeps its buffer private.
const NOTHING = new Uint8Array(0);
let decoding: Uint8Array = NOTHING;
// The same bytes as a Buffer, for readString's latin1 slices.
const NO_TEXT = Buffer.alloc(0);

declare global {
  interface Buffer {
    /**
     * The bytes from `start` to `end` as latin1 text: Node's own method under toString("latin1"),
     * which first checks its arguments and picks the encoding (through toString, decoding a bench
     * CheckRequest took longer than protobuf-es's own string reads). Not in Node's typings, so
     * checked for once (LATIN1_SLICE) before use.
     */
    latin1Slice(start: number, end: number): string;
  }
}
const LATIN1_SLICE = typeof NO_TEXT.latin1Slice === "function";
let decodingText: Buffer = NO_TEXT;

/**
 * The whole message as latin1 text, made on its first ASCII string read (undefined until then;
 * null for a message over WHOLE_TEXT_BYTES). Its strings are then substrings of it: one call into
 * Node for the message instead of one per header name and value, and V8 keeps a longer
 * substring as a view of it rather than a copy. A large message (a request body Envoy sends
 * along) is never turned into text: its strings are sliced one by one.
 */
let decodingWhole: string | null | undefined;
const WHOLE_TEXT_BYTES = 4096;

function latin1(from: number, to: number): string {
  return LATIN1_SLICE ? decodingText.latin1Slice(from, to) : decodingText.toString("latin1", from, to);
}

/**
 * BinaryReader.string(true) for the message being decoded. Nearly every string in a CheckRequest
 * (header names and values, the path, the method) is ASCII, which reads as one latin1 slice of
 * the message's bytes; protobuf-es builds an array of char codes (up to 32 bytes) or a view for
 * its TextDecoder first, which made decoding allocate twice as much (a million bench requests
 * decoded: 725 scavenges of an 8 MiB young generation before, 364 after). Anything else is read
 * from BinaryReader.bytes, so truncation throws exactly as there, and decoded with LENIENT_UTF8.
 */
function readString(reader: BinaryReader): string {
  const at = reader.pos;
  const to = shortAsciiEnd(at);
  if (to !== -1) {
    reader.pos = to;
    if (decodingWhole === undefined) decodingWhole = decoding.length <= WHOLE_TEXT_BYTES ? latin1(0, decoding.length) : null;
    return decodingWhole === null ? latin1(at + 1, to) : decodingWhole.substring(at + 1, to);
  }
  return LENIENT_UTF8.decode(reader.bytes());
}

/**
 * How a string that is not ASCII is read. Envoy copies the client's :path and header values into
 * the CheckRequest as they came, and HTTP/1.1 lets a client send bytes that are not UTF-8 in
 * both (a Latin-1 "é" in the query or in any header): refusing the message for them, as a
 * proto3 decoder does, would make the client's own bytes a gRPC error, which Envoy's
 * failure_mode_allow turns into an allow. They are read as U+FFFD instead: the routes step
 * refuses a path (before its query) that holds one, and a credential holding one is not a key's
 * shape. Every string field is read so, not only the two a client writes today.
 */
// ignoreBOM keeps a leading U+FEFF in the string, as protobuf-es reads it (by default TextDecoder drops it).
const LENIENT_UTF8 = new TextDecoder("utf-8", { fatal: false, ignoreBOM: true });

/**
 * Where the string field's value at `at` (its length byte) ends, when the length fits one byte
 * (under 128: header names and most values) and the value is ASCII within the message; -1 for
 * any other, which goes the general way.
 */
function shortAsciiEnd(at: number): number {
  const length = decoding[at] ?? 0x80;
  if (length >= 0x80) return -1;
  const to = at + 1 + length;
  if (to > decoding.length) return -1;
  for (let i = at + 1; i < to; i++) if ((decoding[i] ?? 0x80) >= 0x80) return -1;
  return to;
}

/**
 * BinaryReader.uint32() with the one-byte varint read here: nearly every tag and length in a
 * CheckRequest is under 128, and the call into protobuf-es's varint reader was a tenth of a
 * decode. Anything longer, and a read past the end, is left to uint32 itself.
 */
function readUint32(reader: BinaryReader): number {
  const at = reader.pos;
  const byte = decoding[at] ?? 0x80;
  if (byte < 0x80) {
    reader.pos = at + 1;
    return byte;
  }
  return reader.uint32();
}

/**
 * BinaryReader.tag() without its [fieldNo, wireType] array (one per field read): the raw tag,
 * checked as tag() checks it and refused with tag()'s words.
 */
function readTag(reader: BinaryReader): number {
  const start = reader.pos;
  const tag = readUint32(reader);
  const bytesRead = reader.pos - start;
  if (bytesRead > 5 || (bytesRead === 5 && (decoding[reader.pos - 1] ?? 0) > 0x0f)) throw new Error("illegal tag: varint overflows uint32");
  const fieldNo = tag >>> 3;
  const wireType = tag & 7;
  if (fieldNo <= 0 || wireType > 5) throw new Error(`illegal tag: field no ${fieldNo} wire type ${wireType}`);
  return tag;
}

/**
 * BinaryReader.skip without the view of the skipped bytes it returns: one allocation per field
 * skipped, and most of what Envoy sends is skipped. The same steps, bounds check and error for
 * varints, fixed-width and length-delimited fields; groups (which Envoy never sends) and unknown
 * wire types are left to skip itself.
 */
function skipField(reader: BinaryReader, wireType: WireType, fieldNo: number, recursionLimit: number): void {
  switch (wireType) {
    case WireType.Varint: {
      // Bytes until one without the continuation bit; past the end reads as that byte.
      let byte: number;
      do byte = decoding[reader.pos++] ?? 0;
      while ((byte & 0x80) !== 0);
      break;
    }
    case WireType.Bit64:
      reader.pos += 8;
      break;
    case WireType.Bit32:
      reader.pos += 4;
      break;
    case WireType.LengthDelimited: {
      // Read first: `pos += uint32()` would add the length to pos as it was before the varint.
      const length = readUint32(reader);
      reader.pos += length;
      break;
    }
    default:
      reader.skip(wireType, fieldNo, recursionLimit);
      return;
  }
  if (reader.pos > reader.len) throw new RangeError("premature EOF");
}

// Each reader below takes the message a previous occurrence of its field built (or undefined)
// and merges into it, as protobuf-es does when a singular message field repeats.

function readAttributeContext(reader: BinaryReader, into: DecodedAttributes | undefined): DecodedAttributes {
  const message: DecodedAttributes = into ?? { $typeName: "keygate.authz.v1.AttributeContextView", contextExtensions: NO_EXTENSIONS };
  const end = readUint32(reader) + reader.pos;
  while (reader.pos < end) {
    const tag = readTag(reader);
    const fieldNo = tag >>> 3;
    const wireType: WireType = tag & 7;
    if (fieldNo === AttributeContextField.request) message.request = readRequest(reader, message.request);
    else if (fieldNo === AttributeContextField.contextExtensions) {
      if (message.contextExtensions === NO_EXTENSIONS) message.contextExtensions = newRecord();
      readStringMapEntry(reader, message.contextExtensions, Depth.attributeContext);
    }
    else skipField(reader, wireType, fieldNo, RECURSION_LIMIT - Depth.attributeContext);
  }
  return message;
}

/**
 * The context extensions of a request without any (most of them): one frozen empty record for
 * all, where a record of its own would be a hash table allocated per request; the first entry
 * gets the request a record of its own.
 */
const NO_EXTENSIONS: { [key: string]: string } = Object.freeze(Object.create(null) as { [key: string]: string });

function readRequest(reader: BinaryReader, into: DecodedRequest | undefined): DecodedRequest {
  const message: DecodedRequest = into ?? { $typeName: "keygate.authz.v1.RequestView" };
  const end = readUint32(reader) + reader.pos;
  while (reader.pos < end) {
    const tag = readTag(reader);
    const fieldNo = tag >>> 3;
    const wireType: WireType = tag & 7;
    if (fieldNo === RequestField.http) message.http = readHttpRequest(reader, message.http);
    else skipField(reader, wireType, fieldNo, RECURSION_LIMIT - Depth.request);
  }
  return message;
}

function readHttpRequest(reader: BinaryReader, into: DecodedHttpRequest | undefined): DecodedHttpRequest {
  const message: DecodedHttpRequest = into ?? { $typeName: "keygate.authz.v1.HttpRequestView", id: "", method: "", headers: new HeaderList(), path: "" };
  const end = readUint32(reader) + reader.pos;
  while (reader.pos < end) {
    const tag = readTag(reader);
    const fieldNo = tag >>> 3;
    const wireType: WireType = tag & 7;
    switch (fieldNo) {
      case HttpRequestField.id:
        message.id = readString(reader);
        break;
      case HttpRequestField.method:
        message.method = readString(reader);
        break;
      case HttpRequestField.headers:
        readHeaderEntry(reader, message.headers, Depth.httpRequest);
        break;
      case HttpRequestField.path:
        message.path = readString(reader);
        break;
      case HttpRequestField.headerMap:
        message.headerMap = readHeaderMap(reader, message.headerMap);
        break;
      default:
        skipField(reader, wireType, fieldNo, RECURSION_LIMIT - Depth.httpRequest);
    }
  }
  return message;
}

function readHeaderMap(reader: BinaryReader, into: HeaderMapView | undefined): HeaderMapView {
  const message: HeaderMapView = into ?? { $typeName: "keygate.authz.v1.HeaderMapView", headers: [] };
  const end = readUint32(reader) + reader.pos;
  while (reader.pos < end) {
    const tag = readTag(reader);
    const fieldNo = tag >>> 3;
    const wireType: WireType = tag & 7;
    if (fieldNo === HeaderMapField.headers) message.headers.push(readHeaderValue(reader));
    else skipField(reader, wireType, fieldNo, RECURSION_LIMIT - Depth.headerMap);
  }
  return message;
}

function readHeaderValue(reader: BinaryReader): HeaderValueView {
  let key = "";
  let value = "";
  let rawValue: Uint8Array | undefined;
  const end = readUint32(reader) + reader.pos;
  while (reader.pos < end) {
    const tag = readTag(reader);
    const fieldNo = tag >>> 3;
    const wireType: WireType = tag & 7;
    if (fieldNo === HeaderValueField.key) key = readString(reader);
    else if (fieldNo === HeaderValueField.value) value = readString(reader);
    else if (fieldNo === HeaderValueField.rawValue) rawValue = reader.bytes();
    else skipField(reader, wireType, fieldNo, RECURSION_LIMIT - Depth.headerValue);
  }
  // raw_value is a view of the request's bytes, as protobuf-es returns it.
  return { $typeName: "keygate.authz.v1.HeaderValueView", key, value, rawValue: rawValue ?? new Uint8Array(0) };
}

/**
 * A record for a map field (the context extensions): no prototype, kept as a hash table from its first entry. Entries
 * are added under names that vary from request to request, which on an ordinary object makes
 * V8 walk (and at a busy server, miss) its cache of shape transitions, about a microsecond an
 * entry; a hash table takes them at the cost of a lookup.
 */
function newRecord(): { [key: string]: string } {
  return Object.create(null) as { [key: string]: string };
}

// Header names repeat from request to request. A name decoded afresh is a new string: adding it
// to a record sends V8 to its runtime to find the name's canonical (internalized) copy, and
// comparing it with a literal name (a HeaderList lookup) compares characters. Under the copy
// kept here, the add stays in generated code and the comparison is of pointers. Bounded, so a
// client's made-up names cannot grow it: only names under 128 bytes are kept (readName), and
// past MAX_NAMES of them the table starts over, so names a client made up first cannot keep
// the proxy's out for the life of the process.
const MAX_NAMES = 1024;
const names = new Map<string, string>();

/** The process's canonical copy of a name (under 128 bytes) used as a property key. */
function canonicalName(name: string): string {
  const known = names.get(name);
  if (known !== undefined) return known;
  if (names.size >= MAX_NAMES) names.clear();
  // A property key is always held internalized: the key read back is the canonical copy.
  const canonical = Object.keys({ [name]: 0 })[0] ?? name;
  names.set(canonical, canonical);
  return canonical;
}

// The entry readMapEntry read last: its key, and its value (or, read with `lazy`, readValueAt's
// position of it). Decoding is synchronous, so one pair serves every map.
let entryKey = "";
let entryValue: string | number = "";

/**
 * One map<string, string> entry into entryKey and entryValue: a missing key or value is "", and
 * a repeated one counts its last occurrence. `depth` is the depth of the message holding the
 * map; with `lazy`, the value is read by readValueAt.
 */
function readMapEntry(reader: BinaryReader, depth: number, lazy: boolean): void {
  let key = "";
  let value: string | number = "";
  const end = readUint32(reader) + reader.pos;
  while (reader.pos < end) {
    const tag = readTag(reader);
    const fieldNo = tag >>> 3;
    const wireType: WireType = tag & 7;
    if (fieldNo === MapEntryField.key) key = readName(reader);
    else if (fieldNo === MapEntryField.value) value = lazy ? readValueAt(reader) : readString(reader);
    else skipField(reader, wireType, fieldNo, RECURSION_LIMIT - depth);
  }
  entryKey = key;
  entryValue = value;
}

/** One map<string, string> entry into `record`, a key seen before overwritten. */
function readStringMapEntry(reader: BinaryReader, record: { [key: string]: string }, depth: number): void {
  readMapEntry(reader, depth, false);
  const key = entryKey;
  const value = entryValue as string;
  // A header named __proto__ is an own property like any other, never the record's prototype.
  if (key === "__proto__") Object.defineProperty(record, key, { value, writable: true, enumerable: true, configurable: true });
  else record[key] = value;
}

/** One entry of the HTTP request's headers map into `headers`. */
function readHeaderEntry(reader: BinaryReader, headers: HeaderList, depth: number): void {
  readMapEntry(reader, depth, true);
  if (typeof entryValue === "number") headers.setAt(entryKey, decodingWhole as string, entryValue);
  else headers.set(entryKey, entryValue);
}

/**
 * A header value as readString reads it, or, for an ASCII value under 128 bytes in a message
 * turned into text whole (decodingWhole), where its length byte is: HeaderList cuts the value
 * from the text only when it is read.
 */
function readValueAt(reader: BinaryReader): string | number {
  const at = reader.pos;
  const to = decoding.length <= WHOLE_TEXT_BYTES ? shortAsciiEnd(at) : -1;
  if (to === -1) return readString(reader);
  reader.pos = to;
  decodingWhole ??= latin1(0, decoding.length);
  return at;
}

// The names read most recently, by a hash of their bytes: a name found here is returned without
// being cut from the message or looked up by its text. A slot holds one name, replaced by the
// next name of its hash that is not in it; the copy kept is canonicalName's. An empty slot holds
// "", which is what an empty name reads as.
const NAME_SLOTS = 256;
const slotNames: string[] = new Array<string>(NAME_SLOTS).fill("");

/**
 * A map entry's key as readString reads it, as the process's canonical copy (canonicalName) when
 * it is under 128 bytes. An ASCII name under 128 bytes is found in the slots by its bytes when it
 * was read before.
 */
function readName(reader: BinaryReader): string {
  const at = reader.pos;
  const from = at + 1;
  const length = decoding[at] ?? 0x80;
  if (length < 0x80 && from + length <= decoding.length) {
    const to = from + length;
    let hash = length;
    let i = from;
    for (; i < to; i++) {
      const byte = decoding[i] ?? 0x80;
      if (byte >= 0x80) break;
      hash = (Math.imul(hash, 31) + byte) | 0;
    }
    if (i === to) {
      const slot = hash & (NAME_SLOTS - 1);
      const known = slotNames[slot] as string;
      if (known.length === length && sameText(known, from)) {
        reader.pos = to;
        return known;
      }
      const name = canonicalName(readString(reader));
      slotNames[slot] = name;
      return name;
    }
  }
  // A name of 128 bytes or more is a client's making, not one that repeats (the proxy's header
  // names and route settings are short), and may be up to the 4 MiB message limit: kept in the
  // table, a thousand of them would pin gigabytes. It is used as decoded.
  return length < 0x80 ? canonicalName(readString(reader)) : readString(reader);
}

/** True when the message's bytes from `from` are `text`'s character codes (text is ASCII). */
function sameText(text: string, from: number): boolean {
  for (let i = 0; i < text.length; i++) if (decoding[from + i] !== text.charCodeAt(i)) return false;
  return true;
}
