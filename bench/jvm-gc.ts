import { existsSync, readFileSync } from "node:fs";

/**
 * The JVM option that makes a Java backend (mongo-java-server) log each stop-the-world GC pause to
 * `path`, stamped with the wall clock in milliseconds, so the bench can tell which pauses fell in a
 * run. The path must not contain ':' (it separates -Xlog's fields).
 */
export function jvmGcLogOption(path: string): string {
  if (path.includes(":")) throw new Error(`a JVM GC log path cannot contain ':' (${path})`);
  return `-Xlog:gc:file=${path}:timemillis`;
}

/** One stop-the-world pause: when it ended (ms since the epoch) and how long it was. */
export interface JvmPause {
  endMs: number;
  ms: number;
  /** "Young", "Full", "Remark", ... as the log names it. */
  kind: string;
}

// [1764920412345ms] GC(23) Pause Young (Allocation Failure) 309M->222M(365M) 27.662ms
const PAUSE_LINE = /^\[(\d+)ms\] GC\(\d+\) Pause (\w+)\b.* (\d+(?:\.\d+)?)ms$/;

/** The pauses in a GC log written with jvmGcLogOption; other lines (the collector's name) are skipped. */
export function parseJvmPauses(text: string): JvmPause[] {
  const pauses: JvmPause[] = [];
  for (const line of text.split("\n")) {
    const m = PAUSE_LINE.exec(line.trim());
    if (m === null) continue;
    pauses.push({ endMs: Number(m[1]), ms: Number(m[3]), kind: m[2] ?? "" });
  }
  return pauses;
}

/** A backend's stop-the-world pauses during one run. */
export interface PauseSummary {
  count: number;
  over10Ms: number;
  totalMs: number;
  maxMs: number;
}

const round1 = (v: number): number => Math.round(v * 10) / 10;

/** The pauses that overlap [fromMs, toMs] (wall clock), summed; a pause partly inside counts whole. */
export function pausesDuring(pauses: readonly JvmPause[], fromMs: number, toMs: number): PauseSummary {
  let count = 0;
  let over10Ms = 0;
  let totalMs = 0;
  let maxMs = 0;
  for (const p of pauses) {
    if (p.endMs < fromMs || p.endMs - p.ms > toMs) continue;
    count += 1;
    if (p.ms > 10) over10Ms += 1;
    totalMs += p.ms;
    maxMs = Math.max(maxMs, p.ms);
  }
  return { count, over10Ms, totalMs: round1(totalMs), maxMs: round1(maxMs) };
}

/** The pauses logged so far at `path` (none while the file does not exist yet). */
export function readJvmPauses(path: string): JvmPause[] {
  return existsSync(path) ? parseJvmPauses(readFileSync(path, "utf8")) : [];
}
