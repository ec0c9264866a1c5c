import { spawn } from "node:child_process";
import type { ChildProcess } from "node:child_process";
import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll } from "vitest";
import { z } from "zod";
import { builtCli } from "./built-cli.js";

/** Node arguments that run `keygate serve` as `npm start` does, from dist/ (which must be built from the current src/). */
export function serveArgs(): string[] {
  return [builtCli(), "serve"];
}

/** A keygate started as its own process, the way `keygate serve` runs in production. */
export interface KeygateProcess {
  child: ChildProcess;
  ports: { grpc: number; http: number; admin: number };
  stdout(): string;
  stderr(): string;
  exit: Promise<number | null>;
  /** Sends the signal and resolves with the exit code. */
  stop(signal?: NodeJS.Signals): Promise<number | null>;
}

const listeningLine = z.object({ msg: z.literal("keygate listening"), grpcPort: z.number(), httpPort: z.number(), adminPort: z.number() });

function readPorts(line: string): { grpc: number; http: number; admin: number } | null {
  let json: unknown;
  try {
    json = JSON.parse(line);
  } catch {
    return null;
  }
  const parsed = listeningLine.safeParse(json);
  return parsed.success ? { grpc: parsed.data.grpcPort, http: parsed.data.httpPort, admin: parsed.data.adminPort } : null;
}

/** The ports of the first "keygate listening" line in a process's stdout so far, or null. */
export function listeningPorts(stdout: string): { grpc: number; http: number; admin: number } | null {
  for (const line of stdout.split("\n")) {
    if (!line.startsWith("{")) continue;
    const ports = readPorts(line);
    if (ports !== null) return ports;
  }
  return null;
}

/** Every listener on 127.0.0.1, on ports the system picks (the process prints them). */
const LOOPBACK_LISTENERS: Readonly<Record<string, string>> = {
  KEYGATE_HOST: "127.0.0.1",
  KEYGATE_GRPC_PORT: "0",
  KEYGATE_HTTP_AUTHZ_PORT: "0",
  KEYGATE_ADMIN_PORT: "0",
};

/**
 * The environment of a keygate on the embedded store in `dataDir`, listening on loopback ports
 * the system picks; `policyFile` when given, then `extra`, which may override any of it.
 */
export function embeddedEnv(options: { dataDir: string; adminToken: string; policyFile?: string; extra?: Record<string, string> }): Record<string, string> {
  return {
    KEYGATE_DATA_DIR: options.dataDir,
    ...(options.policyFile === undefined ? {} : { KEYGATE_CONFIG: options.policyFile }),
    KEYGATE_ADMIN_TOKENS: options.adminToken,
    ...LOOPBACK_LISTENERS,
    ...options.extra,
  };
}

/**
 * The environment of a `keygate serve` on MongoDB and Redis that tests start as a replica:
 * listeners on 127.0.0.1 port 0, the harness's admin token, info logs (the ports line). `extra`
 * adds or overrides variables.
 */
export function sharedBackendEnv(options: { mongoUri: string; redisUrl: string; pepper: string; policyFile: string; adminToken: string; extra?: Record<string, string> }): Record<string, string> {
  return {
    KEYGATE_MONGODB_URI: options.mongoUri,
    KEYGATE_REDIS_URL: options.redisUrl,
    KEYGATE_PEPPER: options.pepper,
    KEYGATE_ADMIN_TOKENS: options.adminToken,
    KEYGATE_CONFIG: options.policyFile,
    ...LOOPBACK_LISTENERS,
    KEYGATE_LOG_LEVEL: "info",
    ...options.extra,
  };
}

/** What a `keygate serve` that exited by itself printed, and its exit code. */
export interface ExitedServe {
  code: number | null;
  stdout: string;
  stderr: string;
}

/**
 * Runs `keygate serve` in `cwd` with exactly `env` for its KEYGATE_* variables (inherited ones are
 * dropped) and waits for it to exit by itself. The child is in `running` until then, for the
 * suite's afterAll to kill one that never exits.
 */
export function serveUntilExit(cwd: string, env: Record<string, string>, running: Set<ChildProcess>): Promise<ExitedServe> {
  const childEnv: NodeJS.ProcessEnv = {};
  for (const [name, value] of Object.entries(process.env)) if (!name.startsWith("KEYGATE_")) childEnv[name] = value;
  Object.assign(childEnv, env);
  const child = spawn(process.execPath, serveArgs(), { cwd, env: childEnv, stdio: ["ignore", "pipe", "pipe"] });
  running.add(child);
  let stdout = "";
  let stderr = "";
  child.stdout.on("data", (chunk: Buffer) => (stdout += chunk.toString()));
  child.stderr.on("data", (chunk: Buffer) => (stderr += chunk.toString()));
  return new Promise((done) =>
    child.on("close", (code) => {
      running.delete(child);
      done({ code, stdout, stderr });
    }),
  );
}

/** The log line of a promise rejected with no handler: keygate keeps serving, and a test fails on it. */
const UNHANDLED_REJECTION = '"msg":"unhandled promise rejection"';

