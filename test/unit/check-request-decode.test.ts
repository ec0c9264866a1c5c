import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import type { UnknownField } from "@bufbuild/protobuf";
import { BinaryWriter, WireType } from "@bufbuild/protobuf/wire";
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { checkRequestView, decodeCheckRequest } from "../../src/authz/check-request.js";
import type { DecodedCheckRequest } from "../../src/authz/check-request.js";
import { HeaderMapSchema, HeaderValueSchema } from "../../src/gen/envoy/config/core/v3/base_pb.js";
import type { HeaderValue } from "../../src/gen/envoy/config/core/v3/base_pb.js";
import {
  AttributeContext_HttpRequestSchema,
  AttributeContext_RequestSchema,
  AttributeContextSchema,
} from "../../src/gen/envoy/service/auth/v3/attribute_context_pb.js";
import { CheckRequestSchema } from "../../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import { CheckRequestViewSchema } from "../../src/gen/keygate/authz/v1/check_view_pb.js";
import type { CheckRequestView } from "../../src/gen/keygate/authz/v1/check_view_pb.js";

// decodeCheckRequest replaces protobuf-es's reflective decode of the Check request. protobuf-es
// stays the reference: for any bytes, both give the same message or both throw the same error.

const DECODE = { readUnknownFields: false };

type Outcome<T = CheckRequestView> = { ok: true; value: T } | { ok: false; error: string };

function outcome<T>(decode: () => T): Outcome<T> {
  try {
    return { ok: true, value: decode() };
  } catch (error) {
    return { ok: false, error: error instanceof Error ? `${error.name}: ${error.message}` : String(error) };
  }
}

/**
 * The decoded message as protobuf-es's view (checkRequestView: the header list back in an
 * object), with the context extensions (prototype-less in keygate's decode) as an ordinary
 * object, so toStrictEqual compares their entries with protobuf-es's. A spread copies an own
 * property named __proto__ as an own property. The header list holds each name once.
 */
function withPlainRecords(decoded: DecodedCheckRequest): CheckRequestView {
  const names = decoded.attributes?.request?.http?.headers.names() ?? [];
  expect(new Set(names).size).toBe(names.length);
  const message = checkRequestView(decoded);
  const attributes = message.attributes;
  if (attributes === undefined) return message;
  expect(Object.getPrototypeOf(attributes.contextExtensions)).toBeNull();
  return { ...message, attributes: { ...attributes, contextExtensions: { ...attributes.contextExtensions } } };
}

function expectSameAsProtobufEs(bytes: Uint8Array): Outcome {
  const reference = outcome(() => fromBinary(CheckRequestViewSchema, bytes, DECODE));
  const decoded = outcome(() => decodeCheckRequest(bytes));
  if (!reference.ok && /utf-8/i.test(reference.error)) {
    // The one departure: a string reads invalid UTF-8 as U+FFFD (LENIENT_UTF8), where protobuf-es
    // refuses the message. One that still fails has another fault protobuf-es did not reach.
    if (!decoded.ok) {
      expect(decoded.error).not.toMatch(/utf-8/i);
      return decoded;
    }
    expect(JSON.stringify(checkRequestView(decoded.value))).toContain("\uFFFD");
    return { ok: true, value: withPlainRecords(decoded.value) };
  }
  const plain: Outcome = decoded.ok ? { ok: true, value: withPlainRecords(decoded.value) } : decoded;
  expect(plain).toStrictEqual(reference);
  return plain;
}

// --- arbitraries --------------------------------------------------------------------------

const headerName = fc.oneof(
  fc.constantFrom("authorization", "x-api-key", ":path", ":method", "x-request-id", "__proto__", "constructor", "toString", "hasOwnProperty", ""),
  fc.string({ maxLength: 12 }),
  fc.string({ unit: "binary", maxLength: 6 }),
);
// Long values too: a string of 128 bytes or more has a two-byte length, which the decoder reads
// another way than the short ones.
const headerValue = fc.oneof(
  fc.string({ maxLength: 40 }),
  fc.string({ unit: "binary", maxLength: 8 }),
  fc.constant("Bearer kg_live_x"),
  fc.string({ minLength: 120, maxLength: 300 }),
  fc.string({ unit: "binary", minLength: 40, maxLength: 120 }),
);
const shortText = fc.oneof(fc.constantFrom("", "GET", "POST", "/v1/decks"), fc.string({ maxLength: 40 }), fc.string({ unit: "binary", maxLength: 40 }));

