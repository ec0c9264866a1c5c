import { GCProfiler, setFlagsFromString } from "node:v8";
import { runInNewContext } from "node:vm";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { MAX_PATH_LENGTH, RouteTable, canonicalPath } from "../../src/authz/routes.js";
import { KeyFormat } from "../../src/keys/key-format.js";
import { checkInit, checkOutcome, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

// canonicalPath runs on every Check whose path needs work (one escape is enough: "%78" for "x"),
// after only the key's public CRC32 check: an anonymous client with a forged well-formed key
// reaches it. It once built the canonical path with += (a V8 rope) and read its end at every "/",
// and each read copied the whole rope: a 16 KB path of one-character segments cost ~8,000 copies
// of up to 16 KB (65 MB allocated, ~8 ms of CPU, a hundred times a plain path's), twice on a
// {project} route. The canonical path must cost about one copy of the path, whatever its shape.
//
// The escaped paths below have their plain twins as canonical form, two characters longer: the
// plain ones are canonical (returned as they are), the escaped ones take the walk. Bytes allocated are counted by the GC profiler, not timed: they do not depend on load.

const SEGMENTS = 7_990; // "/a" each: ~16,000 characters, under MAX_PATH_LENGTH
const tail = "/a".repeat(SEGMENTS);
const PLAIN = `/v1/decks/xx${tail}`;
const ESCAPED = `/v1/decks/x%78${tail}`;
const PLAIN_PROJECT = `/v1/teams/xx${tail}`;
const ESCAPED_PROJECT = `/v1/teams/x%78${tail}`;
const ROUTES = [
  { method: "*", pathPrefix: "/v1/decks", requiredScopes: ["decks"], cost: 1, metered: true },
  { method: "*", pathPrefix: "/v1/teams/{project}", requiredScopes: ["decks"], cost: 1, metered: true },
];

setFlagsFromString("--expose-gc");
const gc = runInNewContext("gc") as () => void;

/**
 * Bytes allocated on the V8 heap while `run` runs: what the heap grew by, plus what each GC in
 * between freed. A full GC first, so those GCs free nothing allocated before.
 */
async function allocatedBytes(run: () => void | Promise<void>): Promise<number> {
  gc();
  const profiler = new GCProfiler();
  const before = process.memoryUsage().heapUsed;
  profiler.start();
  await run();
  const after = process.memoryUsage().heapUsed;
  let freed = 0;
  for (const collection of profiler.stop()?.statistics ?? []) freed += collection.beforeGC.heapStatistics.usedHeapSize - collection.afterGC.heapStatistics.usedHeapSize;
  return after - before + freed;
}

function cpuMs(run: () => void): number {
  const before = process.cpuUsage();
  run();
  const used = process.cpuUsage(before);
  return (used.user + used.system) / 1000;
}

function median(values: readonly number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)] ?? Number.NaN;
}

describe("canonical path security: linear in the path, not in its length times its segments", () => {
  it("the escaped paths are the plain ones to every server", () => {
    expect(ESCAPED.length).toBe(PLAIN.length + 2);
    expect(ESCAPED.length).toBeLessThan(MAX_PATH_LENGTH);
    expect(canonicalPath(ESCAPED)).toBe(PLAIN);
    expect(canonicalPath(ESCAPED_PROJECT)).toBe(PLAIN_PROJECT);
    const table = new RouteTable(ROUTES);
    expect(table.requirements("GET", ESCAPED, undefined)).toEqual(table.requirements("GET", PLAIN, undefined));
    expect(table.requirements("GET", ESCAPED_PROJECT, undefined)).toMatchObject({ projectId: "xx" });
  });

  it("RouteTable.requirements allocates about one copy of an escaped 16 KB path, not one per segment", async () => {
    const table = new RouteTable(ROUTES);
    const calls = 20;
    for (const path of [ESCAPED, ESCAPED_PROJECT]) {
      table.requirements("GET", path, undefined);
      const perCall = (await allocatedBytes(() => {
        for (let i = 0; i < calls; i++) table.requirements("GET", path, undefined);
      })) / calls;
      // Linear: the canonical path once (twice on a {project} route), a lower-cased copy and a
      // few small objects, ~17 KB; the rope walk allocated ~65 MB (130 MB on the {project} route).
      expect(perCall, path.slice(0, 13)).toBeLessThan(8 * path.length);
    }
  });

  it("RouteTable.requirements of an escaped 16 KB path costs at most 5x the CPU of the plain one", () => {
    // Without the {project} route, which makes matching read the whole path: the plain path then
    // costs least, and the rope walk ~100 times as much.
    const table = new RouteTable(ROUTES.slice(0, 1));
    const rounds = 9;
    const calls = 20;
    const plain: number[] = [];
    const escaped: number[] = [];
    for (let i = 0; i < 5; i++) {
      table.requirements("GET", PLAIN, undefined);
      table.requirements("GET", ESCAPED, undefined);
    }
    // Interleaved rounds and medians: load slows both alike.
    for (let r = 0; r < rounds; r++) {
      plain.push(cpuMs(() => { for (let i = 0; i < calls; i++) table.requirements("GET", PLAIN, undefined); }));
      escaped.push(cpuMs(() => { for (let i = 0; i < calls; i++) table.requirements("GET", ESCAPED, undefined); }));
    }
    expect(median(escaped)).toBeLessThan(5 * median(plain));
  }, 60_000);

  describe("through a gRPC Check", () => {
    let kg: TestKeygate;
    beforeAll(async () => {
      kg = await startKeygate();
    });
    afterAll(async () => {
      await kg.stop();
    });

    it("a Check with a forged key and an escaped 16 KB path is answered as the plain one, allocating about as much", async () => {
      const forged = new KeyFormat("kg").generate("live"); // well-formed, never issued: refused (401) only after the routes step
      const outcome = async (path: string) => checkOutcome(await kg.check(checkInit({ "x-api-key": forged }, path, "GET")));
      expect(await outcome(ESCAPED)).toEqual(await outcome(PLAIN));
      expect(await outcome(PLAIN)).toEqual({ status: 401, code: "UNAUTHENTICATED" });
      const checks = 10;
      const perCheck = async (path: string) =>
        (await allocatedBytes(async () => {
          for (let i = 0; i < checks; i++) await kg.check(checkInit({ "x-api-key": forged }, path, "GET"));
        })) / checks;
      const plain = await perCheck(PLAIN);
      const escaped = await perCheck(ESCAPED);
      // Client and server share this heap: a Check of either path costs both the same but for
      // canonicalPath, which may add a few copies of the path; the rope walk added ~65 MB.
      expect(escaped).toBeLessThan(plain + 16 * ESCAPED.length);
    }, 60_000);
  });
});
