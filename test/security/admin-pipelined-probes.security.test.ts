import { mkdtempSync, rmSync } from "node:fs";
import { request } from "node:http";
import type { Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ADMIN_TOKEN } from "../harness/keygate.js";
import { untilValue } from "../harness/poll.js";
import { spawnKeygate } from "../harness/process.js";
import type { KeygateProcess } from "../harness/process.js";
import { closedByServer, openSocket, processMemory, resetPeakMemory } from "../harness/sockets.js";

// The admin port's probes need no token. A client that pipelined GET /metrics on an HTTP/1.1
// connection and read nothing had every request of a read chunk (~64 KiB, ~1,700 requests of 34
// bytes) rendered and its ~10 KiB answer held: Node pauses a pipelining socket only when a request
// is parsed while answers are already queued for writing, and /metrics answers later (it waits for
// keygate_ready), so the whole chunk was handed over first. Each connection cost ~95 MiB of RSS
// for 60 KB sent, and seconds of the event loop that serves Checks; KEYGATE_MAX_CONNECTIONS did
// not bound it. Now scrapes share a render (Metrics.render) and a connection may have at most
// MAX_PIPELINED_ANSWERS (8) answers waiting: the 8th closes it, and nothing behind it is read.

const MiB = 1024 * 1024;
const CONNECTIONS = 4;
/** Peak RSS growth allowed for a whole flood: generous (either flood now grows ~25 MiB; /metrics grew ~560 MiB). */
const MEMORY_BOUND = 128 * MiB;
/** The answers one admin connection may have waiting (MAX_PIPELINED_ANSWERS in src/server/admin.ts). */
const MAX_PIPELINED_ANSWERS = 8;
/** Far longer than the answers and the lingering close (2 s) need. */
const DEADLINE_MS = 8_000;

let kp: KeygateProcess;
let dataDir: string;
let pid: number;
beforeAll(async () => {
  dataDir = mkdtempSync(join(tmpdir(), "keygate-admin-pipelined-"));
  kp = await spawnKeygate({
    cwd: dataDir,
    env: { KEYGATE_DATA_DIR: dataDir, KEYGATE_ADMIN_TOKENS: ADMIN_TOKEN, KEYGATE_HOST: "127.0.0.1", KEYGATE_GRPC_PORT: "0", KEYGATE_HTTP_AUTHZ_PORT: "0", KEYGATE_ADMIN_PORT: "0" },
  });
  if (kp.child.pid === undefined) throw new Error("keygate has no pid");
  pid = kp.child.pid;
}, 60_000);
afterAll(async () => {
  await kp.stop("SIGKILL").catch(() => null);
  rmSync(dataDir, { recursive: true, force: true });
});

function get(path: string): string {
  return `GET ${path} HTTP/1.1\r\nHost: k\r\n\r\n`;
}

interface Answer {
  head: string;
  body: string;
}

/** The body starting at `at`, and where it ends, or null while it is incomplete (Content-Length or chunked, as Node answers). */
function bodyAt(text: string, head: string, at: number): { body: string; end: number } | null {
  const length = /^content-length: (\d+)$/im.exec(head)?.[1];
  if (length !== undefined) return text.length < at + Number(length) ? null : { body: text.slice(at, at + Number(length)), end: at + Number(length) };
  if (!/^transfer-encoding: chunked$/im.test(head)) throw new Error(`an answer of no known length: ${JSON.stringify(head)}`);
  let body = "";
  for (;;) {
    const sizeEnd = text.indexOf("\r\n", at);
    if (sizeEnd < 0) return null;
    const size = Number.parseInt(text.slice(at, sizeEnd), 16);
    const dataEnd = sizeEnd + 2 + size;
    if (text.length < dataEnd + 2) return null;
    body += text.slice(sizeEnd + 2, dataEnd);
    at = dataEnd + 2;
    if (size === 0) return { body, end: at };
  }
}

/** The complete answers in `bytes`, in order. */
function answersIn(bytes: Buffer): Answer[] {
  const text = bytes.toString("latin1");
  const answers: Answer[] = [];
  let at = 0;
  for (;;) {
    const headEnd = text.indexOf("\r\n\r\n", at);
    if (headEnd < 0) return answers;
    const head = text.slice(at, headEnd);
    const body = bodyAt(text, head, headEnd + 4);
    if (body === null) return answers;
    answers.push({ head, body: body.body });
    at = body.end;
  }
}

/** Resolves once `count` complete answers have arrived on `socket`. */
function readAnswers(socket: Socket, count: number): Promise<Answer[]> {
  const chunks: Buffer[] = [];
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`fewer than ${count} answers within ${DEADLINE_MS} ms`)), DEADLINE_MS);
    const onData = (chunk: Buffer): void => {
      chunks.push(chunk);
      const answers = answersIn(Buffer.concat(chunks));
      if (answers.length < count) return;
      clearTimeout(timer);
      socket.off("data", onData);
      resolve(answers);
    };
    socket.on("data", onData);
  });
}

