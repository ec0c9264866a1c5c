import { once } from "node:events";
import { mkdtempSync, rmSync } from "node:fs";
import { request as httpRequest } from "node:http";
import type { IncomingHttpHeaders } from "node:http";
import { connect as h2Connect, constants as h2 } from "node:http2";
import type { OutgoingHttpHeaders } from "node:http2";
import { connect as netConnect } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createGzip } from "node:zlib";
import { create, toBinary } from "@bufbuild/protobuf";
import { Client as GrpcClient, Metadata, credentials } from "@grpc/grpc-js";
import type { ServiceError } from "@grpc/grpc-js";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { z } from "zod";
import { CreateKeyRequestSchema } from "../../src/gen/keygate/v1/key_admin_pb.js";
import { KeyFormat } from "../../src/keys/key-format.js";
import { ADMIN_TOKEN, postJson, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { spawnKeygate } from "../harness/process.js";
import type { KeygateProcess } from "../harness/process.js";
import { closedByServer, firstEvent, openSocket, peakGrowthDuring } from "../harness/sockets.js";

// Finding 4: request bodies were read (and gzip inflated) before the admin token was checked,
// with no size limit, even from an address the failed-login limiter had blocked.

const MiB = 1024 * 1024;
const LIMIT = 64 * 1024;
/** The body an attacker sends: far more than any admin call needs. */
const HUGE = 100 * MiB;
/** What a gzip bomb inflates to: as much as deflate can pack into less than the limit (about 1000:1). */
const BOMB = 56 * MiB;
/** Peak memory growth allowed while a huge body is refused: generous, yet far below the body. */
const MEMORY_BOUND = 32 * MiB;
/** How long an answer may take: far above the milliseconds it needs. */
const DEADLINE_MS = 10_000;
const CREATE_KEY = "/keygate.v1.KeyAdmin/CreateKey";
const MESSAGES = {
  missing: 'an admin token is required: send "Authorization: Bearer <admin token>"',
  invalid: "the admin token is not valid",
  apiKey: "API keys cannot manage keys; use an admin token",
  blocked: /^too many failed admin authentications from this address; retry in \d+ s$/,
};

// Every refused call comes from its own loopback address, so the limiter counts each source
// apart and 127.0.0.1 (the authenticated calls) is never blocked by the refusals.
let nextSource = 10;
const freshSource = (): Promise<string> => Promise.resolve(`127.0.1.${nextSource++}`);
let nextBlocked = 1;

/** One way to be refused, with what each protocol must answer. */
interface Refusal {
  name: string;
  authorization: string | null;
  source: () => Promise<string>;
  httpStatus: number;
  code: "unauthenticated" | "resource_exhausted";
  grpcStatus: number;
  message: string | RegExp;
}

const REFUSALS: Refusal[] = [
  { name: "no token", authorization: null, source: freshSource, httpStatus: 401, code: "unauthenticated", grpcStatus: 16, message: MESSAGES.missing },
  { name: "a wrong token", authorization: "Bearer kgadm_wrong_token_0123456789abcdefghij", source: freshSource, httpStatus: 401, code: "unauthenticated", grpcStatus: 16, message: MESSAGES.invalid },
  { name: "an API key", authorization: `Bearer ${new KeyFormat("kg").generate("live")}`, source: freshSource, httpStatus: 401, code: "unauthenticated", grpcStatus: 16, message: MESSAGES.apiKey },
  // The right token from a blocked address: the limiter answers before the token is looked at.
  { name: "a blocked address (with the right token)", authorization: `Bearer ${ADMIN_TOKEN}`, source: () => blockedSource(), httpStatus: 429, code: "resource_exhausted", grpcStatus: 8, message: MESSAGES.blocked },
];

/** Connect's JSON error body: exactly a code and a message. */
const connectError = z.object({ code: z.string(), message: z.string() }).strict();

function expectMessage(actual: unknown, expected: string | RegExp): void {
  if (typeof expected === "string") expect(actual).toBe(expected);
  else expect(String(actual)).toMatch(expected);
}

/** An HTTP/1.1 answer read off a raw connection. */
interface Http1Answer {
  status: number;
  headers: Map<string, string>;
  body: Buffer;
}

function dechunk(body: Buffer): Buffer {
  const parts: Buffer[] = [];
  let at = 0;
  for (;;) {
    const lineEnd = body.indexOf("\r\n", at);
    if (lineEnd < 0) throw new Error("truncated chunked body");
    const size = Number.parseInt(body.subarray(at, lineEnd).toString("latin1"), 16);
    if (size === 0) return Buffer.concat(parts);
    parts.push(body.subarray(lineEnd + 2, lineEnd + 2 + size));
    at = lineEnd + 2 + size + 2;
  }
}

function parseHttp1(raw: Buffer): Http1Answer {
  const headEnd = raw.indexOf("\r\n\r\n");
  if (headEnd < 0) throw new Error(`no HTTP answer: ${JSON.stringify(raw.toString("latin1").slice(0, 80))}`);
  const [statusLine = "", ...lines] = raw.subarray(0, headEnd).toString("latin1").split("\r\n");
  const status = Number(/^HTTP\/1\.1 (\d{3}) /.exec(statusLine)?.[1] ?? "0");
  const headers = new Map(lines.map((line) => [line.slice(0, line.indexOf(":")).toLowerCase(), line.slice(line.indexOf(":") + 1).trim()]));
  const rest = raw.subarray(headEnd + 4);
  return { status, headers, body: headers.get("transfer-encoding") === "chunked" ? dechunk(rest) : rest };
}

/**
 * Sends only a request head announcing a huge body, never a byte of the body, and returns the
 * answer once the server has closed the connection. A server that waits for the body fails
 * the deadline.
 */
async function headOnlyHttp1(port: number, source: string, head: Record<string, string>): Promise<Http1Answer> {
  const socket = await openSocket(port, source);
  const lines = Object.entries({ host: "127.0.0.1", ...head }).map(([name, value]) => `${name}: ${value}\r\n`);
  socket.write(`POST ${CREATE_KEY} HTTP/1.1\r\n${lines.join("")}\r\n`);
  const closed = await closedByServer(socket, DEADLINE_MS);
  return parseHttp1(closed.received);
}

/** An HTTP/2 exchange as the client saw it. */
interface H2Answer {
  headers: IncomingHttpHeaders;
  /** The answer's HEADERS frame ended the stream: a trailers-only gRPC answer. */
  endedWithHeaders: boolean;
  trailers: IncomingHttpHeaders;
  body: Buffer;
  rstCode: number;
}

/**
 * One HTTP/2 request from `source`. Without `body` the stream is left open after the head and
 * never ended by the client, so it closes only if the server answers and resets it.
 */
function h2Exchange(port: number, source: string, headers: OutgoingHttpHeaders, body?: Buffer): Promise<H2Answer> {
  return new Promise((resolve, reject) => {
    const session = h2Connect(`http://127.0.0.1:${port}`, { createConnection: () => netConnect({ host: "127.0.0.1", port, localAddress: source }) });
    session.on("error", () => undefined);
    const timer = setTimeout(() => {
      session.destroy();
      reject(new Error(`the HTTP/2 stream was still open after ${DEADLINE_MS} ms`));
    }, DEADLINE_MS);
    const stream = session.request({ ":method": "POST", ":path": CREATE_KEY, ...headers }, { endStream: false });
    const chunks: Buffer[] = [];
    let answer: IncomingHttpHeaders = {};
    let trailers: IncomingHttpHeaders = {};
    let endedWithHeaders = false;
    stream.on("response", (received, flags) => {
      answer = received;
      endedWithHeaders = (flags & h2.NGHTTP2_FLAG_END_STREAM) !== 0;
    });
    stream.on("trailers", (received) => (trailers = received));
    stream.on("data", (chunk: Buffer) => chunks.push(chunk));
    stream.on("error", () => undefined);
    stream.once("close", () => {
      clearTimeout(timer);
      resolve({ headers: answer, endedWithHeaders, trailers, body: Buffer.concat(chunks), rstCode: stream.rstCode });
      session.close();
    });
    if (body !== undefined) stream.end(body);
  });
}

/** The gRPC status of a gRPC-Web answer: in the headers (trailers-only) or in the trailer frame. */
function grpcWebStatus(headers: IncomingHttpHeaders | Map<string, string>, body: Buffer): { status: string; message: string } {
  const get = (name: string): string | undefined => {
    const value = headers instanceof Map ? headers.get(name) : headers[name];
    return Array.isArray(value) ? value[0] : value;
  };
  const inHeaders = get("grpc-status");
  if (inHeaders !== undefined) return { status: inHeaders, message: decodeURIComponent(get("grpc-message") ?? "") };
  let at = 0;
  while (at + 5 <= body.length) {
    const flags = body.readUInt8(at);
    const length = body.readUInt32BE(at + 1);
    if ((flags & 0x80) !== 0) {
      const fields = new Map(
        body
          .subarray(at + 5, at + 5 + length)
          .toString("utf8")
          .split("\r\n")
          .filter((line) => line.includes(":"))
          .map((line) => [line.slice(0, line.indexOf(":")).trim().toLowerCase(), line.slice(line.indexOf(":") + 1).trim()]),
      );
      return { status: fields.get("grpc-status") ?? "", message: decodeURIComponent(fields.get("grpc-message") ?? "") };
    }
    at += 5 + length;
  }
  return { status: "", message: "" };
}

function envelope(payload: Buffer, compressed = false): Buffer {
  const head = Buffer.alloc(5);
  head.writeUInt8(compressed ? 1 : 0, 0);
  head.writeUInt32BE(payload.length, 1);
  return Buffer.concat([head, payload]);
}

function varint(value: number): Buffer {
  const bytes: number[] = [];
  let rest = value;
  while (rest >= 0x80) {
    bytes.push((rest % 0x80) | 0x80);
    rest = Math.floor(rest / 0x80);
  }
  bytes.push(rest);
  return Buffer.from(bytes);
}

// An unknown length-delimited field (number 1000): a reader skips it, so the message stays valid.
const PADDING_TAG = varint((1000 << 3) | 2);

/** A CreateKeyRequest for `ownerId`, padded with an unknown field to `totalBytes`. */
function paddedCreateKeyProto(ownerId: string, totalBytes: number): Buffer {
  const message = Buffer.from(toBinary(CreateKeyRequestSchema, create(CreateKeyRequestSchema, { ownerId, name: "padded" })));
  const room = totalBytes - message.length - PADDING_TAG.length;
  const padding = room - varint(room).length;
  return Buffer.concat([message, PADDING_TAG, varint(padding), Buffer.alloc(padding)]);
}

/** A CreateKey JSON for `ownerId`, padded with whitespace (valid JSON) to `totalBytes`. */
function paddedCreateKeyJson(ownerId: string, totalBytes: number): Buffer {
  const head = `{"ownerId":"${ownerId}","name":"padded"`;
  return Buffer.concat([Buffer.from(head), Buffer.alloc(totalBytes - head.length - 1, 0x20), Buffer.from("}")]);
}

/** Gzips `head`, then `fillBytes` bytes of `fill`, then `tail`, without holding the plain text. */
async function gzipStream(head: Buffer, fill: number, fillBytes: number, tail: Buffer): Promise<Buffer> {
  const gzip = createGzip({ level: 9 });
  const out: Buffer[] = [];
  gzip.on("data", (chunk: Buffer) => out.push(chunk));
  const ended = once(gzip, "end");
  gzip.write(head);
  const block = Buffer.alloc(MiB, fill);
  for (let left = fillBytes; left > 0; left -= block.length) {
    if (!gzip.write(left >= block.length ? block : block.subarray(0, left))) await once(gzip, "drain");
  }
  gzip.end(tail);
  await ended;
  return Buffer.concat(out);
}

/** A streamed HTTP/1.1 request with a body of `totalBytes`, sent as the server takes it. */
interface StreamedAnswer {
  status: number;
  headers: IncomingHttpHeaders;
  body: Buffer;
  /** Body bytes handed to the socket before the answer (or the close) stopped the sender. */
  sentBytes: number;
}

function streamedHttp1(port: number, source: string, headers: Record<string, string>, totalBytes: number, block: Buffer): Promise<StreamedAnswer> {
  return new Promise((resolve, reject) => {
    const req = httpRequest({ host: "127.0.0.1", port, localAddress: source, method: "POST", path: CREATE_KEY, headers, agent: false });
    let sentBytes = 0;
    let answered = false;
    const timer = setTimeout(() => {
      req.destroy();
      reject(new Error(`no answer within ${DEADLINE_MS} ms after ${sentBytes} body bytes`));
    }, DEADLINE_MS);
    req.on("response", (res) => {
      answered = true;
      const chunks: Buffer[] = [];
      res.on("data", (chunk: Buffer) => chunks.push(chunk));
      res.on("error", () => undefined);
      res.on("close", () => {
        clearTimeout(timer);
        resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks), sentBytes });
      });
    });
    // Writing on after the server closed fails; only a failure before any answer is one.
    req.on("error", (error) => {
      if (answered) return;
      clearTimeout(timer);
      reject(error);
    });
    const pump = async (): Promise<void> => {
      while (!answered && !req.destroyed && sentBytes < totalBytes) {
        const piece = totalBytes - sentBytes >= block.length ? block : block.subarray(0, totalBytes - sentBytes);
        sentBytes += piece.length;
        if (!req.write(piece)) await firstEvent(req, ["drain", "close", "response"]);
      }
      if (!answered && !req.destroyed) req.end();
    };
    void pump().catch(() => undefined);
  });
}

