import { describe, it } from "vitest";
import { createServer } from "node:net";
import { until } from "./poll.js";

/** A port that was free on 127.0.0.1 a moment ago. */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const address = server.address();
      const port = typeof address === "object" && address !== null ? address.port : 0;
      server.close(() => resolve(port));
    });
  });
}

/** Resolves once a TCP connection to 127.0.0.1:port succeeds (polling every 50 ms), or rejects after `timeoutMs` with `describe()`. */
export async function waitForPort(port: number, timeoutMs: number, describe: () => string): Promise<void> {
  const { connect } = await import("node:net");
  const listening = (): Promise<boolean> =>
    new Promise<boolean>((done) => {
      const socket = connect(port, "127.0.0.1", () => {
        socket.destroy();
        done(true);
      });
      socket.once("error", () => done(false));
    });
  await until(listening, timeoutMs, `something listening on 127.0.0.1:${port}`, { intervalMs: 50, detail: () => `: ${describe()}` });
}

/** Fails in CI, where every server must be present; elsewhere warns and lets the suite skip. */
export function requireServer(name: string, available: boolean, hint: string): boolean {
  if (available) return true;
  const message = `${name} is not available: ${hint}`;
  if (process.env["CI"] !== undefined && process.env["CI"] !== "" && process.env["CI"] !== "false") {
    throw new Error(`CI must run every suite, but ${message}`);
  }
  console.warn(`\n!!! SKIPPING ${name} suites: ${message}\n`);
  return false;
}

/**
 * Declares `suite(server)` when `server` is there. Without it the suite fails in CI (a missing
 * server must never pass as green) and is skipped with a loud warning elsewhere.
 */
export function suiteWithServer<T>(name: string, server: T | null, reason: string, suite: (server: T) => void): void {
  if (server !== null) {
    suite(server);
    return;
  }
  if (process.env["CI"] !== undefined && process.env["CI"] !== "" && process.env["CI"] !== "false") {
    describe(name, () => {
      it("has the server it needs", () => {
        throw new Error(`CI must run ${name}, but ${reason}`);
      });
    });
    return;
  }
  console.warn(`\n!!! SKIPPING ${name}: ${reason}\n`);
  describe.skip(name, () => {
    it(`needs: ${reason}`, () => undefined);
  });
}
