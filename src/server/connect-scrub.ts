import { AsyncLocalStorage } from "node:async_hooks";
import type { IncomingMessage, ServerResponse } from "node:http";
import type { Http2ServerRequest, Http2ServerResponse } from "node:http2";
import { fromJsonString } from "@bufbuild/protobuf";
import type { DescMessage, JsonReadOptions } from "@bufbuild/protobuf";
import { Code, ConnectError, createConnectRouter, createContextKey } from "@connectrpc/connect";
import type { ConnectRouter, ConnectRouterOptions, ContextValues, Interceptor } from "@connectrpc/connect";
import { compressedFlag } from "@connectrpc/connect/protocol";
import type { Compression, UniversalHandler, UniversalServerResponse } from "@connectrpc/connect/protocol";
import { codeToHttpStatus, errorToJson } from "@connectrpc/connect/protocol-connect";
import { contentTypeRegExp as grpcContentType, setTrailerStatus } from "@connectrpc/connect/protocol-grpc";
import { contentTypeRegExp as grpcWebContentType, trailerParse, trailerSerialize } from "@connectrpc/connect/protocol-grpc-web";
import { compressionBrotli, compressionGzip, universalRequestFromNodeRequest, universalResponseToNodeResponse } from "@connectrpc/connect-node";
import type { Logger } from "pino";
import { redactText } from "../keys/redact.js";
import { splitsSurrogatePair, withoutLoneSurrogates } from "../surrogates.js";

type AnyRequest = IncomingMessage | Http2ServerRequest;
type AnyResponse = ServerResponse | Http2ServerResponse;

const GRPC_STATUS = "grpc-status";
const GRPC_MESSAGE = "grpc-message";
/** zlib's error for input that ends before its stream does: a body cut short. */
const CUT_SHORT = "Z_BUF_ERROR";
// connect-es answers a protobuf message it cannot parse INTERNAL, "parse binary: <reason>"
// (protocol/serialization.js); its JSON decoder already answers INVALID_ARGUMENT.
const UNPARSABLE_PREFIX = "parse binary: ";
/** The bound of an inflated error body with no readMaxBytes, and its floor: keygate's own messages are far smaller. */
const MAX_ERROR_BYTES = 1024 * 1024;
/** What an error body holds besides the input it quotes: the decoder's framing, grpc-status, JSON keys. */
const ERROR_FRAMING_BYTES = 64 * 1024;
/** The internal error that stands in for an error body or trailer that cannot be read. */
const UNREADABLE_ERROR = new ConnectError("internal error", Code.Internal);
const TRAILER_FRAME = 0x80;
// protobuf-es's JSON decoder names the message or field, then quotes the caller's input whole:
// "cannot decode message T from JSON: key "…" is unknown", "…: expected bigint (int64): … out of range".
const DECODER_DETAIL = " from JSON: ";
/** Characters of the caller's input a decoder's message repeats, as echo() allows keygate's own messages. */
const MAX_ECHOED_INPUT = 64;
/** The end of a cut message, kept so that it still reads: what follows the input ('" is unknown'). */
const KEPT_ENDING = 16;
/**
 * A surrogate, raw (half of a character sent in UTF-8) or escaped ("\\ud800"): the only text whose
 * JSON error can quote a lone one (wellFormedJsonErrors).
 */
const SURROGATE = /[\uD800-\uDFFF]|\\u[dD][89a-fA-F]/;

/**
 * `compression` with a body it cannot inflate answered as the caller's mistake: connect-node
 * answers one cut short INTERNAL. Its other answers stand: RESOURCE_EXHAUSTED past readMaxBytes,
 * and INTERNAL for a zlib failure that is not about the input (out of memory).
 */
function callersCompression(compression: Compression): Compression {
  const message = `the request body is not valid ${compression.name}`;
  return {
    name: compression.name,
    compress: (bytes) => compression.compress(bytes),
    decompress: (bytes, readMaxBytes) =>
      compression.decompress(bytes, readMaxBytes).catch((error: unknown) => {
        if (!(error instanceof ConnectError)) throw error;
        const cutShort = error.code === Code.Internal && error.cause instanceof Error && "code" in error.cause && error.cause.code === CUT_SHORT;
        if (error.code !== Code.InvalidArgument && !cutShort) throw error;
        throw new ConnectError(message, Code.InvalidArgument, undefined, undefined, error);
      }),
  };
}