/** A map built from pairs, so that a repeated key and __proto__ are both generated. */
function recordOf(pairs: ReadonlyArray<readonly [string, string]>): { [key: string]: string } {
  const record: { [key: string]: string } = {};
  for (const [key, value] of pairs) Object.defineProperty(record, key, { value, writable: true, enumerable: true, configurable: true });
  return record;
}
const stringMap = fc.array(fc.tuple(headerName, headerValue), { maxLength: 8 }).map(recordOf);

/** A field's bytes, written raw, for fields keygate's subset of Envoy's protos does not declare. */
function raw(write: (writer: BinaryWriter) => void): Uint8Array {
  const writer = new BinaryWriter();
  write(writer);
  return writer.finish();
}

// Fields Envoy sends that Check does not read, written under Envoy's numbers as unknown fields
// of the message they belong to: AttributeContext.source/destination (Peer with a socket
// address, principal, labels), metadata_context, tls_session; HttpRequest.body and raw_body.
const peer = fc.record({ address: fc.ipV4(), port: fc.integer({ min: 0, max: 65_535 }), principal: fc.string({ maxLength: 30 }) }).map((p) =>
  raw((w) => {
    w.tag(1, WireType.LengthDelimited).fork();
    w.tag(1, WireType.LengthDelimited).fork().tag(2, WireType.LengthDelimited).string(p.address).tag(3, WireType.Varint).uint32(p.port).join();
    w.join();
    w.tag(4, WireType.LengthDelimited).string(p.principal);
    w.tag(3, WireType.LengthDelimited).fork().tag(1, WireType.LengthDelimited).string("app").tag(2, WireType.LengthDelimited).string("web").join();
  }),
);
const attributeExtras: fc.Arbitrary<UnknownField[]> = fc.record({
  source: fc.option(peer, { nil: undefined }),
  destination: fc.option(peer, { nil: undefined }),
  tlsSni: fc.option(fc.domain(), { nil: undefined }),
}).map((e) => {
  const out: UnknownField[] = [];
  if (e.source !== undefined) out.push({ no: 1, wireType: WireType.LengthDelimited, data: raw((w) => w.bytes(e.source ?? new Uint8Array())) });
  if (e.destination !== undefined) out.push({ no: 2, wireType: WireType.LengthDelimited, data: raw((w) => w.bytes(e.destination ?? new Uint8Array())) });
  out.push({ no: 11, wireType: WireType.LengthDelimited, data: raw((w) => w.bytes(raw((m) => m.tag(1, WireType.LengthDelimited).string("filter")))) });
  if (e.tlsSni !== undefined) out.push({ no: 12, wireType: WireType.LengthDelimited, data: raw((w) => w.bytes(raw((m) => m.tag(1, WireType.LengthDelimited).string(e.tlsSni ?? "")))) });
  return out;
});
const httpExtras: fc.Arbitrary<UnknownField[]> = fc.record({ body: fc.string({ maxLength: 64 }), rawBody: fc.uint8Array({ maxLength: 64 }) }).map((e) => [
  { no: 11, wireType: WireType.LengthDelimited, data: raw((w) => w.string(e.body)) },
  { no: 12, wireType: WireType.LengthDelimited, data: raw((w) => w.bytes(e.rawBody)) },
]);

/** Any well-formed field under a number the message does not declare, groups included. */
function junkField(known: readonly number[]): fc.Arbitrary<UnknownField> {
  const no = fc.integer({ min: 1, max: 2000 }).filter((n) => !known.includes(n));
  return fc.oneof(
    fc.record({ no, value: fc.integer({ min: 0, max: 0x7fffffff }) }).map(({ no: n, value }) => ({ no: n, wireType: WireType.Varint, data: raw((w) => w.uint32(value)) })),
    fc.record({ no, value: fc.uint8Array({ maxLength: 24 }) }).map(({ no: n, value }) => ({ no: n, wireType: WireType.LengthDelimited, data: raw((w) => w.bytes(value)) })),
    fc.record({ no, value: fc.integer() }).map(({ no: n, value }) => ({ no: n, wireType: WireType.Bit32, data: raw((w) => w.sfixed32(value)) })),
    fc.record({ no, value: fc.double() }).map(({ no: n, value }) => ({ no: n, wireType: WireType.Bit64, data: raw((w) => w.double(value)) })),
    no.map((n) => ({ no: n, wireType: WireType.StartGroup, data: raw((w) => w.tag(1, WireType.Varint).uint32(7).tag(n, WireType.EndGroup)) })),
  );
}
const junk = (known: readonly number[]): fc.Arbitrary<UnknownField[]> => fc.array(junkField(known), { maxLength: 2 });

