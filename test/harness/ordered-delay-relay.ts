import { connect, createServer } from "node:net";
import type { Server, Socket } from "node:net";

/**
 * A TCP relay on 127.0.0.1 in front of a local server that answers slowly but still answers:
 * each answer chunk (server to client) waits `delayMs()`, read when it arrives, and never leaves
 * before the chunk ahead of it on its connection, so a delay changed mid-connection slows or
 * speeds the answers without reordering a connection's bytes (TcpRelay's answerDelayMs can: each
 * chunk waits on its own timer). Requests go through at once.
 */
export class OrderedDelayRelay {
  readonly #sockets = new Set<Socket>();
  #server: Server | null = null;
  port = 0;

  constructor(
    private readonly targetPort: number,
    private readonly delayMs: () => number,
  ) {}

  async listen(): Promise<void> {
    const server = createServer((client) => this.#relay(client));
    await new Promise<void>((done, fail) => {
      server.once("error", fail);
      server.listen(0, "127.0.0.1", () => done());
    });
    const address = server.address();
    if (address === null || typeof address === "string") throw new Error("the relay has no TCP address");
    this.port = address.port;
    this.#server = server;
  }

  /** Drops every connection and stops listening. */
  async close(): Promise<void> {
    for (const socket of this.#sockets) socket.destroy();
    this.#sockets.clear();
    const server = this.#server;
    this.#server = null;
    if (server !== null) await new Promise<void>((done) => server.close(() => done()));
  }

  #relay(client: Socket): void {
    const upstream = connect(this.targetPort, "127.0.0.1");
    this.#sockets.add(client);
    this.#sockets.add(upstream);
    const end = (): void => {
      client.destroy();
      upstream.destroy();
      this.#sockets.delete(client);
      this.#sockets.delete(upstream);
    };
    client.on("close", end).on("error", end);
    upstream.on("close", end).on("error", end);
    client.on("data", (chunk: Buffer) => {
      if (!upstream.destroyed) upstream.write(chunk);
    });
    // This connection's answers, each with the time it may leave (never before the one ahead).
    const queue: Array<{ atMs: number; chunk: Buffer }> = [];
    let timer: NodeJS.Timeout | undefined;
    const pump = (): void => {
      timer = undefined;
      const nowMs = performance.now();
      for (let next = queue[0]; next !== undefined && next.atMs <= nowMs; next = queue[0]) {
        queue.shift();
        if (!client.destroyed) client.write(next.chunk);
      }
      const next = queue[0];
      if (next !== undefined) timer = setTimeout(pump, Math.max(0, next.atMs - nowMs));
    };
    upstream.on("data", (chunk: Buffer) => {
      const last = queue[queue.length - 1];
      queue.push({ atMs: Math.max(last?.atMs ?? 0, performance.now() + this.delayMs()), chunk });
      if (timer === undefined) pump();
    });
  }
}

/** Starts an OrderedDelayRelay to 127.0.0.1:targetPort, listening on a free port. */
export async function startOrderedDelayRelay(targetPort: number, delayMs: () => number): Promise<OrderedDelayRelay> {
  const relay = new OrderedDelayRelay(targetPort, delayMs);
  await relay.listen();
  return relay;
}
