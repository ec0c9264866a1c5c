import { constants as h2, createServer as createHttp2Server } from "node:http2";
import type { Http2Session, IncomingHttpHeaders, OutgoingHttpHeaders, ServerHttp2Session, ServerHttp2Stream } from "node:http2";
import type { Socket } from "node:net";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import type { Logger } from "pino";
import { HealthCheckRequestSchema, HealthCheckResponse_ServingStatus, HealthCheckResponseSchema } from "../gen/grpc/health/v1/health_pb.js";
import { awaitOpening, stopAfterAnswer, trackConnections } from "./connections.js";
import type { ListenerLimits } from "./connections.js";
import { sendOkTrailers } from "./h2-trailers.js";
import type { DecodedCheckRequest } from "../authz/check-request.js";
import type { AuthzCore, StartedServer } from "./grpc-authz.js";
import { listen } from "./http-lifecycle.js";
import type { Metrics } from "./metrics.js";
import { createAcceptor } from "./tls.js";
import type { ListenerTls } from "./tls.js";

/** gRPC status codes keygate's server answers with (grpc/doc/statuscodes.md). */
export const GrpcCode = {
  OK: 0,
  DEADLINE_EXCEEDED: 4,
  NOT_FOUND: 5,
  RESOURCE_EXHAUSTED: 8,
  UNIMPLEMENTED: 12,
  INTERNAL: 13,
  UNAVAILABLE: 14,
} as const;
type GrpcCodeValue = (typeof GrpcCode)[keyof typeof GrpcCode];

/** The grpc-message of a Check that could not be decided (UNAVAILABLE), on either engine. */
export const CHECK_UNAVAILABLE_MESSAGE = "the key could not be checked right now";

/** Longest client-sent name (a path, a health service) an error message quotes. */
const MAX_ECHOED_NAME = 200;

/**
 * A client-sent name as an error message quotes it: cut at MAX_ECHOED_NAME characters, so the
 * answer's grpc-message (percent-encoded, up to three times longer) always fits a client's header
 * limit and the caller learns its mistake instead of getting a reset stream.
 */
export function echoedName(name: string): string {
  return name.length <= MAX_ECHOED_NAME ? name : `${name.slice(0, MAX_ECHOED_NAME)}… (${name.length} characters)`;
}

/** Largest request message accepted, as grpc-js's default receive limit (4 MiB). */
export const MAX_MESSAGE_BYTES = 4 * 1024 * 1024;
/**
 * Streams one connection may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS), as Go's HTTP/2
 * server allows by default. A proxy with more Checks in flight opens another connection or queues
 * them; uncapped, one connection could open streams until keygate's memory ran out.
 */
export const MAX_CONCURRENT_STREAMS = 250;
/**
 * Request bytes the calls of one connection, and of the whole listener, may hold at once: the
 * parts of messages still arriving, and messages whose call has not ended. Four messages of the
 * largest size a connection, and a bound the listener's memory can afford. A call whose bytes
 * would pass either bound is answered RESOURCE_EXHAUSTED and its bytes let go.
 */
export const HELD_REQUEST_BYTES = { perConnection: 4 * MAX_MESSAGE_BYTES, perListener: 128 * 1024 * 1024 } as const;
const PREFIX_BYTES = 5;
// The largest block a message still arriving is kept in: one default-size DATA frame.
const BLOCK_BYTES = 16 * 1024;
// An empty message is this one buffer: a view of no bytes would still keep its read alive.
const EMPTY_MESSAGE = Buffer.alloc(0);
// Node's timers hold at most 2^31 - 1 ms; a deadline further away than that (about 24.8 days)
// is as good as none, and a longer delay would fire after 1 ms.
const MAX_TIMER_MS = 2 ** 31 - 1;

const CHECK_PATH = "/envoy.service.auth.v3.Authorization/Check";
const HEALTH_CHECK_PATH = "/grpc.health.v1.Health/Check";
const HEALTH_WATCH_PATH = "/grpc.health.v1.Health/Watch";

const enum Kind {
  Check,
  HealthCheck,
  HealthWatch,
}

const KIND_BY_PATH = new Map<string, Kind>([
  [CHECK_PATH, Kind.Check],
  [HEALTH_CHECK_PATH, Kind.HealthCheck],
  [HEALTH_WATCH_PATH, Kind.HealthWatch],
]);

// Every answer names only the identity encoding: keygate neither decompresses requests nor
// compresses answers (the answers are a few hundred bytes).
const ACCEPT_ENCODING = "identity";
const CONTENT_TYPE = "application/grpc";

// The headers of every answer with a message, as a flat name/value list: node:http2 copies a
// headers object into a new one and lists its keys for each call, while a list that already
// holds :status (and, with sendDate false, gets no date added) is read as it is, never changed.
// Frozen: were node:http2 ever to add to it, the answer would fail loudly (the conformance suite)
// rather than every later answer carrying the addition.
const OK_HEADERS: readonly string[] = Object.freeze([h2.HTTP2_HEADER_STATUS, "200", h2.HTTP2_HEADER_CONTENT_TYPE, CONTENT_TYPE, "grpc-accept-encoding", ACCEPT_ENCODING]);
const OK_TRAILERS: OutgoingHttpHeaders = { "grpc-status": "0" };
// gRPC answers carry no Date header (as grpc-go's server): nothing in gRPC reads it, and
// node:http2 would format, add and encode one for every answer.
const WAIT_FOR_TRAILERS = { waitForTrailers: true, sendDate: false };
const END_STREAM = { endStream: true, sendDate: false };
// A plain HTTP refusal (not POST, not gRPC) keeps its Date, as HTTP asks of an origin server.
const END_HTTP = { endStream: true };
const NOT_POST_HEADERS: OutgoingHttpHeaders = { [h2.HTTP2_HEADER_STATUS]: 405, [h2.HTTP2_HEADER_ALLOW]: "POST" };
const NOT_GRPC_HEADERS: OutgoingHttpHeaders = { [h2.HTTP2_HEADER_STATUS]: 415, "grpc-accept-encoding": ACCEPT_ENCODING };

