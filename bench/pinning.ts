import { spawnSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { availableParallelism } from "node:os";

/**
 * Which core each side of a run gets. keygate and the no-ops run alone on the server core; the
 * load generators (ghz, rategen, h2load), the bench's own process and, by default, the backends
 * (redis-server and the MongoDB-wire server, which a deployment runs on other machines) get the
 * other core, so that none of them steals the server's CPU. `--backends-on server` puts the
 * backends on keygate's core instead, to see the whole served side on one core.
 */
export interface Pinning {
  /** The core servers run on; null when nothing is pinned. */
  server: number | null;
  /** The core ghz, rategen, h2load and the bench itself run on; null when nothing is pinned. */
  load: number | null;
  /** The core redis-server and the MongoDB-wire server run on; null when nothing is pinned. */
  backends: number | null;
  /** Niceness the load generators run at (below the bench's own, so its work cannot delay them), or null. */
  loadNice: number | null;
  /** How pinning was done, or why it was not. */
  note: string;
}

/** Where the backends (redis-server, the MongoDB-wire server) run: with keygate, or beside the load. */
export type BackendsCore = "server" | "load";

/** What a spawned process is, for pinning. */
export type Role = "server" | "load";

const SERVER_CPU = 0;
const LOAD_CPU = 1;

let current: Pinning = { server: null, load: null, backends: null, loadNice: null, note: "not configured" };
// Observed Cpus_allowed_list of every pinned process, by name, for the report.
const observed = new Map<string, string>();

// The bench shares the load core with the load generators; its own garbage collection and
// bookkeeping must not delay an open-loop generator's sends (rategen's lag column shows it when
// they do). Raising a process's priority takes root, so without it the generators run at the
// bench's.
const LOAD_NICE = -10;

function loadNice(): number | null {
  if (process.getuid?.() !== 0) return null;
  const result = spawnSync("nice", ["-n", String(LOAD_NICE), "true"], { stdio: "ignore" });
  return result.error === undefined && result.status === 0 ? LOAD_NICE : null;
}

function tasksetWorks(): boolean {
  const result = spawnSync("taskset", ["-c", String(SERVER_CPU), "true"], { stdio: "ignore" });
  return result.error === undefined && result.status === 0;
}

/**
 * Decides pinning once per run and moves the bench's own process onto the load core, so that the
 * orchestration (scrapes, result parsing) is never charged to the server's core. Without taskset,
 * or with fewer than 2 cores, nothing is pinned and the note says so.
 */
export function configurePinning(enabled: boolean, backendsOn: BackendsCore = "load"): Pinning {
  const cores = availableParallelism();
  const none = { server: null, load: null, backends: null, loadNice: null };
  if (!enabled) current = { ...none, note: "not pinned (--no-pin): servers and load generators share every core" };
  else if (cores < 2) current = { ...none, note: `not pinned: this machine has ${cores} core, so servers and load generators share it and CPU per Check includes contention` };
  else if (!tasksetWorks()) current = { ...none, note: "not pinned: taskset is missing or refused (Debian util-linux); servers and load generators share every core" };
  else {
    const backends = backendsOn === "load" ? LOAD_CPU : SERVER_CPU;
    const placement =
      backendsOn === "load"
        ? `keygate and the no-ops on CPU ${SERVER_CPU}; redis-server and MongoDB-wire, ghz, rategen, h2load and the bench itself on CPU ${LOAD_CPU}`
        : `servers (keygate, no-ops, redis-server, MongoDB-wire: --backends-on server) on CPU ${SERVER_CPU}; ghz, rategen, h2load and the bench itself on CPU ${LOAD_CPU}`;
    current = { server: SERVER_CPU, load: LOAD_CPU, backends, loadNice: loadNice(), note: `pinned with taskset: ${placement}` };
    pinPid(process.pid, LOAD_CPU, "bench");
  }
  if (current.loadNice !== null) current.note += `; load generators at nice ${current.loadNice}, ahead of the bench's own work on their core`;
  return current;
}

/** The run's pinning. */
export function pinning(): Pinning {
  return current;
}

/** `command args` wrapped in `taskset -c <core>` for its role; unchanged when not pinned. taskset execs, so the pid is the command's. */
export function pinnedCommand(role: Role | undefined, command: string, args: readonly string[]): { command: string; args: string[] } {
  const cpu = role === undefined ? null : role === "server" ? current.server : current.load;
  if (cpu === null) return { command, args: [...args] };
  const nice = role === "load" && current.loadNice !== null ? ["nice", "-n", String(current.loadNice)] : [];
  return { command: "taskset", args: ["-c", String(cpu), ...nice, command, ...args] };
}

/** Moves a running process and all its threads onto `cpu` (servers the test harness started). */
export function pinPid(pid: number, cpu: number, name: string): boolean {
  const result = spawnSync("taskset", ["-a", "-p", "-c", String(cpu), String(pid)], { stdio: "ignore" });
  const ok = result.error === undefined && result.status === 0;
  if (ok) recordAffinity(name, pid);
  return ok;
}

/** Moves a running backend (redis-server, the MongoDB-wire server) onto the backends' core, when pinning. */
export function pinBackendPid(pid: number, name: string): void {
  if (current.backends !== null) pinPid(pid, current.backends, name);
}

/** The kernel's view of where `pid` may run (Cpus_allowed_list), or "?" once it has exited. */
export function affinityOf(pid: number): string {
  try {
    const match = /^Cpus_allowed_list:\s*(\S+)/m.exec(readFileSync(`/proc/${pid}/status`, "utf8"));
    return match?.[1] ?? "?";
  } catch {
    return "?";
  }
}

/** Notes where a process was allowed to run, read from the kernel right after it started. */
export function recordAffinity(name: string, pid: number): void {
  // One entry per kind of process: "keygate embedded (cold saturation)" counts as "keygate embedded".
  const kind = name.split(" (")[0] ?? name;
  const cpus = affinityOf(pid);
  if (cpus !== "?") observed.set(kind, cpus);
}

/** Every recorded process kind with the CPUs it was allowed, e.g. { ghz: "1", "keygate embedded": "0" }. */
export function observedAffinity(): Record<string, string> {
  return Object.fromEntries(observed);
}