/**
 * A loopback address the failed-login limiter has just blocked: wrong tokens from it until it is
 * refused. Taken fresh for each use, since a block lifts one attempt every few seconds.
 */
async function blockedSource(): Promise<string> {
  const source = `127.0.2.${nextBlocked++}`;
  for (let attempt = 0; attempt <= 10; attempt++) {
    const answer = await streamedHttp1(adminPort, source, { "content-type": "application/json", authorization: `Bearer wrong-${attempt}-0123456789abcdefghij` }, 2, Buffer.from("{}"));
    if (answer.status === 429) return source;
    expect(answer.status).toBe(401);
  }
  throw new Error(`${source} was not blocked after 11 failed logins`);
}

/** One unary gRPC call through grpc-js with raw bytes in and out. */
function grpcUnary(client: GrpcClient, path: string, payload: Buffer, authorization: string | null): Promise<{ error: ServiceError | null; response: Buffer | undefined }> {
  const metadata = new Metadata();
  if (authorization !== null) metadata.set("authorization", authorization);
  const identity = (bytes: Buffer): Buffer => bytes;
  return new Promise((resolve) => {
    client.makeUnaryRequest(path, identity, identity, payload, metadata, { deadline: Date.now() + DEADLINE_MS }, (error: ServiceError | null, response?: Buffer) =>
      resolve({ error, response }),
    );
  });
}

