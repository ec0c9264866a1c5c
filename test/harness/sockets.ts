import type { EventEmitter } from "node:events";
import { readFileSync, writeFileSync } from "node:fs";
import { connect } from "node:net";
import type { Socket } from "node:net";

/** Opens a TCP connection to 127.0.0.1:port, optionally from a chosen loopback address. */
export function openSocket(port: number, localAddress?: string): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const socket = connect({ host: "127.0.0.1", port, ...(localAddress === undefined ? {} : { localAddress }) });
    socket.once("connect", () => {
      socket.off("error", reject);
      resolve(socket);
    });
    socket.once("error", reject);
  });
}

/** What a connection received until the server closed it, and when that was. */
export interface ClosedConnection {
  received: Buffer;
  /** Milliseconds from the watch starting to the close. */
  afterMs: number;
}

/**
 * Resolves when the server closes `socket` (FIN or reset), with every byte received; rejects
 * when it is still open after `deadlineMs`. The client never closes it itself.
 */
export function closedByServer(socket: Socket, deadlineMs: number): Promise<ClosedConnection> {
  const startedAt = Date.now();
  const chunks: Buffer[] = [];
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error(`the server left the connection open for ${deadlineMs} ms; it sent ${JSON.stringify(Buffer.concat(chunks).toString("latin1").slice(0, 80))}`));
    }, deadlineMs);
    const done = (): void => {
      clearTimeout(timer);
      resolve({ received: Buffer.concat(chunks), afterMs: Date.now() - startedAt });
    };
    socket.on("data", (chunk: Buffer) => chunks.push(chunk));
    // A reset shows as an error; either way the server ended the connection.
    socket.on("error", () => undefined);
    socket.once("end", done);
    socket.once("close", done);
  });
}

/** The HTTP/2 client connection preface (RFC 9113 §3.4). */
export const H2_PREFACE = Buffer.from("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "latin1");

/** One HTTP/2 frame: 9-byte header and payload. */
export function h2Frame(type: number, flags: number, streamId: number, payload: Buffer = Buffer.alloc(0)): Buffer {
  const header = Buffer.alloc(9);
  header.writeUIntBE(payload.length, 0, 3);
  header.writeUInt8(type, 3);
  header.writeUInt8(flags, 4);
  header.writeUInt32BE(streamId, 5);
  return Buffer.concat([header, payload]);
}

/** An empty client SETTINGS frame: the preface plus this is a complete HTTP/2 opening. */
export const H2_SETTINGS = h2Frame(0x4, 0, 0);

/**
 * An HPACK header block of literal fields without indexing and without Huffman coding
 * (RFC 7541 §6.2.2), enough for a hand-made request. Names and values stay under 127 bytes.
 */
export function hpackLiterals(fields: ReadonlyArray<readonly [string, string]>): Buffer {
  const parts: Buffer[] = [];
  for (const [name, value] of fields) {
    if (name.length > 126 || value.length > 126) throw new Error("hpackLiterals encodes short strings only");
    parts.push(Buffer.from([0x00, name.length]), Buffer.from(name, "latin1"), Buffer.from([value.length]), Buffer.from(value, "latin1"));
  }
  return Buffer.concat(parts);
}

/** A HEADERS frame opening stream 1 with `fields`, END_HEADERS set and END_STREAM not: the body is still to come. */
export function h2OpenStream(fields: ReadonlyArray<readonly [string, string]>): Buffer {
  return h2Frame(0x1, 0x4, 1, hpackLiterals(fields));
}

/** Resident and peak resident memory of a process, in bytes (Linux /proc). */
export function processMemory(pid: number): { rssBytes: number; peakBytes: number } {
  const status = readFileSync(`/proc/${pid}/status`, "utf8");
  const kib = (field: string): number => {
    const match = new RegExp(`^${field}:\\s+(\\d+) kB`, "m").exec(status);
    if (match?.[1] === undefined) throw new Error(`/proc/${pid}/status has no ${field}`);
    return Number(match[1]) * 1024;
  };
  return { rssBytes: kib("VmRSS"), peakBytes: kib("VmHWM") };
}

/** Sets a process's peak resident memory back to its current resident memory (Linux clear_refs). */
export function resetPeakMemory(pid: number): void {
  writeFileSync(`/proc/${pid}/clear_refs`, "5");
}

/**
 * How much the peak resident memory of `pid` rose above its resident memory at the start
 * while `work` ran. The peak is kept by the kernel, so a spike between samples is not missed.
 */
export async function peakGrowthDuring(pid: number, work: () => Promise<void>): Promise<number> {
  resetPeakMemory(pid);
  const before = processMemory(pid).rssBytes;
  await work();
  return processMemory(pid).peakBytes - before;
}

/** Resolves on the first of `events` from `emitter`, and leaves no listener behind. */
export function firstEvent(emitter: EventEmitter, events: readonly string[]): Promise<void> {
  return new Promise((resolve) => {
    const done = (): void => {
      for (const event of events) emitter.off(event, done);
      resolve();
    };
    for (const event of events) emitter.on(event, done);
  });
}
