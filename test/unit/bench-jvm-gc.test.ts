import { describe, expect, it } from "vitest";
import { jvmGcLogOption, parseJvmPauses, pausesDuring } from "../../bench/jvm-gc.js";

// Lines as OpenJDK 17 writes them with -Xlog:gc:file=...:timemillis (SerialGC, G1).
const LOG = [
  "[1796457961791ms] Using Serial",
  "[1796457961866ms] GC(0) Pause Young (Allocation Failure) 3M->0M(377M) 1.043ms",
  "[1796457962000ms] GC(1) Pause Young (Allocation Failure) 309M->222M(365M) 27.662ms",
  "[1796457962500ms] GC(2) Pause Full (Allocation Failure) 267M->267M(615M) 295.345ms",
  "[1796457963000ms] GC(3) Pause Remark 300M->280M(615M) 4.5ms",
  "[1796457963100ms] GC(4) Concurrent Cycle 120.5ms",
  "",
].join("\n");

describe("bench: a Java backend's GC pauses", () => {
  it("reads each stop-the-world pause with its end time, length and kind, and nothing else", () => {
    expect(parseJvmPauses(LOG)).toEqual([
      { endMs: 1796457961866, ms: 1.043, kind: "Young" },
      { endMs: 1796457962000, ms: 27.662, kind: "Young" },
      { endMs: 1796457962500, ms: 295.345, kind: "Full" },
      { endMs: 1796457963000, ms: 4.5, kind: "Remark" },
    ]);
  });

  it("sums the pauses that overlap a run, counting one that began before it or ended after it", () => {
    const pauses = parseJvmPauses(LOG);
    // The Full pause ran from ...2204.655 to ...2500: a window that ends inside it counts it.
    expect(pausesDuring(pauses, 1796457961900, 1796457962300)).toEqual({ count: 2, over10Ms: 2, totalMs: 323, maxMs: 295.3 });
    // The Remark pause began at ...2995.5: a window ending before it has none.
    expect(pausesDuring(pauses, 1796457962501, 1796457962990)).toEqual({ count: 0, over10Ms: 0, totalMs: 0, maxMs: 0 });
    expect(pausesDuring(pauses, 1796457962501, 1796457962996)).toEqual({ count: 1, over10Ms: 0, totalMs: 4.5, maxMs: 4.5 });
    expect(pausesDuring(pauses, 0, Number.MAX_SAFE_INTEGER)).toEqual({ count: 4, over10Ms: 2, totalMs: 328.6, maxMs: 295.3 });
  });

  it("builds the -Xlog option, refusing a path -Xlog would split", () => {
    expect(jvmGcLogOption("/tmp/bench/mongo-gc.log")).toBe("-Xlog:gc:file=/tmp/bench/mongo-gc.log:timemillis");
    expect(() => jvmGcLogOption("C:/gc.log")).toThrow("cannot contain ':'");
  });
});