let kp: KeygateProcess;
let dataDir: string;
let pid: number;
let adminPort: number;
let grpc: GrpcClient;
/** 1 MiB of spaces: the unit of every huge body, sent over and over. */
const BLOCK = Buffer.alloc(MiB, 0x20);

async function keyCount(ownerId: string): Promise<number> {
  const res = await postJson(adminPort, "ListKeys", { ownerId, includeRevoked: true });
  expect(res.status).toBe(200);
  return Array.isArray(res.json["keys"]) ? res.json["keys"].length : 0;
}

beforeAll(async () => {
  dataDir = mkdtempSync(join(tmpdir(), "keygate-admin-bounds-"));
  kp = await spawnKeygate({
    cwd: dataDir,
    env: {
      KEYGATE_DATA_DIR: dataDir,
      KEYGATE_ADMIN_TOKENS: ADMIN_TOKEN,
      KEYGATE_HOST: "127.0.0.1",
      KEYGATE_GRPC_PORT: "0",
      KEYGATE_HTTP_AUTHZ_PORT: "0",
      KEYGATE_ADMIN_PORT: "0",
    },
  });
  const childPid = kp.child.pid;
  if (childPid === undefined) throw new Error("keygate has no pid");
  pid = childPid;
  adminPort = kp.ports.admin;
  grpc = new GrpcClient(`127.0.0.1:${adminPort}`, credentials.createInsecure());
}, 60_000);

