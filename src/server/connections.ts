import { readFileSync } from "node:fs";
import type { ServerResponse } from "node:http";
import { constants as http2Constants } from "node:http2";
import type { ServerHttp2Stream } from "node:http2";
import type { Server as NetServer, Socket } from "node:net";
import type { ListenerSettings } from "../config.js";
import type { ListenerName, Metrics } from "./metrics.js";

/** A listener's timeouts and connection cap, with the cap resolved to a number. */
export interface ListenerLimits {
  headersTimeoutMs: number;
  requestTimeoutMs: number;
  idleTimeoutMs: number;
  maxConnections: number;
}

/** The default cap per listener when the open-file limit allows more. */
export const MAX_CONNECTIONS_CEILING = 10_000;
// Descriptors kept back from the three listeners for the store, MongoDB's pool, Redis, logs
// and Node itself, so a flood on one port cannot starve them.
const RESERVED_FILES = 256;
const MIN_DEFAULT_CONNECTIONS = 16;

/** The soft open-file limit of this process, or null when unlimited or unknown (not Linux). */
export function openFileLimit(): number | null {
  let text: string;
  try {
    text = readFileSync("/proc/self/limits", "utf8");
  } catch {
    return null;
  }
  const soft = /^Max open files\s+(\S+)/m.exec(text)?.[1];
  if (soft === undefined || soft === "unlimited") return null;
  const limit = Number(soft);
  return Number.isSafeInteger(limit) && limit > 0 ? limit : null;
}

/**
 * The default per-listener cap: the three listeners together stay RESERVED_FILES below the
 * open-file limit, and none holds more than MAX_CONNECTIONS_CEILING.
 */
export function defaultMaxConnections(fileLimit: number | null): number {
  if (fileLimit === null) return MAX_CONNECTIONS_CEILING;
  return Math.min(MAX_CONNECTIONS_CEILING, Math.max(MIN_DEFAULT_CONNECTIONS, Math.floor((fileLimit - RESERVED_FILES) / 3)));
}

/** Resolves the configured settings for this process. */
export function listenerLimits(settings: ListenerSettings, fileLimit: number | null = openFileLimit()): ListenerLimits {
  return { ...settings, maxConnections: settings.maxConnections ?? defaultMaxConnections(fileLimit) };
}

/**
 * How often Node's HTTP/1.1 server looks for requests past their headers or request timeout:
 * often enough that a timeout is kept to within a quarter of itself, at most once a second.
 */
export function timeoutCheckIntervalMs(limits: ListenerLimits): number {
  return Math.min(1000, Math.max(25, Math.floor(limits.headersTimeoutMs / 4)));
}

/**
 * Caps a listener's open connections and counts them. Past the cap Node accepts and at once
 * closes a new connection, so it holds no descriptor, and the refusal is counted.
 */
export function trackConnections(server: NetServer, listener: ListenerName, limits: ListenerLimits, metrics: Metrics): void {
  server.maxConnections = limits.maxConnections;
  server.on("drop", () => metrics.connectionRejected(listener));
  server.on("connection", (socket: Socket) => {
    metrics.connectionOpened(listener);
    socket.once("close", () => metrics.connectionClosed(listener));
  });
}

