import { Agent, createServer, request } from "node:http";
import type { IncomingHttpHeaders, Server } from "node:http";
import { connect } from "node:net";

/** An HTTP answer as the client received it. */
export interface RawAnswer {
  status: number;
  headers: IncomingHttpHeaders;
  body: string;
}

/**
 * Sends one request with its request-target exactly as given: fetch (WHATWG URL) would resolve
 * "..", turn "\" into "/" and drop "#...", which is what the path tests must not have done for
 * them. Node's client refuses only targets with control characters or spaces.
 */
export function rawRequest(port: number, method: string, target: string, headers: Record<string, string>, agent?: Agent): Promise<RawAnswer> {
  return new Promise((resolve, reject) => {
    const req = request({ host: "127.0.0.1", port, method, path: target, headers, agent: agent ?? false }, (res) => {
      const chunks: Buffer[] = [];
      res.on("data", (chunk: Buffer) => chunks.push(chunk));
      res.on("end", () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks).toString("utf8") }));
      res.on("error", reject);
    });
    req.on("error", reject);
    req.end();
  });
}

/**
 * One request written as given on a raw socket, request line and header lines in order (repeats
 * included), for what node:http's client will not send; resolves with all the server sent once
 * it closes the connection, and the status from its first line (0 when there is none).
 */
export function sendRaw(port: number, requestLine: string, headers: ReadonlyArray<readonly [string, string]>): Promise<{ status: number; text: string }> {
  return new Promise((resolve, reject) => {
    const lines = [requestLine, ...headers.map(([name, value]) => `${name}: ${value}`)];
    // Written, not ended: a client that half-closes has gone, and Caddy answers it nothing.
    const socket = connect(port, "127.0.0.1", () => socket.write(`${lines.join("\r\n")}\r\n\r\n`));
    let text = "";
    socket.setEncoding("utf8");
    socket.on("data", (chunk: string) => (text += chunk));
    socket.on("close", () => resolve({ status: Number(/^HTTP\/1\.1 (\d{3}) /.exec(text)?.[1] ?? 0), text }));
    socket.on("error", reject);
  });
}

/** A sample upstream that counts what reaches it: a refused request must never arrive. */
export interface CountingUpstream {
  port: number;
  /** Request targets received, in order. */
  readonly received: string[];
  stop(): Promise<void>;
}

/** Starts an upstream that answers 200 "served" to anything and records the request target. */
export async function startCountingUpstream(): Promise<CountingUpstream> {
  const received: string[] = [];
  const server: Server = createServer((req, res) => {
    received.push(req.url ?? "");
    res.writeHead(200, { "content-type": "text/plain" });
    res.end("served");
  });
  await new Promise<void>((done) => server.listen(0, "127.0.0.1", done));
  const address = server.address();
  const port = typeof address === "object" && address !== null ? address.port : 0;
  return {
    port,
    received,
    stop: () =>
      new Promise<void>((done) => {
        server.closeAllConnections();
        server.close(() => done());
      }),
  };
}
