import { execFileSync, spawn } from "node:child_process";
import type { ChildProcess } from "node:child_process";
import { closeSync, constants, openSync, readSync, writeFileSync, writeSync } from "node:fs";
import { createServer } from "node:net";
import type { Server, Socket } from "node:net";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ADMIN_TOKEN } from "../harness/keygate.js";
import { until } from "../harness/poll.js";
import { embeddedEnv, listeningPorts, serveArgs, spawnedKeygates } from "../harness/process.js";

// Every exit of `keygate serve` is to wait at most 2 s for stdout to take the log (exitAfterLog).
// With a stdout nobody reads, some never exited (a pod Running for ever instead of restarting):
// an exception nothing caught (and, during the start, a rejection nothing handled, which Node
// raises as one) went through Node's own exit, where pino's hook flushSync()s the lines still
// waiting, retrying EAGAIN every 100 ms for as long as nobody reads; and a start that failed other
// than by a configuration mistake logged at fatal, which pino follows with the same flushSync.
// Once the reader of stdout had gone (`keygate serve | head -1`: EPIPE), pino drops every write,
// so nothing can drain, yet each exit still waited its full 2 s. A SIGTERM during the start finds
// no handler yet and ends the process at once, with no flush; a case keeps it so.

const spawned = spawnedKeygates("kg-blocked-exits-");

/** Long enough for a bounded exit on a loaded machine, far shorter than for ever. */
const EXIT_DEADLINE_MS = 15_000;

/** Less than the log's 2 s wait at exit, so that a drain that waits for a closed stdout lets it pass. */
const SENTINEL_MS = 1500;
const SENTINEL_LINE = "preload: still running 1.5 s after keygate's failure line";

/**
 * Modules node loads before keygate (`--import`). THROW_ON_SIGUSR2 throws from a signal handler,
 * an exception nothing catches; REJECT_ON_SIGUSR2 rejects a promise nobody handles.
 * SENTINEL_AFTER_FAILURE_LINE writes SENTINEL_LINE to stderr if the process still runs
 * SENTINEL_MS after keygate's first "keygate: " line there: its timer is set in the same turn as,
 * and just before, the log's 2 s one, so it fires first whenever the exit waits out the log's
 * wait, and not when the exit does not wait for a closed stdout. The order is the process's own,
 * so a loaded machine cannot change it.
 */
const PRELOADS = {
  THROW_ON_SIGUSR2: `process.on("SIGUSR2", () => { throw new Error("an exception nothing catches"); });\n`,
  REJECT_ON_SIGUSR2: `process.on("SIGUSR2", () => { void Promise.reject(new Error("a rejection no one handles")); });\n`,
  SENTINEL_AFTER_FAILURE_LINE: `import { writeSync } from "node:fs";
const write = process.stderr.write.bind(process.stderr);
let armed = false;
process.stderr.write = (chunk, ...rest) => {
  if (!armed && String(chunk).startsWith("keygate: ")) {
    armed = true;
    setTimeout(() => writeSync(2, "${SENTINEL_LINE}\\n"), ${SENTINEL_MS}).unref();
  }
  return write(chunk, ...rest);
};
`,
} as const;
type Preload = keyof typeof PRELOADS;

/**
 * A named pipe as keygate's stdout, as a container runtime gives it. The test holds it open for
 * reading and writing, without blocking: it reads when it chooses, and fill() leaves not one byte
 * of room, so every line keygate logs from then on waits in keygate (writes of up to PIPE_BUF
 * bytes are all or nothing: a socket pair would still take a short line after a big write).
 */
class StdoutPipe {
  readonly fd: number;
  #read = "";

  constructor(dir: string) {
    const path = join(dir, "stdout.fifo");
    execFileSync("mkfifo", [path]);
    this.fd = openSync(path, constants.O_RDWR | constants.O_NONBLOCK);
  }

  /** Everything read so far, after reading what waits. */
  read(): string {
    const buffer = Buffer.alloc(65_536);
    for (;;) {
      const n = this.#attempt(() => readSync(this.fd, buffer));
      if (n === 0) return this.#read;
      this.#read += buffer.toString("utf8", 0, n);
    }
  }

