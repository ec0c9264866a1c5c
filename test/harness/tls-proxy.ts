import { connect } from "node:net";
import type { Socket } from "node:net";
import { createServer } from "node:tls";
import type { TLSSocket } from "node:tls";

/** A TLS-terminating TCP proxy in front of a plaintext test server (the MongoDB-wire server speaks no TLS). */
export interface TlsProxy {
  port: number;
  /** Connections that completed a TLS handshake: proof the client really spoke TLS. */
  handshakes(): number;
  stop(): Promise<void>;
}

/**
 * Listens on a free port of 127.0.0.1 with `cert` and `key`, and pipes each decrypted connection
 * to 127.0.0.1:targetPort. A client that fails the handshake never reaches the target.
 */
export async function startTlsProxy(targetPort: number, tls: { cert: Buffer; key: Buffer }): Promise<TlsProxy> {
  let handshakes = 0;
  const open = new Set<Socket>();
  const server = createServer({ cert: tls.cert, key: tls.key }, (socket: TLSSocket) => {
    handshakes += 1;
    const upstream = connect(targetPort, "127.0.0.1");
    for (const s of [socket, upstream]) {
      open.add(s);
      s.once("close", () => open.delete(s));
    }
    socket.pipe(upstream).pipe(socket);
    socket.once("error", () => upstream.destroy());
    upstream.once("error", () => socket.destroy());
    socket.once("close", () => upstream.destroy());
    upstream.once("close", () => socket.destroy());
  });
  server.on("tlsClientError", () => undefined);
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => resolve());
  });
  const address = server.address();
  if (address === null || typeof address !== "object") throw new Error("the TLS proxy has no port");
  const { port } = address;
  return {
    port,
    handshakes: () => handshakes,
    stop: () =>
      new Promise<void>((resolve) => {
        for (const socket of open) socket.destroy();
        server.close(() => resolve());
      }),
  };
}
