import { spawn } from "node:child_process";
import type { ChildProcess } from "node:child_process";
import { accessSync, constants, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { connect, createServer } from "node:net";
import { tmpdir } from "node:os";
import { connect as tlsConnect } from "node:tls";
import { delimiter, join } from "node:path";
import { Redis } from "ioredis";
import { afterAll, describe } from "vitest";
import { until } from "./poll.js";
import { freePort, suiteWithServer } from "./ports.js";

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
    child = await spawnRedis(binary, port, [], undefined, options.tls);
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

async function spawnRedis(binary: string, port: number, extraArgs: readonly string[] = [], cwd?: string, tls?: RedisTlsFiles): Promise<ChildProcess> {
  const listen =
    tls === undefined
      ? ["--port", String(port)]
      : ["--port", "0", "--tls-port", String(port), "--tls-cert-file", tls.certFile, "--tls-key-file", tls.keyFile, "--tls-ca-cert-file", tls.caFile, "--tls-auth-clients", "no"];
  const args = [...listen, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--loglevel", "warning", ...extraArgs];
  return spawnRedisWith(binary, port, args, cwd, tls);
}

/** Spawns redis-server with exactly `args` and waits until it answers PING on `port` (over TLS with `tls`). */
async function spawnRedisWith(binary: string, port: number, args: readonly string[], cwd?: string, tls?: RedisTlsFiles): Promise<ChildProcess> {
  const child = spawn(binary, args, { stdio: ["ignore", "pipe", "pipe"], ...(cwd === undefined ? {} : { cwd }) });
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

/** True when redis-server and redis-cli are on PATH (a Cluster or Sentinel set needs both). */
export function redisTopologyAvailable(): boolean {
  return findOnPath("redis-server") !== null && findOnPath("redis-cli") !== null;
}

/** A running redis-server process of a Cluster or Sentinel set. */
export interface RedisNode {
  port: number;
  /** SIGKILL: the node is gone at once, as on a crash. */
  kill(): Promise<void>;
}

/** A Redis Cluster of three masters on free ports of 127.0.0.1. */
export interface RedisClusterSet {
  /** KEYGATE_REDIS_URL for it: redis+cluster:// with every node as a seed. */
  url: string;
  nodes: RedisNode[];
  stop(): Promise<void>;
}

/** A free port whose cluster bus port (port + 10000) is free too. */
async function freeClusterPort(): Promise<number> {
  for (;;) {
    const port = await freePort();
    if (port + 10_000 > 65_535) continue;
    const busFree = await new Promise<boolean>((done) => {
      const server = createServer();
      server.once("error", () => done(false));
      server.listen(port + 10_000, "127.0.0.1", () => server.close(() => done(true)));
    });
    if (busFree) return port;
  }
}

/** Runs redis-cli with `args`; rejects with its output when it exits non-zero. */
function redisCli(args: readonly string[]): Promise<string> {
  const binary = findOnPath("redis-cli");
  if (binary === null) return Promise.reject(new Error("redis-cli is not on PATH"));
  return new Promise((resolve, reject) => {
    const child = spawn(binary, [...args], { stdio: ["ignore", "pipe", "pipe"] });
    let output = "";
    child.stdout.on("data", (chunk: Buffer) => (output += chunk.toString("utf8")));
    child.stderr.on("data", (chunk: Buffer) => (output += chunk.toString("utf8")));
    child.once("error", reject);
    child.once("exit", (code) => (code === 0 ? resolve(output) : reject(new Error(`redis-cli ${args.join(" ")} exited ${code}:\n${output}`))));
  });
}

/** One command over a short-lived ioredis connection to 127.0.0.1:port. */
export async function redisCommand(port: number, command: string, ...args: Array<string | number>): Promise<unknown> {
  const client = new Redis({ host: "127.0.0.1", port, lazyConnect: true, maxRetriesPerRequest: 0, retryStrategy: () => null, connectTimeout: 2000, commandTimeout: 5000 });
  client.on("error", () => undefined);
  try {
    await client.connect();
    return await client.call(command, ...args);
  } finally {
    client.disconnect();
  }
}

/**
 * Polls `probe` every 100 ms until it is true, counting a probe that throws (a node still
 * starting or electing) as "not yet"; throws naming `what` after `timeoutMs`. The harness's
 * {@link until} with those two settings.
 */
export async function waitFor(probe: () => Promise<boolean>, timeoutMs: number, what: string): Promise<void> {
  await until(probe, timeoutMs, what, { intervalMs: 100, retryErrors: true });
}

function nodeOf(port: number, child: ChildProcess): RedisNode {
  return {
    port,
    kill: async () => {
      if (child.exitCode !== null || child.signalCode !== null) return;
      await new Promise<void>((resolve) => {
        child.once("exit", () => resolve());
        child.kill("SIGKILL");
      });
    },
  };
}

/**
 * Starts three `redis-server --cluster-enabled yes` masters, joins them with
 * `redis-cli --cluster create`, and waits until every node reports cluster_state:ok.
 * Null when redis-server or redis-cli is missing.
 */
export async function startRedisCluster(): Promise<RedisClusterSet | null> {
  const binary = findOnPath("redis-server");
  if (binary === null || findOnPath("redis-cli") === null) return null;
  const dir = mkdtempSync(join(tmpdir(), "keygate-redis-cluster-"));
  const children: ChildProcess[] = [];
  const stop = async (): Promise<void> => {
    await Promise.all(children.map((child) => terminate(child)));
    rmSync(dir, { recursive: true, force: true });
  };
  try {
    const ports: number[] = [];
    for (let i = 0; i < 3; i++) ports.push(await freeClusterPort());
    for (const port of ports) {
      children.push(
        await spawnRedis(binary, port, ["--cluster-enabled", "yes", "--cluster-config-file", `nodes-${port}.conf`, "--cluster-node-timeout", "2000", "--dir", dir], dir),
      );
    }
    await redisCli(["--cluster", "create", ...ports.map((p) => `127.0.0.1:${p}`), "--cluster-yes"]);
    for (const port of ports) {
      await waitFor(async () => String(await redisCommand(port, "CLUSTER", "INFO")).includes("cluster_state:ok"), 30_000, `cluster node ${port} reporting cluster_state:ok`);
    }
    return {
      url: `redis+cluster://${ports.map((p) => `127.0.0.1:${p}`).join(",")}`,
      nodes: ports.map((port, i) => nodeOf(port, children[i] ?? spawnFailed())),
      stop,
    };
  } catch (error) {
    await stop();
    throw error;
  }
}

function spawnFailed(): never {
  throw new Error("a redis-server of the set did not start");
}

/** A master, one replica and three Sentinels watching them as "mymaster". */
export interface RedisSentinelSet {
  /** KEYGATE_REDIS_URL for it: redis+sentinel:// naming the three Sentinels and "mymaster". */
  url: string;
  masterName: string;
  /** The two data nodes; which is master changes with a failover. */
  dataNodes: RedisNode[];
  sentinelPorts: number[];
  /** The port the Sentinels currently name as master. */
  masterPort(): Promise<number>;
  /** SENTINEL FAILOVER, then waits until the other node is master and the Sentinels agree. */
  failover(): Promise<number>;
  /** Waits until every Sentinel names a master other than `before` and it answers ROLE as master. */
  awaitNewMaster(before: number): Promise<number>;
  stop(): Promise<void>;
}

/**
 * Starts a master, a replica of it and three Sentinels (`redis-server <conf> --sentinel`, with
 * down-after-milliseconds 1000, failover-timeout 3000), and waits until every Sentinel knows the replica and the other
 * Sentinels, so that a failover can be agreed. Null when redis-server is missing.
 */
export async function startRedisSentinel(): Promise<RedisSentinelSet | null> {
  const binary = findOnPath("redis-server");
  if (binary === null) return null;
  const masterName = "mymaster";
  const dir = mkdtempSync(join(tmpdir(), "keygate-redis-sentinel-"));
  const children: ChildProcess[] = [];
  const stop = async (): Promise<void> => {
    await Promise.all(children.map((child) => terminate(child)));
    rmSync(dir, { recursive: true, force: true });
  };
  try {
    const masterPort = await freePort();
    const replicaPort = await freePort();
    const master = await spawnRedis(binary, masterPort, [], dir);
    children.push(master);
    const replica = await spawnRedis(binary, replicaPort, ["--replicaof", "127.0.0.1", String(masterPort)], dir);
    children.push(replica);
    await waitFor(async () => String(await redisCommand(replicaPort, "INFO", "replication")).includes("master_link_status:up"), 30_000, "replica linked to its master");
    const sentinelPorts: number[] = [];
    for (let i = 0; i < 3; i++) {
      const port = await freePort();
      const conf = join(dir, `sentinel-${port}.conf`);
      writeFileSync(
        conf,
        [
          `port ${port}`,
          "bind 127.0.0.1",
          `dir ${dir}`,
          `sentinel monitor ${masterName} 127.0.0.1 ${masterPort} 2`,
          `sentinel down-after-milliseconds ${masterName} 1000`,
          // A split election is retried after twice this.
          `sentinel failover-timeout ${masterName} 3000`,
          `sentinel parallel-syncs ${masterName} 1`,
          "",
        ].join("\n"),
      );
      children.push(await spawnRedisWith(binary, port, [conf, "--sentinel", "--loglevel", "warning"], dir));
      sentinelPorts.push(port);
    }
    for (const port of sentinelPorts) {
      await waitFor(
        async () => {
          const replicas = await redisCommand(port, "SENTINEL", "REPLICAS", masterName);
          const sentinels = await redisCommand(port, "SENTINEL", "SENTINELS", masterName);
          return Array.isArray(replicas) && replicas.length === 1 && Array.isArray(sentinels) && sentinels.length === 2;
        },
        60_000,
        `Sentinel ${port} knowing the replica and the other Sentinels`,
      );
    }
    const currentMaster = async (): Promise<number> => {
      const reply = await redisCommand(sentinelPorts[0] ?? 0, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", masterName);
      if (!Array.isArray(reply) || typeof reply[1] !== "string") throw new Error(`unexpected SENTINEL GET-MASTER-ADDR-BY-NAME reply ${JSON.stringify(reply)}`);
      return Number(reply[1]);
    };
    const awaitNewMaster = async (before: number): Promise<number> => {
      let after = before;
      await waitFor(
        async () => {
          const named = await Promise.all(
            sentinelPorts.map(async (port) => {
              const reply = await redisCommand(port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", masterName);
              return Array.isArray(reply) ? Number(reply[1]) : 0;
            }),
          );
          after = named[0] ?? before;
          if (after === before || !named.every((p) => p === after)) return false;
          return String(await redisCommand(after, "ROLE")).startsWith("master");
        },
        60_000,
        "the Sentinels agreeing on a promoted master",
      );
      return after;
    };
    return {
      url: `redis+sentinel://${sentinelPorts.map((p) => `127.0.0.1:${p}`).join(",")}/${masterName}`,
      masterName,
      dataNodes: [nodeOf(masterPort, master), nodeOf(replicaPort, replica)],
      sentinelPorts,
      masterPort: currentMaster,
      async failover() {
        const before = await currentMaster();
        await redisCommand(sentinelPorts[0] ?? 0, "SENTINEL", "FAILOVER", masterName);
        return awaitNewMaster(before);
      },
      awaitNewMaster,
      stop,
    };
  } catch (error) {
    await stop();
    throw error;
  }
}

/** What a suite's tests leave to close: its afterAll runs them last first. */
export type Closers = Array<() => Promise<unknown> | void>;

/**
 * Starts a redis-server and declares `suite` as describe(`name`) over it, as suiteWithServer does
 * (failing in CI, skipped elsewhere, when there is none). The suite's afterAll runs what its tests
 * pushed to `closers`, last first, then stops the server.
 */
export async function suiteWithRedis(name: string, suite: (redisServer: RedisServer, closers: Closers) => void): Promise<void> {
  const server = await startRedis();
  suiteWithServer(name, server, "redis-server is not on PATH (apt-get install redis-server, or set KEYGATE_TEST_REDIS_URL)", (redisServer) => {
    describe(name, () => {
      const closers: Closers = [];
      afterAll(async () => {
        for (const close of closers.reverse()) await close();
        await redisServer.stop();
      });
      suite(redisServer, closers);
    });
  });
}