afterAll(async () => {
  grpc.close();
  await kp.stop();
  rmSync(dataDir, { recursive: true, force: true });
});

describe("admin port security: a refused call is answered from its head, before its body", () => {
  const withAuth = (refusal: Refusal): Record<string, string> => (refusal.authorization === null ? {} : { authorization: refusal.authorization });

  it.each(REFUSALS)("Connect JSON over HTTP/1.1, $name: the JSON error, Connection: close, and the connection closed", async (refusal) => {
    const answer = await headOnlyHttp1(adminPort, await refusal.source(), { "content-type": "application/json", "content-length": String(HUGE), ...withAuth(refusal) });
    expect(answer.status).toBe(refusal.httpStatus);
    expect(answer.headers.get("connection")).toBe("close");
    expect(answer.headers.get("content-type")).toBe("application/json");
    const error = connectError.parse(JSON.parse(answer.body.toString("utf8")));
    expect(error.code).toBe(refusal.code);
    expectMessage(error.message, refusal.message);
  });

  it.each(REFUSALS)("gRPC-Web over HTTP/1.1, $name: grpc-status in the headers, no body, the connection closed", async (refusal) => {
    const answer = await headOnlyHttp1(adminPort, await refusal.source(), { "content-type": "application/grpc-web+proto", "content-length": String(HUGE), ...withAuth(refusal) });
    expect(answer.status).toBe(200);
    expect(answer.headers.get("connection")).toBe("close");
    expect(answer.headers.get("content-type")).toBe("application/grpc-web+proto");
    expect(answer.headers.get("grpc-status")).toBe(String(refusal.grpcStatus));
    expectMessage(decodeURIComponent(answer.headers.get("grpc-message") ?? ""), refusal.message);
    expect(answer.body.length).toBe(0);
  });

  it.each(REFUSALS)("gRPC over HTTP/2, $name: trailers-only, then the stream is reset with NO_ERROR", async (refusal) => {
    const answer = await h2Exchange(adminPort, await refusal.source(), { "content-type": "application/grpc", te: "trailers", ...withAuth(refusal) });
    expect(answer.headers[":status"]).toBe(200);
    expect(answer.endedWithHeaders).toBe(true);
    expect(answer.headers["content-type"]).toBe("application/grpc");
    expect(answer.headers["grpc-status"]).toBe(String(refusal.grpcStatus));
    expectMessage(decodeURIComponent(String(answer.headers["grpc-message"])), refusal.message);
    expect(answer.body.length).toBe(0);
    expect(answer.rstCode).toBe(h2.NGHTTP2_NO_ERROR);
  });

  it.each(REFUSALS)("gRPC-Web over HTTP/2, $name: grpc-status in the headers, then the stream is reset", async (refusal) => {
    const answer = await h2Exchange(adminPort, await refusal.source(), { "content-type": "application/grpc-web+proto", ...withAuth(refusal) });
    expect(answer.headers[":status"]).toBe(200);
    expect(answer.endedWithHeaders).toBe(true);
    expect(answer.headers["grpc-status"]).toBe(String(refusal.grpcStatus));
    expectMessage(decodeURIComponent(String(answer.headers["grpc-message"])), refusal.message);
    expect(answer.rstCode).toBe(h2.NGHTTP2_NO_ERROR);
  });

  it.each(REFUSALS)("Connect JSON over HTTP/2, $name: the JSON error, then the stream is reset", async (refusal) => {
    const answer = await h2Exchange(adminPort, await refusal.source(), { "content-type": "application/json", ...withAuth(refusal) });
    expect(answer.headers[":status"]).toBe(refusal.httpStatus);
    expect(answer.headers["content-type"]).toBe("application/json");
    const error = connectError.parse(JSON.parse(answer.body.toString("utf8")));
    expect(error.code).toBe(refusal.code);
    expectMessage(error.message, refusal.message);
    expect(answer.rstCode).toBe(h2.NGHTTP2_NO_ERROR);
  });
});