const COMPRESSIONS = [callersCompression(compressionGzip), callersCompression(compressionBrotli)];

/** The request message type of the call under way, for the JSON decoder (wellFormedJsonErrors). */
const decodingInput = new AsyncLocalStorage<DescMessage>();

/**
 * The text decoder of connect-es's JSON serialization, which calls it inside the try whose refusal
 * is INVALID_ARGUMENT. The JSON decoder quotes the key or value it refuses ('key "\\ud800x" is
 * unknown', a string where a message belongs), and connect-es percent-encodes a gRPC or gRPC-Web
 * error message with encodeURIComponent, which throws on a lone surrogate: the refusal became a
 * bare 500. JSON escapes one alone, and V8's SyntaxError cuts a raw pair in two: it quotes the
 * token it stopped at as one code unit ("Unexpected token '\\ud83d'") and the source's first ten
 * or so ('"a😀😀😀😀\\ud83d"... is not valid JSON'). So a body that holds a surrogate, raw or
 * escaped, is decoded here first, and its refusal thrown with each lone surrogate shown as U+FFFD;
 * the decoder then reads it again (such bodies are rare, and bounded by readMaxBytes).
 */
function wellFormedJsonErrors(options: Partial<JsonReadOptions> | undefined): { decode(input?: Uint8Array): string } {
  const utf8 = new TextDecoder();
  // connect-es ignores unknown fields unless told otherwise (getJsonOptions): read as it does.
  const readOptions = { ...options, ignoreUnknownFields: options?.ignoreUnknownFields ?? true };
  return {
    decode(input) {
      const text = utf8.decode(input);
      const desc = decodingInput.getStore();
      if (desc === undefined || !SURROGATE.test(text)) return text;
      try {
        fromJsonString(desc, text, readOptions);
      } catch (error) {
        const message = error instanceof Error ? error.message : String(error);
        throw new ConnectError(withoutLoneSurrogates(message), Code.InvalidArgument, undefined, undefined, error);
      }
      return text;
    },
  };
}

/**
 * Whether the request's message was decoded. Interceptors run only once it is (KeyAdmin's
 * methods are all unary), so a call that never reached one failed in the decoder or before it.
 * A streaming method would run them first: its decoder's errors would then stay INTERNAL.
 */
const decodedKey = createContextKey(false, { description: "request message decoded" });
const markDecoded: Interceptor = (next) => (req) => {
  req.contextValues.set(decodedKey, true);
  return next(req);
};

/**
 * An error of a handler or interceptor with each lone surrogate of its message shown as U+FFFD.
 * keygate's messages quote the caller's input (echo()), and a quote cut inside a pair, by keygate
 * or a library, would make connect-es's encodeURIComponent of a gRPC or gRPC-Web error message
 * throw: a bare 500, no grpc-status. Outermost, so that it sees every other interceptor's errors.
 */
const wellFormedErrors: Interceptor = (next) => async (req) => {
  try {
    return await next(req);
  } catch (reason) {
    // Only a ConnectError's message is the caller's to read; anything else stays as thrown.
    if (!(reason instanceof ConnectError)) throw reason;
    const error = reason;
    const message = withoutLoneSurrogates(error.rawMessage);
    if (message === error.rawMessage) throw reason;
    const wellFormed = new ConnectError(message, error.code, error.metadata, undefined, error.cause);
    wellFormed.details = error.details;
    throw wellFormed;
  }
};

/**
 * The decoder's refusal of a protobuf message as what it is, the caller's mistake: its reason
 * (such as "premature EOF") without the decoder's framing. Null for any other error, and for
 * every error of a call whose message was decoded: a failure of keygate's own stays INTERNAL.
 */
function callersMistake(decoded: boolean, code: Code, rawMessage: string): ConnectError | null {
  if (decoded || code !== Code.Internal || !rawMessage.startsWith(UNPARSABLE_PREFIX)) return null;
  return new ConnectError(`the request body is not a valid protobuf message: ${rawMessage.slice(UNPARSABLE_PREFIX.length)}`, Code.InvalidArgument);
}