/** A trailers-only answer (`:status 200` and the status in the one HEADERS frame). */
function errorHeaders(code: GrpcCodeValue, message: string): OutgoingHttpHeaders {
  return {
    [h2.HTTP2_HEADER_STATUS]: 200,
    [h2.HTTP2_HEADER_CONTENT_TYPE]: CONTENT_TYPE,
    "grpc-accept-encoding": ACCEPT_ENCODING,
    "grpc-status": String(code),
    "grpc-message": encodeGrpcMessage(message),
  };
}

// A Watch ended by shutdown ends with status OK.
const WATCH_END_HEADERS: OutgoingHttpHeaders = { "grpc-status": "0" };
const UNAVAILABLE_HEADERS = errorHeaders(GrpcCode.UNAVAILABLE, CHECK_UNAVAILABLE_MESSAGE);
const DEADLINE_HEADERS = errorHeaders(GrpcCode.DEADLINE_EXCEEDED, "Deadline exceeded");
const ARRIVAL_HEADERS = errorHeaders(GrpcCode.DEADLINE_EXCEEDED, "the request did not arrive within the request timeout (KEYGATE_REQUEST_TIMEOUT_SECONDS)");
const CONNECTION_HELD_HEADERS = errorHeaders(GrpcCode.RESOURCE_EXHAUSTED, "this connection's calls hold too many request bytes; end or cancel some calls");
const LISTENER_HELD_HEADERS = errorHeaders(GrpcCode.RESOURCE_EXHAUSTED, "keygate holds too many request bytes right now; retry");
const COMPRESSED_HEADERS = errorHeaders(GrpcCode.UNIMPLEMENTED, "compressed messages are not accepted; send identity encoding");
const TOO_LARGE_HEADERS = errorHeaders(GrpcCode.RESOURCE_EXHAUSTED, `Received message larger than max (${MAX_MESSAGE_BYTES} bytes)`);
const SECOND_MESSAGE_HEADERS = errorHeaders(GrpcCode.INTERNAL, "a unary call carries exactly one request message; a second one arrived");
const NO_MESSAGE_HEADERS = errorHeaders(GrpcCode.INTERNAL, "a unary call carries exactly one request message; none arrived");
const TRUNCATED_HEADERS = errorHeaders(GrpcCode.INTERNAL, "the request ended inside a message");
const BAD_FLAG_HEADERS = errorHeaders(GrpcCode.INTERNAL, "a message's compressed flag is neither 0 nor 1");
const UNDECODABLE_HEADERS = errorHeaders(GrpcCode.INTERNAL, "Error deserializing request");

const utf8 = new TextEncoder();
const HEX = "0123456789ABCDEF";

/**
 * Percent-encodes a grpc-message value as the gRPC spec says: bytes outside printable ASCII
 * (0x20–0x7E) and `%` itself become %XX of their UTF-8 bytes.
 */
export function encodeGrpcMessage(message: string): string {
  let plain = true;
  for (let i = 0; i < message.length; i++) {
    const c = message.charCodeAt(i);
    if (c < 0x20 || c > 0x7e || c === 0x25) {
      plain = false;
      break;
    }
  }
  if (plain) return message;
  let out = "";
  for (const byte of utf8.encode(message)) {
    if (byte >= 0x20 && byte <= 0x7e && byte !== 0x25) out += String.fromCharCode(byte);
    else out += `%${HEX.charAt(byte >> 4)}${HEX.charAt(byte & 0xf)}`;
  }
  return out;
}

/**
 * Parses a grpc-timeout value (1 to 8 ASCII digits and a unit H M S m u n) into milliseconds,
 * or null when it is not of that form.
 */
export function parseGrpcTimeoutMs(value: string): number | null {
  const last = value.length - 1;
  if (last < 1 || last > 8) return null;
  let amount = 0;
  for (let i = 0; i < last; i++) {
    const digit = value.charCodeAt(i) - 48;
    if (digit < 0 || digit > 9) return null;
    amount = amount * 10 + digit;
  }
  switch (value.charAt(last)) {
    case "H":
      return amount * 3_600_000;
    case "M":
      return amount * 60_000;
    case "S":
      return amount * 1000;
    case "m":
      return amount;
    case "u":
      return amount / 1000;
    case "n":
      return amount / 1_000_000;
    default:
      return null;
  }
}

/** True for `application/grpc` and `application/grpc+proto`, with or without parameters. */
export function isGrpcContentType(value: string | string[] | undefined): boolean {
  if (value === "application/grpc" || value === "application/grpc+proto") return true;
  if (typeof value !== "string") return false;
  const end = value.indexOf(";");
  const type = (end === -1 ? value : value.slice(0, end)).trim().toLowerCase();
  return type === "application/grpc" || type === "application/grpc+proto";
}

