import type { Socket } from "node:net";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import type { StartedServer } from "../../src/server/grpc-authz.js";
import { HeldPipeline, startHttpAuthzOver } from "../harness/held-pipeline.js";
import { startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { closedByServer, openSocket } from "../harness/sockets.js";

// A request node:http cannot read gets keygate's INVALID_PATH refusal, counted as a denied Check
// with an access line (refuseUnreadable, the server's clientError handler). node:http raises the
// same clientError for a parse error in the BODY of a request it already handed to keygate, which
// keygate decided, answered, counted and logged: such a request was counted twice, logged twice
// and answered twice (401 then 400, or 200 then 400). A request pipelined behind one still being
// decided had its 400 written first, as the answer to the earlier request, whose own was lost;
// a request answered while its body still came got a 408 after its answer at the request timeout.

/** Far longer than an answer and the lingering close (2 s) need. */
const DEADLINE_MS = 8_000;

/** The HTTP/1.1 status lines in what a connection received. */
function statusLines(received: Buffer): string[] {
  return received.toString("latin1").match(/^HTTP\/1\.1 \d{3} [^\r]*/gm) ?? [];
}

/** Writes `text` on one connection; what came back before the server closed it. */
async function exchange(port: number, text: string): Promise<Buffer> {
  const socket = await openSocket(port);
  const closed = closedByServer(socket, DEADLINE_MS);
  socket.write(text);
  return (await closed).received;
}

describe("HTTP authorization port security: a chunked body node:http cannot parse", () => {
  let kg: TestKeygate;
  let secret = "";
  beforeAll(async () => {
    kg = await startKeygate({ env: { KEYGATE_ACCESS_LOG_SAMPLE: "1" } });
    secret = (await kg.admin.createKey({ ownerId: "body_owner", name: "b" })).secret;
  });
  afterAll(async () => {
    await kg?.stop();
  });

  /** HTTP-mode Checks counted so far, whatever their decision. */
  async function checksTotal(): Promise<number> {
    const text = await (await fetch(`http://127.0.0.1:${kg.ports.admin}/metrics`)).text();
    return text
      .split("\n")
      .filter((line) => line.startsWith("keygate_checks_total{") && line.includes('mode="http"'))
      .reduce((sum, line) => sum + Number(line.split(" ")[1]), 0);
  }

  it.each([
    ["without a key", (): string => "", "HTTP/1.1 401 Unauthorized"],
    ["with a valid key", (): string => `X-Api-Key: ${secret}\r\n`, "HTTP/1.1 200 OK"],
  ] as const)("%s: one answer, counted once, one access line, and the connection closed", async (_case, headers, status) => {
    const before = await checksTotal();
    const logsBefore = kg.logLines.length;
    // The head is read and handed to keygate, which decides it; "zz" is not a chunk size.
    const received = await exchange(kg.ports.http, `POST /check/v1/things HTTP/1.1\r\nHost: keygate\r\n${headers()}Transfer-Encoding: chunked\r\n\r\nzz\r\n`);
    // The answer is recorded (counted and logged) as it is written: by the close, both are done.
    const access = kg.logLines.slice(logsBefore).filter((line) => line.includes('"msg":"access"'));
    expect({ answers: statusLines(received), counted: (await checksTotal()) - before, access: access.length }).toEqual({ answers: [status], counted: 1, access: 1 });
  });
});

describe("HTTP authorization port security: a small body still arriving when its request times out", () => {
  let kg: TestKeygate;
  beforeAll(async () => {
    kg = await startKeygate({ env: { KEYGATE_HEADERS_TIMEOUT_SECONDS: "0.3", KEYGATE_REQUEST_TIMEOUT_SECONDS: "1", KEYGATE_IDLE_TIMEOUT_SECONDS: "0.5" } });
  });
  afterAll(async () => {
    await kg?.stop();
  });

  it("the request, answered at once, gets no 408 after its answer: the connection is closed", async () => {
    const socket = await openSocket(kg.ports.http);
    const closed = closedByServer(socket, DEADLINE_MS);
    // A body of 100 bytes (read through, under 64 KiB) sent a byte every 100 ms: never idle for
    // the socket timeout, still incomplete when the 1 s request timeout comes.
    socket.write("POST /check/v1/things HTTP/1.1\r\nHost: keygate\r\nContent-Length: 100\r\n\r\n");
    const trickle = setInterval(() => socket.write("x"), 100);
    try {
      expect(statusLines((await closed).received)).toEqual(["HTTP/1.1 401 Unauthorized"]);
    } finally {
      clearInterval(trickle);
      socket.destroy();
    }
  });
});

describe("HTTP authorization port security: a request node:http cannot read, pipelined behind a Check still being decided", () => {
  const running: StartedServer[] = [];
  const sockets: Socket[] = [];
  afterEach(async () => {
    for (const socket of sockets.splice(0)) socket.destroy();
    for (const server of running.splice(0)) await server.stop(0);
  });

  it("is refused after that Check's answer, in order, on a keep-alive connection", async () => {
    const pipeline = new HeldPipeline();
    const server = await startHttpAuthzOver(pipeline);
    running.push(server);

    const socket = await openSocket(server.port);
    sockets.push(socket);
    const closed = closedByServer(socket, DEADLINE_MS);
    // FOO is not a method node:http knows: the parser refuses the second request's head.
    socket.write("GET /check/v1/things HTTP/1.1\r\nHost: keygate\r\n\r\nFOO /check/v1/things HTTP/1.1\r\nHost: keygate\r\n\r\n");
    await pipeline.reached(1);
    // One small write arrives in one read, which the parser goes through before the next turn of
    // the event loop: by then it has refused the second head, with the first Check undecided.
    await new Promise((resolve) => setImmediate(resolve));
    pipeline.release();

    expect(statusLines((await closed).received)).toEqual(["HTTP/1.1 401 Unauthorized", "HTTP/1.1 400 Bad Request"]);
    expect(pipeline.decided).toBe(1);
  });
});
