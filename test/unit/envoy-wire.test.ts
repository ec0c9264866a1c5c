import { fromBinary } from "@bufbuild/protobuf";
import { BinaryReader, WireType } from "@bufbuild/protobuf/wire";
import { describe, expect, it } from "vitest";
import type { Allow, Deny } from "../../src/authz/pipeline.js";
import { encodeCheckResponse } from "../../src/authz/to-envoy.js";
import { CheckRequestSchema } from "../../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import type { ChargeResult } from "../../src/limits/limits.js";
import { authorizationServerDefinition, headersOf } from "../../src/server/grpc-authz.js";
import type { KeySnapshot } from "../../src/store/store.js";
import { newKeyRecord } from "../../src/store/store.js";
import { NO_REQUIREMENTS } from "../../src/authz/routes.js";

// The client harness and the server both code messages with src/gen, so a wrong field number
// there would round-trip fine in every other test. These bytes are written from Envoy's published
// protos (envoy/service/auth/v3, envoy/config/core/v3/base.proto, google/rpc/status.proto): each
// tag is (field number << 3) | wire type, spelled out as a literal.

const utf8 = new TextEncoder();
const text = new TextDecoder();

function varint(value: number): number[] {
  const out: number[] = [];
  let rest = value;
  while (rest > 0x7f) {
    out.push((rest & 0x7f) | 0x80);
    rest = Math.floor(rest / 128);
  }
  out.push(rest);
  return out;
}

/** A length-delimited field: literal tag byte, length, payload. */
function len(tag: number, payload: Uint8Array | string): Uint8Array {
  const body = typeof payload === "string" ? utf8.encode(payload) : payload;
  return Uint8Array.from([tag, ...varint(body.length), ...body]);
}

/** A varint field: literal tag byte, then the value. */
function num(tag: number, value: number): Uint8Array {
  return Uint8Array.from([tag, ...varint(value)]);
}

function cat(...parts: Uint8Array[]): Uint8Array {
  return Uint8Array.from(parts.flatMap((p) => [...p]));
}

/** A map<string, string> entry: key = 1, value = 2. */
function entry(tag: number, key: string, value: string): Uint8Array {
  return len(tag, cat(len(0x0a, key), len(0x12, value)));
}

interface WireField {
  /** The raw tag, (field number << 3) | wire type, to compare with the literals above. */
  tag: number;
  fieldNo: number;
  bytes: Uint8Array;
  varint: number;
}

/** Walks one message's top-level fields in wire order. */
function fields(bytes: Uint8Array): WireField[] {
  const reader = new BinaryReader(bytes);
  const out: WireField[] = [];
  while (reader.pos < reader.len) {
    const [fieldNo, wireType] = reader.tag();
    const tag = (fieldNo << 3) | wireType;
    if (wireType === WireType.LengthDelimited) out.push({ tag, fieldNo, bytes: reader.bytes(), varint: -1 });
    else if (wireType === WireType.Varint) out.push({ tag, fieldNo, bytes: new Uint8Array(), varint: reader.uint32() });
    else out.push({ tag, fieldNo, bytes: reader.skip(wireType, fieldNo), varint: -1 });
  }
  return out;
}

function tagsOf(bytes: Uint8Array): number[] {
  return fields(bytes).map((f) => f.tag);
}

/** The single field with this tag; fails when it is missing or repeated. */
function only(bytes: Uint8Array, tag: number): WireField {
  const found = fields(bytes).filter((f) => f.tag === tag);
  expect(found, `tag 0x${tag.toString(16)}`).toHaveLength(1);
  const [first] = found;
  if (first === undefined) throw new Error(`tag 0x${tag.toString(16)} missing`);
  return first;
}

function all(bytes: Uint8Array, tag: number): WireField[] {
  return fields(bytes).filter((f) => f.tag === tag);
}

