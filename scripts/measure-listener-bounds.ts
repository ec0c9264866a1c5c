// Measures what an unauthenticated or idle client costs keygate, against `keygate serve` with
// its default settings. Not part of `npm test`.
//   npx tsx scripts/measure-listener-bounds.ts [--root DIR] [--body-mib 100] [--idle-wait-seconds 90] [--skip-idle]
// Prints one JSON line per figure:
//  - memory: peak RSS growth of the keygate process while a body of --body-mib MiB is streamed
//    (chunked) to KeyAdmin/CreateKey with no token, with the answer and the bytes it took;
//  - idle: for each port, seconds until the server closed a connection that sent nothing
//    ("silent") and one left idle after one answered request ("after-request"), or null when it
//    was still open after --idle-wait-seconds.
// --root runs another checkout's keygate (for example the pre-change tree) with the same client.
import { spawn } from "node:child_process";
import { once } from "node:events";
import { mkdtempSync, rmSync } from "node:fs";
import { request } from "node:http";
import { connect } from "node:net";
import type { Socket } from "node:net";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { pathToFileURL } from "node:url";
import { Command } from "commander";
import { z } from "zod";
import { H2_PREFACE, H2_SETTINGS, firstEvent, processMemory, resetPeakMemory } from "../test/harness/sockets.js";
import { listeningPorts } from "../test/harness/process.js";

const options = z
  .object({
    root: z.string().default(resolve(import.meta.dirname, "..")),
    bodyMib: z.coerce.number().int().positive(),
    idleWaitSeconds: z.coerce.number().positive(),
    skipIdle: z.boolean().default(false),
  })
  .parse(
    new Command()
      .option("--root <dir>", "the keygate checkout to run")
      .option("--body-mib <n>", "size of the unauthenticated body", "100")
      .option("--idle-wait-seconds <n>", "how long to wait for an idle connection to be closed", "90")
      .option("--skip-idle", "measure memory only")
      .parse()
      .opts(),
  );

const MiB = 1024 * 1024;
const ADMIN_TOKEN = "kgadm_measure_token_0123456789abcdefghij";

function print(line: Record<string, unknown>): void {
  process.stdout.write(`${JSON.stringify(line)}\n`);
}

/** Streams `totalBytes` to CreateKey with no token, as fast as the server takes them. */
function unauthenticatedBody(port: number, totalBytes: number): Promise<{ status: number; sentBytes: number; answer: string }> {
  const block = Buffer.alloc(MiB, 0x20);
  return new Promise((done, fail) => {
    const req = request({ host: "127.0.0.1", port, method: "POST", path: "/keygate.v1.KeyAdmin/CreateKey", headers: { "content-type": "application/json" }, agent: false });
    let sentBytes = 0;
    let answered = false;
    req.on("response", (res) => {
      answered = true;
      let answer = "";
      res.on("data", (chunk: Buffer) => (answer += chunk.toString("utf8")));
      res.on("close", () => done({ status: res.statusCode ?? 0, sentBytes, answer }));
    });
    req.on("error", (error) => {
      if (!answered) fail(error);
    });
    void (async () => {
      while (!answered && !req.destroyed && sentBytes < totalBytes) {
        sentBytes += block.length;
        if (!req.write(block)) await firstEvent(req, ["drain", "close", "response"]);
      }
      if (!answered && !req.destroyed) req.end();
    })().catch(() => undefined);
  });
}

/** Seconds until the server closes `socket`, or null after `waitSeconds`. */
function secondsUntilClosed(socket: Socket, waitSeconds: number): Promise<number | null> {
  const startedAt = performance.now();
  return new Promise((done) => {
    const timer = setTimeout(() => {
      socket.destroy();
      done(null);
    }, waitSeconds * 1000);
    socket.resume();
    socket.on("error", () => undefined);
    socket.once("close", () => {
      clearTimeout(timer);
      done(Math.round((performance.now() - startedAt) / 10) / 100);
    });
  });
}

function opened(port: number): Promise<Socket> {
  return new Promise((done, fail) => {
    const socket = connect(port, "127.0.0.1", () => done(socket));
    socket.once("error", fail);
  });
}