describe("admin port security: Expect: 100-continue", () => {
  it("a refused call that asks first (as curl does for large bodies) gets no 100 Continue, only the refusal", async () => {
    const answer = await headOnlyHttp1(adminPort, await freshSource(), { "content-type": "application/json", "content-length": String(HUGE), expect: "100-continue" });
    expect(answer.status).toBe(401);
    expect(JSON.parse(answer.body.toString("utf8"))).toEqual({ code: "unauthenticated", message: MESSAGES.missing });
  });

  it("an admitted call that asks first gets 100 Continue, then its answer", async () => {
    const body = Buffer.from(JSON.stringify({ ownerId: "bounds-continue" }));
    const socket = await openSocket(adminPort);
    let received = "";
    const collect = (chunk: Buffer): void => {
      received += chunk.toString("latin1");
    };
    socket.on("data", collect);
    socket.write(
      `POST /keygate.v1.KeyAdmin/ListKeys HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\nauthorization: Bearer ${ADMIN_TOKEN}\r\n` +
        `content-length: ${body.length}\r\nexpect: 100-continue\r\nconnection: close\r\n\r\n`,
    );
    const deadline = Date.now() + DEADLINE_MS;
    while (!received.includes("\r\n\r\n") && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 5));
    expect(received).toBe("HTTP/1.1 100 Continue\r\n\r\n");
    socket.off("data", collect);
    // The answer can only come after the body, which is sent now.
    const closing = closedByServer(socket, DEADLINE_MS);
    socket.write(body);
    const answer = parseHttp1((await closing).received);
    expect(answer.status).toBe(200);
    expect(answer.body.toString("utf8")).toBe("{}");
  });
});

