import { spawn, spawnSync } from "node:child_process";
import type { ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { connect } from "node:net";
import { homedir, tmpdir } from "node:os";
import { join, resolve } from "node:path";
import mongoose from "mongoose";
import { freePort } from "./ports.js";

// mongo-java-server (in-memory backend) from Maven Central, installed by .ci/install-mongo-wire.sh.
// FerretDB 1.x was evaluated and rejected: its SQLite backend loses concurrent conditional $inc
// updates, which keygate's active-key cap depends on (see that script).
const VERSION = "1.46.0";
const READY_TIMEOUT_MS = 30_000;
const KILL_AFTER_MS = 5000;
const OUTPUT_LIMIT = 8192;
const START_ATTEMPTS = 3;

/** A running MongoDB-wire server for tests. */
export interface MongoWire {
  uri: string;
  kind: string;
  /** Kills the server (SIGTERM, SIGKILL after 5 s) and removes its temp dir; its data is gone. */
  stop(): Promise<void>;
  /** Stops and starts it again on the same port, empty: for outage and recovery tests. */
  restart(): Promise<void>;
  /** Stops it and leaves it stopped until `start()`. */
  pause(): Promise<void>;
  start(): Promise<void>;
}

// A worker that dies before afterAll must not leave servers or temp dirs behind.
const running = new Set<ChildProcess>();
const tempDirs = new Set<string>();
process.once("exit", () => {
  for (const child of running) child.kill("SIGKILL");
  for (const dir of tempDirs) rmSync(dir, { recursive: true, force: true });
});

const installScript = resolve(import.meta.dirname, "../../.ci/install-mongo-wire.sh");

/** The directory .ci/install-mongo-wire.sh installs mongo-java-server into. */
export function mongoWireInstallDir(): string {
  const cache = process.env["KEYGATE_CACHE_DIR"] ?? join(homedir(), ".cache", "keygate");
  return join(cache, `mongo-java-server-${VERSION}`);
}

function externalUri(): string | null {
  const uri = process.env["KEYGATE_TEST_MONGODB_URI"];
  return uri === undefined || uri === "" ? null : uri;
}

function launcherInstalled(): boolean {
  return existsSync(join(mongoWireInstallDir(), "classes", "MongoWireServer.class"));
}

/** True when KEYGATE_TEST_MONGODB_URI is set or the server is installed; never installs. */
export function mongoWireInstalled(): boolean {
  return externalUri() !== null || launcherInstalled();
}

/**
 * True when an external URI is set or the server is installed. A missing server is installed
 * (and cached) by .ci/install-mongo-wire.sh on first use, when Java and Maven are present.
 */
export function mongoWireAvailable(): boolean {
  if (mongoWireInstalled()) return true;
  spawnSync("bash", [installScript], { stdio: "inherit" });
  return launcherInstalled();
}

/** `uri` with its database replaced by `database`, keeping hosts and options. */
function withDatabase(uri: string, database: string): string {
  const match = /^(mongodb(?:\+srv)?:\/\/[^/?]*)(?:\/[^?]*)?(\?.*)?$/.exec(uri);
  if (match === null) throw new Error(`KEYGATE_TEST_MONGODB_URI is not a mongodb:// URI: ${uri}`);
  return `${match[1] ?? ""}/${database}${match[2] ?? ""}`;
}

function stopChild(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) {
    running.delete(child);
    return Promise.resolve();
  }
  return new Promise((done) => {
    const kill = setTimeout(() => child.kill("SIGKILL"), KILL_AFTER_MS);
    child.once("exit", () => {
      clearTimeout(kill);
      running.delete(child);
      done();
    });
    child.kill("SIGTERM");
  });
}

function tcpConnects(port: number): Promise<boolean> {
  return new Promise((done) => {
    const socket = connect(port, "127.0.0.1");
    const timer = setTimeout(() => {
      socket.destroy();
      done(false);
    }, 1000);
    socket.once("connect", () => {
      clearTimeout(timer);
      socket.destroy();
      done(true);
    });
    socket.once("error", () => {
      clearTimeout(timer);
      done(false);
    });
  });
}

async function pings(port: number): Promise<void> {
  const client = new mongoose.mongo.MongoClient(`mongodb://127.0.0.1:${port}/`, {
    directConnection: true,
    serverSelectionTimeoutMS: 2000,
    connectTimeoutMS: 2000,
  });
  try {
    await client.connect();
    await client.db("admin").command({ ping: 1 });
  } finally {
    await client.close();
  }
}

/** A started child and what it printed (the last few KiB). */
interface Launched {
  child: ChildProcess;
  output(): string;
}