/** The client connection preface of HTTP/2 (RFC 9113 §3.4). */
const H2_PREFACE = Buffer.from("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "latin1");
const FRAME_HEADER_BYTES = 9;
const SETTINGS_FRAME = 0x4;
const ACK_FLAG = 0x1;
// A SETTINGS payload is six bytes per setting; six settings are defined, 16 KiB is the frame limit.
const MAX_SETTINGS_PAYLOAD = 16_384;

/** What the first bytes of a connection are. */
export type Opening = "http1" | "http2" | "incomplete" | "invalid";

/**
 * Reads the opening bytes of a connection: the HTTP/2 preface followed by a complete SETTINGS
 * frame is "http2"; bytes that depart from the preface are "http1".
 */
export function classifyOpening(bytes: Buffer): Opening {
  const compared = Math.min(bytes.length, H2_PREFACE.length);
  if (bytes.compare(H2_PREFACE, 0, compared, 0, compared) !== 0) return "http1";
  if (bytes.length < H2_PREFACE.length + FRAME_HEADER_BYTES) return "incomplete";
  const at = H2_PREFACE.length;
  const length = bytes.readUIntBE(at, 3);
  const type = bytes.readUInt8(at + 3);
  const flags = bytes.readUInt8(at + 4);
  const streamId = bytes.readUInt32BE(at + 5) & 0x7fffffff;
  if (type !== SETTINGS_FRAME || (flags & ACK_FLAG) !== 0 || streamId !== 0 || length % 6 !== 0 || length > MAX_SETTINGS_PAYLOAD) return "invalid";
  return bytes.length < at + FRAME_HEADER_BYTES + length ? "incomplete" : "http2";
}

/**
 * Holds a new connection until its opening is known, then hands it on with every byte still
 * unread. A connection that sends nothing, or only part of the HTTP/2 preface and SETTINGS,
 * within `timeoutMs` is closed; so is one whose opening is "invalid" or, when `allowHttp1` is
 * off, not HTTP/2. `ready` gets the milliseconds of `timeoutMs` still left: a server that reads
 * the request head next counts its deadline on from the connection, not from the hand-over.
 */
export function awaitOpening(socket: Socket, timeoutMs: number, allowHttp1: boolean, ready: (opening: "http1" | "http2", leftMs: number) => void): void {
  const chunks: Buffer[] = [];
  let received = 0;
  const deadline = performance.now() + timeoutMs;
  const timer = setTimeout(() => socket.destroy(), timeoutMs);
  const stop = (): void => {
    clearTimeout(timer);
    socket.off("data", onData);
  };
  socket.once("close", stop);
  socket.once("error", () => socket.destroy());
  function onData(chunk: Buffer): void {
    chunks.push(chunk);
    received += chunk.length;
    const bytes = chunks.length === 1 ? chunk : Buffer.concat(chunks, received);
    const opening = classifyOpening(bytes);
    if (opening === "incomplete") return;
    stop();
    socket.off("close", stop);
    if (opening === "invalid" || (opening === "http1" && !allowHttp1)) {
      socket.destroy();
      return;
    }
    socket.pause();
    socket.unshift(bytes);
    ready(opening, Math.max(0, deadline - performance.now()));
  }
  socket.on("data", onData);
}

// After an answer that leaves request bytes unread, how long an HTTP/1.1 connection is kept
// half-closed, so that the answer is not lost to a TCP reset (RFC 9112 §9.6).
const LINGER_MS = 2000;

/** Marks an HTTP/1.1 socket whose last answer is decided: see lastAnswerDecided. */
const LAST_ANSWER_DECIDED = Symbol("keygate.lastAnswerDecided");

/**
 * Whether an earlier answer on this HTTP/1.1 connection has been made its last (closeAfterAnswer,
 * lingeringClose). Node's parser still reads requests pipelined behind it and hands them to the
 * request handler, but their answers would never be sent: such a request must run nothing
 * (stopReading). One property lookup, as it sits on the Check path.
 */
export function lastAnswerDecided(socket: Socket): boolean {
  return LAST_ANSWER_DECIDED in socket;
}

/**
 * What a request read behind its connection's last answer gets: nothing is run or answered, and
 * the connection reads no more. Not destroyed here: the answer ahead of it may not have been
 * written yet (pipelined in the same packet), and a close with input unread resets the connection,
 * which may lose that answer. The lingering close (or Node's close) ends it; Node then destroys
 * the responses still queued behind the last one.
 */
export function stopReading(socket: Socket): void {
  socket.pause();
}

/**
 * Half-closes an HTTP/1.1 connection whose request was not read to the end, then closes it
 * after LINGER_MS, rather than reading an unbounded body through. In the meantime Node's parser
 * reads on: the rest of the unread body is thrown away (Node dumps a body no one read), and the
 * first request pipelined behind it stops the reading (lastAnswerDecided, stopReading).
 * A connection already half-closed (a lingering close under way) is left as it is.
 */
export function lingeringClose(socket: Socket): void {
  markLastAnswerDecided(socket);
  if (socket.destroyed || socket.writableEnded) return;
  socket.end();
  socket.resume();
  const timer = setTimeout(() => socket.destroy(), LINGER_MS);
  timer.unref();
  socket.once("close", () => clearTimeout(timer));
}

/**
 * Makes the answer to an HTTP/1.1 request whose body keygate will not read the last on its
 * connection: "Connection: close", and a lingering close rather than Node's destroySoon(), which
 * closes with the body still arriving, so the kernel resets the connection and the client may
 * lose the answer. Call it before the answer's head is written, and before a later request on the
 * connection can be read: from then on, every one is refused by lastAnswerDecided.
 */
export function closeAfterAnswer(socket: Socket, res: ServerResponse): void {
  markLastAnswerDecided(socket);
  socket.destroySoon = () => lingeringClose(socket);
  res.setHeader("connection", "close");
}

function markLastAnswerDecided(socket: Socket): void {
  if (!lastAnswerDecided(socket)) Object.defineProperty(socket, LAST_ANSWER_DECIDED, { value: true });
}

/**
 * Tells a client that may still be sending that its answer is complete: RST_STREAM with
 * NO_ERROR (RFC 9113 §8.1), so it stops sending a body keygate will not read. Call it after the
 * answer's respond() (and end()); the reset goes one turn of the event loop later. Made in the
 * same turn, on Node 26 the reset reaches nghttp2 ahead of the answer's HEADERS, which are then
 * never sent: the client sees a reset without a status (grpc-js: INTERNAL, "Call ended without
 * gRPC status"). Node 24 held the reset back until the answer was written; setImmediate runs
 * after node:http2 has handed the answer over, on both.
 */
export function stopAfterAnswer(stream: ServerHttp2Stream): void {
  setImmediate(closeWithNoError, stream);
}

function closeWithNoError(stream: ServerHttp2Stream): void {
  if (!stream.destroyed && !stream.closed) stream.close(http2Constants.NGHTTP2_NO_ERROR);
}