const headerValueArb = fc.record({ key: headerName, value: headerValue, rawValue: fc.uint8Array({ maxLength: 16 }), junk: junk([1, 2, 3]) }).map(
  ({ junk: unknown, ...h }): HeaderValue => ({ ...create(HeaderValueSchema, h), $unknown: unknown }),
);

const httpArb = fc
  .record(
    {
      id: shortText,
      method: shortText,
      headers: stringMap,
      path: shortText,
      host: fc.domain(),
      scheme: fc.constantFrom("", "https", "http"),
      query: fc.string({ maxLength: 16 }),
      protocol: fc.constantFrom("HTTP/1.1", "HTTP/2"),
      size: fc.bigInt({ min: -1n, max: 1n << 40n }),
      headerMap: fc.option(fc.record({ headers: fc.array(headerValueArb, { maxLength: 6 }), junk: junk([1]) }), { nil: undefined }),
      extras: httpExtras,
      junk: junk([1, 2, 3, 4, 13]),
    },
    { requiredKeys: ["id", "method", "headers", "path", "extras", "junk"] },
  )
  .map(({ headerMap, extras, junk: unknown, ...http }) =>
    create(AttributeContext_HttpRequestSchema, {
      ...http,
      headerMap: headerMap === undefined ? undefined : { ...create(HeaderMapSchema, { headers: headerMap.headers }), $unknown: headerMap.junk },
      $unknown: [...extras, ...unknown],
    }),
  );

const checkRequestArb = fc
  .record({
    http: fc.option(httpArb, { nil: undefined }),
    withRequest: fc.boolean(),
    withAttributes: fc.boolean(),
    time: fc.option(fc.integer({ min: 0, max: 2_000_000_000 }), { nil: undefined }),
    contextExtensions: stringMap,
    extras: attributeExtras,
    requestJunk: junk([2]),
    topJunk: junk([1]),
  })
  .map((r) => {
    const request =
      r.withRequest || r.http !== undefined
        ? { ...create(AttributeContext_RequestSchema, { http: r.http, time: r.time === undefined ? undefined : { seconds: BigInt(r.time) } }), $unknown: r.requestJunk }
        : undefined;
    const attributes =
      r.withAttributes || request !== undefined
        ? { ...create(AttributeContextSchema, { request, contextExtensions: r.contextExtensions }), $unknown: r.extras }
        : undefined;
    return toBinary(CheckRequestSchema, { ...create(CheckRequestSchema, { attributes }), $unknown: r.topJunk });
  });

/** Well-formed requests, their concatenations (a merge, on the wire), and damaged copies. */
const wireArb = fc.oneof(
  { weight: 4, arbitrary: checkRequestArb },
  { weight: 2, arbitrary: fc.tuple(checkRequestArb, checkRequestArb).map(([a, b]) => Uint8Array.from([...a, ...b])) },
  {
    weight: 2,
    arbitrary: fc.tuple(checkRequestArb, fc.nat()).map(([bytes, cut]) => bytes.subarray(0, bytes.length === 0 ? 0 : cut % bytes.length)),
  },
  {
    weight: 2,
    arbitrary: fc.tuple(checkRequestArb, fc.array(fc.tuple(fc.nat(), fc.integer({ min: 0, max: 255 })), { minLength: 1, maxLength: 3 })).map(([bytes, flips]) => {
      const copy = Uint8Array.from(bytes);
      if (copy.length > 0) for (const [at, value] of flips) copy[at % copy.length] = value;
      return copy;
    }),
  },
  { weight: 1, arbitrary: fc.tuple(checkRequestArb, fc.uint8Array({ minLength: 1, maxLength: 12 })).map(([a, b]) => Uint8Array.from([...a, ...b])) },
  { weight: 1, arbitrary: fc.uint8Array({ maxLength: 64 }) },
);

// --- byte builders for the edge cases ---------------------------------------------------

/** CheckRequest { attributes { request { http { <http> } } } } around raw HttpRequest bytes. */
function aroundHttp(http: Uint8Array): Uint8Array {
  return raw((w) => w.tag(1, WireType.LengthDelimited).bytes(raw((a) => a.tag(4, WireType.LengthDelimited).bytes(raw((r) => r.tag(2, WireType.LengthDelimited).bytes(http))))));
}
function entry(fieldNo: number, key: string, value: string): Uint8Array {
  return raw((w) => w.tag(fieldNo, WireType.LengthDelimited).bytes(raw((e) => e.tag(1, WireType.LengthDelimited).string(key).tag(2, WireType.LengthDelimited).string(value))));
}