/**
 * The JSON decoder's message with what it quotes of the input cut to MAX_ECHOED_INPUT characters
 * and the last KEPT_ENDING: 60 KB of unknown key sent, 60 KB came back. The cut is by length,
 * not at the closing quote, which a key may hold itself, and never inside a surrogate pair: half
 * an emoji is a lone surrogate ("\ud83d" in the JSON error), which strict decoders refuse. Messages
 * of a decoded call are keygate's own, which bound what they quote (echo()), and are left as they are.
 */
function boundedDecoderMessage(message: string, decoded: boolean): string {
  const at = message.indexOf(DECODER_DETAIL);
  if (decoded || at === -1) return message;
  const start = at + DECODER_DETAIL.length;
  if (message.length - start <= MAX_ECHOED_INPUT + KEPT_ENDING) return message;
  // A pair at either cut is left out whole: the head one character shorter, the ending too.
  let headEnd = start + MAX_ECHOED_INPUT;
  if (splitsSurrogatePair(message, headEnd)) headEnd -= 1;
  let endingStart = message.length - KEPT_ENDING;
  if (splitsSurrogatePair(message, endingStart)) endingStart += 1;
  return `${message.slice(0, headEnd)}…${message.slice(endingStart)}`;
}

/**
 * The most an error body or trailer keygate writes can hold once inflated, when a message may be
 * `readMaxBytes` long (after decompression). The decoder's message quotes the caller's input whole
 * (a JSON key as long as the message) before keygate bounds it, and a grpc-message percent-encodes
 * each of its bytes as at most three. These are keygate's own bytes, compressed from a buffer it
 * held: inflating them within this bound takes no more memory than writing them did.
 */
function maxErrorBytes(readMaxBytes: number | undefined): number {
  return readMaxBytes === undefined ? MAX_ERROR_BYTES : Math.max(MAX_ERROR_BYTES, 3 * readMaxBytes + ERROR_FRAMING_BYTES);
}

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
 * the secret it issues). A body that cannot be inflated or decoded is INVALID_ARGUMENT, not the
 * INTERNAL connect-es answers.
 */
export function scrubbedConnectHandler(options: ScrubbedConnectOptions): (req: AnyRequest, res: AnyResponse) => void {
  const { routes, contextValues, logger, ...routerOptions } = options;
  // connect-es hands jsonOptions to its JSON serialization, which takes a textDecoder.
  const jsonOptions = { ...routerOptions.jsonOptions, textDecoder: wellFormedJsonErrors(routerOptions.jsonOptions) };
  const router = createConnectRouter({ acceptCompression: COMPRESSIONS, ...routerOptions, jsonOptions, interceptors: [wellFormedErrors, markDecoded, ...(routerOptions.interceptors ?? [])] });
  routes(router);
  const handlers = new Map<string, UniversalHandler>(router.handlers.map((handler) => [handler.requestPath, handler]));
  const errorBytes = maxErrorBytes(routerOptions.readMaxBytes);
  return (req, res) => {
    const handler = handlers.get((req.url ?? "").split("?", 2)[0] ?? "");
    if (handler === undefined) {
      res.statusCode = 404;
      res.end();
      return;
    }
    const values = contextValues(req);
    const request = universalRequestFromNodeRequest(req, res, undefined, values);
    // The handler answers once the message is decoded and handled, or has failed: the flag is final.
    decodingInput
      .run(handler.method.input, () => handler(request))
      .then(async (answer) => universalResponseToNodeResponse(await withoutSecrets(answer, values.get(decodedKey), logger, errorBytes), res))
      .catch((reason: unknown) => {
        if (ConnectError.from(reason).code === Code.Aborted) return;
        logger.error({ err: reason, method: handler.method.name }, "KeyAdmin handler failed");
        // Never left hanging until the request timeout: a bare 500, or a reset once headers went.
        if (!res.headersSent) {
          res.statusCode = 500;
          res.end();
        } else if (!res.writableEnded) {
          res.destroy();
        }
      });
  };
}


/**
 * `answer` with the text of its error messages redacted, and, unless the request's message was
 * `decoded`, the decoder's refusal of it reclassified (callersMistake); anything else is left as it is.
 * `logger` hears of an error body or gRPC-Web trailer frame that could not be inflated within
 * `errorBytes` (maxErrorBytes); it is answered INTERNAL.
 */