/** One length-prefixed message: flag 0, big-endian length, the bytes. */
function frame(message: Uint8Array): Buffer {
  const out = Buffer.allocUnsafe(PREFIX_BYTES + message.length);
  out[0] = 0;
  out.writeUInt32BE(message.length, 1);
  out.set(message, PREFIX_BYTES);
  return out;
}

const healthFrames = new Map<HealthCheckResponse_ServingStatus, Buffer>(
  [HealthCheckResponse_ServingStatus.SERVING, HealthCheckResponse_ServingStatus.NOT_SERVING, HealthCheckResponse_ServingStatus.SERVICE_UNKNOWN].map(
    (status) => [status, frame(toBinary(HealthCheckResponseSchema, create(HealthCheckResponseSchema, { status })))],
  ),
);

function healthFrame(status: HealthCheckResponse_ServingStatus): Buffer {
  const bytes = healthFrames.get(status);
  if (bytes === undefined) throw new Error(`no health answer for status ${status}`);
  return bytes;
}

/** One call's state: where its framing stands, and whether it has been answered. */
class Call {
  kind: Kind;
  stream: ServerHttp2Stream;
  /** The 5-byte prefix while it arrives split across DATA frames: bytes read, flag, length so far. */
  prefixFilled = 0;
  prefixFlag = 0;
  prefixLength = 0;
  /** Length of the message being read, or -1 while reading a prefix. */
  bodyLength = -1;
  /**
   * A message split across DATA frames, copied as it arrives into blocks of keygate's own (see
   * `keepBody`): DATA chunks are slices of whole socket reads, so a view of a few bytes would keep
   * a whole read alive. Nothing is allocated from the prefix's length alone.
   */
  blocks: Buffer[] | null = null;
  /** Bytes of the message arrived, and of them in the last block. */
  bodyFilled = 0;
  lastBlockFilled = 0;
  message: Buffer | null = null;
  /** The answer is out, or the stream is gone: nothing more is written. */
  done = false;
  /** The client sent END_STREAM. */
  halfClosed = false;
  /** The call's own deadline timer, when its timeout has no shared list (DeadlineLists). */
  deadline: NodeJS.Timeout | undefined = undefined;
  /** The shared list the call waits in for its deadline, its place in it, and when it passes. */
  deadlineList: DeadlineList | null = null;
  previousInList: Call | null = null;
  nextInList: Call | null = null;
  deadlineAt = 0;
  /**
   * The deadline armed is the request's arrival timeout (KEYGATE_REQUEST_TIMEOUT_SECONDS), not
   * the call's own: it is let go once the request has arrived.
   */
  arrivalOnly = false;
  /** The call's own grpc-timeout deadline (performance.now()) when it is later than the arrival timeout; 0 for none. */
  laterDeadlineAt = 0;
  unsubscribe: (() => void) | undefined = undefined;
  pendingTrailers: OutgoingHttpHeaders = OK_TRAILERS;
  /** Where the request bytes this call holds are counted, and how many it holds. */
  heldIn: HeldBytes;
  held = 0;
  /** The list the call waits in once answered, until the client has taken the answer. */
  untaken: DeadlineList;

  constructor(kind: Kind, stream: ServerHttp2Stream, heldIn: HeldBytes, untaken: DeadlineList) {
    this.kind = kind;
    this.stream = stream;
    this.heldIn = heldIn;
    this.untaken = untaken;
  }
}

/**
 * The request bytes held by the calls of one connection (or of the listener, `parent` null):
 * counted as a call keeps them and let go when its message is decided or the call ends.
 */
class HeldBytes {
  held = 0;

  constructor(
    readonly max: number,
    readonly refusal: OutgoingHttpHeaders,
    readonly parent: HeldBytes | null,
  ) {}

  /** Counts `bytes` here and in the parent; the refusal of the bound they would pass (nothing counted), else null. */
  take(bytes: number): OutgoingHttpHeaders | null {
    if (this.held + bytes > this.max) return this.refusal;
    if (this.parent !== null) {
      const refused = this.parent.take(bytes);
      if (refused !== null) return refused;
    }
    this.held += bytes;
    return null;
  }

  give(bytes: number): void {
    this.held -= bytes;
    this.parent?.give(bytes);
  }
}

/** Counts `bytes` more held by the call; false (and the call answered RESOURCE_EXHAUSTED) past a bound. */
function hold(call: Call, bytes: number): boolean {
  const refused = call.heldIn.take(bytes);
  if (refused === null) {
    call.held += bytes;
    return true;
  }
  finish(call, refused);
  return false;
}

/**
 * Copies `take` bytes of `chunk` from `at` into the call's blocks, counting each block whole as it
 * is allocated; false (and the call answered RESOURCE_EXHAUSTED) past a bound. A new block is as
 * large as what has arrived so far, up to BLOCK_BYTES, and at least what this chunk brings, never
 * past the message's end: what a call counts is what it holds, at most twice what it was sent,
 * and a message sent a byte at a time fills blocks that double up to BLOCK_BYTES, not one a byte.
 * The blocks are joined once, when the message is whole.
 */
