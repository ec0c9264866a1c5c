import { spawn, spawnSync } from "node:child_process";
import type { ChildProcess } from "node:child_process";
import { existsSync } from "node:fs";
import { homedir } from "node:os";
import { join, resolve } from "node:path";
import { randomBytes } from "node:crypto";
import { freePort, waitForPort } from "./ports.js";

const VERSION = "1.46.0";

/** A running MongoDB-wire server for tests. */
export interface MongoWire {
  uri: string;
  kind: string;
  /** Kills the server (its in-memory data is gone). */
  stop(): Promise<void>;
  /** Stops and starts it again on the same port, empty: for outage and recovery tests. */
  restart(): Promise<void>;
  /** Stops it and leaves it stopped until `start()`. */
  pause(): Promise<void>;
  start(): Promise<void>;
}

function installDir(): string {
  return join(process.env["KEYGATE_CACHE_DIR"] ?? join(homedir(), ".cache", "keygate"), `mongo-java-server-${VERSION}`);
}

const installScript = resolve(import.meta.dirname, "../../.ci/install-mongo-wire.sh");

/**
 * True when an external URI is set or the server is installed. A missing server is installed
 * (and cached) by .ci/install-mongo-wire.sh on first use, when Java and Maven are present.
 */
export function mongoWireAvailable(): boolean {
  if (process.env["KEYGATE_TEST_MONGODB_URI"] !== undefined) return true;
  const launcher = join(installDir(), "classes", "MongoWireServer.class");
  if (existsSync(launcher)) return true;
  spawnSync("bash", [installScript], { stdio: "inherit" });
  return existsSync(launcher);
}

function stopChild(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => {
    const kill = setTimeout(() => child.kill("SIGKILL"), 5000);
    child.once("exit", () => {
      clearTimeout(kill);
      resolve();
    });
    child.kill("SIGTERM");
  });
}

/**
 * Starts mongo-java-server on a free port, or uses KEYGATE_TEST_MONGODB_URI (a real MongoDB)
 * when it is set. Each call gets its own database name.
 */
export async function startMongoWire(): Promise<MongoWire> {
  const database = `keygate_test_${randomBytes(4).toString("hex")}`;
  const external = process.env["KEYGATE_TEST_MONGODB_URI"];
  if (external !== undefined) {
    const url = new URL(external);
    url.pathname = `/${database}`;
    const unsupported = async (): Promise<void> => {
      throw new Error("outage tests need the harness's own server, not KEYGATE_TEST_MONGODB_URI");
    };
    return { uri: url.toString(), kind: "external", stop: async () => undefined, restart: unsupported, pause: unsupported, start: unsupported };
  }
  const dir = installDir();
  if (!existsSync(join(dir, "classes", "MongoWireServer.class"))) {
    throw new Error(`mongo-java-server is not installed in ${dir}; run .ci/install-mongo-wire.sh`);
  }
  const port = await freePort();
  let child: ChildProcess | null = null;
  let stderr = "";
  const launch = async (): Promise<void> => {
    stderr = "";
    const classpath = [join(dir, "classes"), join(dir, "lib", "*")].join(":");
    const started = spawn("java", ["-Xss512k", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-cp", classpath, "MongoWireServer", String(port)], {
      stdio: ["ignore", "ignore", "pipe"],
    });
    started.stderr?.on("data", (chunk: Buffer) => (stderr += chunk.toString()));
    child = started;
    await waitForPort(port, 30_000, () => stderr);
  };
  const halt = async (): Promise<void> => {
    if (child !== null) await stopChild(child);
    child = null;
  };
  await launch();
  return {
    uri: `mongodb://127.0.0.1:${port}/${database}`,
    kind: `mongo-java-server ${VERSION}`,
    stop: halt,
    pause: halt,
    start: launch,
    async restart() {
      await halt();
      await launch();
    },
  };
}
