import { spawn, spawnSync } from "node:child_process";
import type { ChildProcess } from "node:child_process";
import { readdirSync, readFileSync, writeFileSync } from "node:fs";
import { z } from "zod";
import { pinnedCommand, recordAffinity } from "./pinning.js";
import type { Role } from "./pinning.js";

const OUTPUT_LIMIT = 64 * 1024;
const KILL_AFTER_MS = 5000;

// Every child this run starts; all are killed if the run dies, so nothing outlives it.
const running = new Set<ChildProcess>();
process.once("exit", () => {
  for (const child of running) child.kill("SIGKILL");
});

/** On SIGINT/SIGTERM: kill every child started by this run, then exit. */
export function installSignalCleanup(): void {
  const die = (signal: NodeJS.Signals): void => {
    process.stderr.write(`\nbench: ${signal}, stopping every child process\n`);
    for (const child of running) child.kill("SIGKILL");
    process.exit(130);
  };
  process.once("SIGINT", die);
  process.once("SIGTERM", die);
}

/** A child process started by the bench, with the tail of its output kept for error messages. */
export interface TrackedChild {
  readonly name: string;
  readonly pid: number;
  readonly child: ChildProcess;
  stdout(): string;
  output(): string;
  readonly exit: Promise<number | null>;
  /** Sends `signal` (SIGKILL after 5 s) and resolves with the exit code once it has exited. */
  stop(signal?: NodeJS.Signals): Promise<number | null>;
}

/**
 * Spawns a tracked child on 127.0.0.1-only services; env replaces the inherited KEYGATE_* variables.
 * A role pins it to the server or load core (bench/pinning.ts) when the run pins.
 */
export function spawnTracked(name: string, command: string, args: readonly string[], options: { cwd: string; env: Record<string, string>; role?: Role }): TrackedChild {
  const env: NodeJS.ProcessEnv = {};
  for (const [key, value] of Object.entries(process.env)) if (!key.startsWith("KEYGATE_")) env[key] = value;
  Object.assign(env, options.env);
  const pinned = pinnedCommand(options.role, command, args);
  const child = spawn(pinned.command, pinned.args, { cwd: options.cwd, env, stdio: ["ignore", "pipe", "pipe"] });
  const pid = child.pid;
  if (pid === undefined) throw new Error(`${name}: could not start ${command}`);
  // Read a moment later: until taskset has set the affinity and exec'd, the child has the bench's.
  if (options.role !== undefined) setTimeout(() => recordAffinity(name, pid), 200).unref();
  running.add(child);
  let stdout = "";
  let all = "";
  child.stdout?.on("data", (chunk: Buffer) => {
    stdout = (stdout + chunk.toString()).slice(-OUTPUT_LIMIT);
    all = (all + chunk.toString()).slice(-OUTPUT_LIMIT);
  });
  child.stderr?.on("data", (chunk: Buffer) => {
    all = (all + chunk.toString()).slice(-OUTPUT_LIMIT);
  });
  const exit = new Promise<number | null>((done) => {
    child.once("exit", (code) => {
      running.delete(child);
      done(code);
    });
  });
  return {
    name,
    pid,
    child,
    stdout: () => stdout,
    output: () => all,
    exit,
    stop(signal = "SIGTERM") {
      if (child.exitCode !== null || child.signalCode !== null) return exit;
      const kill = setTimeout(() => child.kill("SIGKILL"), KILL_AFTER_MS);
      void exit.then(() => clearTimeout(kill));
      child.kill(signal);
      return exit;
    },
  };
}

/** Waits for the first stdout JSON line that `schema` accepts. Rejects if the child exits first. */
export function waitForJsonLine<T>(tracked: TrackedChild, schema: z.ZodType<T>, timeoutMs: number): Promise<T> {
  return new Promise((resolve, reject) => {
    let settled = false;
    const finish = (action: () => void): void => {
      if (settled) return;
      settled = true;
      clearInterval(poll);
      clearTimeout(timer);
      action();
    };
    const poll = setInterval(() => {
      for (const line of tracked.stdout().split("\n")) {
        const parsed = schema.safeParse(parseJson(line));
        if (parsed.success) finish(() => resolve(parsed.data));
      }
    }, 20);
    const timer = setTimeout(() => finish(() => reject(new Error(`${tracked.name} did not start within ${timeoutMs} ms:\n${tracked.output()}`))), timeoutMs);
    void tracked.exit.then((code) => finish(() => reject(new Error(`${tracked.name} exited with ${String(code)} before it was ready:\n${tracked.output()}`))));
  });
}