describe("decodeCheckRequest happy", () => {
  it("equals protobuf-es's decode for random Envoy requests, merges, truncations and junk", () => {
    fc.assert(
      fc.property(wireArb, (bytes) => {
        expectSameAsProtobufEs(bytes);
      }),
      { seed: 1313, numRuns: 2500 },
    );
  });

  it("reads a typical Envoy request's fields", () => {
    const bytes = toBinary(
      CheckRequestSchema,
      create(CheckRequestSchema, {
        attributes: {
          request: { http: { id: "req-1", method: "GET", path: "/v1/decks", host: "api.example.com", headers: { authorization: "Bearer k", ":path": "/v1/decks" } } },
          contextExtensions: { scopes: "decks" },
        },
      }),
    );
    const decoded = expectSameAsProtobufEs(bytes);
    expect(decoded).toStrictEqual({
      ok: true,
      value: {
        $typeName: "keygate.authz.v1.CheckRequestView",
        attributes: {
          $typeName: "keygate.authz.v1.AttributeContextView",
          contextExtensions: { scopes: "decks" },
          request: {
            $typeName: "keygate.authz.v1.RequestView",
            http: { $typeName: "keygate.authz.v1.HttpRequestView", id: "req-1", method: "GET", path: "/v1/decks", headers: { authorization: "Bearer k", ":path": "/v1/decks" } },
          },
        },
      },
    });
  });

  it("reads the same strings from a message under and over 4 KiB (a request body Envoy sends along)", () => {
    // Strings of a message up to 4 KiB are cut from one text of it, of a larger one one by one.
    const request = (body: string) =>
      create(CheckRequestSchema, {
        attributes: {
          request: {
            http: {
              id: "req-2",
              method: "POST",
              path: "/v1/decks?q=ünïcode",
              // HttpRequest.body (field 11), which keygate's copy of the proto leaves out.
              $unknown: [{ no: 11, wireType: WireType.LengthDelimited, data: raw((w) => w.string(body)) }],
              headers: { authorization: "Bearer kg_live_abc", "x-name": "Zoë", "x-long": "v".repeat(300), "x-ascii": "plain" },
            },
          },
          contextExtensions: { scopes: "decks:write" },
        },
      });
    for (const bodyLength of [0, 3000, 4096, 70_000]) {
      const bytes = toBinary(CheckRequestSchema, request("b".repeat(bodyLength)));
      const decoded = expectSameAsProtobufEs(bytes);
      const http = decoded.ok ? decoded.value.attributes?.request?.http : undefined;
      expect(http?.headers, `body of ${bodyLength}`).toStrictEqual({ authorization: "Bearer kg_live_abc", "x-name": "Zoë", "x-long": "v".repeat(300), "x-ascii": "plain" });
      expect(http?.path).toBe("/v1/decks?q=ünïcode");
    }
  });

  it("reads header names of the same length and hash (x-Aa, x-BB) as themselves, together or apart", () => {
    // keygate finds a name it read before by a hash of its bytes; these two have the same one.
    const request = (headers: Record<string, string>) =>
      toBinary(CheckRequestSchema, create(CheckRequestSchema, { attributes: { request: { http: { method: "GET", path: "/", headers } } } }));
    const namesOf = (bytes: Uint8Array) => {
      const decoded = expectSameAsProtobufEs(bytes);
      return decoded.ok ? decoded.value.attributes?.request?.http?.headers : undefined;
    };
    expect(namesOf(request({ "x-Aa": "1" }))).toStrictEqual({ "x-Aa": "1" });
    expect(namesOf(request({ "x-BB": "2" }))).toStrictEqual({ "x-BB": "2" });
    expect(namesOf(request({ "x-Aa": "3", "x-BB": "4" }))).toStrictEqual({ "x-Aa": "3", "x-BB": "4" });
    expect(namesOf(request({ "x-BB": "5", "x-Aa": "6", "": "7" }))).toStrictEqual({ "x-BB": "5", "x-Aa": "6", "": "7" });
  });

  it("gives proto3 defaults for an empty request and empty messages", () => {
    expect(expectSameAsProtobufEs(new Uint8Array(0))).toStrictEqual({ ok: true, value: { $typeName: "keygate.authz.v1.CheckRequestView" } });
    const decoded = expectSameAsProtobufEs(aroundHttp(raw((w) => w.tag(13, WireType.LengthDelimited).bytes(raw((m) => m.tag(1, WireType.LengthDelimited).bytes(new Uint8Array(0)))))));
    expect(decoded.ok && decoded.value.attributes?.request?.http?.headerMap?.headers).toStrictEqual([
      { $typeName: "keygate.authz.v1.HeaderValueView", key: "", value: "", rawValue: new Uint8Array(0) },
    ]);
  });

  it("merges a repeated message field, lets the last scalar and map key win, and appends list items", () => {
    const first = raw((w) =>
      w.tag(1, WireType.LengthDelimited).string("a").tag(2, WireType.LengthDelimited).string("GET").raw(entry(3, "x-api-key", "one")).raw(entry(3, "accept", "*/*")),
    );
    const headerMap = (key: string): Uint8Array =>
      raw((w) => w.tag(13, WireType.LengthDelimited).bytes(raw((m) => m.tag(1, WireType.LengthDelimited).bytes(raw((h) => h.tag(1, WireType.LengthDelimited).string(key))))));
    const second = raw((w) => w.tag(1, WireType.LengthDelimited).string("b").raw(entry(3, "x-api-key", "two")).tag(4, WireType.LengthDelimited).string("/p"));
    const bytes = Uint8Array.from([...aroundHttp(Uint8Array.from([...first, ...headerMap("h1")])), ...aroundHttp(Uint8Array.from([...second, ...headerMap("h2")]))]);
    const decoded = expectSameAsProtobufEs(bytes);
    const http = decoded.ok ? decoded.value.attributes?.request?.http : undefined;
    expect(http?.id).toBe("b");
    expect(http?.method).toBe("GET");
    expect(http?.path).toBe("/p");
    expect(http?.headers).toStrictEqual({ "x-api-key": "two", accept: "*/*" });
    expect(http?.headerMap?.headers.map((h) => h.key)).toStrictEqual(["h1", "h2"]);
  });

  it("reads a map entry with its key or value missing, repeated, or fields after the value", () => {
    const entries = raw((w) => {
      w.tag(3, WireType.LengthDelimited).bytes(raw((e) => e.tag(2, WireType.LengthDelimited).string("no key")));
      w.tag(3, WireType.LengthDelimited).bytes(raw((e) => e.tag(1, WireType.LengthDelimited).string("no-value")));
      w.tag(3, WireType.LengthDelimited).bytes(raw((e) => e.tag(1, WireType.LengthDelimited).string("k1").tag(1, WireType.LengthDelimited).string("k2").tag(2, WireType.LengthDelimited).string("v").tag(9, WireType.Varint).uint32(1)));
    });
    const decoded = expectSameAsProtobufEs(aroundHttp(entries));
    expect(decoded.ok && decoded.value.attributes?.request?.http?.headers).toStrictEqual({ "": "no key", "no-value": "", k2: "v" });
  });
});

