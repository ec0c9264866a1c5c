import { mkdtempSync, readFileSync, readdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { lowerGcThreadPriority } from "../../src/server/gc-threads.js";
import { embeddedEnv, spawnKeygate } from "../harness/process.js";
import type { KeygateProcess } from "../harness/process.js";

/** V8's worker threads as Linux names them: V8Worker on Node 24, node-V8Worker on Node 26. */
const V8_WORKER = /^(node-)?V8Worker$/;

// keygate sets V8's worker threads (GC marking, sweeping, compaction) to KEYGATE_GC_THREAD_NICE
// at start (default 0: left as they are), and nothing else: the event loop's thread keeps the
// process's priority.
// Nice values are per thread on Linux only, where this is checked from /proc.

const linux = process.platform === "linux";
if (!linux) console.warn(`gc-threads: SKIPPED, per-thread nice values are Linux's (this is ${process.platform})`);

/** Each thread of `pid`: its name and nice value (field 19 of /proc/<pid>/task/<tid>/stat). */
function threads(pid: number): Array<{ tid: number; name: string; nice: number }> {
  const found: Array<{ tid: number; name: string; nice: number }> = [];
  for (const tid of readdirSync(`/proc/${pid}/task`)) {
    const stat = readFileSync(`/proc/${pid}/task/${tid}/stat`, "utf8");
    // The name is in parentheses and may hold spaces; the fields after it start at field 3 (state).
    const name = stat.slice(stat.indexOf("(") + 1, stat.lastIndexOf(")"));
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    found.push({ tid: Number(tid), name, nice: Number(fields[19 - 3]) });
  }
  return found;
}

/** The nice value this test runs at, which a keygate it starts inherits. */
function ownNice(): number {
  return threads(process.pid).find((t) => t.tid === process.pid)?.nice ?? 0;
}

const running: KeygateProcess[] = [];
const dirs: string[] = [];
afterAll(async () => {
  await Promise.all(running.map((p) => p.stop("SIGKILL")));
  for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
});

async function start(extra: Record<string, string>): Promise<KeygateProcess> {
  const dataDir = mkdtempSync(join(tmpdir(), "keygate-gc-threads-"));
  dirs.push(dataDir);
  const started = await spawnKeygate({ cwd: dataDir, env: embeddedEnv({ dataDir, adminToken: "gc-threads-admin-token-0123456789abcdef", extra }) });
  running.push(started);
  return started;
}

describe.runIf(linux)("V8's GC threads at a lower priority", () => {
  it("sets every V8Worker thread to KEYGATE_GC_THREAD_NICE=19 and leaves the event loop's thread as it was", async () => {
    const keygate = await start({ KEYGATE_GC_THREAD_NICE: "19" });
    const pid = keygate.child.pid as number;
    const all = threads(pid);
    const workers = all.filter((t) => V8_WORKER.test(t.name));
    expect(workers.length).toBeGreaterThan(0);
    expect(workers.map((t) => t.nice)).toStrictEqual(workers.map(() => 19));
    expect(all.find((t) => t.tid === pid)?.nice).toBe(ownNice());
    await keygate.stop();
  });

  it("uses any value from 0 to 19, and leaves the threads as they are by default and at 0", async () => {
    // A value above the inherited one: raising a nice value needs no privilege.
    const chosen = Math.min(19, ownNice() + 7);
    const seven = await start({ KEYGATE_GC_THREAD_NICE: String(chosen) });
    const sevenWorkers = threads(seven.child.pid as number).filter((t) => V8_WORKER.test(t.name));
    expect(sevenWorkers.length).toBeGreaterThan(0);
    expect(sevenWorkers.map((t) => t.nice)).toStrictEqual(sevenWorkers.map(() => chosen));
    await seven.stop();

    const unset: Record<string, string> = {};
    for (const env of [unset, { KEYGATE_GC_THREAD_NICE: "0" }]) {
      const left = await start(env);
      const leftWorkers = threads(left.child.pid as number).filter((t) => V8_WORKER.test(t.name));
      expect(leftWorkers.length).toBeGreaterThan(0);
      expect(leftWorkers.map((t) => t.nice)).toStrictEqual(leftWorkers.map(() => ownNice()));
      await left.stop();
    }
  });

  it("changes nothing off Linux or at 0, and counts the threads it set", () => {
    expect(lowerGcThreadPriority(19, "darwin")).toStrictEqual({ nice: 19, threads: 0, error: null });
    expect(lowerGcThreadPriority(0)).toStrictEqual({ nice: 0, threads: 0, error: null });
  });
});
