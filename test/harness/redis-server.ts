import { spawn, spawnSync } from "node:child_process";
import type { ChildProcess } from "node:child_process";
import { freePort, waitForPort } from "./ports.js";

/** A redis-server for tests, on a free port of 127.0.0.1. */
export interface RedisServer {
  url: string;
  port: number;
  stop(): Promise<void>;
  /** Starts it again on the same port (empty: no persistence), after `stop()`. */
  start(): Promise<void>;
}

/** True when redis-server is on PATH or KEYGATE_TEST_REDIS_URL is set. */
export function redisAvailable(): boolean {
  if (process.env["KEYGATE_TEST_REDIS_URL"] !== undefined) return true;
  return spawnSync("redis-server", ["--version"], { stdio: "ignore" }).status === 0;
}

/** Starts redis-server with persistence off, or uses KEYGATE_TEST_REDIS_URL when set. */
export async function startRedis(): Promise<RedisServer> {
  const external = process.env["KEYGATE_TEST_REDIS_URL"];
  if (external !== undefined) {
    const unsupported = async (): Promise<void> => {
      throw new Error("outage tests need the harness's own redis-server, not KEYGATE_TEST_REDIS_URL");
    };
    return { url: external, port: Number(new URL(external).port || 6379), stop: unsupported, start: unsupported };
  }
  const port = await freePort();
  let child: ChildProcess | null = null;
  let stderr = "";
  const start = async (): Promise<void> => {
    const started = spawn("redis-server", ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--loglevel", "warning"], {
      stdio: ["ignore", "ignore", "pipe"],
    });
    started.stderr?.on("data", (chunk: Buffer) => (stderr += chunk.toString()));
    child = started;
    await waitForPort(port, 10_000, () => stderr);
  };
  const stop = async (): Promise<void> => {
    const running = child;
    child = null;
    if (running === null || running.exitCode !== null || running.signalCode !== null) return;
    await new Promise<void>((resolve) => {
      const kill = setTimeout(() => running.kill("SIGKILL"), 3000);
      running.once("exit", () => {
        clearTimeout(kill);
        resolve();
      });
      running.kill("SIGKILL");
    });
  };
  await start();
  return { url: `redis://127.0.0.1:${port}`, port, stop, start };
}
