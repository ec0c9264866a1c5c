/**
 * The ceiling: Node's own HTTP/2 limit for a unary gRPC call. A Check handler written directly on
 * `node:http2` that reads the request's 5-byte-framed message, checks the frame, and answers one
 * fixed OK CheckResponse (framed and encoded once) with `grpc-status: 0` in trailers (sent as
 * keygate sends them, src/server/h2-trailers.ts, so both pay the same turns). It does not
 * decode the protobuf message: what it costs is the transport, which every server pays. Anything
 * but POST /envoy.service.auth.v3.Authorization/Check is a trailers-only UNIMPLEMENTED. Run as its
 * own process so its CPU is accounted apart; prints one JSON line with its port, then serves until
 * SIGTERM.
 */
import { create, toBinary } from "@bufbuild/protobuf";
import { constants, createServer } from "node:http2";
import type { IncomingHttpHeaders, ServerHttp2Stream } from "node:http2";
import { CheckResponseSchema } from "../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import { sendOkTrailers } from "../src/server/h2-trailers.js";

const CHECK_PATH = "/envoy.service.auth.v3.Authorization/Check";
// Larger than any bench CheckRequest; a bigger frame is refused like a server's size limit would.
const MAX_MESSAGE_BYTES = 64 * 1024;

function framed(message: Uint8Array): Buffer {
  const frame = Buffer.alloc(5 + message.length);
  frame.writeUInt32BE(message.length, 1);
  frame.set(message, 5);
  return frame;
}

const OK_FRAME = framed(
  toBinary(
    CheckResponseSchema,
    create(CheckResponseSchema, {
      status: { code: 0 },
      httpResponse: { case: "okResponse", value: {} },
    }),
  ),
);
const RESPONSE_HEADERS = { [constants.HTTP2_HEADER_STATUS]: 200, [constants.HTTP2_HEADER_CONTENT_TYPE]: "application/grpc" };

function trailersOnly(stream: ServerHttp2Stream, code: number, message: string): void {
  stream.respond({ ...RESPONSE_HEADERS, "grpc-status": String(code), "grpc-message": encodeURIComponent(message) }, { endStream: true });
}

function onStream(stream: ServerHttp2Stream, headers: IncomingHttpHeaders): void {
  stream.on("error", () => stream.destroy());
  if (headers[constants.HTTP2_HEADER_METHOD] !== "POST" || headers[constants.HTTP2_HEADER_PATH] !== CHECK_PATH) {
    trailersOnly(stream, 12, "unknown method");
    return;
  }
  const chunks: Buffer[] = [];
  let received = 0;
  stream.on("data", (chunk: Buffer) => {
    received += chunk.length;
    if (received > 5 + MAX_MESSAGE_BYTES) {
      trailersOnly(stream, 8, "message too large");
      stream.removeAllListeners("data");
      return;
    }
    chunks.push(chunk);
  });
  stream.on("end", () => {
    if (stream.headersSent) return;
    const body = chunks.length === 1 ? (chunks[0] ?? Buffer.alloc(0)) : Buffer.concat(chunks);
    // One uncompressed message whose length prefix matches what arrived.
    if (body.length < 5 || body[0] !== 0 || body.readUInt32BE(1) !== body.length - 5) {
      trailersOnly(stream, 13, "malformed frame");
      return;
    }
    stream.respond(RESPONSE_HEADERS, { waitForTrailers: true });
    // As keygate sends them: in the turn that ends the DATA where this Node allows it.
    stream.once("wantTrailers", () => sendOkTrailers(stream));
    stream.end(OK_FRAME);
  });
}

async function main(): Promise<void> {
  const server = createServer();
  server.on("stream", onStream);
  const port = await new Promise<number>((resolve, reject) => {
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const address = server.address();
      if (address === null || typeof address === "string") reject(new Error("no TCP address"));
      else resolve(address.port);
    });
  });
  process.stdout.write(`${JSON.stringify({ msg: "noop listening", grpcPort: port })}\n`);
  const stop = (): void => {
    server.close(() => process.exit(0));
    setTimeout(() => process.exit(0), 2000).unref();
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

await main();
