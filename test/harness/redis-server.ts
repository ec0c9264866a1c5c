import { spawn } from "node:child_process";
import type { ChildProcess } from "node:child_process";
import { accessSync, constants, statSync } from "node:fs";
import { connect } from "node:net";
import { readFileSync } from "node:fs";
import { connect as tlsConnect } from "node:tls";
import { delimiter, join } from "node:path";
import { freePort } from "./ports.js";

/** A redis-server for tests, on a free port of 127.0.0.1, with persistence off. */
export interface RedisServer {
  url: string;
  port: number;
  /** SIGTERM, then SIGKILL after 3 s; resolves once the process has exited. */
  stop(): Promise<void>;
  /** Stops it and starts it again, empty, on the same port (for reconnect tests). */
  restart(): Promise<void>;
  /** Starts it again on the same port after `stop()` (for outage tests). */
  start(): Promise<void>;
  /** SIGSTOP: connections stay open and nothing answers, as with a hung or frozen Redis. */
  freeze(): void;
  /** SIGCONT after `freeze()`. */
  thaw(): void;
}

const READY_TIMEOUT_MS = 10_000;
const KILL_AFTER_MS = 3000;
const OUTPUT_LIMIT = 8192;

// A worker that dies before afterAll must not leave redis-servers behind.
const running = new Set<ChildProcess>();
process.once("exit", () => {
  for (const child of running) child.kill("SIGKILL");
});

/** The absolute path of `name` on PATH, or null. */
function findOnPath(name: string): string | null {
  for (const dir of (process.env["PATH"] ?? "").split(delimiter)) {
    if (dir === "") continue;
    const candidate = join(dir, name);
    try {
      accessSync(candidate, constants.X_OK);
      if (statSync(candidate).isFile()) return candidate;
    } catch {
      // Not here; keep looking.
    }
  }
  return null;
}

/** True when redis-server is on PATH or KEYGATE_TEST_REDIS_URL is set. */
export function redisAvailable(): boolean {
  return externalRedisUrl() !== undefined || findOnPath("redis-server") !== null;
}

function externalRedisUrl(): string | undefined {
  const url = process.env["KEYGATE_TEST_REDIS_URL"];
  return url === undefined || url === "" ? undefined : url;
}

/** A certificate, its key and the CA that signed it, for a redis-server that speaks only TLS. */
export interface RedisTlsFiles {
  certFile: string;
  keyFile: string;
  caFile: string;
}

/**
 * Starts redis-server on a free port and waits for PING, or returns KEYGATE_TEST_REDIS_URL when
 * set (then stop is a no-op and restart throws). Null when redis-server is not on PATH. With
 * `tls`, the server listens with TLS only (--tls-port, no plaintext port) and the URL is rediss://;
 * clients need not present a certificate. An external Redis is never used for a TLS server.
 */
export async function startRedis(options: { tls?: RedisTlsFiles } = {}): Promise<RedisServer | null> {
  const external = options.tls === undefined ? externalRedisUrl() : undefined;
  if (external !== undefined) return externalServer(external);
  const binary = findOnPath("redis-server");
  if (binary === null) return null;
  const port = await freePort();
  let child: ChildProcess | null = null;

  const start = async (): Promise<void> => {
    if (child !== null) throw new Error(`redis-server on port ${port} is already running`);
    child = await spawnRedis(binary, port, options.tls);
  };
  const stop = async (): Promise<void> => {
    const current = child;
    child = null;
    if (current !== null) await terminate(current);
  };
  const signal = (name: "SIGSTOP" | "SIGCONT"): void => {
    if (child === null) throw new Error(`redis-server on port ${port} is not running`);
    child.kill(name);
  };
  await start();
  return {
    url: `${options.tls === undefined ? "redis" : "rediss"}://127.0.0.1:${port}`,
    port,
    start,
    stop,
    freeze: () => signal("SIGSTOP"),
    thaw: () => signal("SIGCONT"),
    async restart() {
      await stop();
      await start();
    },
  };
}

function externalServer(url: string): RedisServer {
  const unsupported = async (): Promise<void> => {
    throw new Error("not supported with an external Redis (KEYGATE_TEST_REDIS_URL)");
  };
  const cannotSignal = (): void => {
    throw new Error("not supported with an external Redis (KEYGATE_TEST_REDIS_URL)");
  };
  return { url, port: Number(new URL(url).port || "6379"), stop: async () => {}, restart: unsupported, start: unsupported, freeze: cannotSignal, thaw: cannotSignal };
}

async function spawnRedis(binary: string, port: number, tls: RedisTlsFiles | undefined): Promise<ChildProcess> {
  const listen =
    tls === undefined
      ? ["--port", String(port)]
      : ["--port", "0", "--tls-port", String(port), "--tls-cert-file", tls.certFile, "--tls-key-file", tls.keyFile, "--tls-ca-cert-file", tls.caFile, "--tls-auth-clients", "no"];
  const args = [...listen, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--loglevel", "warning"];
  const child = spawn(binary, args, { stdio: ["ignore", "pipe", "pipe"] });
  running.add(child);
  child.once("exit", () => running.delete(child));
  // redis-server logs startup failures (e.g. the port is taken) to stdout, so keep both.
  let output = "";
  const keep = (chunk: Buffer): void => {
    output = (output + chunk.toString("utf8")).slice(-OUTPUT_LIMIT);
  };
  child.stdout?.on("data", keep);
  child.stderr?.on("data", keep);
  try {
    await waitForPing(port, child, () => output, tls === undefined ? undefined : readFileSync(tls.caFile));
  } catch (error) {
    await terminate(child);
    throw error;
  }
  return child;
}

async function waitForPing(port: number, child: ChildProcess, output: () => string, ca: Buffer | undefined): Promise<void> {
  const deadline = Date.now() + READY_TIMEOUT_MS;
  for (;;) {
    if (child.exitCode !== null || child.signalCode !== null) {
      throw new Error(`redis-server on port ${port} exited (${child.exitCode ?? child.signalCode}) before answering PING:\n${output()}`);
    }
    if (await ping(port, ca)) return;
    if (Date.now() > deadline) throw new Error(`redis-server on port ${port} did not answer PING within ${READY_TIMEOUT_MS} ms:\n${output()}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

/** One raw PING (over TLS when `ca` is given); true on +PONG. A loading server answers -LOADING, which counts as not ready. */
function ping(port: number, ca: Buffer | undefined): Promise<boolean> {
  return new Promise((resolve) => {
    let reply = "";
    const socket =
      ca === undefined
        ? connect(port, "127.0.0.1", () => socket.write("PING\r\n"))
        : tlsConnect({ port, host: "127.0.0.1", servername: "localhost", ca }, () => socket.write("PING\r\n"));
    const done = (ok: boolean): void => {
      socket.destroy();
      resolve(ok);
    };
    socket.setTimeout(1000, () => done(false));
    socket.on("data", (chunk: Buffer) => {
      reply += chunk.toString("utf8");
      if (reply.includes("\r\n")) done(reply.startsWith("+PONG"));
    });
    socket.once("error", () => done(false));
    socket.once("close", () => done(false));
  });
}

async function terminate(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  await new Promise<void>((resolve) => {
    const kill = setTimeout(() => child.kill("SIGKILL"), KILL_AFTER_MS);
    child.once("exit", () => {
      clearTimeout(kill);
      resolve();
    });
    child.kill("SIGTERM");
  });
}
