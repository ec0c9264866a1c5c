// Bench-only preload for the memory scenario: `node --expose-gc --import <this file> …`.
// On SIGUSR2 it runs full garbage collections and writes process.memoryUsage() as JSON to the
// file named by BENCH_GC_REPORT (written to a temporary name and renamed, so a reader never sees
// half a file). Plain JavaScript because keygate runs from dist/ under plain node. It is never
// loaded by keygate itself.
import { renameSync, writeFileSync } from "node:fs";

const report = process.env.BENCH_GC_REPORT;
if (typeof globalThis.gc !== "function" || report === undefined) {
  throw new Error("bench/gc-probe.mjs needs --expose-gc and BENCH_GC_REPORT");
}
const gc = globalThis.gc;

process.on("SIGUSR2", () => {
  // Twice: the first collection can leave objects that finalizers or weak callbacks free for the second.
  gc();
  gc();
  const usage = process.memoryUsage();
  writeFileSync(`${report}.tmp`, JSON.stringify({ ...usage, at: Date.now() }));
  renameSync(`${report}.tmp`, report);
});
