import { readFileSync, readdirSync } from "node:fs";
import { setPriority } from "node:os";

/**
 * KEYGATE_GC_THREAD_NICE's default: the threads keep the process's priority. At 19 they cost CPU
 * where the GC works hardest, and some processes settled where young-generation GCs promoted
 * far more (docs/performance-log.md, "V8's GC threads take turns with the event loop").
 */
export const DEFAULT_GC_THREAD_NICE = 0;

/** The highest nice value, Linux's lowest priority: KEYGATE_GC_THREAD_NICE runs from 0 to this. */
export const MAX_GC_THREAD_NICE = 19;

/**
 * The names Linux shows for V8's worker threads (/proc/<pid>/task/<tid>/comm): Node 24 names them
 * V8Worker, Node 26 prefixes every thread of its own with "node-".
 */
const V8_WORKER_NAMES: ReadonlySet<string> = new Set(["V8Worker", "node-V8Worker"]);

/** What lowerGcThreadPriority did: the threads it set, and the first refusal, if any. */
export interface GcThreadPriority {
  nice: number;
  threads: number;
  error: string | null;
}

/**
 * Sets the nice value of V8's worker threads, which mark, sweep and compact the heap beside the
 * event loop. On a core of their own that is free work; on a core they share with the event loop
 * (a pod held to one CPU, a process pinned to one core) each is one more thread the scheduler
 * takes turns with, and every Check that arrives meanwhile waits for its turn to end: at 3,000
 * Checks/s on one key and one pinned core, p99 was 56-61 ms in four 8-second runs of fresh
 * processes of five, and 2.2-6.8 ms in 21 of 22 with the threads at nice 19
 * (docs/performance-log.md). At a low priority they run when the event loop leaves the core idle, and V8 does
 * what they have not done on the event loop, in small steps.
 *
 * Linux keeps a nice value per thread, so setpriority(2) on a thread id sets that thread alone;
 * elsewhere, and with `nice` 0, nothing is changed. A thread that refuses (a sandbox that forbids
 * setpriority) leaves the others as they are set and is reported, not thrown: keygate serves
 * either way.
 */
export function lowerGcThreadPriority(nice: number, platform: NodeJS.Platform = process.platform): GcThreadPriority {
  const result: GcThreadPriority = { nice, threads: 0, error: null };
  if (platform !== "linux" || nice === 0) return result;
  let tids: string[];
  try {
    tids = readdirSync("/proc/self/task");
  } catch (error) {
    result.error = `cannot list /proc/self/task: ${describe(error)}`;
    return result;
  }
  for (const tid of tids) {
    let name: string;
    try {
      name = readFileSync(`/proc/self/task/${tid}/comm`, "utf8").trim();
    } catch {
      // The thread ended after the listing.
      continue;
    }
    if (!V8_WORKER_NAMES.has(name)) continue;
    try {
      setPriority(Number(tid), nice);
      result.threads += 1;
    } catch (error) {
      result.error ??= `setpriority(${tid}, ${nice}): ${describe(error)}`;
    }
  }
  return result;
}

const WHOLE_DECIMAL = /^[0-9]+$/;

/**
 * KEYGATE_GC_THREAD_NICE as `keygate serve` reads it before its modules load, ahead of the
 * configuration: a value the configuration will refuse (it names the problem and keygate exits)
 * changes nothing here.
 */
export function gcThreadNiceFromEnv(env: NodeJS.ProcessEnv): number {
  const raw = env["KEYGATE_GC_THREAD_NICE"]?.trim();
  // Decimal digits only, as the configuration reads it: Number() takes "0x10" and "1e1" too.
  if (raw === undefined || !WHOLE_DECIMAL.test(raw)) return DEFAULT_GC_THREAD_NICE;
  const nice = Number(raw);
  return nice <= MAX_GC_THREAD_NICE ? nice : DEFAULT_GC_THREAD_NICE;
}

function describe(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}
