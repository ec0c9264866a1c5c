import { connect } from "node:net";
import type { Socket } from "node:net";
import { afterEach, describe, expect, it } from "vitest";
import type { StartedServer } from "../../src/server/grpc-authz.js";
import { HeldPipeline, startHttpAuthzOver } from "../harness/held-pipeline.js";

// SIGTERM "stops accepting work, lets in-flight calls finish". On the HTTP authorization port,
// closing the server closes only the keep-alive connections idle at that instant: a connection
// with a Check in flight (every busy nginx/Envoy upstream connection) must get its answer with
// "Connection: close", not go on being handed new Checks for the whole grace period and be cut
// with one in flight when it ends (after that Check may have been charged).

const running: StartedServer[] = [];
const sockets: Socket[] = [];
afterEach(async () => {
  for (const s of sockets.splice(0)) s.destroy();
  for (const server of running.splice(0)) await server.stop(0);
});

/** A raw keep-alive connection that collects what the server sends and notes when it ends. */
function open(port: number): Promise<{ socket: Socket; text: () => string; ended: Promise<void> }> {
  return new Promise((resolve) => {
    const socket = connect(port, "127.0.0.1");
    sockets.push(socket);
    let text = "";
    socket.setEncoding("latin1");
    socket.on("data", (chunk: string) => (text += chunk));
    const ended = new Promise<void>((done) => socket.once("close", () => done()));
    socket.on("error", () => undefined);
    socket.once("connect", () => resolve({ socket, text: () => text, ended }));
  });
}

async function until(condition: () => boolean): Promise<void> {
  while (!condition()) await new Promise((resolve) => setTimeout(resolve, 5));
}

const CHECK = "GET /check/v1/things HTTP/1.1\r\nHost: keygate\r\n\r\n";

describe("HTTP authorization port: a busy keep-alive connection during the drain", () => {
  it("the answer to the Check in flight when the drain began closes its connection; no later Check is taken on it", async () => {
    const pipeline = new HeldPipeline();
    const server = await startHttpAuthzOver(pipeline);
    running.push(server);

    const conn = await open(server.port);
    conn.socket.write(CHECK);
    await pipeline.reached(1);

    // The drain begins (SIGTERM) while that Check is being decided; the grace is long.
    let stopped = false;
    void server.stop(20_000).then(() => (stopped = true));

    pipeline.release();
    await until(() => conn.text().includes("\r\n\r\n") && conn.text().includes("}"));
    const head = conn.text().slice(0, conn.text().indexOf("\r\n\r\n")).toLowerCase();
    expect(head).toContain("connection: close");

    // A proxy that sends its next Check on the connection anyway finds it closed: the draining
    // listener decides nothing more, and with nothing in flight it has drained (the stop ends now,
    // not at the end of its 20 s grace).
    conn.socket.write(CHECK);
    await conn.ended;
    await until(() => stopped);
    expect(pipeline.decided).toBe(1);
  }, 30_000);
});
