import { HeaderValueOption_HeaderAppendAction } from "../gen/envoy/config/core/v3/base_pb.js";
import { WireType } from "@bufbuild/protobuf/wire";

// The protobuf wire primitives keygate's hand-written Check answers use (to-envoy.ts,
// limit-headers.ts), and the framing of Envoy's HeaderValueOption they share. Every tag fits one
// byte. test/unit/check-response-encoding.test.ts holds the answers to protobuf-es's toBinary.

// Field numbers of envoy/service/auth/v3/external_auth.proto's OkHttpResponse and
// envoy/config/core/v3/base.proto's HeaderValueOption and HeaderValue.
const OkHttpResponseField = { responseHeadersToAdd: 6 } as const;
const HeaderValueOptionField = { header: 1, appendAction: 3 } as const;
const HeaderValueField = { key: 1, value: 2 } as const;

/** OkHttpResponse.response_headers_to_add: the headers that go back to the client. */
export const ADD_TAG = (OkHttpResponseField.responseHeadersToAdd << 3) | WireType.LengthDelimited;
/** HeaderValueOption.header. */
export const HEADER_TAG = (HeaderValueOptionField.header << 3) | WireType.LengthDelimited;
/** HeaderValue.key. */
export const KEY_TAG = (HeaderValueField.key << 3) | WireType.LengthDelimited;
/** HeaderValue.value. */
export const VALUE_TAG = (HeaderValueField.value << 3) | WireType.LengthDelimited;
/**
 * HeaderValueOption.append_action (a varint) set to OVERWRITE_IF_EXISTS_OR_ADD, after the header:
 * an allow's headers replace any client-sent value of the same name, so identity cannot be spoofed.
 */
export const APPEND_ACTION = [(HeaderValueOptionField.appendAction << 3) | WireType.Varint, HeaderValueOption_HeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD] as const;

/** An ASCII name (under 128 bytes) as a length-delimited field with `tag`, encoded once. */
export function nameField(tag: number, name: string): Buffer {
  return Buffer.concat([Buffer.from([tag, name.length]), Buffer.from(name, "latin1")]);
}

/** Bytes of `value` as a varint (value < 2^32). */
export function varintLength(value: number): number {
  let length = 1;
  for (let rest = value >>> 7; rest !== 0; rest >>>= 7) length++;
  return length;
}

/** Writes `value` (< 2^32) as a varint at `at`; returns the position after it. */
export function writeVarint(out: Uint8Array, at: number, value: number): number {
  let rest = value >>> 0;
  let pos = at;
  while (rest > 0x7f) {
    out[pos++] = (rest & 0x7f) | 0x80;
    rest >>>= 7;
  }
  out[pos++] = rest;
  return pos;
}

/** Bytes of a length-delimited field holding `length` bytes, with its tag (one byte). */
export function fieldBytes(length: number): number {
  return 1 + varintLength(length) + length;
}

/** Copies a short encoded part into `out` at `at` (a loop: cheaper than a call into set); returns the position after it. */
export function copyBytes(out: Uint8Array, at: number, part: Uint8Array): number {
  for (let i = 0; i < part.length; i++) out[at + i] = part[i] as number;
  return at + part.length;
}

// From this length on, Buffer.write copies faster than a loop (a denial's JSON body, say).
const NATIVE_COPY_FROM = 64;

/** Writes a length-delimited string field (`bytes` = its UTF-8 length); returns the position after it. */
export function writeString(out: Buffer, at: number, tag: number, value: string, bytes: number): number {
  out[at] = tag;
  return writeText(out, writeVarint(out, at + 1, bytes), value, bytes);
}

/** Writes `value`'s UTF-8 bytes (`bytes` of them) at `at`; returns the position after them. */
export function writeText(out: Buffer, at: number, value: string, bytes: number): number {
  // ASCII, the usual case: short strings are copied here, for less than a call into Buffer.write.
  if (bytes !== value.length || bytes > NATIVE_COPY_FROM) return at + out.write(value, at, bytes, "utf8");
  for (let i = 0; i < bytes; i++) out[at + i] = value.charCodeAt(i);
  return at + bytes;
}

/**
 * A HeaderValueOption field with `tag` up to its value's bytes: the option's and the header's
 * lengths, the encoded name (nameField), then the value's tag and length unless the value is
 * empty (left out, as protobuf-es leaves it). Returns where the value's bytes go; the caller
 * writes them, then writeAppendAction.
 */
export function writeOptionHead(out: Buffer, at: number, tag: number, name: Buffer, valueBytes: number): number {
  const headerBytes = name.length + (valueBytes === 0 ? 0 : fieldBytes(valueBytes));
  let pos = at;
  out[pos++] = tag;
  pos = writeVarint(out, pos, fieldBytes(headerBytes) + APPEND_ACTION.length);
  out[pos++] = HEADER_TAG;
  pos = writeVarint(out, pos, headerBytes);
  pos = copyBytes(out, pos, name);
  if (valueBytes === 0) return pos;
  out[pos++] = VALUE_TAG;
  return writeVarint(out, pos, valueBytes);
}

/** APPEND_ACTION, a HeaderValueOption's last field; returns the position after it. */
export function writeAppendAction(out: Buffer, at: number): number {
  out[at] = APPEND_ACTION[0];
  out[at + 1] = APPEND_ACTION[1];
  return at + 2;
}

/**
 * Buffer.byteLength(value) for UTF-8, counted here: an allow measures about twenty short
 * strings, each cheaper to count than a call into Buffer.byteLength. A longer string (a
 * denial's JSON body) is counted by Buffer.byteLength. A lone surrogate counts 3 bytes, as
 * Buffer.write replaces it with U+FFFD.
 */
export function utf8Length(value: string): number {
  if (value.length > NATIVE_COPY_FROM) return Buffer.byteLength(value, "utf8");
  let bytes = value.length;
  for (let i = 0; i < value.length; i++) {
    const c = value.charCodeAt(i);
    if (c < 0x80) continue;
    if (c < 0x800) bytes += 1;
    else if (c >= 0xd800 && c < 0xdc00 && i + 1 < value.length && (value.charCodeAt(i + 1) & 0xfc00) === 0xdc00) {
      bytes += 2;
      i++;
    } else bytes += 2;
  }
  return bytes;
}