describe("decodeCheckRequest security", () => {
  it("keeps a header or extension named __proto__ as an own value and pollutes no prototype", () => {
    const bytes = Uint8Array.from([...aroundHttp(Uint8Array.from([...entry(3, "__proto__", "polluted"), ...entry(3, "constructor", "c")]))]);
    expectSameAsProtobufEs(bytes);
    const headers = decodeCheckRequest(bytes).attributes?.request?.http?.headers;
    expect(headers?.names()).toStrictEqual(["__proto__", "constructor"]);
    expect(headers?.get("__proto__")).toBe("polluted");
    expect(headers?.get("constructor")).toBe("c");
    // Names are list entries, not properties: nothing a header is named reaches a prototype, and
    // a name the request lacks reads as absent whatever Object.prototype holds.
    expect(headers?.get("toString")).toBeUndefined();
    expect(headers?.get("hasOwnProperty")).toBeUndefined();
    expect(Object.hasOwn(Object.prototype, "polluted")).toBe(false);

    const ext = raw((w) => w.tag(1, WireType.LengthDelimited).bytes(entry(10, "__proto__", "x")));
    expectSameAsProtobufEs(ext);
    const extensions = decodeCheckRequest(ext).attributes?.contextExtensions;
    expect(extensions !== undefined && Object.getOwnPropertyDescriptor(extensions, "__proto__")?.value).toBe("x");
  });

  it("reads invalid UTF-8 in any string field, short or long, as U+FFFD where protobuf-es refuses the message", () => {
    // Envoy copies the client's :path and header values as they came: refusing the message would
    // make them a gRPC error (which failure_mode_allow turns into an allow). The routes step
    // refuses a path holding U+FFFD, and a credential holding one is no key's shape.
    for (const bytes of [Uint8Array.from([0x66, 0xff]), Uint8Array.from([...new Uint8Array(40).fill(0x61), 0xc0])]) {
      const text = new TextDecoder().decode(bytes);
      expect(text.endsWith("\uFFFD")).toBe(true);
      const http = (field: number): DecodedCheckRequest => decodeCheckRequest(aroundHttp(raw((w) => w.tag(field, WireType.LengthDelimited).bytes(bytes))));
      expect(http(1).attributes?.request?.http?.id).toBe(text);
      expect(http(2).attributes?.request?.http?.method).toBe(text);
      expect(http(4).attributes?.request?.http?.path).toBe(text);
      for (const field of [1, 2, 4]) expect(expectSameAsProtobufEs(aroundHttp(raw((w) => w.tag(field, WireType.LengthDelimited).bytes(bytes)))).ok).toBe(true);
      // A header's value, and its name.
      const value = aroundHttp(entry(3, "k", "v").map((b, i, all) => (i === all.length - 1 ? 0xff : b)));
      expect(expectSameAsProtobufEs(value).ok).toBe(true);
      expect(decodeCheckRequest(value).attributes?.request?.http?.headers.get("k")).toBe("\uFFFD");
      const name = aroundHttp(raw((w) => w.tag(3, WireType.LengthDelimited).bytes(raw((e) => e.tag(1, WireType.LengthDelimited).bytes(bytes).tag(2, WireType.LengthDelimited).string("v")))));
      expect(expectSameAsProtobufEs(name).ok).toBe(true);
      expect(decodeCheckRequest(name).attributes?.request?.http?.headers.names()).toEqual([text]);
    }
    // raw_value is bytes: anything goes.
    const rawValue = aroundHttp(raw((w) => w.tag(13, WireType.LengthDelimited).bytes(raw((m) => m.tag(1, WireType.LengthDelimited).bytes(raw((h) => h.tag(3, WireType.LengthDelimited).bytes(Uint8Array.from([0xff, 0xfe]))))))));
    expect(expectSameAsProtobufEs(rawValue).ok).toBe(true);
  });
});