/** A connection that has had one exchange and now sends nothing: HTTP/1.1 keep-alive, or an HTTP/2 session with no stream. */
async function afterOneExchange(port: number, http2: boolean): Promise<Socket> {
  const socket = await opened(port);
  const reply = once(socket, "data");
  socket.write(http2 ? Buffer.concat([H2_PREFACE, H2_SETTINGS]) : Buffer.from("GET /healthz HTTP/1.1\r\nHost: keygate\r\n\r\n"));
  await reply;
  return socket;
}

/** Starts `keygate serve` from `root`'s sources with default settings and waits for its ports. */
async function serve(root: string, dataDir: string): Promise<{ pid: number; ports: { grpc: number; http: number; admin: number }; stop(): Promise<void> }> {
  const env: NodeJS.ProcessEnv = {};
  for (const [name, value] of Object.entries(process.env)) if (!name.startsWith("KEYGATE_")) env[name] = value;
  Object.assign(env, { KEYGATE_DATA_DIR: dataDir, KEYGATE_ADMIN_TOKENS: ADMIN_TOKEN, KEYGATE_HOST: "127.0.0.1", KEYGATE_GRPC_PORT: "0", KEYGATE_HTTP_AUTHZ_PORT: "0", KEYGATE_ADMIN_PORT: "0" });
  const loader = pathToFileURL(join(root, "node_modules/tsx/dist/loader.mjs")).href;
  const child = spawn(process.execPath, ["--import", loader, join(root, "src/cli.ts"), "serve"], { cwd: dataDir, env, stdio: ["ignore", "pipe", "inherit"] });
  let out = "";
  child.stdout.on("data", (chunk: Buffer) => (out += chunk.toString("utf8")));
  const exited = once(child, "exit");
  const deadline = Date.now() + 30_000;
  let ports = listeningPorts(out);
  while (ports === null) {
    if (Date.now() > deadline || child.exitCode !== null) throw new Error(`keygate did not start:\n${out}`);
    await new Promise((wait) => setTimeout(wait, 25));
    ports = listeningPorts(out);
  }
  const pid = child.pid;
  if (pid === undefined) throw new Error("keygate has no pid");
  return {
    pid,
    ports,
    async stop() {
      child.kill("SIGTERM");
      await exited;
    },
  };
}

async function main(): Promise<void> {
  const dataDir = mkdtempSync(join(tmpdir(), "keygate-measure-"));
  const kp = await serve(options.root, dataDir);
  try {
    const pid = kp.pid;
    await new Promise((wait) => setTimeout(wait, 1000));
    resetPeakMemory(pid);
    const before = processMemory(pid);
    const startedAt = performance.now();
    const result = await unauthenticatedBody(kp.ports.admin, options.bodyMib * MiB);
    const ms = Math.round(performance.now() - startedAt);
    const after = processMemory(pid);
    print({
      figure: "memory",
      root: options.root,
      bodyMiB: options.bodyMib,
      status: result.status,
      answer: result.answer.slice(0, 120),
      sentMiB: Math.round((result.sentBytes / MiB) * 10) / 10,
      ms,
      rssBeforeMiB: Math.round((before.rssBytes / MiB) * 10) / 10,
      peakGrowthMiB: Math.round(((after.peakBytes - before.rssBytes) / MiB) * 10) / 10,
    });
    if (options.skipIdle) return;
    const { admin, http, grpc } = kp.ports;
    const wait = options.idleWaitSeconds;
    const watched: Array<[string, string, Promise<Socket>]> = [
      ["admin", "silent", opened(admin)],
      ["http", "silent", opened(http)],
      ["grpc", "silent", opened(grpc)],
      ["admin", "after-request (HTTP/1.1)", afterOneExchange(admin, false)],
      ["admin", "after-request (HTTP/2 session, no stream)", afterOneExchange(admin, true)],
      ["http", "after-request (HTTP/1.1)", afterOneExchange(http, false)],
      ["grpc", "after-request (HTTP/2 session, no call)", afterOneExchange(grpc, true)],
    ];
    const closed = await Promise.all(watched.map(async ([port, kind, socket]) => ({ port, kind, seconds: await secondsUntilClosed(await socket, wait) })));
    for (const line of closed) print({ figure: "idle", root: options.root, ...line, waitedSeconds: wait });
  } finally {
    await kp.stop();
    rmSync(dataDir, { recursive: true, force: true });
  }
}

await main();
