import { existsSync, readFileSync, rmSync, statSync } from "node:fs";
import { join, resolve } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { pathToFileURL } from "node:url";
import { z } from "zod";
import { SqliteKeyStore } from "../src/store/sqlite.js";
import type { DataFile } from "./data.js";
import { pass } from "./measure.js";
import type { LoadSettings } from "./measure.js";
import { gauge, scrape } from "./metrics.js";
import { BENCH_CACHE } from "./policy.js";
import { memoryOf } from "./processes.js";
import { seedFiller, sqliteImportWriter } from "./seed.js";
import type { SeedTiming } from "./seed.js";
import type { Target } from "./targets.js";

const root = resolve(import.meta.dirname, "..");
// The bench-only preload that runs gc() on SIGUSR2 and writes process.memoryUsage().
const GC_PROBE = pathToFileURL(join(root, "bench/gc-probe.mjs")).href;
const GC_REPORT_TIMEOUT_MS = 30_000;

const snapshotSchema = z.object({
  rss: z.number(),
  heapTotal: z.number(),
  heapUsed: z.number(),
  external: z.number(),
  arrayBuffers: z.number(),
  /** Resident kB by mapping, largest first (Linux only). */
  residentByMapping: z.array(z.object({ mapping: z.string(), kb: z.number() })).nullable().optional(),
  /** v8.getHeapSpaceStatistics(): what each V8 space holds and has committed. */
  heapSpaces: z.array(z.object({ space: z.string(), size: z.number(), used: z.number(), physical: z.number() })).optional(),
});
const usageSchema = snapshotSchema.extend({
  /** The same after a memory-reducing GC (V8's last resort): free pages returned to the system. */
  reduced: snapshotSchema,
});

/** process.memoryUsage() of keygate right after forced full GCs. */
export type MemoryAfterGc = z.infer<typeof usageSchema>;

/** Asks the probe in `pid` for a GC and its memory, and waits for the report file. */
async function afterGc(pid: number, reportPath: string): Promise<MemoryAfterGc> {
  rmSync(reportPath, { force: true });
  process.kill(pid, "SIGUSR2");
  const deadline = performance.now() + GC_REPORT_TIMEOUT_MS;
  while (performance.now() < deadline) {
    if (existsSync(reportPath)) return usageSchema.parse(JSON.parse(readFileSync(reportPath, "utf8")));
    await sleep(50);
  }
  throw new Error(`keygate wrote no memory report to ${reportPath} within ${GC_REPORT_TIMEOUT_MS} ms of SIGUSR2`);
}

/** How long the write-behind may take to write what the touch left (100,000 keys' rows). */
const DRAIN_TIMEOUT_MS = 120_000;

/** Waits until keygate's write-behind has nothing left to write: what there was, and how long it took. */
async function drainWriteBehind(adminPort: number): Promise<{ pendingAfterTouch: number; drainSeconds: number }> {
  const pending = (samples: Map<string, number>): number => {
    let total = 0;
    for (const [name, value] of samples) if (name.startsWith("keygate_write_behind_pending{")) total += value;
    return total;
  };
  const startedAt = performance.now();
  const first = pending(await scrape(adminPort));
  let left = first;
  while (left > 0) {
    if (performance.now() - startedAt > DRAIN_TIMEOUT_MS) throw new Error(`keygate's write-behind still had ${left} entries to write ${DRAIN_TIMEOUT_MS / 1000} s after the touch`);
    await sleep(200);
    left = pending(await scrape(adminPort));
  }
  return { pendingAfterTouch: first, drainSeconds: (performance.now() - startedAt) / 1000 };
}

/** keygate's memory with a large store and many distinct keys touched. */
export interface MemoryResult {
  storeKeys: number;
  touchedKeys: number;
  l1Bounds: typeof BENCH_CACHE;
  filler: SeedTiming;
  databaseBytes: number;
  rssAfterStartBytes: number;
  rssAfterTouchBytes: number;
  peakRssBytes: number;
  /** V8 heap in use after the touch (from keygate's /metrics, no GC). */
  heapUsedBytes: number | null;
  /** After start-up, after forced full GCs (keygate ran with --expose-gc and bench/gc-probe.mjs). */
  atStartAfterGc: MemoryAfterGc;
  /** After the touch, after forced full GCs. */
  afterTouchAfterGc: MemoryAfterGc;
  /** Keys that went into L1: the distinct keys touched, up to L1's bound. */
  cachedKeys: number;
  /** (RSS after touch − RSS after start), both after GC, over the cached keys. */
  rssBytesPerCachedKey: number;
  /** The same after memory-reducing GCs: what the cached keys hold once V8 returns its free pages. */
  reducedRssBytesPerCachedKey: number;
  /**
   * Write-behind entries (usage rows, last-used times) not yet in the store right after the
   * touch, and the seconds until they were: the after-touch GC figures are read once none are
   * left, so they measure the cached keys, not how far a flush had got. Null without an admin port.
   */
  writeBehind: { pendingAfterTouch: number; drainSeconds: number } | null;
  /** The same for the V8 heap in use. */
  heapBytesPerCachedKey: number;
  touch: { requests: number; seconds: number; rps: number; errors: number; l1Misses: number; storeLookups: number };
}

