import { connect } from "node:http2";
import { brotliCompressSync, gzipSync } from "node:zlib";
import { create, toBinary } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { withoutSecrets } from "../../src/server/connect-scrub.js";
import { CreateKeyRequestSchema, GetKeyRequestSchema } from "../../src/gen/keygate/v1/key_admin_pb.js";
import { ADMIN_TOKEN, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

// A KeyAdmin request body the caller got wrong (a protobuf message cut short or with a tag that
// cannot exist, a gzip or brotli body cut short) is the caller's mistake: INVALID_ARGUMENT on
// every protocol (Connect 400, gRPC and gRPC-Web grpc-status 3), with a message that names the
// problem and quotes none of the body, and nothing written. connect-es answers the first two
// INTERNAL; keygate's own failures must stay INTERNAL.

let kg: TestKeygate;
beforeAll(async () => {
  kg = await startKeygate();
});
afterAll(async () => {
  await kg.stop();
});

const OWNER = "undecodable-owner";
const MESSAGE = Buffer.from(toBinary(CreateKeyRequestSchema, create(CreateKeyRequestSchema, { ownerId: OWNER, name: "n" })));
const JSON_BODY = Buffer.from(JSON.stringify({ ownerId: OWNER, name: "n" }));
/** The message cut one byte short: its last field's length says more than follows. */
const TRUNCATED = MESSAGE.subarray(0, MESSAGE.length - 1);
/** Field 1 with wire type 7, which does not exist. */
const ILLEGAL_TAG = Buffer.from([0x0f, 0x01]);
const GZIP_CUT = gzipSync(MESSAGE).subarray(0, 12);

const CUT_SHORT = "the request body is not a valid protobuf message: premature EOF";
const BAD_TAG = "the request body is not a valid protobuf message: illegal tag: field no 1 wire type 7";

function envelope(data: Buffer, flags = 0): Buffer {
  const head = Buffer.alloc(5);
  head[0] = flags;
  head.writeUInt32BE(data.length, 1);
  return Buffer.concat([head, data]);
}

interface Answer {
  http: number;
  /** gRPC and gRPC-Web: from the trailers, the headers or the trailer frame. */
  grpcStatus: string | null;
  grpcMessage: string | null;
  text: string;
}

/** One CreateKey over HTTP/2, as sent. */
async function createKey(headers: Record<string, string>, body: Buffer): Promise<Answer> {
  const session = connect(`http://127.0.0.1:${kg.ports.admin}`);
  try {
    return await new Promise((resolve, reject) => {
      const stream = session.request({ ":method": "POST", ":path": "/keygate.v1.KeyAdmin/CreateKey", te: "trailers", authorization: `Bearer ${ADMIN_TOKEN}`, ...headers });
      let head: Record<string, unknown> = {};
      const chunks: Buffer[] = [];
      stream.on("response", (h) => (head = { ...h }));
      stream.on("trailers", (t) => (head = { ...head, ...t }));
      stream.on("data", (d: Buffer) => chunks.push(d));
      stream.on("error", reject);
      stream.on("close", () => {
        const text = Buffer.concat(chunks).toString("utf8");
        const field = (name: string): string | null => (head[name] === undefined ? (new RegExp(`${name}: ?([^\\r\\n]*)`).exec(text)?.[1] ?? null) : String(head[name]));
        const message = field("grpc-message");
        resolve({ http: Number(head[":status"]), grpcStatus: field("grpc-status"), grpcMessage: message === null ? null : decodeURIComponent(message), text });
      });
      stream.end(body);
    });
  } finally {
    session.close();
  }
}

async function keysOfOwner(): Promise<number> {
  return (await kg.admin.listKeys({ ownerId: OWNER, includeRevoked: true })).keys.length;
}

describe("admin undecodable body security: the caller's mistake, on every protocol", () => {
  it("Connect: a malformed protobuf body, or a gzip or brotli body cut short, is 400 invalid_argument naming the problem", async () => {
    const cases: Array<[string, Record<string, string>, Buffer, string]> = [
      ["proto cut short", { "content-type": "application/proto" }, TRUNCATED, CUT_SHORT],
      ["proto illegal tag", { "content-type": "application/proto" }, ILLEGAL_TAG, BAD_TAG],
      ["gzip cut short", { "content-type": "application/json", "content-encoding": "gzip" }, gzipSync(JSON_BODY).subarray(0, 12), "the request body is not valid gzip"],
      ["brotli cut short", { "content-type": "application/json", "content-encoding": "br" }, brotliCompressSync(JSON_BODY).subarray(0, 4), "the request body is not valid br"],
      ["gzip of protobuf cut short", { "content-type": "application/proto", "content-encoding": "gzip" }, GZIP_CUT, "the request body is not valid gzip"],
    ];
    const seen = [];
    for (const [label, headers, body] of cases) {
      const answer = await createKey(headers, body);
      seen.push({ label, http: answer.http, error: JSON.parse(answer.text) as unknown });
    }
    expect(seen).toEqual(cases.map(([label, , , message]) => ({ label, http: 400, error: { code: "invalid_argument", message } })));
    expect(await keysOfOwner()).toBe(0);
  });

  it("gRPC and gRPC-Web: the same bodies are grpc-status 3 with the same message", async () => {
    const cases: Array<[string, Record<string, string>, Buffer, string]> = [
      ["gRPC proto cut short", { "content-type": "application/grpc" }, envelope(TRUNCATED), CUT_SHORT],
      ["gRPC proto illegal tag", { "content-type": "application/grpc" }, envelope(ILLEGAL_TAG), BAD_TAG],
      ["gRPC gzip cut short", { "content-type": "application/grpc", "grpc-encoding": "gzip" }, envelope(GZIP_CUT, 1), "the request body is not valid gzip"],
      ["gRPC-Web proto cut short", { "content-type": "application/grpc-web+proto" }, envelope(TRUNCATED), CUT_SHORT],
      ["gRPC-Web proto illegal tag", { "content-type": "application/grpc-web+proto" }, envelope(ILLEGAL_TAG), BAD_TAG],
      ["gRPC-Web gzip cut short", { "content-type": "application/grpc-web+proto", "grpc-encoding": "gzip" }, envelope(GZIP_CUT, 1), "the request body is not valid gzip"],
    ];
    const seen = [];
    for (const [label, headers, body] of cases) {
      const answer = await createKey(headers, body);
      seen.push({ label, http: answer.http, grpcStatus: answer.grpcStatus, grpcMessage: answer.grpcMessage });
    }
    expect(seen).toEqual(cases.map(([label, , , message]) => ({ label, http: 200, grpcStatus: "3", grpcMessage: message })));
    expect(await keysOfOwner()).toBe(0);
  });

  it("gRPC-Web over HTTP/1.1: the trailer frame says grpc-status 3 with the same message", async () => {
    const res = await fetch(`http://127.0.0.1:${kg.ports.admin}/keygate.v1.KeyAdmin/CreateKey`, {
      method: "POST",
      headers: { "content-type": "application/grpc-web+proto", authorization: `Bearer ${ADMIN_TOKEN}` },
      body: envelope(TRUNCATED),
    });
    const bytes = Buffer.from(await res.arrayBuffer());
    const trailer = bytes.subarray(5).toString("utf8");
    expect({
      http: res.status,
      flags: bytes[0],
      length: bytes.readUInt32BE(1),
      status: /grpc-status: ?(\d+)/.exec(trailer)?.[1],
      message: decodeURIComponent(/grpc-message: ?([^\r\n]*)/.exec(trailer)?.[1] ?? ""),
    }).toEqual({ http: 200, flags: 0x80, length: bytes.length - 5, status: "3", message: CUT_SHORT });
    expect(await keysOfOwner()).toBe(0);
  });

  it("happy: well-formed bodies on the same paths are served, so the malformation is what was refused", async () => {
    const served = {
      connectProto: await createKey({ "content-type": "application/proto" }, Buffer.from(toBinary(CreateKeyRequestSchema, create(CreateKeyRequestSchema, { ownerId: "undecodable-ok-1", name: "n" })))),
      connectGzip: await createKey({ "content-type": "application/json", "content-encoding": "gzip" }, gzipSync(JSON.stringify({ ownerId: "undecodable-ok-2", name: "n" }))),
      grpcGzip: await createKey(
        { "content-type": "application/grpc", "grpc-encoding": "gzip" },
        envelope(gzipSync(toBinary(CreateKeyRequestSchema, create(CreateKeyRequestSchema, { ownerId: "undecodable-ok-3", name: "n" }))), 1),
      ),
    };
    expect({ connectProto: served.connectProto.http, connectGzip: served.connectGzip.http, grpcGzip: served.grpcGzip.grpcStatus }).toEqual({ connectProto: 200, connectGzip: 200, grpcGzip: "0" });
  });
});

describe("admin undecodable body security: keygate's own failures stay INTERNAL", () => {
  const bodyOf = async (body: AsyncIterable<Uint8Array> | undefined): Promise<string> => {
    let text = "";
    for await (const chunk of body ?? []) text += new TextDecoder().decode(chunk);
    return text;
  };
  const once = async function* (text: string): AsyncIterable<Uint8Array> {
    yield new TextEncoder().encode(text);
  };

  it("an INTERNAL that reads like the decoder's, from a call whose message was decoded, is left as it is", async () => {
    const connectError = await withoutSecrets(
      { status: 500, header: new Headers({ "content-type": "application/json" }), body: once(JSON.stringify({ code: "internal", message: "parse binary: premature EOF" })) },
      true,
    );
    const grpcTrailer = new Headers({ "grpc-status": "13", "grpc-message": "parse%20binary%3A%20premature%20EOF" });
    const grpc = await withoutSecrets({ status: 200, header: new Headers({ "content-type": "application/grpc" }), body: once(""), trailer: grpcTrailer }, true);
    await bodyOf(grpc.body);
    expect({
      connect: { status: connectError.status, body: JSON.parse(await bodyOf(connectError.body)) as unknown },
      grpc: { status: grpcTrailer.get("grpc-status"), message: grpcTrailer.get("grpc-message") },
    }).toEqual({
      connect: { status: 500, body: { code: "internal", message: "parse binary: premature EOF" } },
      grpc: { status: "13", message: "parse%20binary%3A%20premature%20EOF" },
    });
  });

  it("an undecoded call's INTERNAL is reclassified only when it is the decoder's; other codes and messages stand", async () => {
    const answers = [];
    for (const error of [
      { code: "internal", message: "internal error" },
      { code: "internal", message: "serialize binary: invalid uint32: -1" },
      { code: "unavailable", message: "parse binary: premature EOF" },
      { code: "resource_exhausted", message: "message is larger than configured readMaxBytes 65536 after decompression" },
    ]) {
      const answer = await withoutSecrets({ status: 500, header: new Headers({ "content-type": "application/json" }), body: once(JSON.stringify(error)) }, false);
      answers.push({ status: answer.status, body: JSON.parse(await bodyOf(answer.body)) as unknown });
    }
    expect(answers).toEqual([
      { status: 500, body: { code: "internal", message: "internal error" } },
      { status: 500, body: { code: "internal", message: "serialize binary: invalid uint32: -1" } },
      { status: 500, body: { code: "unavailable", message: "parse binary: premature EOF" } },
      { status: 500, body: { code: "resource_exhausted", message: "message is larger than configured readMaxBytes 65536 after decompression" } },
    ]);
  });

  it("a failure of keygate's own during a well-formed protobuf call stays 500 internal, even when it reads like the decoder's", async () => {
    const store = kg.app.store;
    const getKey = store.getKey.bind(store);
    const getKeyBody = Buffer.from(toBinary(GetKeyRequestSchema, create(GetKeyRequestSchema, { id: "key_01K0000000000000000000000A" })));
    const call = async (): Promise<unknown> => {
      const res = await fetch(`http://127.0.0.1:${kg.ports.admin}/keygate.v1.KeyAdmin/GetKey`, {
        method: "POST",
        headers: { "content-type": "application/proto", authorization: `Bearer ${ADMIN_TOKEN}` },
        body: getKeyBody,
      });
      return { status: res.status, body: (await res.json()) as unknown };
    };
    try {
      store.getKey = () => Promise.reject(new Error("parse binary: the disk is on fire"));
      const plain = await call();
      // A ConnectError passes toConnectError as it is: only the decoded flag tells it from the decoder's.
      store.getKey = () => Promise.reject(new ConnectError("parse binary: premature EOF", Code.Internal));
      const lookalike = await call();
      expect({ plain, lookalike }).toEqual({
        plain: { status: 500, body: { code: "internal", message: "internal error" } },
        lookalike: { status: 500, body: { code: "internal", message: "parse binary: premature EOF" } },
      });
    } finally {
      store.getKey = getKey;
    }
  });
});