function parseJson(line: string): unknown {
  if (!line.startsWith("{")) return null;
  try {
    return JSON.parse(line);
  } catch {
    return null;
  }
}

const clockTicksPerSecond = readClockTicks();

function readClockTicks(): number {
  const result = spawnSync("getconf", ["CLK_TCK"], { encoding: "utf8" });
  const ticks = Number.parseInt(result.stdout ?? "", 10);
  return Number.isFinite(ticks) && ticks > 0 ? ticks : 100;
}

/** User plus system CPU seconds the process has used so far, from /proc/<pid>/stat. */
export function cpuSeconds(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
  // comm (field 2) may contain spaces, so fields are counted from after its closing parenthesis.
  const rest = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  const utime = Number(rest[11]);
  const stime = Number(rest[12]);
  if (!Number.isFinite(utime) || !Number.isFinite(stime)) throw new Error(`cannot read CPU times of pid ${pid}`);
  return (utime + stime) / clockTicksPerSecond;
}

/** Current and peak resident set size in bytes, from /proc/<pid>/status. */
export function memoryOf(pid: number): { rssBytes: number; peakRssBytes: number } {
  const status = readFileSync(`/proc/${pid}/status`, "utf8");
  const kib = (field: string): number => {
    const match = new RegExp(`^${field}:\\s+(\\d+) kB`, "m").exec(status);
    return match?.[1] === undefined ? 0 : Number(match[1]) * 1024;
  };
  return { rssBytes: kib("VmRSS"), peakRssBytes: kib("VmHWM") };
}

/**
 * Resets the process's peak RSS (VmHWM) to its current RSS, so the next reading is the peak of
 * one scenario rather than of the process's life. False where the kernel does not allow it.
 */
export function resetPeakRss(pid: number): boolean {
  try {
    writeFileSync(`/proc/${pid}/clear_refs`, "5");
    return true;
  } catch {
    return false;
  }
}

/** One process's CPU and memory over an interval. */
export interface ResourceUse {
  cpuSeconds: number;
  /** CPU seconds over wall seconds: 1.0 is one core fully busy. */
  cpuCores: number;
  rssBytes: number;
  peakRssBytes: number;
  /** False when the peak could not be reset: then it is the peak of the process's whole life. */
  peakIsPerScenario: boolean;
}

/** Starts measuring a process; the returned function ends the interval. */
export function measureResources(pid: number): () => ResourceUse {
  const peakIsPerScenario = resetPeakRss(pid);
  const cpuBefore = cpuSeconds(pid);
  const startedAt = performance.now();
  return () => {
    const cpu = cpuSeconds(pid) - cpuBefore;
    const wallSeconds = (performance.now() - startedAt) / 1000;
    const memory = memoryOf(pid);
    return { cpuSeconds: round(cpu, 2), cpuCores: round(wallSeconds > 0 ? cpu / wallSeconds : 0, 2), ...memory, peakIsPerScenario };
  };
}

/** Rounds to `digits` decimals. */
export function round(value: number, digits: number): number {
  const factor = 10 ** digits;
  return Math.round(value * factor) / factor;
}

/** Children of this process whose command line contains `match` (servers the test harness started). */
export function childPids(match: string): number[] {
  const out: number[] = [];
  for (const entry of readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const stat = readFileSync(`/proc/${entry}/stat`, "utf8");
      const ppid = Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]);
      if (ppid !== process.pid) continue;
      if (readFileSync(`/proc/${entry}/cmdline`, "utf8").includes(match)) out.push(Number(entry));
    } catch {
      // The process ended while the list was read.
    }
  }
  return out;
}
