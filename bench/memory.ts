import { existsSync, statSync } from "node:fs";
import { setTimeout as sleep } from "node:timers/promises";
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
  /** V8 heap in use after the touch (from keygate's /metrics). */
  heapUsedBytes: number | null;
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
  start(label: string): Promise<Target>;
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
  const target = await input.start("keygate embedded (memory)");
  try {
    // Let start-up allocation settle before the baseline.
    await sleep(1000);
    const atStart = memoryOf(target.process.pid);
    const touched = Math.min(input.touchKeys, input.touch.entries);
    const run = await pass(target, input.settings, input.touch, touched);
    await sleep(500);
    const after = memoryOf(target.process.pid);
    const samples = target.adminPort === null ? null : await scrape(target.adminPort);
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