describe("admin port security: a 100 MiB body from a caller that is refused costs no memory", () => {
  it("Connect JSON (chunked, no token): 401 before the body is through, peak RSS growth far below the body", async () => {
    let answer: StreamedAnswer | undefined;
    const growth = await peakGrowthDuring(pid, async () => {
      answer = await streamedHttp1(adminPort, await freshSource(), { "content-type": "application/json" }, HUGE, BLOCK);
    });
    expect(answer?.status).toBe(401);
    expect(JSON.parse(answer?.body.toString("utf8") ?? "")).toEqual({ code: "unauthenticated", message: MESSAGES.missing });
    expect(answer?.sentBytes).toBeLessThan(HUGE);
    expect(growth).toBeLessThan(MEMORY_BOUND);
  });

  it("gRPC (grpc-js, a wrong token): UNAUTHENTICATED, peak RSS growth far below the body", async () => {
    let result: Awaited<ReturnType<typeof grpcUnary>> | undefined;
    const message = Buffer.alloc(HUGE, 0x20);
    const growth = await peakGrowthDuring(pid, async () => {
      result = await grpcUnary(grpc, CREATE_KEY, message, "Bearer kgadm_wrong_token_0123456789abcdefghij");
    });
    expect(result?.error?.code).toBe(16);
    expect(result?.error?.details).toBe(MESSAGES.invalid);
    expect(growth).toBeLessThan(MEMORY_BOUND);
  });

  it("gRPC-Web over HTTP/1.1 (a blocked address, the right token): grpc-status 8, peak RSS growth far below the body", async () => {
    const source = await blockedSource();
    let answer: StreamedAnswer | undefined;
    const growth = await peakGrowthDuring(pid, async () => {
      answer = await streamedHttp1(adminPort, source, { "content-type": "application/grpc-web+proto", authorization: `Bearer ${ADMIN_TOKEN}` }, HUGE, BLOCK);
    });
    expect(answer?.status).toBe(200);
    const status = grpcWebStatus(answer?.headers ?? {}, answer?.body ?? Buffer.alloc(0));
    expect(status.status).toBe("8");
    expect(status.message).toMatch(MESSAGES.blocked);
    expect(answer?.sentBytes).toBeLessThan(HUGE);
    expect(growth).toBeLessThan(MEMORY_BOUND);
  });
});