function keepBody(call: Call, chunk: Buffer, at: number, take: number): boolean {
  const blocks = (call.blocks ??= []);
  let from = at;
  const end = at + take;
  while (from < end) {
    let last = blocks[blocks.length - 1];
    if (last === undefined || call.lastBlockFilled === last.length) {
      const size = Math.min(call.bodyLength - call.bodyFilled, Math.max(end - from, Math.min(BLOCK_BYTES, call.bodyFilled)));
      if (!hold(call, size)) return false;
      // Not from Node's shared pool: a pooled slice would keep its whole 8 KiB pool alive.
      last = Buffer.allocUnsafeSlow(size);
      blocks.push(last);
      call.lastBlockFilled = 0;
    }
    const copied = chunk.copy(last, call.lastBlockFilled, from, end);
    call.lastBlockFilled += copied;
    call.bodyFilled += copied;
    from += copied;
  }
  return true;
}

/** The whole message from its blocks: the one block as it is, else joined into one buffer. */
function joinBlocks(blocks: readonly Buffer[], length: number): Buffer {
  const only = blocks[0];
  if (blocks.length === 1 && only !== undefined) return only;
  const message = Buffer.allocUnsafeSlow(length);
  let at = 0;
  for (const block of blocks) at += block.copy(message, at);
  return message;
}

/** A copy of `bytes` in a buffer of its own. */
function ownCopy(bytes: Buffer): Buffer {
  const copy = Buffer.allocUnsafeSlow(bytes.length);
  bytes.copy(copy);
  return copy;
}

// The calls whose message is a view of a socket read taken in this turn of the event loop, or
// null before the first. A call whose request has not ended by the end of the turn (ownViews)
// gets a copy: otherwise a small message, counted at its size, would keep its whole read alive
// (up to 64 KiB) for as long as the client leaves the call open.
let viewing: Call[] | null = null;

function keepViewForTurn(call: Call): void {
  if (viewing === null) {
    viewing = [];
    setImmediate(ownViews);
  }
  viewing.push(call);
}

function ownViews(): void {
  const calls = viewing;
  viewing = null;
  if (calls === null) return;
  for (const call of calls) {
    const message = call.message;
    // Decided, or ended and decided in this turn (endTurn): the view goes with the turn.
    if (message === null || call.done || call.halfClosed) continue;
    call.message = ownCopy(message);
  }
}

/** Lets go of the call's request message and the bytes it held. */
function dropMessage(call: Call): void {
  call.blocks = null;
  call.message = null;
  if (call.held === 0) return;
  call.heldIn.give(call.held);
  call.held = 0;
}

const CALL = Symbol("keygate.call");
const GUARD = Symbol("keygate.sessionGuard");
interface CallStream extends ServerHttp2Stream {
  [CALL]?: Call;
  /** Its session's guard, told when the stream closes. */
  [GUARD]?: SessionGuard;
}
interface GuardedSession extends Http2Session {
  [GUARD]?: SessionGuard;
}

/** What a session's idle limit needs to know of its streams: how many are open. */
interface SessionGuard {
  opened(): void;
  closed(): void;
  /** The request bytes held by the session's calls. */
  held: HeldBytes;
}

function ignore(): void {}

function sendTrailers(this: CallStream): void {
  const call = this[CALL];
  try {
    if (call === undefined || call.pendingTrailers === OK_TRAILERS) sendOkTrailers(this);
    else this.sendTrailers(call.pendingTrailers);
  } catch {
    this.destroy();
  }
}

/** Ends a call with a trailers-only answer (or trailers, when a Watch already sent headers). */
function finish(call: Call, headers: OutgoingHttpHeaders): void {
  if (call.done) return;
  settle(call);
  const stream = call.stream;
  if (stream.destroyed || stream.closed) return;
  try {
    if (stream.headersSent) {
      const message = headers["grpc-message"];
      call.pendingTrailers = message === undefined ? { "grpc-status": headers["grpc-status"] } : { "grpc-status": headers["grpc-status"], "grpc-message": message };
      stream.end();
      awaitTaken(call);
      return;
    }
    stream.respond(headers, END_STREAM);
    // The client may still be sending (an oversize body, say): RST_STREAM NO_ERROR after the
    // answer tells it to stop (RFC 9113 §8.1), and keygate reads no more of it.
    if (!call.halfClosed) stopAfterAnswer(stream);
    awaitTaken(call);
  } catch {
    stream.destroy();
  }
}

/**
 * The answer is written; the client has the request timeout to take it. An answer's DATA waits
 * for the client's flow-control window, so a client that never opens it (SETTINGS_INITIAL_WINDOW_SIZE
 * 0, or one that stops reading) would keep the stream, and the answer queued in it, for as long as
 * it answers keepalive pings. Its stream closes once the answer is out, taking it off the list.
 */
function awaitTaken(call: Call): void {
  call.untaken.add(call, performance.now());
}

/** An answer not taken within the request timeout: the stream is reset and the answer let go. */
function abandon(call: Call): void {
  const stream = call.stream;
  if (!stream.destroyed && !stream.closed) stream.close(h2.NGHTTP2_CANCEL);
}

/** Marks a call answered and lets go of its timer and subscriptions. */
function settle(call: Call): void {
  call.done = true;
  if (call.deadline !== undefined) clearTimeout(call.deadline);
  call.deadline = undefined;
  call.deadlineList?.remove(call);
  call.unsubscribe?.();
  call.unsubscribe = undefined;
  dropMessage(call);
}