  fill(): void {
    const page = Buffer.alloc(4096, 10);
    while (this.#attempt(() => writeSync(this.fd, page)) > 0);
    while (this.#attempt(() => writeSync(this.fd, "\n")) > 0);
  }

  close(): void {
    closeSync(this.fd);
  }

  /** The bytes `io` moved, 0 on EAGAIN. */
  #attempt(io: () => number): number {
    try {
      return io();
    } catch (error) {
      if (error instanceof Error && "code" in error && error.code === "EAGAIN") return 0;
      throw error;
    }
  }
}

/** The exit of a child spawned here. */
interface Exited {
  code: number | null;
  signal: NodeJS.Signals | null;
}

/** A `keygate serve` spawned here, with its stderr collected. */
interface Serving {
  child: ChildProcess;
  stderr(): string;
  /** The exit, or null when the process still runs after EXIT_DEADLINE_MS. */
  exitWithinDeadline(): Promise<Exited | null>;
}

/**
 * Runs `keygate serve` with `preloads`, `stdout` and exactly `extra` added to the embedded store's
 * KEYGATE_* variables, after `prepare` has had the data directory.
 */
function serve(options: { preloads: readonly Preload[]; stdout: StdoutPipe | "pipe"; extra: Record<string, string>; prepare?: (dataDir: string) => void }): Serving {
  const { dir, dataDir } = spawned.tempDataDir();
  options.prepare?.(dataDir);
  const env: NodeJS.ProcessEnv = {};
  for (const [name, value] of Object.entries(process.env)) if (!name.startsWith("KEYGATE_")) env[name] = value;
  Object.assign(env, embeddedEnv({ dataDir, adminToken: ADMIN_TOKEN, extra: options.extra }));
  const preloads = options.preloads.flatMap((name) => {
    const file = join(dir, `${name.toLowerCase()}.mjs`);
    writeFileSync(file, PRELOADS[name]);
    return ["--import", file];
  });
  const stdout = options.stdout === "pipe" ? "pipe" : options.stdout.fd;
  const child = spawn(process.execPath, [...preloads, ...serveArgs()], { cwd: dir, env, stdio: ["ignore", stdout, "pipe"] });
  spawned.children.add(child);
  let stderr = "";
  child.stderr?.on("data", (chunk: Buffer) => (stderr += chunk.toString()));
  let exited: Exited | null = null;
  child.on("exit", (code, signal) => (exited = { code, signal }));
  return {
    child,
    stderr: () => stderr,
    async exitWithinDeadline() {
      await until(() => exited !== null, EXIT_DEADLINE_MS, "keygate's exit", { intervalMs: 50 }).catch(() => undefined);
      return exited;
    },
  };
}

/** A Redis that accepts connections and never answers: a start waits for it (15 s at most), its log already written to. */
class SilentRedis {
  readonly #sockets = new Set<Socket>();
  readonly #server: Server = createServer((socket) => {
    this.connections += 1;
    this.#sockets.add(socket);
    socket.on("error", () => undefined);
    socket.on("close", () => this.#sockets.delete(socket));
  });
  port = 0;
  connections = 0;