/** HeaderValueOption bytes → its header (field 1: HeaderValue key = 1, value = 2) and the other tags. */
function headerOption(bytes: Uint8Array): { key: string; value: string; tags: number[]; appendAction: number | undefined } {
  const header = only(bytes, 0x0a).bytes;
  const action = fields(bytes).find((f) => f.tag === 0x18);
  return {
    key: text.decode(only(header, 0x0a).bytes),
    value: text.decode(only(header, 0x12).bytes),
    tags: tagsOf(bytes),
    appendAction: action?.varint,
  };
}

const SNAPSHOT: KeySnapshot = {
  key: newKeyRecord({
    id: "key_01HWIRE",
    hash: "h",
    ownerId: "owner-wire",
    projectId: "alpha",
    name: "wire",
    mode: "live",
    start: "kg_live_abcd",
    last4: "wxyz",
    scopes: ["tutor", "decks"],
    createdAtMs: 0,
  }),
  account: { ownerId: "owner-wire", plan: "business", subscriptionStatus: "active", role: "standard", createdAtMs: 0, updatedAtMs: 0 },
};

const LIMITS: ChargeResult = {
  allowed: true,
  reason: null,
  rate: { limit: 1000, windowSeconds: 60, remaining: 999, resetSeconds: 60 },
  retryAfterSeconds: null,
  quota: null,
  credits: null,
  spent: null,
  replayed: false,
};