/** Sends one framed message and OK trailers: one output buffer, constant headers. */
function answer(call: Call, framed: Uint8Array): void {
  if (call.done) return;
  settle(call);
  const stream = call.stream;
  if (stream.destroyed || stream.closed) return;
  try {
    stream.respond(OK_HEADERS as string[], WAIT_FOR_TRAILERS);
    // 'wantTrailers', 'close' and 'end' come once per stream: `on` with a shared handler spares
    // the wrapper `once` makes per call.
    stream.on("wantTrailers", sendTrailers);
    stream.end(framed);
    awaitTaken(call);
  } catch {
    stream.destroy();
  }
}

/** A Check's answer, framed by the core (createAuthzCore's `framed`), or null for UNAVAILABLE. */
function replyCheck(call: Call, framed: Uint8Array | null): void {
  if (framed === null) finish(call, UNAVAILABLE_HEADERS);
  else answer(call, framed);
}

/** Reads DATA into the call's one message; a framing fault answers at once. */
function onData(this: CallStream, chunk: Buffer): void {
  const call = this[CALL];
  if (call === undefined || call.done) return;
  let at = 0;
  while (at < chunk.length) {
    if (call.bodyLength === -1) {
      if (call.message !== null) return finish(call, SECOND_MESSAGE_HEADERS);
      let flag: number;
      let length: number;
      if (call.prefixFilled === 0 && chunk.length - at >= PREFIX_BYTES) {
        flag = chunk[at] ?? 0;
        length = chunk.readUInt32BE(at + 1);
        at += PREFIX_BYTES;
      } else {
        // A prefix split across DATA frames is read a byte at a time into numbers: no buffer
        // (a pooled one would keep its 8 KiB pool alive) for five bytes.
        while (call.prefixFilled < PREFIX_BYTES && at < chunk.length) {
          const byte = chunk[at] ?? 0;
          if (call.prefixFilled === 0) call.prefixFlag = byte;
          else call.prefixLength = call.prefixLength * 256 + byte;
          call.prefixFilled += 1;
          at += 1;
        }
        if (call.prefixFilled < PREFIX_BYTES) return;
        flag = call.prefixFlag;
        length = call.prefixLength;
        call.prefixFilled = 0;
        call.prefixLength = 0;
      }
      if (flag === 1) return finish(call, COMPRESSED_HEADERS);
      if (flag !== 0) return finish(call, BAD_FLAG_HEADERS);
      // Refused on the prefix alone: nothing of an oversize message is held.
      if (length > MAX_MESSAGE_BYTES) return finish(call, TOO_LARGE_HEADERS);
      if (length === 0) {
        call.message = EMPTY_MESSAGE;
        continue;
      }
      if (chunk.length - at >= length) {
        if (!hold(call, length)) return;
        // The common case: the whole message is in this chunk, so it is a view, not a copy, for
        // as long as this turn (keepViewForTurn).
        call.message = chunk.subarray(at, at + length);
        keepViewForTurn(call);
        at += length;
        continue;
      }
      call.bodyLength = length;
      call.bodyFilled = 0;
      call.lastBlockFilled = 0;
    }
    const take = Math.min(call.bodyLength - call.bodyFilled, chunk.length - at);
    if (!keepBody(call, chunk, at, take)) return;
    at += take;
    const blocks = call.blocks;
    if (call.bodyFilled === call.bodyLength && blocks !== null) {
      call.message = joinBlocks(blocks, call.bodyLength);
      call.blocks = null;
      call.bodyLength = -1;
    }
  }
}

function onStreamClose(this: CallStream): void {
  const call = this[CALL];
  if (call !== undefined) {
    if (!call.done) settle(call);
    else call.deadlineList?.remove(call);
  }
  this[GUARD]?.closed();
  this[CALL] = undefined;
  this[GUARD] = undefined;
  // 'close' is a stream's last event. Until then node:http2's own listeners on the stream hold
  // closures over the request (its headers among them). Cutting them here took what each
  // young-generation GC promoted to the old generation from about 575 KB to 5-44 KB at 3,000
  // Checks/s (about 1 KB a Check before), and with it the mark-compacts that set the p99 at that
  // rate (docs/performance-log.md). The listener table itself may live in the old generation (V8
  // pretenures the allocation site of every emitter's table in some processes), where a young
  // closure it still points to survives every scavenge until the next mark-compact: so its
  // entries are cleared in place first, then the stream takes an empty table (one allocation,
  // where removing name by name made V8 shrink the table's dictionary as it went) and gets the
  // shared 'error' handler back, for an error after this.
  clearListenerTable(this);
  this.removeAllListeners();
  this.on("error", ignore);
}

/**
 * Sets every entry of an emitter's listener table to undefined, which node:events reads as no
 * listener; the caller then replaces the table. `_events` is the table's long-standing name in
 * node:events; an emitter without one is left as it is.
 */
function clearListenerTable(emitter: NodeJS.EventEmitter): void {
  const table = (emitter as { _events?: Record<string, unknown> })._events;
  if (table === undefined || table === null) return;
  for (const name in table) table[name] = undefined;
}

function onDeadline(call: Call): void {
  call.deadline = undefined;
  if (call.done) return abandon(call);
  finish(call, call.arrivalOnly ? ARRIVAL_HEADERS : DEADLINE_HEADERS);
}

/**
 * The request has arrived: an arrival timeout armed for it is let go, and the call's own later
 * deadline, if it has one, is armed for what is left of it.
 */
