import { connect as h2Connect, constants as h2 } from "node:http2";
import { connect as netConnect } from "node:net";
import type { Socket } from "node:net";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { closedByServer, openSocket } from "../harness/sockets.js";

// /healthz, /readyz and /metrics need no token, and the HTTP authorization port none at all. Over
// HTTP/1.1 a request announcing a body was answered at once, but the connection was kept alive
// and Node read the whole body through, then the next request's: a caller with no token made
// keygate read bodies of any size for as long as it liked (958 MiB in 1.5 s on the thread that
// serves Checks). An answer given with the body unread now ends the connection: "Connection:
// close", a half-close, and for 2 s at most the rest of the body is read and thrown away. A
// request pipelined behind it is not run (*-pipelined-behind-close.security.test.ts).

/** Far longer than any answer, or the 2 s of a lingering close, needs; far shorter than the request timeout below. */
const DEADLINE_MS = 8_000;
/** A request timeout well past the deadline: only keygate's own choice to stop can close a connection in time. */
const ENV = { KEYGATE_REQUEST_TIMEOUT_SECONDS: "120", KEYGATE_IDLE_TIMEOUT_SECONDS: "300" };
const HUGE = 100 * 1024 * 1024;

let kg: TestKeygate;
beforeAll(async () => {
  kg = await startKeygate({ env: ENV });
});
afterAll(async () => {
  await kg.stop();
});

/** An HTTP/1.1 answer's status line, headers (lower-case names) and body, as received. */
function parse(text: string): { statusLine: string; headers: Map<string, string>; body: string } {
  const end = text.indexOf("\r\n\r\n");
  const [statusLine = "", ...lines] = text.slice(0, end === -1 ? text.length : end).split("\r\n");
  const headers = new Map(lines.map((line) => [line.slice(0, line.indexOf(":")).toLowerCase(), line.slice(line.indexOf(":") + 1).trim()]));
  return { statusLine, headers, body: end === -1 ? "" : text.slice(end + 4) };
}

/** Sends `head` on a fresh connection, no body, and waits for the server to close it. */
async function headThenClose(port: number, head: string): Promise<ReturnType<typeof parse>> {
  const socket = await openSocket(port);
  const closed = closedByServer(socket, DEADLINE_MS);
  socket.write(head);
  return parse((await closed).received.toString("latin1"));
}

/**
 * Sends `head`, then body bytes every 10 ms on a connection that stays half-open (it goes on
 * sending after the server's FIN, as a hostile client would), until the server cuts it off.
 * Rejects if the connection is still open after DEADLINE_MS. What was received.
 */
function sendUntilCut(port: number, head: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const socket: Socket = netConnect({ host: "127.0.0.1", port, allowHalfOpen: true });
    const chunks: Buffer[] = [];
    const chunk = Buffer.alloc(64 * 1024, "a");
    let pump: NodeJS.Timeout | undefined;
    const deadline = setTimeout(() => {
      clearInterval(pump);
      socket.destroy();
      reject(new Error(`the server left the connection open for ${DEADLINE_MS} ms`));
    }, DEADLINE_MS);
    socket.on("data", (data: Buffer) => chunks.push(data));
    socket.on("error", () => undefined);
    socket.once("connect", () => {
      socket.write(head);
      pump = setInterval(() => {
        if (socket.writable) socket.write(chunk);
      }, 10);
    });
    socket.once("close", () => {
      clearTimeout(deadline);
      clearInterval(pump);
      resolve(Buffer.concat(chunks).toString("latin1"));
    });
  });
}

const post = (path: string, headers: string): string => `POST ${path} HTTP/1.1\r\nHost: keygate\r\n${headers}\r\n`;