describe("decodeCheckRequest error", () => {
  const cases: Array<[string, number[]]> = [
    ["truncated varint tag", [0x80]],
    ["varint longer than ten bytes", [0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]],
    ["tag overflowing uint32", [0xff, 0xff, 0xff, 0xff, 0x7f]],
    ["field number zero", [0x02, 0x00]],
    ["wire type 6", [0x0e]],
    ["wire type 7", [0x0f]],
    ["length past the end", [0x0a, 0x05, 0x22, 0x00]],
    ["unknown field's length past the end", [0x12, 0x7f]],
    ["unknown fixed64 cut short", [0x11, 0x01, 0x02]],
    ["unknown fixed32 cut short", [0x15, 0x01]],
    ["stray end-group tag", [0x14]],
    ["unclosed group", [0x13, 0x08, 0x01]],
    ["group closed under another number", [0x13, 0x1c]],
    ["known field sent with the group wire type", [0x0b, 0x00]],
    ["known field sent as a varint", [0x08, 0x02, 0x22, 0x00]],
    ["nested map entry past the end", [0x0a, 0x03, 0x52, 0x7f, 0x0a]],
  ];
  for (const [name, bytes] of cases) {
    it(`throws where protobuf-es throws: ${name}`, () => {
      expectSameAsProtobufEs(Uint8Array.from(bytes));
    });
  }

  it("rejects groups nested past protobuf-es's recursion limit at every depth", () => {
    const nest = (depth: number): Uint8Array => Uint8Array.from([...new Array<number>(depth).fill(0x1b), ...new Array<number>(depth).fill(0x1c)]);
    for (const depth of [93, 94, 95, 96, 97, 98, 99, 100]) {
      expectSameAsProtobufEs(nest(depth));
      expectSameAsProtobufEs(aroundHttp(nest(depth)));
      expectSameAsProtobufEs(aroundHttp(raw((w) => w.tag(3, WireType.LengthDelimited).bytes(nest(depth)))));
    }
    expect(outcome(() => decodeCheckRequest(nest(100))).ok).toBe(false);
  });
});
