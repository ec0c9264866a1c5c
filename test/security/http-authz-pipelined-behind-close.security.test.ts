import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import type { Socket } from "node:net";
import type { StartedServer } from "../../src/server/grpc-authz.js";
import { HeldPipeline, startHttpAuthzOver } from "../harness/held-pipeline.js";
import { httpCheck, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { closedByServer, openSocket } from "../harness/sockets.js";

// An answer that leaves a body unread (chunked, or over 64 KiB) closes its connection: "Connection:
// close", then a lingering close. Node's parser still reads what arrives behind the body, and
// handed every pipelined request to the handler, which decided it (rate limit, quota and credits
// charged) while its answer could never be sent: three Checks counted, one answered. A request
// read behind a connection's last answer now runs nothing, and the connection reads no more.

/** Far longer than an answer and the lingering close (2 s) need. */
const DEADLINE_MS = 8_000;
const PIPELINED = 3;

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

describe("HTTP authorization port security: a Check pipelined behind a closing answer is not decided", () => {
  let kg: TestKeygate;
  let secret = "";
  beforeAll(async () => {
    kg = await startKeygate({ env: { KEYGATE_REQUEST_TIMEOUT_SECONDS: "120", KEYGATE_IDLE_TIMEOUT_SECONDS: "300" } });
    await kg.admin.upsertAccount({ ownerId: "pipelined", plan: "basic" });
    secret = (await kg.admin.createKey({ ownerId: "pipelined", name: "k" })).secret;
  });
  afterAll(async () => {
    await kg.stop();
  });

  /** The rate-limit units left, as an allowed Check reports them (it uses one itself). */
  async function remaining(): Promise<number> {
    const answer = await httpCheck(kg.ports.http, "/check/v1/things", { "x-api-key": secret });
    expect(answer.status).toBe(200);
    return Number(answer.headers.get("x-ratelimit-remaining"));
  }

  /** The Checks `text` sends counted against the key's rate limit, and the answers it received. */
  async function countedAndAnswered(text: string): Promise<{ counted: number; answered: string[] }> {
    const before = await remaining();
    const answered = statusLines(await exchange(kg.ports.http, text));
    return { counted: before - 1 - (await remaining()), answered };
  }

  const check = (headers: string): string => `GET /check/v1/things HTTP/1.1\r\nHost: keygate\r\nX-Api-Key: ${secret}\r\n${headers}\r\n`;

  it("a Check with an empty chunked body, three Checks pipelined behind it: one answered, one counted", async () => {
    const text = `${check("Transfer-Encoding: chunked\r\n")}0\r\n\r\n${check("").repeat(PIPELINED)}`;
    expect(await countedAndAnswered(text)).toEqual({ counted: 1, answered: ["HTTP/1.1 200 OK"] });
  });

  it("a Check with a 70,000-byte body, three Checks pipelined behind it: one answered, one counted", async () => {
    const body = "x".repeat(70_000);
    const text = `${check(`Content-Length: ${body.length}\r\n`)}${body}${check("").repeat(PIPELINED)}`;
    expect(await countedAndAnswered(text)).toEqual({ counted: 1, answered: ["HTTP/1.1 200 OK"] });
  });

  it("happy: three Checks pipelined on a keep-alive connection, the last asking to close: three answered, three counted", async () => {
    const text = check("").repeat(PIPELINED - 1) + check("Connection: close\r\n");
    expect(await countedAndAnswered(text)).toEqual({ counted: 3, answered: ["HTTP/1.1 200 OK", "HTTP/1.1 200 OK", "HTTP/1.1 200 OK"] });
  });
});

describe("HTTP authorization port security: Checks read behind a closing answer still being decided", () => {
  const running: StartedServer[] = [];
  const sockets: Socket[] = [];
  afterEach(async () => {
    for (const socket of sockets.splice(0)) socket.destroy();
    for (const server of running.splice(0)) await server.stop(0);
  });

  it("the first Check's decision is held while three pipelined in the same packet are read: they are not decided, and its answer still arrives", async () => {
    const pipeline = new HeldPipeline();
    const server = await startHttpAuthzOver(pipeline);
    running.push(server);

    const socket = await openSocket(server.port);
    sockets.push(socket);
    const closed = closedByServer(socket, DEADLINE_MS);
    const check = "GET /check/v1/things HTTP/1.1\r\nHost: keygate\r\n";
    socket.write(`${check}Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n${`${check}\r\n`.repeat(PIPELINED)}`);
    await pipeline.reached(1);
    // One small write arrives in one read, which the parser goes through before the next turn of
    // the event loop: by then the pipelined Checks have reached the handler, with the first undecided.
    await new Promise((resolve) => setImmediate(resolve));
    pipeline.release();

    // Closing the connection at once would reset it with input unread, and the held answer,
    // not yet written, would be lost: it is answered, and only then is the connection closed.
    expect(statusLines((await closed).received)).toEqual(["HTTP/1.1 401 Unauthorized"]);
    expect(pipeline.decided).toBe(1);
  });
});