export async function withoutSecrets(answer: UniversalServerResponse, decoded: boolean, logger?: Logger, errorBytes = MAX_ERROR_BYTES): Promise<UniversalServerResponse> {
  scrubGrpcStatus(answer.header, decoded);
  scrubGrpcStatus(answer.trailer, decoded);
  const type = answer.header?.get("content-type") ?? "";
  if (answer.body === undefined) return answer;
  // gRPC: a failure met while the body is read sets the trailers as the body ends.
  if (grpcContentType.test(type)) return { ...answer, body: thenScrubbed(answer.body, answer.trailer, decoded) };
  // A Connect unary error: its status is not 200 and its body is the error's JSON.
  if (answer.status !== 200 && type.startsWith("application/json")) {
    // A large error body may have been compressed for a caller that accepts it; it goes back
    // uncompressed (an error is small, and identity is always acceptable).
    const encoding = answer.header?.get("content-encoding") ?? null;
    const compression = encoding === null ? null : COMPRESSIONS.find((c) => c.name === encoding);
    if (compression === undefined) return answer;
    const error = await scrubConnectError(await readAll(answer.body), compression, answer.status, decoded, errorBytes, logger);
    const body = new TextEncoder().encode(error.text);
    answer.header?.delete("content-encoding");
    answer.header?.set("content-length", String(body.byteLength));
    return { ...answer, status: error.status, body: once(body) };
  }
  // gRPC-Web: the status and message travel in the last frame, flagged 0x80, as header lines.
  if (grpcWebContentType.test(type)) {
    const encoding = answer.header?.get("grpc-encoding") ?? null;
    return { ...answer, body: once(await scrubTrailerFrames(await readAll(answer.body), encoding, decoded, errorBytes, logger)) };
  }
  return answer;
}

async function* thenScrubbed(body: AsyncIterable<Uint8Array>, trailer: Headers | undefined, decoded: boolean): AsyncIterable<Uint8Array> {
  yield* body;
  scrubGrpcStatus(trailer, decoded);
}

/** A gRPC status (in headers, a trailer or a gRPC-Web trailer frame) reclassified when it is callersMistake; whether it was. */
function reclassifyGrpcStatus(headers: Headers | undefined, decoded: boolean): boolean {
  if (headers === undefined || headers.get(GRPC_STATUS) !== String(Code.Internal)) return false;
  const mistake = callersMistake(decoded, Code.Internal, decodeGrpcMessage(headers.get(GRPC_MESSAGE) ?? ""));
  if (mistake === null) return false;
  setTrailerStatus(headers, mistake);
  return true;
}

function scrubGrpcStatus(headers: Headers | undefined, decoded: boolean): void {
  reclassifyGrpcStatus(headers, decoded);
  scrubGrpcMessage(headers, decoded);
}

/**
 * A grpc-message, percent-encoded (gRPC's rule: bytes outside printable ASCII, and "%"), decoded,
 * redacted, bounded (boundedDecoderMessage) and encoded again: redacting the encoded text could
 * cut an escape in two. Whether it changed.
 */
function scrubGrpcMessage(headers: Headers | undefined, decoded: boolean): boolean {
  const message = headers?.get(GRPC_MESSAGE);
  if (message === null || message === undefined) return false;
  const text = decodeGrpcMessage(message);
  // Redacted before it is cut: a cut could leave part of a key that no longer looks like one.
  const scrubbed = boundedDecoderMessage(redactText(text), decoded);
  if (scrubbed === text) return false;
  headers?.set(GRPC_MESSAGE, encodeGrpcMessage(scrubbed));
  return true;
}

/** A grpc-message as text; one that is not valid percent-encoding, as it is. */
function decodeGrpcMessage(message: string): string {
  try {
    return decodeURIComponent(message);
  } catch {
    return message;
  }
}

function encodeGrpcMessage(text: string): string {
  let out = "";
  for (const byte of new TextEncoder().encode(text)) {
    out += byte >= 0x20 && byte <= 0x7e && byte !== 0x25 ? String.fromCharCode(byte) : `%${byte.toString(16).toUpperCase().padStart(2, "0")}`;
  }
  return out;
}

/**
 * A Connect error body, inflated when it was compressed, then scrubJsonError'd. Its bytes never
 * pass unread: one that cannot be inflated within `errorBytes` is replaced with a well-formed
 * INTERNAL error (not a bare 500), and the cause logged.
 */
