import { existsSync, readFileSync } from "node:fs";

/**
 * The C allocator (malloc) keygate's process runs on. The image preloads jemalloc
 * (deploy/Dockerfile sets LD_PRELOAD); `npm start` runs on the system's unless LD_PRELOAD says
 * otherwise. Why it matters: node:http2 hands every request header value to JavaScript as an
 * external string whose bytes live in malloc'd memory, and only a mark-compact frees them, all
 * at once and inside its pause. glibc's malloc then merges the freed chunks in that pause
 * (`malloc_consolidate`); jemalloc does not (docs/performance-log.md).
 */
export type Allocator = "jemalloc" | "tcmalloc" | "mimalloc" | "system" | "unknown";

// A preloaded allocator shows as a mapped library of its name.
const LIBRARIES: ReadonlyArray<readonly [Allocator, RegExp]> = [
  ["jemalloc", /\/libjemalloc[^/\s]*\.so/],
  ["tcmalloc", /\/libtcmalloc[^/\s]*\.so/],
  ["mimalloc", /\/libmimalloc[^/\s]*\.so/],
];

/** The allocator a process's memory map (the text of /proc/<pid>/maps) shows: "system" when no other is mapped. */
export function allocatorOf(maps: string): Allocator {
  for (const [name, library] of LIBRARIES) if (library.test(maps)) return name;
  return "system";
}

/** This process's allocator; "unknown" where /proc/self/maps cannot be read (any system but Linux). */
export function processAllocator(readMaps: () => string = () => readFileSync("/proc/self/maps", "utf8")): Allocator {
  try {
    return allocatorOf(readMaps());
  } catch {
    return "unknown";
  }
}

/** Where deploy/Dockerfile links jemalloc, whatever the image's architecture, and preloads it from. */
export const IMAGE_JEMALLOC = "/usr/local/lib/libjemalloc.so.2";

/**
 * Debian's libjemalloc2 on this machine (its multiarch directory, or the image's link), for
 * starting keygate the way the image does (`LD_PRELOAD=<it> npm start`); null when not installed.
 */
export function findJemalloc(exists: (path: string) => boolean = existsSync): string | null {
  const machine = process.arch === "arm64" ? "aarch64" : process.arch === "x64" ? "x86_64" : process.arch;
  const candidates = [`/usr/lib/${machine}-linux-gnu/libjemalloc.so.2`, IMAGE_JEMALLOC, "/usr/lib64/libjemalloc.so.2", "/usr/lib/libjemalloc.so.2"];
  return candidates.find((path) => exists(path)) ?? null;
}