/**
 * Spawns `keygate serve` with exactly `env` for its KEYGATE_* variables (inherited ones are
 * dropped) and waits for its "keygate listening" line. `args` (node's arguments) runs another
 * build, such as an earlier release's `dist/cli.js serve`. `stop()` fails when the process
 * logged an unhandled promise rejection (a defect keygate survives), unless
 * `allowUnhandledRejections` is set.
 */
export function spawnKeygate(options: { cwd: string; env: Record<string, string>; args?: readonly string[]; allowUnhandledRejections?: boolean }): Promise<KeygateProcess> {
  const env: NodeJS.ProcessEnv = {};
  for (const [name, value] of Object.entries(process.env)) if (!name.startsWith("KEYGATE_")) env[name] = value;
  // Test machines are shared and loaded: a budget as short as production's would turn a slow
  // test run into UNAVAILABLE answers. Tests of the budget set their own.
  env["KEYGATE_CHECK_BUDGET_MS"] = "5000";
  Object.assign(env, options.env);
  const child = spawn(process.execPath, [...(options.args ?? serveArgs())], { cwd: options.cwd, env, stdio: ["ignore", "pipe", "pipe"] });
  let out = "";
  let err = "";
  child.stdout?.on("data", (chunk: Buffer) => (out += chunk.toString()));
  child.stderr?.on("data", (chunk: Buffer) => (err += chunk.toString()));
  const exit = new Promise<number | null>((done) => child.on("exit", (code) => done(code)));
  return new Promise((ready, fail) => {
    const timer = setTimeout(() => fail(new Error(`keygate did not start within 30 s:\n${out}\n${err}`)), 30_000);
    const poll = setInterval(() => {
      for (const line of out.split("\n")) {
        const ports = readPorts(line);
        if (ports === null) continue;
        clearInterval(poll);
        clearTimeout(timer);
        ready({
          child,
          ports,
          stdout: () => out,
          stderr: () => err,
          exit,
          async stop(signal = "SIGTERM") {
            if (child.exitCode === null && child.signalCode === null) child.kill(signal);
            const code = await exit;
            const rejection = out.split("\n").find((line) => line.includes(UNHANDLED_REJECTION));
            if (rejection !== undefined && options.allowUnhandledRejections !== true) throw new Error(`keygate logged an unhandled promise rejection:\n${rejection}`);
            return code;
          },
        });
        return;
      }
    }, 25);
    void exit.then((code) => {
      clearInterval(poll);
      clearTimeout(timer);
      fail(new Error(`keygate exited with ${code}:\n${out}\n${err}`));
    });
  });
}

/** What a suite's spawned keygates leave behind until its afterAll. */
export interface SpawnedKeygates {
  /** Started keygates: the suite pushes each one, and its afterAll kills them (SIGKILL). */
  running: KeygateProcess[];
  /** For serveUntilExit: the children still running when the suite's afterAll kills them. */
  children: Set<ChildProcess>;
  /** A fresh directory; the suite's afterAll removes it. */
  tempDir(): string;
  /** A fresh directory with an empty, owner-only data directory in it; the suite's afterAll removes it. */
  tempDataDir(): { dir: string; dataDir: string };
  /**
   * How a start ended: its exit code and last line (stderr's, for a refused start), or "served"
   * when keygate started (stopped again at once), so a test of a start that must be refused
   * fails rather than waits when keygate serves instead.
   */
  startOutcome(cwd: string, env: Record<string, string>): Promise<StartOutcome>;
}

/** See SpawnedKeygates.startOutcome. */
export interface StartOutcome {
  code: number | "served";
  lastLine: string;
  output: string;
}

/** Registers the calling suite's afterAll that kills every keygate it spawns and removes every directory it makes (named from `tempPrefix`). */
export function spawnedKeygates(tempPrefix: string): SpawnedKeygates {
  const running: KeygateProcess[] = [];
  const children = new Set<ChildProcess>();
  const dirs: string[] = [];
  afterAll(async () => {
    for (const child of children) child.kill("SIGKILL");
    await Promise.all(running.map((p) => p.stop("SIGKILL").catch(() => null)));
    for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
  });
  const tempDir = (): string => {
    const dir = mkdtempSync(join(tmpdir(), tempPrefix));
    dirs.push(dir);
    return dir;
  };
  return {
    running,
    children,
    tempDir,
    tempDataDir() {
      const dir = tempDir();
      const dataDir = join(dir, "data");
      mkdirSync(dataDir, { mode: 0o700 });
      return { dir, dataDir };
    },
    async startOutcome(cwd, env) {
      try {
        const keygate = await spawnKeygate({ cwd, env });
        running.push(keygate);
        await keygate.stop("SIGTERM");
        return { code: "served", lastLine: "", output: keygate.stdout() + keygate.stderr() };
      } catch (error) {
        const exited = /^Error: keygate exited with (\d+):\n([\s\S]*)$/.exec(String(error));
        if (exited === null) throw error;
        const output = exited[2] ?? "";
        return { code: Number(exited[1]), lastLine: output.trimEnd().split("\n").at(-1) ?? "", output };
      }
    },
  };
}
