import { Writable } from "node:stream";
import { brotliCompressSync, gzipSync } from "node:zlib";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Code, createClient } from "@connectrpc/connect";
import type { Interceptor } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-node";
import { KeyAdmin } from "../../src/gen/keygate/v1/key_admin_pb.js";
import { withoutSecrets } from "../../src/server/connect-scrub.js";
import { createLogger } from "../../src/server/logger.js";
import { ADMIN_TOKEN, TEST_POLICY, adminRefusal, grpcFrame, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

// connect-es compresses a gRPC-Web trailer frame like any other frame once it reaches
// compressMinBytes (1 KiB) and the caller accepts gzip or br (connect-node's gRPC-Web transport
// does by default): flag 0x81. keygate scrubbed every frame flagged 0x80 as plain header lines, so
// such a trailer came back corrupt (TextDecoder turned the gzip bytes into U+FFFD) or as a bare
// HTTP 500, and skipped the redaction, the decoder-echo bound and the reclassification. It is now
// inflated, scrubbed and sent back uncompressed (flag 0x80): identity is always acceptable. One
// that cannot be inflated becomes a well-formed INTERNAL trailer, never its bytes unread.

// A scope catalog of 84 scopes: an unknown scope's message lists them all, well over 1 KiB.
const CATALOG = [...TEST_POLICY.scopes.catalog, ...Array.from({ length: 80 }, (_, i) => `projects.resource${String(i).padStart(2, "0")}:read`)];
const POLICY = { ...TEST_POLICY, scopes: { catalog: CATALOG, default: ["tutor"] } };

let kg: TestKeygate;
beforeAll(async () => {
  kg = await startKeygate({ policy: POLICY });
  await kg.admin.upsertAccount({ ownerId: "user_gw", plan: "business" });
});
afterAll(async () => {
  await kg.stop();
});

const auth: Interceptor = (next) => (req) => {
  req.header.set("authorization", `Bearer ${ADMIN_TOKEN}`);
  return next(req);
};

/** A gRPC-Web answer's frames: each frame's flag byte and its data. */
function frames(bytes: Buffer): { flags: number; data: Buffer }[] {
  const out: { flags: number; data: Buffer }[] = [];
  for (let at = 0; at + 5 <= bytes.length; at += 5 + bytes.readUInt32BE(at + 1)) {
    out.push({ flags: bytes[at] ?? -1, data: bytes.subarray(at + 5, at + 5 + bytes.readUInt32BE(at + 1)) });
  }
  return out;
}

/** A trailer frame's header lines as name → value, grpc-message percent-decoded. */
function trailerFields(data: Buffer): Record<string, string> {
  const fields: Record<string, string> = {};
  for (const line of data.toString("utf8").split("\r\n")) {
    const at = line.indexOf(":");
    if (at > 0) fields[line.slice(0, at)] = line.slice(at + 1).trim();
  }
  if (fields["grpc-message"] !== undefined) fields["grpc-message"] = decodeURIComponent(fields["grpc-message"]);
  return fields;
}

/** A raw gRPC-Web JSON call to GetKey that accepts `encoding`: the answer's grpc-encoding and its frames. */
async function getKeyAccepting(encoding: string, json: string): Promise<{ grpcEncoding: string | null; frames: { flags: number; fields: Record<string, string> }[] }> {
  const res = await fetch(`http://127.0.0.1:${kg.ports.admin}/keygate.v1.KeyAdmin/GetKey`, {
    method: "POST",
    headers: { "content-type": "application/grpc-web+json", authorization: `Bearer ${ADMIN_TOKEN}`, "grpc-accept-encoding": encoding },
    body: grpcFrame(json),
  });
  const bytes = Buffer.from(await res.arrayBuffer());
  return { grpcEncoding: res.headers.get("grpc-encoding"), frames: frames(bytes).map((frame) => ({ flags: frame.flags, fields: trailerFields(frame.data) })) };
}

const LONG_KEY = "a".repeat(2000);
const UNKNOWN_KEY = `cannot decode message keygate.v1.GetKeyRequest from JSON: key "${"a".repeat(59)}…aaaa" is unknown`;

describe("admin gRPC-Web compressed trailer security: a trailer frame of 1 KiB or more, to a caller that accepts compression", () => {
  it("CreateKey with an unknown scope over connect-node's default gRPC-Web transport: INVALID_ARGUMENT, the catalog listed, nothing logged", async () => {
    const client = createClient(KeyAdmin, createGrpcWebTransport({ baseUrl: `http://127.0.0.1:${kg.ports.admin}`, httpVersion: "1.1", interceptors: [auth] }));
    const refusal = await adminRefusal(client.createKey({ ownerId: "user_gw", name: "ci", scopes: ["nope"] }));
    // Not a failure of keygate's own: nothing logged as one.
    const failures = kg.logLines.filter((line) => line.includes("KeyAdmin handler failed") || line.includes("KeyAdmin error trailer unreadable"));
    expect({ code: Code[refusal.code], message: refusal.message, failures }).toEqual({
      code: "InvalidArgument",
      message: `scopes[0]: unknown scope "nope"; known scopes: ${CATALOG.join(", ")}`,
      failures: [],
    });
  });

  it.each(["gzip", "br"])("raw gRPC-Web JSON, a 2,000-character unknown key, grpc-accept-encoding %s: one uncompressed trailer frame, the message bounded", async (encoding) => {
    const answer = await getKeyAccepting(encoding, JSON.stringify({ [LONG_KEY]: 1 }));
    // The answer did negotiate compression: the trailer frame alone goes back as identity.
    expect(answer).toEqual({ grpcEncoding: encoding, frames: [{ flags: 0x80, fields: { "grpc-status": "3", "grpc-message": UNKNOWN_KEY } }] });
  });

  it("raw gRPC-Web JSON, gzip: an API key quoted in a compressed trailer is redacted before the message is cut", async () => {
    const key = `kg_live_${"K".repeat(2000)}`;
    const answer = await getKeyAccepting("gzip", JSON.stringify({ [key]: 1 }));
    expect(answer.frames).toEqual([{ flags: 0x80, fields: { "grpc-status": "3", "grpc-message": 'cannot decode message keygate.v1.GetKeyRequest from JSON: key "[redacted]" is unknown' } }]);
  });

  it("happy: the same call without grpc-accept-encoding: uncompressed as before, the message bounded the same way", async () => {
    const res = await fetch(`http://127.0.0.1:${kg.ports.admin}/keygate.v1.KeyAdmin/GetKey`, {
      method: "POST",
      headers: { "content-type": "application/grpc-web+json", authorization: `Bearer ${ADMIN_TOKEN}` },
      body: grpcFrame(JSON.stringify({ [LONG_KEY]: 1 })),
    });
    const bytes = Buffer.from(await res.arrayBuffer());
    expect({ grpcEncoding: res.headers.get("grpc-encoding"), frames: frames(bytes).map((frame) => ({ flags: frame.flags, fields: trailerFields(frame.data) })) }).toEqual({
      grpcEncoding: null,
      frames: [{ flags: 0x80, fields: { "grpc-status": "3", "grpc-message": UNKNOWN_KEY } }],
    });
  });
});

describe("admin gRPC-Web compressed trailer security: each compressed trailer frame connect-es could write", () => {
  const once = async function* (bytes: Uint8Array): AsyncIterable<Uint8Array> {
    yield bytes;
  };
  const envelope = (flags: number, data: Uint8Array): Buffer => {
    const head = Buffer.alloc(5);
    head[0] = flags;
    head.writeUInt32BE(data.byteLength, 1);
    return Buffer.concat([head, data]);
  };
  /** withoutSecrets on a gRPC-Web answer of `body` with grpc-encoding `encoding`: its frames, and the messages logged. */
  const scrubbed = async (body: Buffer, encoding: string | null, decoded: boolean): Promise<{ frames: { flags: number; fields: Record<string, string> }[]; logged: string[] }> => {
    const lines: string[] = [];
    const sink = new Writable({
      write(chunk: Buffer, _encoding, callback) {
        lines.push(chunk.toString("utf8"));
        callback();
      },
    });
    const header = new Headers({ "content-type": "application/grpc-web+proto" });
    if (encoding !== null) header.set("grpc-encoding", encoding);
    const answer = await withoutSecrets({ status: 200, header, body: once(body) }, decoded, createLogger("info", sink));
    const chunks: Uint8Array[] = [];
    for await (const chunk of answer.body ?? []) chunks.push(chunk);
    return {
      frames: frames(Buffer.concat(chunks)).map((frame) => ({ flags: frame.flags, fields: trailerFields(frame.data) })),
      logged: lines.map((line) => String((JSON.parse(line) as { msg?: unknown }).msg)),
    };
  };
  const INTERNAL = { flags: 0x80, fields: { "grpc-status": "13", "grpc-message": "internal error" } };

  it("the decoder's INTERNAL of an undecoded call, gzip-compressed: reclassified INVALID_ARGUMENT, the message frame before it left as it is", async () => {
    const message = envelope(0x01, gzipSync(Buffer.from("{}")));
    const trailer = envelope(0x81, gzipSync(Buffer.from("grpc-status: 13\r\ngrpc-message: parse%20binary%3A%20premature%20EOF\r\n")));
    const answer = await scrubbed(Buffer.concat([message, trailer]), "gzip", false);
    expect(answer.frames[0]?.flags).toBe(0x01);
    expect(answer.frames.slice(1)).toEqual([{ flags: 0x80, fields: { "grpc-status": "3", "grpc-message": "the request body is not a valid protobuf message: premature EOF" } }]);
  });

  it("a decoded call's INTERNAL, brotli-compressed: stays INTERNAL, uncompressed", async () => {
    const trailer = envelope(0x81, brotliCompressSync(Buffer.from("grpc-status: 13\r\ngrpc-message: parse%20binary%3A%20premature%20EOF\r\n")));
    expect(await scrubbed(trailer, "br", true)).toEqual({ frames: [{ flags: 0x80, fields: { "grpc-status": "13", "grpc-message": "parse binary: premature EOF" } }], logged: [] });
  });

  it.each([
    ["not gzip at all", envelope(0x81, Buffer.from("grpc-status: 3\r\n")), "gzip"],
    ["gzip cut short", envelope(0x81, gzipSync(Buffer.from("grpc-status: 3\r\ngrpc-message: kg_live_0123456789abcdef\r\n")).subarray(0, 20)), "gzip"],
    ["more than 1 MiB inflated", envelope(0x81, gzipSync(Buffer.from(`grpc-status: 3\r\ngrpc-message: ${"x".repeat(1024 * 1024)}\r\n`))), "gzip"],
    ["no grpc-encoding to inflate it with", envelope(0x81, gzipSync(Buffer.from("grpc-status: 3\r\n"))), null],
  ])("a compressed trailer frame that cannot be inflated (%s): a well-formed INTERNAL trailer, the cause logged", async (_case, body, encoding) => {
    expect(await scrubbed(body, encoding, false)).toEqual({ frames: [INTERNAL], logged: ["KeyAdmin error trailer unreadable"] });
  });
});