  async listen(): Promise<void> {
    await new Promise<void>((done) => this.#server.listen(0, "127.0.0.1", done));
    const address = this.#server.address();
    if (address === null || typeof address === "string") throw new Error("the silent Redis has no TCP address");
    this.port = address.port;
  }

  async close(): Promise<void> {
    for (const socket of this.#sockets) socket.destroy();
    await new Promise<void>((done) => this.#server.close(() => done()));
  }
}

describe("keygate serve's exits with a stdout that is not read or is closed", { timeout: 60_000 }, () => {
  const redis = new SilentRedis();
  const pipes: StdoutPipe[] = [];
  beforeAll(() => redis.listen());
  afterAll(async () => {
    for (const pipe of pipes) pipe.close();
    await redis.close();
  });

  function stdoutPipe(): StdoutPipe {
    const pipe = new StdoutPipe(spawned.tempDir());
    pipes.push(pipe);
    return pipe;
  }

  /**
   * Two lines logged before anything can fail or wait, which wait themselves (stdout being full):
   * a misspelled variable's warning and the GC threads' priority. Two, since pino's flushes leave
   * alone the one already being written.
   */
  const TWO_START_LINES = { KEYGATE_LOG_LEVLE: "info", KEYGATE_GC_THREAD_NICE: "1" };

  /** A keygate whose start waits for SilentRedis, with stdout full before its first line; resolves once it has connected. */
  async function startWaitingForRedis(preloads: readonly Preload[]): Promise<Serving> {
    const stdout = stdoutPipe();
    stdout.fill();
    const before = redis.connections;
    const kg = serve({ preloads, stdout, extra: { KEYGATE_REDIS_URL: `redis://127.0.0.1:${redis.port}`, ...TWO_START_LINES } });
    await until(() => redis.connections > before || kg.child.exitCode !== null, 20_000, "keygate's connection to Redis", { intervalMs: 20 });
    expect(kg.child.exitCode).toBe(null);
    return kg;
  }

  it("error: an exception nothing catches while serving exits 1 after the log's bounded wait, with one line on stderr", async () => {
    const stdout = stdoutPipe();
    const kg = serve({ preloads: ["THROW_ON_SIGUSR2"], stdout, extra: { KEYGATE_ACCESS_LOG_SAMPLE: "1" } });
    await until(() => listeningPorts(stdout.read()) !== null || kg.child.exitCode !== null, 30_000, "the listening line", { intervalMs: 20 });
    const ports = listeningPorts(stdout.read());
    if (ports === null) throw new Error(`keygate exited: ${kg.stderr()}`);
    stdout.fill();
    // Access lines, which now wait in keygate for stdout.
    for (let i = 0; i < 3; i += 1) expect((await fetch(`http://127.0.0.1:${ports.http}/check/v1/blocked-exit`)).status).toBe(401);
    kg.child.kill("SIGUSR2");
    // Before: Node's exit hung in pino's flushSync.
    expect(await kg.exitWithinDeadline()).toEqual({ code: 1, signal: null });
    // One line, not Node's stack trace, which can quote a secret; the whole error is in the log.
    expect(kg.stderr()).toBe("keygate: unexpected error: Error: an exception nothing catches\n");
  });

  it("error: a rejection nobody handles during the start exits 1 after the log's bounded wait", async () => {
    const kg = await startWaitingForRedis(["REJECT_ON_SIGUSR2"]);
    kg.child.kill("SIGUSR2");
    // Before: raised as an uncaught exception, into the same endless flushSync.
    expect(await kg.exitWithinDeadline()).toEqual({ code: 1, signal: null });
    expect(kg.stderr()).toBe("keygate: unexpected error: Error: a rejection no one handles\n");
  });

  it("error: a start that fails other than by a configuration mistake exits 1 after the log's bounded wait", async () => {
    const stdout = stdoutPipe();
    stdout.fill();
    let db = "";
    const kg = serve({
      preloads: [],
      stdout,
      extra: TWO_START_LINES,
      prepare: (dataDir) => {
        db = join(dataDir, "keygate.db");
        writeFileSync(db, "not a database\n".repeat(400));
      },
    });
    // Before: pino's fatal() (the "keygate could not start" line) flushSync()ed, for ever.
    expect(await kg.exitWithinDeadline()).toEqual({ code: 1, signal: null });
    expect(kg.stderr()).toBe(`keygate: could not start: ${db}: file is not a database\n`);
  });

  it("error: SIGTERM during the start ends the process at once, as Node's default does (no handler, so no exit flush)", async () => {
    const kg = await startWaitingForRedis([]);
    kg.child.kill("SIGTERM");
    expect(await kg.exitWithinDeadline()).toEqual({ code: null, signal: "SIGTERM" });
  });

  it("error: with stdout closed by its reader (EPIPE), a failed start exits 2 without waiting for a stdout that cannot drain", async () => {
    // Port 1: nothing listens there, so the start fails at once (KEYGATE_REDIS_URL, exit 2), after
    // log lines that meet EPIPE.
    const kg = serve({ preloads: ["SENTINEL_AFTER_FAILURE_LINE"], stdout: "pipe", extra: { KEYGATE_REDIS_URL: "redis://127.0.0.1:1", KEYGATE_STARTUP_WAIT_SECONDS: "0", KEYGATE_LOG_LEVLE: "info" } });
    kg.child.stdout?.destroy();
    expect(await kg.exitWithinDeadline()).toEqual({ code: 2, signal: null });
    // Before: the sentinel's line came too, the log's wait having run its full 2 s.
    expect(kg.stderr()).toBe("keygate: KEYGATE_REDIS_URL: nothing accepts connections at that host and port (ECONNREFUSED)\n");
  });
});
