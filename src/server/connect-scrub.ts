import type { IncomingMessage, ServerResponse } from "node:http";
import type { Http2ServerRequest, Http2ServerResponse } from "node:http2";
import { Code, ConnectError, createConnectRouter } from "@connectrpc/connect";
import type { ConnectRouter, ConnectRouterOptions, ContextValues } from "@connectrpc/connect";
import type { UniversalHandler, UniversalServerResponse } from "@connectrpc/connect/protocol";
import { contentTypeRegExp as grpcContentType } from "@connectrpc/connect/protocol-grpc";
import { contentTypeRegExp as grpcWebContentType } from "@connectrpc/connect/protocol-grpc-web";
import { compressionBrotli, compressionGzip, universalRequestFromNodeRequest, universalResponseToNodeResponse } from "@connectrpc/connect-node";
import type { Logger } from "pino";
import { redactText } from "../keys/redact.js";

type AnyRequest = IncomingMessage | Http2ServerRequest;
type AnyResponse = ServerResponse | Http2ServerResponse;

const GRPC_MESSAGE = "grpc-message";
const COMPRESSIONS = [compressionGzip, compressionBrotli];
/** An error body keygate writes is far smaller; a larger one inflated is cut off here. */
const MAX_ERROR_BYTES = 1024 * 1024;
const TRAILER_FRAME = 0x80;

/** What scrubbedConnectHandler needs: the router's options, its routes, and each request's context values. */
export interface ScrubbedConnectOptions extends ConnectRouterOptions {
  routes: (router: ConnectRouter) => void;
  contextValues: (req: AnyRequest) => ContextValues;
  logger: Logger;
}

/**
 * KeyAdmin over Connect (gRPC, gRPC-Web and Connect, JSON or binary), as `connectNodeAdapter`
 * serves it, but with every error's message passed through redactText on its way out. A request
 * is decoded before any handler or interceptor runs, and the decoder's error quotes what it could
 * not read: a JSON field named by an API key ("key \"kg_live_…\" is unknown"), a key sent as a
 * number. keygate never repeats a secret, the caller's own included, so such text is replaced
 * wherever an error message travels: a Connect error body, a grpc-message header or trailer, a
 * gRPC-Web trailer frame. Answers that are not errors are passed as they are (CreateKey's holds
 * the secret it issues).
 */
export function scrubbedConnectHandler(options: ScrubbedConnectOptions): (req: AnyRequest, res: AnyResponse) => void {
  const { routes, contextValues, logger, ...routerOptions } = options;
  const router = createConnectRouter({ acceptCompression: COMPRESSIONS, ...routerOptions });
  routes(router);
  const handlers = new Map<string, UniversalHandler>(router.handlers.map((handler) => [handler.requestPath, handler]));
  return (req, res) => {
    const handler = handlers.get((req.url ?? "").split("?", 2)[0] ?? "");
    if (handler === undefined) {
      res.statusCode = 404;
      res.end();
      return;
    }
    const request = universalRequestFromNodeRequest(req, res, undefined, contextValues(req));
    handler(request)
      .then(async (answer) => universalResponseToNodeResponse(await withoutSecrets(answer), res))
      .catch((reason: unknown) => {
        if (ConnectError.from(reason).code === Code.Aborted) return;
        logger.error({ err: reason, method: handler.method.name }, "KeyAdmin handler failed");
      });
  };
}