function arrived(call: Call): void {
  if (!call.arrivalOnly) return;
  call.arrivalOnly = false;
  call.deadlineList?.remove(call);
  if (call.deadline !== undefined) clearTimeout(call.deadline);
  call.deadline = undefined;
  if (call.laterDeadlineAt === 0) return;
  call.deadline = setTimeout(onDeadline, Math.max(1, Math.ceil(call.laterDeadlineAt - performance.now())), call);
}

/**
 * The calls waiting on one grpc-timeout value, in the order they came, which is their deadline
 * order: one timer, set for the first call's deadline, serves them all, and a call that is
 * answered leaves the list in constant time. A proxy sends the same timeout with every call
 * (Envoy's ext_authz timeout), so this replaces a timer made and cleared per call. The server
 * keeps one more, of answered calls waiting for their answer to be taken (`lists` null).
 */
class DeadlineList {
  #first: Call | null = null;
  #last: Call | null = null;
  #timer: NodeJS.Timeout | undefined = undefined;

  constructor(
    readonly timeoutMs: number,
    private readonly lists: DeadlineLists | null,
  ) {}

  add(call: Call, now: number): void {
    call.deadlineList = this;
    call.deadlineAt = now + this.timeoutMs;
    call.previousInList = this.#last;
    call.nextInList = null;
    if (this.#last === null) this.#first = call;
    else this.#last.nextInList = call;
    this.#last = call;
    // A timer already set fires no later than this call's deadline; it stays set when the list
    // empties and finds nothing to do, so a steady load sets one timer per timeout, not per call.
    if (this.#timer === undefined) this.#arm(this.timeoutMs);
  }

  remove(call: Call): void {
    const { previousInList: previous, nextInList: next } = call;
    if (previous === null) this.#first = next;
    else previous.nextInList = next;
    if (next === null) this.#last = previous;
    else next.previousInList = previous;
    call.deadlineList = null;
    call.previousInList = null;
    call.nextInList = null;
  }

  #arm(ms: number): void {
    this.#timer = setTimeout(this.#fire, Math.max(1, Math.ceil(ms)));
    this.#timer.unref();
  }

  readonly #fire = (): void => {
    this.#timer = undefined;
    const now = performance.now();
    let call = this.#first;
    while (call !== null && call.deadlineAt <= now) {
      this.remove(call);
      onDeadline(call);
      call = this.#first;
    }
    if (call !== null) this.#arm(call.deadlineAt - now);
    else this.lists?.forget(this);
  };
}

/** The deadline lists of one server by timeout value, at most MAX_DEADLINE_LISTS of them. */
class DeadlineLists {
  readonly #byTimeout = new Map<number, DeadlineList>();