/** The JVM flags the server runs with: a small, quick-starting JVM for tests. */
export const MONGO_WIRE_JVM_FLAGS: readonly string[] = ["-Xss512k", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1"];

function launchJava(dir: string, dataDir: string, port: number, jvmOptions: readonly string[]): Launched {
  const classpath = [join(dir, "classes"), join(dir, "lib", "*")].join(":");
  const args = [...MONGO_WIRE_JVM_FLAGS, ...jvmOptions, `-Djava.io.tmpdir=${dataDir}`, "-cp", classpath, "MongoWireServer", String(port)];
  const child = spawn("java", args, { cwd: dataDir, stdio: ["ignore", "pipe", "pipe"] });
  running.add(child);
  let out = "";
  const keep = (chunk: Buffer): void => {
    out = (out + chunk.toString()).slice(-OUTPUT_LIMIT);
  };
  child.stdout?.on("data", keep);
  child.stderr?.on("data", keep);
  child.once("exit", () => running.delete(child));
  return { child, output: () => out };
}

/** Resolves once 127.0.0.1:port accepts TCP and answers a driver `ping`; rejects if the child exits first. */
async function waitReady(launched: Launched, port: number): Promise<void> {
  const deadline = Date.now() + READY_TIMEOUT_MS;
  let lastError = "no attempt yet";
  const exited = (): boolean => launched.child.exitCode !== null || launched.child.signalCode !== null;
  for (;;) {
    if (exited()) {
      const status = launched.child.exitCode ?? launched.child.signalCode;
      throw new Error(`mongo-java-server exited (${String(status)}) before answering on 127.0.0.1:${port}; its output:\n${launched.output()}`);
    }
    if (await tcpConnects(port)) {
      try {
        await pings(port);
        return;
      } catch (error) {
        lastError = error instanceof Error ? error.message : String(error);
      }
    } else {
      lastError = "TCP connect refused";
    }
    if (Date.now() > deadline) {
      await stopChild(launched.child);
      throw new Error(`mongo-java-server did not answer ping on 127.0.0.1:${port} within ${READY_TIMEOUT_MS} ms (last: ${lastError}); its output:\n${launched.output()}`);
    }
    await new Promise((r) => setTimeout(r, 50));
  }
}

function external(uri: string, database: string): MongoWire {
  const unsupported = async (): Promise<void> => {
    throw new Error("outage tests need the harness's own server, not KEYGATE_TEST_MONGODB_URI");
  };
  return { uri: withDatabase(uri, database), kind: "external", stop: async () => undefined, restart: unsupported, pause: unsupported, start: unsupported };
}

/**
 * Starts mongo-java-server on a free port of 127.0.0.1 and waits for a driver ping, or uses
 * KEYGATE_TEST_MONGODB_URI (a real MongoDB; stop is a no-op) when it is set. Each call gets its
 * own database name. Resolves to null when the server is not installed (see mongoWireAvailable).
 * `jvmOptions` are added to the JVM's flags (the bench logs its GC pauses with them).
 */
export async function tryStartMongoWire(options: { jvmOptions?: readonly string[] } = {}): Promise<MongoWire | null> {
  const database = `keygate_test_${randomBytes(4).toString("hex")}`;
  const uri = externalUri();
  if (uri !== null) return external(uri, database);
  if (!launcherInstalled()) return null;
  const dir = mongoWireInstallDir();

  // The memory backend keeps no files; the fresh dir is its cwd and java.io.tmpdir.
  let dataDir: string | null = null;
  let current: Launched | null = null;
  let port = 0;

  const launch = async (): Promise<void> => {
    if (current !== null) return;
    if (dataDir === null) {
      dataDir = mkdtempSync(join(tmpdir(), "keygate-mongo-wire-"));
      tempDirs.add(dataDir);
    }
    const launched = launchJava(dir, dataDir, port, options.jvmOptions ?? []);
    await waitReady(launched, port);
    current = launched;
  };
  const halt = async (): Promise<void> => {
    const launched = current;
    current = null;
    if (launched !== null) await stopChild(launched.child);
  };

  // Another process may take the free port before Java binds it: try a fresh one.
  for (let attempt = 1; ; attempt++) {
    port = await freePort();
    try {
      await launch();
      break;
    } catch (error) {
      if (attempt >= START_ATTEMPTS) {
        if (dataDir !== null) {
          rmSync(dataDir, { recursive: true, force: true });
          tempDirs.delete(dataDir);
        }
        throw error;
      }
    }
  }

  return {
    uri: `mongodb://127.0.0.1:${port}/${database}`,
    kind: `mongo-java-server ${VERSION} (memory backend)`,
    async stop() {
      await halt();
      if (dataDir !== null) {
        rmSync(dataDir, { recursive: true, force: true });
        tempDirs.delete(dataDir);
        dataDir = null;
      }
    },
    pause: halt,
    start: launch,
    async restart() {
      await halt();
      await launch();
    },
  };
}

/** Like tryStartMongoWire, but a missing server is an error naming the install script. */
export async function startMongoWire(): Promise<MongoWire> {
  const server = await tryStartMongoWire();
  if (server === null) throw new Error(`mongo-java-server is not installed in ${mongoWireInstallDir()}; run .ci/install-mongo-wire.sh`);
  return server;
}