describe("admin port security: a gzip body under the limit that inflates to 56 MiB is never inflated whole", () => {
  let jsonBomb: Buffer;
  let protoBomb: Buffer;
  beforeAll(async () => {
    // Valid if inflated whole: CreateKey JSON padded with spaces, and a CreateKeyRequest with a
    // 56 MiB unknown field. A server without a limit would create the key. Both are smaller
    // than the limit as sent, so only the limit after decompression can refuse them.
    jsonBomb = await gzipStream(Buffer.from('{"ownerId":"bounds-bomb-json","name":"bomb"'), 0x20, BOMB, Buffer.from("}"));
    const head = Buffer.from(toBinary(CreateKeyRequestSchema, create(CreateKeyRequestSchema, { ownerId: "bounds-bomb-grpc", name: "bomb" })));
    protoBomb = await gzipStream(Buffer.concat([head, PADDING_TAG, varint(BOMB)]), 0, BOMB, Buffer.alloc(0));
    expect(jsonBomb.length).toBeLessThan(LIMIT - 5);
    expect(protoBomb.length).toBeLessThan(LIMIT - 5);
  }, 60_000);

  it("Connect JSON, no token: 401, not inflated", async () => {
    let answer: StreamedAnswer | undefined;
    const growth = await peakGrowthDuring(pid, async () => {
      answer = await streamedHttp1(adminPort, await freshSource(), { "content-type": "application/json", "content-encoding": "gzip" }, jsonBomb.length, jsonBomb);
    });
    expect(answer?.status).toBe(401);
    expect(JSON.parse(answer?.body.toString("utf8") ?? "")).toEqual({ code: "unauthenticated", message: MESSAGES.missing });
    expect(growth).toBeLessThan(MEMORY_BOUND);
  });

  it("gRPC over HTTP/2, a wrong token: UNAUTHENTICATED, not inflated", async () => {
    let answer: H2Answer | undefined;
    const growth = await peakGrowthDuring(pid, async () => {
      answer = await h2Exchange(
        adminPort,
        await freshSource(),
        { "content-type": "application/grpc", te: "trailers", "grpc-encoding": "gzip", authorization: "Bearer kgadm_wrong_token_0123456789abcdefghij" },
        envelope(protoBomb, true),
      );
    });
    expect(answer?.headers["grpc-status"]).toBe("16");
    expect(decodeURIComponent(String(answer?.headers["grpc-message"]))).toBe(MESSAGES.invalid);
    expect(growth).toBeLessThan(MEMORY_BOUND);
  });

  it("gRPC-Web, a blocked address: grpc-status 8, not inflated", async () => {
    const source = await blockedSource();
    let answer: StreamedAnswer | undefined;
    const body = envelope(protoBomb, true);
    const growth = await peakGrowthDuring(pid, async () => {
      answer = await streamedHttp1(
        adminPort,
        source,
        { "content-type": "application/grpc-web+proto", "grpc-encoding": "gzip", authorization: `Bearer ${ADMIN_TOKEN}` },
        body.length,
        body,
      );
    });
    const status = grpcWebStatus(answer?.headers ?? {}, answer?.body ?? Buffer.alloc(0));
    expect(status.status).toBe("8");
    expect(status.message).toMatch(MESSAGES.blocked);
    expect(growth).toBeLessThan(MEMORY_BOUND);
  });

  it("Connect JSON with the admin token: RESOURCE_EXHAUSTED naming the limit, inflating stopped at it, nothing written", async () => {
    let answer: StreamedAnswer | undefined;
    const growth = await peakGrowthDuring(pid, async () => {
      answer = await streamedHttp1(
        adminPort,
        "127.0.0.1",
        { "content-type": "application/json", "content-encoding": "gzip", authorization: `Bearer ${ADMIN_TOKEN}` },
        jsonBomb.length,
        jsonBomb,
      );
    });
    expect(answer?.status).toBe(429);
    expect(JSON.parse(answer?.body.toString("utf8") ?? "")).toEqual({
      code: "resource_exhausted",
      message: `message is larger than configured readMaxBytes ${LIMIT} after decompression`,
    });
    expect(growth).toBeLessThan(MEMORY_BOUND);
    expect(await keyCount("bounds-bomb-json")).toBe(0);
  });

  it("gRPC and gRPC-Web with the admin token: RESOURCE_EXHAUSTED naming the limit, inflating stopped at it, nothing written", async () => {
    let overH2: H2Answer | undefined;
    let overWeb: StreamedAnswer | undefined;
    const body = envelope(protoBomb, true);
    const growth = await peakGrowthDuring(pid, async () => {
      overH2 = await h2Exchange(
        adminPort,
        "127.0.0.1",
        { "content-type": "application/grpc", te: "trailers", "grpc-encoding": "gzip", authorization: `Bearer ${ADMIN_TOKEN}` },
        body,
      );
      overWeb = await streamedHttp1(
        adminPort,
        "127.0.0.1",
        { "content-type": "application/grpc-web+proto", "grpc-encoding": "gzip", authorization: `Bearer ${ADMIN_TOKEN}` },
        body.length,
        body,
      );
    });
    const expected = `message is larger than configured readMaxBytes ${LIMIT} after decompression`;
    const h2Status = overH2?.trailers["grpc-status"] ?? overH2?.headers["grpc-status"];
    const h2Message = overH2?.trailers["grpc-message"] ?? overH2?.headers["grpc-message"];
    expect(h2Status).toBe("8");
    expect(decodeURIComponent(String(h2Message))).toBe(expected);
    expect(grpcWebStatus(overWeb?.headers ?? {}, overWeb?.body ?? Buffer.alloc(0))).toEqual({ status: "8", message: expected });
    expect(growth).toBeLessThan(MEMORY_BOUND);
    expect(await keyCount("bounds-bomb-grpc")).toBe(0);
  });
});