/** `answer` with the text of its error messages redacted; anything else is left as it is. */
export async function withoutSecrets(answer: UniversalServerResponse): Promise<UniversalServerResponse> {
  scrubGrpcMessage(answer.header);
  scrubGrpcMessage(answer.trailer);
  const type = answer.header?.get("content-type") ?? "";
  if (answer.body === undefined) return answer;
  // gRPC: a failure met while the body is read sets the trailers as the body ends.
  if (grpcContentType.test(type)) return { ...answer, body: thenScrubbed(answer.body, answer.trailer) };
  // A Connect unary error: its status is not 200 and its body is the error's JSON.
  if (answer.status !== 200 && type.startsWith("application/json")) {
    // A large error body may have been compressed for a caller that accepts it; it goes back
    // uncompressed (an error is small, and identity is always acceptable).
    const encoding = answer.header?.get("content-encoding") ?? null;
    const compression = encoding === null ? null : COMPRESSIONS.find((c) => c.name === encoding);
    if (compression === undefined) return answer;
    let bytes = await readAll(answer.body);
    if (compression !== null) bytes = await compression.decompress(bytes, MAX_ERROR_BYTES);
    const body = new TextEncoder().encode(scrubJsonError(new TextDecoder().decode(bytes)));
    answer.header?.delete("content-encoding");
    answer.header?.set("content-length", String(body.byteLength));
    return { ...answer, body: once(body) };
  }
  // gRPC-Web: the status and message travel in the last frame, flagged 0x80, as header lines.
  if (grpcWebContentType.test(type)) return { ...answer, body: once(scrubTrailerFrames(await readAll(answer.body))) };
  return answer;
}

async function* thenScrubbed(body: AsyncIterable<Uint8Array>, trailer: Headers | undefined): AsyncIterable<Uint8Array> {
  yield* body;
  scrubGrpcMessage(trailer);
}

/**
 * A grpc-message, percent-encoded (gRPC's rule: bytes outside printable ASCII, and "%"), decoded,
 * redacted and encoded again: redacting the encoded text could cut an escape in two.
 */
function scrubGrpcMessage(headers: Headers | undefined): void {
  const message = headers?.get(GRPC_MESSAGE);
  if (message === null || message === undefined) return;
  let text: string;
  try {
    text = decodeURIComponent(message);
  } catch {
    text = message;
  }
  const redacted = redactText(text);
  if (redacted !== text) headers?.set(GRPC_MESSAGE, encodeGrpcMessage(redacted));
}

function encodeGrpcMessage(text: string): string {
  let out = "";
  for (const byte of new TextEncoder().encode(text)) {
    out += byte >= 0x20 && byte <= 0x7e && byte !== 0x25 ? String.fromCharCode(byte) : `%${byte.toString(16).toUpperCase().padStart(2, "0")}`;
  }
  return out;
}

function scrubJsonError(text: string): string {
  let error: unknown;
  try {
    error = JSON.parse(text);
  } catch {
    return redactText(text);
  }
  if (typeof error === "object" && error !== null && "message" in error && typeof error.message === "string") {
    return JSON.stringify({ ...error, message: redactText(error.message) });
  }
  return text;
}

/** gRPC-Web frames (flag byte, 4-byte length, data) with each trailer frame's text redacted. */
function scrubTrailerFrames(bytes: Uint8Array): Uint8Array {
  const frames: Uint8Array[] = [];
  let at = 0;
  while (at + 5 <= bytes.byteLength) {
    const flags = bytes[at] ?? 0;
    const length = new DataView(bytes.buffer, bytes.byteOffset + at + 1, 4).getUint32(0);
    const data = bytes.subarray(at + 5, at + 5 + length);
    at += 5 + length;
    if ((flags & TRAILER_FRAME) === 0) {
      frames.push(bytes.subarray(at - 5 - length, at));
      continue;
    }
    const text = new TextEncoder().encode(redactText(new TextDecoder().decode(data)));
    const head = new Uint8Array(5);
    head[0] = flags;
    new DataView(head.buffer).setUint32(1, text.byteLength);
    frames.push(head, text);
  }
  if (at < bytes.byteLength) frames.push(bytes.subarray(at));
  return concat(frames);
}

async function readAll(body: AsyncIterable<Uint8Array>): Promise<Uint8Array> {
  const chunks: Uint8Array[] = [];
  for await (const chunk of body) chunks.push(chunk);
  return concat(chunks);
}

function concat(chunks: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(chunks.reduce((sum, chunk) => sum + chunk.byteLength, 0));
  let at = 0;
  for (const chunk of chunks) {
    out.set(chunk, at);
    at += chunk.byteLength;
  }
  return out;
}

async function* once(bytes: Uint8Array): AsyncIterable<Uint8Array> {
  yield bytes;
}