/** keygate_connections{listener="admin"}, read on a connection of its own (counted, and closed after). */
function adminConnections(): Promise<number> {
  return new Promise((resolve, reject) => {
    const req = request({ host: "127.0.0.1", port: kp.ports.admin, path: "/metrics", agent: false }, (res) => {
      let text = "";
      res.setEncoding("utf8");
      res.on("data", (chunk: string) => (text += chunk));
      res.on("end", () => resolve(Number(/^keygate_connections\{listener="admin"\} (\d+)$/m.exec(text)?.[1] ?? Number.NaN)));
    });
    req.on("error", reject);
    req.end();
  });
}

/**
 * Opens CONNECTIONS connections, pipelines ~60 KB of `request` on each and reads nothing; resolves
 * with keygate's peak RSS growth once keygate has closed them all (or its peak has passed the
 * bound), and whether keygate still answers a fresh /healthz.
 */
async function pipelinedFlood(text: string): Promise<{ growth: number; healthz: number }> {
  const open = await adminConnections();
  resetPeakMemory(pid);
  const before = processMemory(pid).rssBytes;
  const sockets: Socket[] = [];
  try {
    for (let i = 0; i < CONNECTIONS; i++) {
      const socket = await openSocket(kp.ports.admin);
      socket.pause();
      socket.on("error", () => undefined);
      socket.write(text.repeat(Math.floor(60_000 / text.length)));
      sockets.push(socket);
    }
    // The kernel keeps the peak, so growth between two polls is not missed.
    const { value } = await untilValue(
      async () => ({ growth: processMemory(pid).peakBytes - before, open: await adminConnections() }),
      (v) => v.growth > MEMORY_BOUND || v.open <= open,
      30_000,
      "keygate closes the flood's connections",
      { intervalMs: 250, detail: (v) => `; last seen ${JSON.stringify(v)}` },
    );
    const healthz = (await fetch(`http://127.0.0.1:${kp.ports.admin}/healthz`)).status;
    return { growth: value.growth, healthz };
  } finally {
    for (const socket of sockets) socket.destroy();
  }
}

describe("admin port security: pipelined unauthenticated probes that are never read cost bounded memory", () => {
  it("pipelined GET /healthz stays within the bound", async () => {
    const { growth, healthz } = await pipelinedFlood(get("/healthz"));
    expect(healthz).toBe(200);
    expect(growth, `peak RSS growth ${Math.round(growth / MiB)} MiB from ${CONNECTIONS} x 60 KB sent`).toBeLessThan(MEMORY_BOUND);
  }, 60_000);

  it("pipelined GET /metrics stays within the same bound", async () => {
    const { growth, healthz } = await pipelinedFlood(get("/metrics"));
    expect(healthz).toBe(200);
    expect(growth, `peak RSS growth ${Math.round(growth / MiB)} MiB from ${CONNECTIONS} x 60 KB sent`).toBeLessThan(MEMORY_BOUND);
  }, 60_000);
});

describe("admin port security: a connection may have at most 8 answers waiting", () => {
  it.each(["/metrics", "/healthz", "/readyz"])("20 pipelined GET %s in one write: the first 8 answered, the 8th with Connection: close, then the connection closed", async (path) => {
    const socket = await openSocket(kp.ports.admin);
    const closed = closedByServer(socket, DEADLINE_MS);
    // One write of 680 bytes, read by keygate as one chunk: all 20 are parsed before an answer is written.
    socket.write(get(path).repeat(20));
    const answers = answersIn((await closed).received);
    expect(answers.map((a) => a.head.split("\r\n")[0])).toEqual(Array.from({ length: MAX_PIPELINED_ANSWERS }, () => "HTTP/1.1 200 OK"));
    expect(answers.map((a) => /^connection: close$/im.test(a.head))).toEqual([...Array.from({ length: MAX_PIPELINED_ANSWERS - 1 }, () => false), true]);
    // Nothing broke: a new connection is served.
    expect((await fetch(`http://127.0.0.1:${kp.ports.admin}${path}`)).status).toBe(200);
  });

  it("happy: 7 pipelined GET /metrics in one write are all answered, and the connection serves on", async () => {
    const socket = await openSocket(kp.ports.admin);
    try {
      socket.write(get("/metrics").repeat(MAX_PIPELINED_ANSWERS - 1));
      const answers = await readAnswers(socket, MAX_PIPELINED_ANSWERS - 1);
      expect(answers.map((a) => a.head.split("\r\n")[0])).toEqual(Array.from({ length: MAX_PIPELINED_ANSWERS - 1 }, () => "HTTP/1.1 200 OK"));
      expect(answers.every((a) => a.body.includes("\nkeygate_ready 1\n") && !/^connection: close$/im.test(a.head))).toBe(true);
      socket.write(get("/healthz"));
      const [next] = await readAnswers(socket, 1);
      expect(next).toEqual({ head: expect.stringMatching(/^HTTP\/1\.1 200 OK\r\n/), body: "ok\n" });
    } finally {
      socket.destroy();
    }
  });
});