/** What the memory scenario needs. */
export interface MemoryInput {
  databasePath: string;
  existingKeys: number;
  totalKeys: number;
  touchKeys: number;
  accounts: number;
  pepper: string;
  maxActiveKeys: number;
  touch: DataFile;
  settings: LoadSettings;
  /** Starts keygate with extra node flags and extra (non-KEYGATE_) environment. */
  start(label: string, nodeArgs: readonly string[], env: Record<string, string>): Promise<Target>;
  /** A directory for the GC report file. */
  workDir: string;
}

function fileBytes(path: string): number {
  return existsSync(path) ? statSync(path).size : 0;
}

/**
 * Grows the embedded store to `totalKeys`, starts a fresh keygate, and touches `touchKeys`
 * distinct keys once each; RSS is read before and after.
 */
export async function runMemory(input: MemoryInput): Promise<MemoryResult> {
  const store = new SqliteKeyStore(input.databasePath);
  let filler: SeedTiming;
  try {
    filler = await seedFiller(sqliteImportWriter(store, input.maxActiveKeys), input.existingKeys, input.totalKeys, input.accounts, input.pepper);
  } finally {
    await store.close();
  }
  const reportPath = join(input.workDir, "gc-report.json");
  const target = await input.start("keygate embedded (memory)", ["--expose-gc", "--import", GC_PROBE], { BENCH_GC_REPORT: reportPath });
  try {
    // Let start-up allocation settle before the baseline.
    await sleep(1000);
    const atStart = memoryOf(target.process.pid);
    const atStartAfterGc = await afterGc(target.process.pid, reportPath);
    const touched = Math.min(input.touchKeys, input.touch.entries);
    const run = await pass(target, input.settings, input.touch, touched);
    await sleep(500);
    const after = memoryOf(target.process.pid);
    const samples = target.adminPort === null ? null : await scrape(target.adminPort);
    const writeBehind = target.adminPort === null ? null : await drainWriteBehind(target.adminPort);
    const afterTouchAfterGc = await afterGc(target.process.pid, reportPath);
    const cachedKeys = Math.max(1, Math.min(touched, BENCH_CACHE.maxEntries));
    return {
      storeKeys: Math.max(input.totalKeys, input.existingKeys),
      touchedKeys: touched,
      l1Bounds: BENCH_CACHE,
      filler,
      databaseBytes: fileBytes(input.databasePath) + fileBytes(`${input.databasePath}-wal`),
      rssAfterStartBytes: atStart.rssBytes,
      rssAfterTouchBytes: after.rssBytes,
      peakRssBytes: after.peakRssBytes,
      heapUsedBytes: samples === null ? null : gauge(samples, "nodejs_heap_size_used_bytes"),
      atStartAfterGc,
      afterTouchAfterGc,
      cachedKeys,
      rssBytesPerCachedKey: Math.round((afterTouchAfterGc.rss - atStartAfterGc.rss) / cachedKeys),
      reducedRssBytesPerCachedKey: Math.round((afterTouchAfterGc.reduced.rss - atStartAfterGc.reduced.rss) / cachedKeys),
      heapBytesPerCachedKey: Math.round((afterTouchAfterGc.heapUsed - atStartAfterGc.heapUsed) / cachedKeys),
      writeBehind,
      touch: {
        requests: run.ghz.requests,
        seconds: run.ghz.seconds,
        rps: run.ghz.rps,
        errors: run.ghz.errors,
        l1Misses: run.checks?.cache["l1 miss"] ?? 0,
        storeLookups: run.checks?.backendCalls["store find_snapshot"] ?? 0,
      },
    };
  } finally {
    await target.stop();
  }
}
