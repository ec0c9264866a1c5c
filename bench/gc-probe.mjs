// Bench-only preload for the memory scenario: `node --expose-gc --import <this file> …`.
// On SIGUSR2 it runs full garbage collections, then a memory-reducing one, and writes
// process.memoryUsage() after each as JSON to the file named by BENCH_GC_REPORT (written to a temporary name and renamed, so a reader never sees
// half a file), with the resident memory of /proc/self/smaps summed by mapping (the largest
// first), so a report says whether RSS is malloc's heap, anonymous maps or mapped files. Plain
// JavaScript because keygate runs from dist/ under plain node. It is never loaded by keygate itself.
import { readFileSync, renameSync, writeFileSync } from "node:fs";
import { getHeapSpaceStatistics } from "node:v8";

const report = process.env.BENCH_GC_REPORT;
if (typeof globalThis.gc !== "function" || report === undefined) {
  throw new Error("bench/gc-probe.mjs needs --expose-gc and BENCH_GC_REPORT");
}
const gc = globalThis.gc;

/** Resident kB by mapping name ("[anon]" for unnamed maps), largest first; null off Linux. */
function residentByMapping() {
  let text;
  try {
    text = readFileSync("/proc/self/smaps", "utf8");
  } catch {
    return null;
  }
  const totals = new Map();
  let name = "[anon]";
  for (const line of text.split("\n")) {
    const header = /^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ \S+\s*(.*)$/.exec(line);
    if (header !== null) {
      name = header[1] === "" ? "[anon]" : header[1];
      continue;
    }
    const rss = /^Rss:\s+(\d+) kB/.exec(line);
    if (rss !== null) totals.set(name, (totals.get(name) ?? 0) + Number(rss[1]));
  }
  return [...totals.entries()]
    .filter(([, kb]) => kb >= 1024)
    .sort((a, b) => b[1] - a[1])
    .map(([mapping, kb]) => ({ mapping, kb }));
}

/** process.memoryUsage() with the resident memory by mapping and V8's spaces. */
function snapshot() {
  const heapSpaces = getHeapSpaceStatistics().map((s) => ({ space: s.space_name, size: s.space_size, used: s.space_used_size, physical: s.physical_space_size }));
  return { ...process.memoryUsage(), residentByMapping: residentByMapping(), heapSpaces };
}

/** Resident bytes now (/proc/self/statm's second field), or null off Linux. */
function residentBytes() {
  try {
    return Number(readFileSync("/proc/self/statm", "utf8").split(" ")[1]) * 4096;
  } catch {
    return null;
  }
}

const SETTLE_POLL_MS = 50;
const SETTLE_MAX_POLLS = 40;

/**
 * Waits, with the event loop idle, until resident memory stops falling (two polls alike, at most
 * SETTLE_MAX_POLLS): V8 returns freed pages to the system from its worker threads, which keygate
 * can run at a low priority (KEYGATE_GC_THREAD_NICE), so a reading taken the moment a collection
 * ends can still count pages already given up.
 */
async function settled() {
  let last = residentBytes();
  for (let i = 0; i < SETTLE_MAX_POLLS && last !== null; i++) {
    await new Promise((resolve) => setTimeout(resolve, SETTLE_POLL_MS));
    const now = residentBytes();
    if (now === last) return;
    last = now;
  }
}

process.on("SIGUSR2", () => {
  void (async () => {
    // Twice: the first collection can leave objects that finalizers or weak callbacks free for the second.
    gc();
    gc();
    await settled();
    const regular = snapshot();
    // Then a memory-reducing collection (V8's last resort, as on a low-memory notification): it
    // compacts the old generation, shrinks the young one and returns pooled pages to the system,
    // so what stays resident is what the live data needs. A plain full GC keeps those pages for
    // the next allocations.
    gc({ type: "major", execution: "sync", flavor: "last-resort" });
    await settled();
    writeFileSync(`${report}.tmp`, JSON.stringify({ ...regular, at: Date.now(), reduced: snapshot() }));
    renameSync(`${report}.tmp`, report);
  })();
});