describe("Envoy wire format happy", () => {
  it("decodes a CheckRequest built byte by byte from Envoy's field numbers", () => {
    const http = cat(
      len(0x0a, "req-wire-1"), // id = 1
      len(0x12, "POST"), // method = 2
      entry(0x1a, "authorization", "Bearer kg_live_x"), // headers = 3
      entry(0x1a, "x-api-key", "second"),
      len(0x22, "/v1/decks/7?x=1"), // path = 4
      len(0x2a, "api.example.com"), // host = 5
      len(0x32, "https"), // scheme = 6
      len(0x3a, "q=ignored"), // query = 7
      len(0x42, "frag"), // fragment = 8
      num(0x48, 300), // size = 9 (a two-byte varint)
      len(0x52, "HTTP/2"), // protocol = 10
      len(0x5a, "body text"), // body = 11, not in keygate's subset: skipped
      len(0x62, Uint8Array.from([0, 1, 2])), // raw_body = 12, likewise
      len(
        0x6a, // header_map = 13 → HeaderMap.headers = 1 → HeaderValue key = 1, value = 2, raw_value = 3
        cat(len(0x0a, cat(len(0x0a, "x-raw"), len(0x1a, "raw bytes"))), len(0x0a, cat(len(0x0a, "x-plain"), len(0x12, "plain")))),
      ),
    );
    // Request: time = 1 (a Timestamp with seconds = 1), http = 2.
    const request = cat(len(0x0a, num(0x08, 1)), len(0x12, http));
    const attributes = cat(
      len(0x0a, len(0x12, "source-service")), // source = 1 (Peer.service = 2): not in the subset, skipped
      len(0x12, len(0x12, "destination")), // destination = 2: likewise
      len(0x22, request), // request = 4
      entry(0x52, "required_scopes", "decks"), // context_extensions = 10
      entry(0x52, "project_id", "alpha"),
    );
    const bytes = len(0x0a, attributes); // CheckRequest.attributes = 1

    const decoded = fromBinary(CheckRequestSchema, bytes, { readUnknownFields: false });
    const attrs = decoded.attributes;
    const got = attrs?.request?.http;
    expect(attrs?.request?.time?.seconds).toBe(1n);
    expect(got?.id).toBe("req-wire-1");
    expect(got?.method).toBe("POST");
    expect(got?.headers).toEqual({ authorization: "Bearer kg_live_x", "x-api-key": "second" });
    expect(got?.path).toBe("/v1/decks/7?x=1");
    expect(got?.host).toBe("api.example.com");
    expect(got?.scheme).toBe("https");
    expect(got?.query).toBe("q=ignored");
    expect(got?.fragment).toBe("frag");
    expect(got?.size).toBe(300n);
    expect(got?.protocol).toBe("HTTP/2");
    expect(got?.headerMap?.headers.map((h) => [h.key, h.value, text.decode(h.rawValue)])).toEqual([
      ["x-raw", "", "raw bytes"],
      ["x-plain", "plain", ""],
    ]);
    expect(attrs?.contextExtensions).toEqual({ required_scopes: "decks", project_id: "alpha" });

    // The server decodes the same bytes as its CheckRequestView: the fields it reads, and no others.
    const view = authorizationServerDefinition.Check.requestDeserialize(Buffer.from(bytes));
    const viewHttp = view.attributes?.request?.http;
    expect(viewHttp?.id).toBe("req-wire-1");
    expect(viewHttp?.method).toBe("POST");
    expect(viewHttp?.path).toBe("/v1/decks/7?x=1");
    expect(viewHttp?.headers.names()).toEqual(["authorization", "x-api-key"]);
    expect(viewHttp?.headers.values()).toEqual(["Bearer kg_live_x", "second"]);
    expect(viewHttp?.headerMap?.headers.map((h) => [h.key, h.value, text.decode(h.rawValue)])).toEqual([
      ["x-raw", "", "raw bytes"],
      ["x-plain", "plain", ""],
    ]);
    expect(view.attributes?.contextExtensions).toEqual({ required_scopes: "decks", project_id: "alpha" });
    expect(Object.keys(viewHttp ?? {}).filter((k) => !k.startsWith("$")).sort()).toEqual(["headerMap", "headers", "id", "method", "path"]);
    // With header_map present, the server reads it instead of `headers`, raw_value first.
    const read = headersOf(viewHttp);
    expect(read.names()).toEqual(["x-raw", "x-plain"]);
    expect(read.get("x-raw")).toBe("raw bytes");
    expect(read.get("x-plain")).toBe("plain");
    expect(read.get("authorization")).toBeUndefined();
  });

  it("encodes an allow with Envoy's CheckResponse, OkHttpResponse and HeaderValueOption numbers", () => {
    const allow: Allow = {
      allow: true,
      snapshot: SNAPSHOT,
      credentialHeaders: ["authorization"],
      route: NO_REQUIREMENTS,
      limits: LIMITS,
      forwarded: [],
    };
    const bytes = encodeCheckResponse(allow, ["authorization", "x-keygate-spoof"], "req-1", 0);

    // status = 1 (0x0a), ok_response = 3 (0x1a), dynamic_metadata = 4 (0x22); never denied_response = 2.
    expect(tagsOf(bytes)).toEqual([0x0a, 0x1a, 0x22]);
    // google.rpc.Status with code 0: proto3 leaves code = 1 off the wire, and no message = 2.
    expect(tagsOf(only(bytes, 0x0a).bytes)).toEqual([]);

    const ok = only(bytes, 0x1a).bytes;
    // headers = 2 (0x12), headers_to_remove = 5 (0x2a), response_headers_to_add = 6 (0x32); 3 is reserved.
    expect([...new Set(tagsOf(ok))]).toEqual([0x12, 0x2a, 0x32]);
    const upstream = all(ok, 0x12).map((f) => headerOption(f.bytes));
    expect(upstream.map((h) => [h.key, h.value])).toEqual([
      ["x-keygate-key-id", "key_01HWIRE"],
      ["x-keygate-owner-id", "owner-wire"],
      ["x-keygate-project-id", "alpha"],
      ["x-keygate-scopes", "tutor,decks"],
      ["x-keygate-plan", "business"],
      ["x-keygate-role", "standard"],
      ["x-keygate-mode", "live"],
    ]);
    for (const h of upstream) {
      // header = 1 and append_action = 3 (varint, 0x18) = OVERWRITE_IF_EXISTS_OR_ADD (2). The
      // deprecated append = 2 (0x12) stays unset: Envoy rejects an option that sets both.
      expect(h.tags).toEqual([0x0a, 0x18]);
      expect(h.appendAction).toBe(2);
    }
    expect(all(ok, 0x2a).map((f) => text.decode(f.bytes))).toEqual(["authorization", "x-keygate-spoof"]);
    const toClient = all(ok, 0x32).map((f) => headerOption(f.bytes));
    expect(toClient.map((h) => h.key)).toContain("x-ratelimit-remaining");
    expect(toClient.find((h) => h.key === "x-ratelimit-remaining")?.value).toBe("999");

    // dynamic_metadata is a google.protobuf.Struct: fields = 1, map entries of key = 1 and
    // Value = 2, whose string_value is field 3 (0x1a).
    const metadata = new Map(
      all(only(bytes, 0x22).bytes, 0x0a).map((e) => [text.decode(only(e.bytes, 0x0a).bytes), text.decode(only(only(e.bytes, 0x12).bytes, 0x1a).bytes)]),
    );
    expect(metadata.get("key_id")).toBe("key_01HWIRE");
    expect(metadata.get("owner_id")).toBe("owner-wire");
    expect(metadata.get("scopes")).toBe("tutor,decks");
  });

  it("encodes a 401 deny with Envoy's DeniedHttpResponse and google.rpc.Status numbers", () => {
    const deny: Deny = { allow: false, reason: "UNKNOWN_KEY", message: "Invalid or expired API key." };
    const bytes = encodeCheckResponse(deny, [], "req-deny", 0);

    // status = 1 (0x0a) and denied_response = 2 (0x12) only.
    expect(tagsOf(bytes)).toEqual([0x0a, 0x12]);
    const status = only(bytes, 0x0a).bytes;
    // google.rpc.Status: code = 1 (varint, 0x08) UNAUTHENTICATED (16), message = 2 (0x12).
    expect(tagsOf(status)).toEqual([0x08, 0x12]);
    expect(only(status, 0x08).varint).toBe(16);
    expect(text.decode(only(status, 0x12).bytes)).toBe("UNAUTHENTICATED");

    const denied = only(bytes, 0x12).bytes;
    // DeniedHttpResponse: status = 1 (0x0a), headers = 2 (0x12), body = 3 (0x1a).
    expect([...new Set(tagsOf(denied))]).toEqual([0x0a, 0x12, 0x1a]);
    // envoy.type.v3.HttpStatus: code = 1 (varint, 0x08).
    expect(only(only(denied, 0x0a).bytes, 0x08).varint).toBe(401);
    const headers = all(denied, 0x12).map((f) => headerOption(f.bytes));
    expect(headers.map((h) => [h.key, h.value])).toEqual([
      ["content-type", "application/json"],
      ["www-authenticate", "Bearer"],
    ]);
    const body: unknown = JSON.parse(text.decode(only(denied, 0x1a).bytes));
    expect(body).toMatchObject({ success: false, requestId: "req-deny", error: { statusCode: 401, code: "UNAUTHENTICATED" } });
  });

  it("encodes a 429 deny with its status code and Retry-After on the wire", () => {
    const deny: Deny = {
      allow: false,
      reason: "RATE_LIMITED",
      message: "Too many requests.",
      retryAfterSeconds: 7,
      limits: { ...LIMITS, allowed: false, reason: "RATE_LIMITED", retryAfterSeconds: 7, rate: { ...LIMITS.rate, remaining: 0 } },
    };
    const bytes = encodeCheckResponse(deny, [], "req-429", 0);
    expect(tagsOf(bytes)).toEqual([0x0a, 0x12]);
    // RESOURCE_EXHAUSTED (8).
    expect(only(only(bytes, 0x0a).bytes, 0x08).varint).toBe(8);
    const denied = only(bytes, 0x12).bytes;
    expect(only(only(denied, 0x0a).bytes, 0x08).varint).toBe(429);
    const headers = new Map(all(denied, 0x12).map((f) => headerOption(f.bytes)).map((h) => [h.key, h.value]));
    expect(headers.get("retry-after")).toBe("7");
    expect(headers.get("x-ratelimit-remaining")).toBe("0");
    expect(headers.has("www-authenticate")).toBe(false);
  });
});