describe("admin port security: an authenticated body over the limit is refused naming it, and nothing is written", () => {
  const auth = { authorization: `Bearer ${ADMIN_TOKEN}` };
  const OVER = 100 * 1024;

  it("a declared Content-Length over the limit is refused from the head alone", async () => {
    const answer = await headOnlyHttp1(adminPort, "127.0.0.1", { "content-type": "application/json", "content-length": String(OVER), ...auth });
    expect(answer.status).toBe(429);
    expect(answer.headers.get("connection")).toBe("close");
    expect(JSON.parse(answer.body.toString("utf8"))).toEqual({
      code: "resource_exhausted",
      message: `the request body is ${OVER} bytes; the admin API accepts at most ${LIMIT} (KEYGATE_ADMIN_MAX_BODY_BYTES)`,
    });
  });

  it("Connect JSON, chunked with no length: a valid CreateKey padded past the limit is refused and no key is created", async () => {
    const body = paddedCreateKeyJson("bounds-json", OVER);
    const answer = await streamedHttp1(adminPort, "127.0.0.1", { "content-type": "application/json", "transfer-encoding": "chunked", ...auth }, body.length, body);
    expect(answer.status).toBe(429);
    expect(JSON.parse(answer.body.toString("utf8"))).toEqual({ code: "resource_exhausted", message: `message size is larger than configured readMaxBytes ${LIMIT}` });
    expect(await keyCount("bounds-json")).toBe(0);
  });

  it("gRPC (grpc-js): a valid CreateKeyRequest padded past the limit is RESOURCE_EXHAUSTED naming it, and no key is created", async () => {
    const payload = paddedCreateKeyProto("bounds-grpc", OVER);
    const result = await grpcUnary(grpc, CREATE_KEY, payload, auth.authorization);
    expect(result.error?.code).toBe(8);
    expect(result.error?.details).toBe(`message size ${OVER} is larger than configured readMaxBytes ${LIMIT}`);
    expect(await keyCount("bounds-grpc")).toBe(0);
  });

  it("gRPC-Web: a valid CreateKeyRequest padded past the limit is grpc-status 8 naming it, and no key is created", async () => {
    const body = envelope(paddedCreateKeyProto("bounds-web", OVER));
    const answer = await streamedHttp1(adminPort, "127.0.0.1", { "content-type": "application/grpc-web+proto", "transfer-encoding": "chunked", ...auth }, body.length, body);
    expect(answer.status).toBe(200);
    expect(grpcWebStatus(answer.headers, answer.body)).toEqual({ status: "8", message: `message size ${OVER} is larger than configured readMaxBytes ${LIMIT}` });
    expect(await keyCount("bounds-web")).toBe(0);
  });

  it("the same padded calls just under the limit are served: the limit is the only reason for the refusals", async () => {
    const json = paddedCreateKeyJson("bounds-under-json", LIMIT - 1024);
    const answer = await streamedHttp1(adminPort, "127.0.0.1", { "content-type": "application/json", ...auth }, json.length, json);
    expect(answer.status).toBe(200);
    const result = await grpcUnary(grpc, CREATE_KEY, paddedCreateKeyProto("bounds-under-grpc", LIMIT - 1024), auth.authorization);
    expect(result.error).toBeNull();
    expect(await keyCount("bounds-under-json")).toBe(1);
    expect(await keyCount("bounds-under-grpc")).toBe(1);
  });
});

describe("admin body limit configuration", () => {
  let kg: TestKeygate;
  beforeAll(async () => {
    kg = await startKeygate({ env: { KEYGATE_ADMIN_MAX_BODY_BYTES: "4096" } });
  });
  afterAll(async () => {
    await kg.stop();
  });

  it("KEYGATE_ADMIN_MAX_BODY_BYTES sets the limit the refusal names", async () => {
    const over = await postJson(kg.ports.admin, "CreateKey", paddedCreateKeyJson("bounds-config", 5000).toString("utf8"));
    expect(over.status).toBe(429);
    expect(over.json).toEqual({ code: "resource_exhausted", message: "the request body is 5000 bytes; the admin API accepts at most 4096 (KEYGATE_ADMIN_MAX_BODY_BYTES)" });
    const under = await postJson(kg.ports.admin, "CreateKey", paddedCreateKeyJson("bounds-config", 4000).toString("utf8"));
    expect(under.status).toBe(200);
  });
});