async function scrubConnectError(
  bytes: Uint8Array,
  compression: Compression | null,
  status: number,
  decoded: boolean,
  errorBytes: number,
  logger: Logger | undefined,
): Promise<{ text: string; status: number }> {
  let inflated = bytes;
  try {
    if (compression !== null) inflated = await compression.decompress(bytes, errorBytes);
  } catch (error) {
    logger?.error({ err: error }, "KeyAdmin error body unreadable");
    return { text: JSON.stringify(errorToJson(UNREADABLE_ERROR, undefined)), status: codeToHttpStatus(UNREADABLE_ERROR.code) };
  }
  return scrubJsonError(new TextDecoder().decode(inflated), status, decoded);
}

/** A Connect error body redacted, or, when it is callersMistake, replaced (and its HTTP status with it). */
function scrubJsonError(text: string, status: number, decoded: boolean): { text: string; status: number } {
  let error: unknown;
  try {
    error = JSON.parse(text);
  } catch {
    return { text: redactText(text), status };
  }
  if (typeof error !== "object" || error === null || !("message" in error) || typeof error.message !== "string") return { text, status };
  const mistake = "code" in error && error.code === "internal" ? callersMistake(decoded, Code.Internal, error.message) : null;
  if (mistake !== null) return { text: JSON.stringify(errorToJson(mistake, undefined)), status: codeToHttpStatus(mistake.code) };
  return { text: JSON.stringify({ ...error, message: boundedDecoderMessage(redactText(error.message), decoded) }), status };
}

/**
 * gRPC-Web frames (flag byte, 4-byte length, data) with each trailer frame's text redacted, and its
 * status reclassified when it is callersMistake. connect-es compresses a trailer frame like any
 * other once it reaches compressMinBytes (1 KiB) and the caller accepts `encoding`: such a frame is
 * inflated, scrubbed, and goes back uncompressed (identity is always acceptable), as a Connect
 * error body does. One that cannot be inflated within `errorBytes` becomes an INTERNAL trailer.
 */
async function scrubTrailerFrames(bytes: Uint8Array, encoding: string | null, decoded: boolean, errorBytes: number, logger: Logger | undefined): Promise<Uint8Array> {
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
    const text = (flags & compressedFlag) === 0 ? scrubTrailer(data, decoded) : await scrubCompressedTrailer(data, encoding, decoded, errorBytes, logger);
    const head = new Uint8Array(5);
    head[0] = flags & ~compressedFlag;
    new DataView(head.buffer).setUint32(1, text.byteLength);
    frames.push(head, text);
  }
  if (at < bytes.byteLength) frames.push(bytes.subarray(at));
  return concat(frames);
}

/** A trailer frame's header lines redacted, and its status reclassified when it is callersMistake. */
function scrubTrailer(data: Uint8Array, decoded: boolean): Uint8Array {
  // Reclassified and its message scrubbed decoded: redacting the encoded grpc-message may cut an escape in two.
  const trailer = trailerParse(data);
  const reclassified = reclassifyGrpcStatus(trailer, decoded);
  const fields = scrubGrpcMessage(trailer, decoded) || reclassified ? trailerSerialize(trailer) : data;
  return new TextEncoder().encode(redactText(new TextDecoder().decode(fields)));
}

/**
 * A compressed trailer frame inflated and scrubTrailer'd. Its bytes never pass unread: one that
 * cannot be inflated (or is not header lines) is replaced with INTERNAL, and the cause logged.
 */
async function scrubCompressedTrailer(data: Uint8Array, encoding: string | null, decoded: boolean, errorBytes: number, logger: Logger | undefined): Promise<Uint8Array> {
  try {
    const compression = COMPRESSIONS.find((c) => c.name === encoding);
    if (compression === undefined) throw new Error(`a compressed gRPC-Web trailer frame with grpc-encoding ${String(encoding)}`);
    return scrubTrailer(await compression.decompress(data, errorBytes), decoded);
  } catch (error) {
    logger?.error({ err: error }, "KeyAdmin error trailer unreadable");
    return trailerSerialize(setTrailerStatus(new Headers(), UNREADABLE_ERROR));
  }
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
