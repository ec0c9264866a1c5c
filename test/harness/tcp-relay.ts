import { connect, createServer } from "node:net";
import type { Server, Socket } from "node:net";

/** How a relay treats the answers (upstream to client) it forwards. */
export interface TcpRelayOptions {
  /**
   * Milliseconds each answer chunk waits before it is forwarded, read per chunk; 0 forwards at
   * once. A chunk never leaves before the one ahead of it on its connection, so a delay changed
   * mid-connection slows or speeds the answers without reordering a connection's bytes.
   */
  answerDelayMs?: () => number;
}

/**
 * A TCP relay on 127.0.0.1 in front of a local server, for making a store misbehave at a chosen
 * point: delay its answers, freeze every connection (a paused or partitioned server: connections
 * stay open and nothing moves), hold one connection's requests from a matching chunk on (a stall
 * at a chosen command), drop connections and refuse new ones until `listen()` again, or send new
 * connections elsewhere (an endpoint that moved).
 */
export class TcpRelay {
  #targetPort: number;
  readonly #answerDelayMs: () => number;
  readonly #sockets = new Set<Socket>();
  /** Held writes, in the order they arrived; release() or thaw() runs them. */
  readonly #held: Array<() => void> = [];
  /** Client sockets whose requests are held since a chunk matched `holdWhen`. */
  readonly #holding = new Set<Socket>();
  #server: Server | null = null;
  #frozen = false;
  port = 0;
  /** When set, the first client chunk it matches (and all after it on that connection) is held until release(). */
  holdWhen: ((chunk: string) => boolean) | null = null;
  /** Chunks held so far, by freeze() or by `holdWhen`. */
  heldChunks = 0;
  /** When set, the first client chunk it matches is not forwarded, and the relay closes (as close()). */
  dropWhen: ((chunk: string) => boolean) | null = null;

  constructor(targetPort: number, options: TcpRelayOptions = {}) {
    this.#targetPort = targetPort;
    this.#answerDelayMs = options.answerDelayMs ?? (() => 0);
  }

  /** Listens on `port` (a free one the first time, the same one again after close()). */
  async listen(): Promise<void> {
    const server = createServer((client) => this.#relay(client));
    await new Promise<void>((done, fail) => {
      server.once("error", fail);
      server.listen(this.port, "127.0.0.1", () => done());
    });
    const address = server.address();
    if (address === null || typeof address === "string") throw new Error("the relay has no TCP address");
    this.port = address.port;
    this.#server = server;
  }

  /** Sends new connections to `targetPort` from now on (a DNS name moved); open ones stay where they are. */
  retarget(targetPort: number): void {
    this.#targetPort = targetPort;
  }

  /** Holds every byte in both directions from now on, until thaw(). */
  freeze(): void {
    this.#frozen = true;
  }

  /** Stops freezing and lets every held byte through, in order. */
  thaw(): void {
    this.#frozen = false;
    this.release();
  }

  /** Lets every held byte through, in order, and stops holding the connections `holdWhen` matched. */
  release(): void {
    this.#holding.clear();
    for (const write of this.#held.splice(0)) write();
  }

  /** Drops every open connection; the relay still accepts new ones. */
  dropAll(): void {
    for (const socket of this.#sockets) socket.destroy();
    this.#sockets.clear();
  }

  /** Drops every connection and stops listening; listen() opens the same port again. */
  async close(): Promise<void> {
    const server = this.#server;
    this.#server = null;
    this.dropAll();
    if (server !== null) await new Promise<void>((done) => server.close(() => done()));
  }

  #relay(client: Socket): void {
    const upstream = connect(this.#targetPort, "127.0.0.1");
    this.#sockets.add(client);
    this.#sockets.add(upstream);
    const end = (): void => {
      client.destroy();
      upstream.destroy();
      this.#sockets.delete(client);
      this.#sockets.delete(upstream);
      this.#holding.delete(client);
    };
    client.on("close", end).on("error", end);
    upstream.on("close", end).on("error", end);
    client.on("data", (chunk: Buffer) => this.#request(client, upstream, chunk));
    // When this connection's latest delayed answer leaves: a later one never leaves before it.
    const order = { lastLeavesAtMs: 0 };
    upstream.on("data", (chunk: Buffer) => this.#answer(client, chunk, order));
  }

  #request(client: Socket, upstream: Socket, chunk: Buffer): void {
    if (this.dropWhen?.(chunk.toString("latin1")) === true) {
      this.dropWhen = null;
      void this.close();
      return;
    }
    if (!this.#holding.has(client) && this.holdWhen?.(chunk.toString("latin1")) === true) {
      this.holdWhen = null;
      this.#holding.add(client);
    }
    const write = (): void => {
      if (!upstream.destroyed) upstream.write(chunk);
    };
    if (this.#frozen || this.#holding.has(client)) this.#hold(write);
    else write();
  }

  #answer(client: Socket, chunk: Buffer, order: { lastLeavesAtMs: number }): void {
    const write = (): void => {
      if (!client.destroyed) client.write(chunk);
    };
    const nowMs = performance.now();
    const leavesAtMs = Math.max(order.lastLeavesAtMs, nowMs + this.#answerDelayMs());
    if (this.#frozen) this.#hold(write);
    else if (leavesAtMs > nowMs) {
      order.lastLeavesAtMs = leavesAtMs;
      setTimeout(write, leavesAtMs - nowMs);
    } else write();
  }

  #hold(write: () => void): void {
    this.heldChunks += 1;
    this.#held.push(write);
  }
}

/** Starts a TcpRelay to 127.0.0.1:targetPort, listening on a free port. */
export async function startTcpRelay(targetPort: number, options: TcpRelayOptions = {}): Promise<TcpRelay> {
  const relay = new TcpRelay(targetPort, options);
  await relay.listen();
  return relay;
}