describe("admin port security: a probe's body is not read", () => {
  // Bodies as sent: chunked (Node's choice for an answer without a length).
  const probes: Array<[string, string]> = [
    ["/healthz", "3\r\nok\n\r\n0\r\n\r\n"],
    ["/readyz", "6\r\nready\n\r\n0\r\n\r\n"],
    ["/metrics", ""],
  ];

  it.each(probes)("POST %s announcing 100 MiB, none sent: 200 with Connection: close, then closed", async (path, body) => {
    const answer = await headThenClose(kg.ports.admin, post(path, `Content-Length: ${HUGE}\r\n`));
    expect(answer.statusLine).toBe("HTTP/1.1 200 OK");
    expect(answer.headers.get("connection")).toBe("close");
    if (body !== "") expect(answer.body).toBe(body);
  });

  it.each(probes)("POST %s, chunked, the body never ending: 200, then closed", async (path) => {
    const answer = await headThenClose(kg.ports.admin, post(path, "Transfer-Encoding: chunked\r\n") + "10\r\n0123456789abcdef\r\n");
    expect(answer.statusLine).toBe("HTTP/1.1 200 OK");
    expect(answer.headers.get("connection")).toBe("close");
  });

  it.each(probes)("POST %s with Expect: 100-continue: no 100 Continue, the answer, then closed", async (path) => {
    const answer = await headThenClose(kg.ports.admin, post(path, `Content-Length: ${HUGE}\r\nExpect: 100-continue\r\n`));
    expect(answer.statusLine).toBe("HTTP/1.1 200 OK");
    expect(answer.headers.get("connection")).toBe("close");
  });

  it("POST /healthz from a client that sends its body regardless, past the FIN: cut off", async () => {
    const text = await sendUntilCut(kg.ports.admin, post("/healthz", `Content-Length: ${10 * 1024 * 1024 * 1024}\r\n`));
    expect(parse(text).statusLine).toBe("HTTP/1.1 200 OK");
  });

  it("HTTP/2: POST /healthz whose body never ends: 200, then the stream is reset with NO_ERROR", async () => {
    const session = h2Connect(`http://127.0.0.1:${kg.ports.admin}`);
    session.on("error", () => undefined);
    try {
      const answer = await new Promise<{ status: number; rstCode: number }>((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`the HTTP/2 stream was still open after ${DEADLINE_MS} ms`)), DEADLINE_MS);
        const stream = session.request({ ":method": "POST", ":path": "/healthz", "content-type": "text/plain" }, { endStream: false });
        let status = 0;
        stream.on("response", (headers) => (status = Number(headers[":status"])));
        stream.on("data", () => undefined);
        stream.on("error", () => undefined);
        stream.once("close", () => {
          clearTimeout(timer);
          resolve({ status, rstCode: stream.rstCode });
        });
        stream.write(Buffer.alloc(1024, "a"));
      });
      expect(answer).toEqual({ status: 200, rstCode: h2.NGHTTP2_NO_ERROR });
    } finally {
      session.destroy();
    }
  });

  it("happy: GETs, and a POST with Content-Length: 0, share one keep-alive connection", async () => {
    const socket = await openSocket(kg.ports.admin);
    const closed = closedByServer(socket, DEADLINE_MS);
    socket.write(
      "GET /healthz HTTP/1.1\r\nHost: keygate\r\n\r\n" +
        "POST /healthz HTTP/1.1\r\nHost: keygate\r\nContent-Length: 0\r\n\r\n" +
        "GET /healthz HTTP/1.1\r\nHost: keygate\r\nConnection: close\r\n\r\n",
    );
    const text = (await closed).received.toString("latin1");
    expect(text.split("HTTP/1.1 200 OK").length - 1).toBe(3);
  });
});

describe("HTTP authorization port security: a body too large to drain is not read", () => {
  const paths: Array<[string, string]> = [
    ["/healthz", "HTTP/1.1 200 OK"],
    ["/readyz", "HTTP/1.1 200 OK"],
    // No key: the Check is decided, and denied, from the head alone.
    ["/check/v1/decks", "HTTP/1.1 401 Unauthorized"],
  ];

  it.each(paths)("POST %s announcing 100 MiB, none sent: answered with Connection: close, then closed", async (path, statusLine) => {
    const answer = await headThenClose(kg.ports.http, post(path, `Content-Length: ${HUGE}\r\n`));
    expect(answer.statusLine).toBe(statusLine);
    expect(answer.headers.get("connection")).toBe("close");
  });

  it.each(paths)("POST %s, chunked, the body never ending: answered, then closed", async (path, statusLine) => {
    const answer = await headThenClose(kg.ports.http, post(path, "Transfer-Encoding: chunked\r\n") + "10\r\n0123456789abcdef\r\n");
    expect(answer.statusLine).toBe(statusLine);
    expect(answer.headers.get("connection")).toBe("close");
  });

  it("POST /check/v1/decks announcing 100 MiB with Expect: 100-continue: no 100 Continue, the answer, then closed", async () => {
    const answer = await headThenClose(kg.ports.http, post("/check/v1/decks", `Content-Length: ${HUGE}\r\nExpect: 100-continue\r\n`));
    expect(answer.statusLine).toBe("HTTP/1.1 401 Unauthorized");
    expect(answer.headers.get("connection")).toBe("close");
  });

  it("POST /check/v1/decks from a client that sends its body regardless, past the FIN: cut off", async () => {
    const text = await sendUntilCut(kg.ports.http, post("/check/v1/decks", `Content-Length: ${10 * 1024 * 1024 * 1024}\r\n`));
    expect(parse(text).statusLine).toBe("HTTP/1.1 401 Unauthorized");
  });

  it("happy: Checks with no body and with a small one (64 KiB, drained) share one keep-alive connection", async () => {
    const socket = await openSocket(kg.ports.http);
    const closed = closedByServer(socket, DEADLINE_MS);
    const small = "a".repeat(64 * 1024);
    socket.write(
      "GET /check/v1/decks HTTP/1.1\r\nHost: keygate\r\n\r\n" +
        `POST /check/v1/decks HTTP/1.1\r\nHost: keygate\r\nContent-Length: ${small.length}\r\n\r\n${small}` +
        "GET /check/v1/decks HTTP/1.1\r\nHost: keygate\r\nConnection: close\r\n\r\n",
    );
    const text = (await closed).received.toString("latin1");
    expect(text.split("HTTP/1.1 401 Unauthorized").length - 1).toBe(3);
    expect(text.split(/\r\nconnection: close\r\n/i).length - 1).toBe(1);
  });
});