  /** Puts the call on its timeout's list; false when a client's many timeouts used up the lists. */
  add(call: Call, timeoutMs: number): boolean {
    let list = this.#byTimeout.get(timeoutMs);
    if (list === undefined) {
      if (this.#byTimeout.size >= MAX_DEADLINE_LISTS) return false;
      list = new DeadlineList(timeoutMs, this);
      this.#byTimeout.set(timeoutMs, list);
    }
    list.add(call, performance.now());
    return true;
  }

  forget(list: DeadlineList): void {
    this.#byTimeout.delete(list.timeoutMs);
  }
}

/** Distinct timeout values with a shared list; a call with yet another has a timer of its own. */
const MAX_DEADLINE_LISTS = 64;

/** What the h2 engine needs besides the shared Check and health logic. */
export interface H2ServerDeps {
  limits: ListenerLimits;
  metrics: Metrics;
  logger: Logger;
  /** TLS on this listener (ALPN h2), or null for cleartext HTTP/2 with prior knowledge. */
  tls?: ListenerTls | null;
  /** Bounds on the request bytes calls hold (default HELD_REQUEST_BYTES). */
  heldRequestBytes?: { perConnection: number; perListener: number } | undefined;
}

/**
 * keygate's own unary gRPC server on node:http2: Check, health Check and Watch, identity
 * encoding only, one message per call, grpc-timeout deadlines, trailers-only errors.
 */
export function createH2GrpcServer(core: AuthzCore, deps: H2ServerDeps): { start(host: string, port: number): Promise<StartedServer> } {
  const { limits, metrics, logger } = deps;
  const heldBounds = deps.heldRequestBytes ?? HELD_REQUEST_BYTES;
  const watchers = new Set<Call>();
  const deadlines = new DeadlineLists();
  // Answered calls whose stream is still open, each given the request timeout to be taken.
  const untaken = new DeadlineList(limits.requestTimeoutMs, null);
  const listenerHeld = new HeldBytes(heldBounds.perListener, LISTENER_HELD_HEADERS, null);

  // The Checks whose request ended in this turn of the event loop after its first, or null before
  // that first. One read of a busy connection carries many Checks, and node:http2 hands them over
  // one by one, each between the HTTP/2 work of the next. The first is decided at once, as an idle
  // server's only Check; the others are decoded, decided, encoded and answered together once the
  // turn's reads are done (setImmediate runs right after them, in the same turn), so that each
  // step runs for all of them while its code and tables are still in the CPU's caches, where a
  // Check run on its own finds them evicted by node:http2 and the kernel.
  let waiting: Call[] | null = null;

  function endTurn(): void {
    const calls = waiting;
    waiting = null;
    if (calls !== null && calls.length > 0) decideAll(calls);
  }

  function decideAll(calls: readonly Call[]): void {
    const requests: DecodedCheckRequest[] = [];
    const targets: Call[] = [];
    for (const call of calls) {
      const message = call.message;
      dropMessage(call);
      // Reset since it arrived (settle let go of its message): nothing is decided or charged.
      if (call.done || message === null) continue;
      try {
        requests.push(core.decodeCheck(message));
      } catch {
        finish(call, UNDECODABLE_HEADERS);
        continue;
      }
      targets.push(call);
    }
    if (requests.length === 0) return;
    try {
      core.checkAll(requests, targets, replyCheck);
    } catch (error) {
      // checkAll answers its own failures; were anything else to throw, no Check of the batch is
      // left waiting for its deadline.
      logger.error({ err: error }, "checks could not be answered");
      const now = performance.now();
      for (const call of targets) {
        if (!call.done) metrics.recordCheck("grpc", "INTERNAL", now, now);
        finish(call, UNAVAILABLE_HEADERS);
      }
    }
  }

  /** The client half-closed: the one message is complete, or the call is malformed. */
  function onEnd(this: CallStream): void {
    const call = this[CALL];
    if (call === undefined) return;
    call.halfClosed = true;
    if (call.done) return;
    if (call.bodyLength !== -1 || call.prefixFilled !== 0) return finish(call, TRUNCATED_HEADERS);
    const message = call.message;
    if (message === null) return finish(call, NO_MESSAGE_HEADERS);
    arrived(call);
    if (call.kind === Kind.Check) {
      if (waiting !== null) {
        // Decided with the turn's others (endTurn); its message waits on the call until then.
        waiting.push(call);
        return;
      }
      waiting = [];
      setImmediate(endTurn);
      return decideAll([call]);
    }
    dropMessage(call);
    let service: string;
    try {
      service = fromBinary(HealthCheckRequestSchema, message, { readUnknownFields: false }).service;
    } catch {
      return finish(call, UNDECODABLE_HEADERS);
    }
    if (call.kind === Kind.HealthCheck) {
      const status = core.servingStatus(service);
      if (status === null) finish(call, errorHeaders(GrpcCode.NOT_FOUND, `unknown service "${echoedName(service)}"`));
      else answer(call, healthFrame(status));
      return;
    }
    watch(call, service);
  }

  /** Health Watch: the current status now, every change after, ended by shutdown. */
  function watch(call: Call, service: string): void {
    const stream = call.stream;
    const send = (): void => {
      if (call.done || stream.destroyed) return;
      stream.write(healthFrame(core.servingStatus(service) ?? HealthCheckResponse_ServingStatus.SERVICE_UNKNOWN));
    };
    try {
      stream.respond(OK_HEADERS as string[], WAIT_FOR_TRAILERS);
      stream.on("wantTrailers", sendTrailers);
      send();
    } catch {
      stream.destroy();
      return;
    }
    watchers.add(call);
    const unsubscribe = core.readiness.onChange(send);
    call.unsubscribe = () => {
      unsubscribe();
      watchers.delete(call);
    };
  }

  function onStream(stream: ServerHttp2Stream, headers: IncomingHttpHeaders): void {
    // Every fault of a stream (a reset, a write after the peer left) ends up in 'close'.
    stream.on("error", ignore);
    // One 'close' handler per stream, shared: it settles the call and tells the session's guard.
    const callStream: CallStream = stream;
    const session: GuardedSession | undefined = stream.session;
    const guard = session?.[GUARD];
    if (guard !== undefined) {
      callStream[GUARD] = guard;
      guard.opened();
    }
    stream.on("close", onStreamClose);
    if (headers[h2.HTTP2_HEADER_METHOD] !== "POST") return rejectHttp(stream, NOT_POST_HEADERS);
    if (!isGrpcContentType(headers[h2.HTTP2_HEADER_CONTENT_TYPE])) return rejectHttp(stream, NOT_GRPC_HEADERS);
    const pathHeader = headers[h2.HTTP2_HEADER_PATH];
    const path = typeof pathHeader === "string" ? pathHeader : "";
    const kind = KIND_BY_PATH.get(path);
    const call = new Call(kind ?? Kind.Check, stream, guard?.held ?? listenerHeld, untaken);
    callStream[CALL] = call;
    stream.on("end", onEnd);
    if (kind === undefined) return finish(call, errorHeaders(GrpcCode.UNIMPLEMENTED, `The server does not implement the method ${echoedName(path)}`));
    const encoding = headers["grpc-encoding"];
    if (encoding !== undefined && encoding !== "identity") return finish(call, COMPRESSED_HEADERS);
    let ms = Infinity;
    const timeout = headers["grpc-timeout"];
    if (timeout !== undefined) {
      const timeoutMs = typeof timeout === "string" ? parseGrpcTimeoutMs(timeout) : null;
      if (timeoutMs === null) return finish(call, errorHeaders(GrpcCode.INTERNAL, `Invalid grpc-timeout value "${echoedName(String(timeout))}"`));
      if (timeoutMs < MAX_TIMER_MS) ms = Math.floor(timeoutMs);
    }
    // Whatever the call's own deadline, its request must arrive within the request timeout: a
    // call that never ends its request would otherwise hold its stream and bytes for good.
    if (ms > limits.requestTimeoutMs) {
      call.arrivalOnly = true;
      if (ms !== Infinity) call.laterDeadlineAt = performance.now() + ms;
      ms = limits.requestTimeoutMs;
    }
    if (!deadlines.add(call, ms)) call.deadline = setTimeout(onDeadline, ms, call);
    stream.on("data", onData);
  }

  function rejectHttp(stream: ServerHttp2Stream, headers: OutgoingHttpHeaders): void {
    try {
      stream.respond(headers, END_HTTP);
      if (!stream.endAfterHeaders) stopAfterAnswer(stream);
    } catch {
      stream.destroy();
    }
  }

  /**
   * A session with no stream for the idle timeout gets GOAWAY; every session is pinged once per
   * idle timeout and destroyed if the ping goes unanswered for the headers timeout. So a peer
   * that vanished, or holds a call open without speaking HTTP/2, loses its connection, while a
   * live Watch answers the pings and stays (as grpc-js's keepalive and max_connection_idle).
   */
  function guardSession(session: ServerHttp2Session): void {
    let open = 0;
    // When the last stream closed (performance.now()); the idle timer reads it when it fires,
    // so a stream opening and closing touches no timer.
    let idleSince = performance.now();
    let idle: NodeJS.Timeout | undefined;
    let keepalive: NodeJS.Timeout | undefined;
    const closeIdle = (): void => {
      session.close();
      setTimeout(() => session.destroy(), limits.headersTimeoutMs).unref();
    };
    const checkIdle = (): void => {
      idle = undefined;
      if (session.closed || session.destroyed) return;
      // Busy now: idle can begin no sooner than a whole timeout from now.
      const wait = open > 0 ? limits.idleTimeoutMs : idleSince + limits.idleTimeoutMs - performance.now();
      if (wait <= 0) return closeIdle();
      armIdle(wait);
    };
    const armIdle = (wait: number): void => {
      idle = setTimeout(checkIdle, Math.ceil(wait));
      idle.unref();
    };
    const ping = (): void => {
      if (session.destroyed) return;
      keepalive = setTimeout(() => session.destroy(), limits.headersTimeoutMs);
      keepalive.unref();
      let sent = false;
      try {
        sent = session.ping((error) => {
          clearTimeout(keepalive);
          if (error === null) armKeepalive();
          else session.destroy();
        });
      } catch {
        sent = false;
      }
      if (!sent) session.destroy();
    };
    const armKeepalive = (): void => {
      if (session.destroyed) return;
      keepalive = setTimeout(ping, limits.idleTimeoutMs);
      keepalive.unref();
    };
    armIdle(limits.idleTimeoutMs);
    armKeepalive();
    // onStream and onStreamClose report each stream: no listener or closure per stream here.
    const guarded: GuardedSession = session;
    guarded[GUARD] = {
      held: new HeldBytes(heldBounds.perConnection, CONNECTION_HELD_HEADERS, listenerHeld),
      opened() {
        open += 1;
      },
      closed() {
        open -= 1;
        if (open === 0) idleSince = performance.now();
      },
    };
    session.once("close", () => {
      clearTimeout(idle);
      clearTimeout(keepalive);
    });
  }

  return {
    async start(host, port) {
      const http2 = createHttp2Server({ settings: { maxConcurrentStreams: MAX_CONCURRENT_STREAMS } });
      http2.on("stream", onStream);
      // A session's protocol errors close it; they are the peer's fault, not keygate's.
      http2.on("sessionError", (error: Error) => logger.debug({ err: error }, "grpc session error"));
      const sessions = new Set<ServerHttp2Session>();
      let drained: (() => void) | undefined;
      http2.on("session", (session: ServerHttp2Session) => {
        sessions.add(session);
        session.on("error", ignore);
        session.once("close", () => {
          sessions.delete(session);
          drained?.();
        });
        guardSession(session);
      });
      // keygate owns the TCP listener and hands HTTP/2 only connections that opened with the
      // preface and SETTINGS in time, so it can cap them and close silent ones.
      const opening = new Set<Socket>();
      const acceptor = createAcceptor(deps.tls ?? null, limits.headersTimeoutMs, (socket: Socket) => {
        opening.add(socket);
        socket.once("close", () => opening.delete(socket));
        awaitOpening(socket, limits.headersTimeoutMs, false, () => {
          opening.delete(socket);
          // A session made after stop() would get no GOAWAY, and stop() may have ended already.
          if (acceptor.stopped) return void socket.destroy();
          // The session reads the unshifted bytes itself; resuming would drop them.
          http2.emit("connection", socket);
        });
      });
      trackConnections(acceptor.server, "grpc", limits, metrics);
      const boundPort = await listen(acceptor.server, host, port);
      return {
        port: boundPort,
        stop: (graceMs) =>
          new Promise<void>((resolve) => {
            // Connections not yet handed to HTTP/2 (in their TLS handshake, or before their
            // opening bytes) are closed: only sessions serving at stop() get the grace.
            acceptor.stop();
            for (const socket of opening) socket.destroy();
            // Readiness has already sent NOT_SERVING to every Watch; now they end with OK.
            for (const call of [...watchers]) finish(call, WATCH_END_HEADERS);
            // GOAWAY to every session: in-flight calls finish, new ones go elsewhere.
            for (const session of sessions) session.close();
            const force = setTimeout(() => {
              for (const session of sessions) session.destroy();
            }, graceMs);
            drained = () => {
              if (sessions.size > 0) return;
              clearTimeout(force);
              drained = undefined;
              resolve();
            };
            drained();
          }),
      };
    },
  };
}
