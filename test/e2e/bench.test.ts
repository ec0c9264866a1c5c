import { spawn, spawnSync } from "node:child_process";
import { mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { pathToFileURL } from "node:url";
import { afterAll, describe, expect, it } from "vitest";
import { z } from "zod";
import { findGhz } from "../../bench/ghz.js";
import { findH2load } from "../../bench/h2load.js";
import { findRategen } from "../../bench/rategen.js";
import { SCENARIOS } from "../../bench/scenarios.js";
import { mongoWireAvailable } from "../harness/mongo-wire.js";
import { requireServer } from "../harness/ports.js";
import { redisAvailable } from "../harness/redis-server.js";

// The harness only has to run; how fast keygate is belongs to `npm run bench`, never to a test.
const root = resolve(import.meta.dirname, "../..");
const tsxLoader = pathToFileURL(join(root, "node_modules/tsx/dist/loader.mjs")).href;

/** ghz, installed by bench/install-ghz.sh when Go is there and it is missing. */
function ghzPresent(): boolean {
  if (findGhz() !== null) return true;
  if (spawnSync("go", ["version"], { stdio: "ignore" }).status !== 0) return false;
  spawnSync("bash", [join(root, "bench/install-ghz.sh")], { stdio: "inherit", timeout: 180_000 });
  return findGhz() !== null;
}

/** rategen built from this checkout's source by bench/install-rategen.sh, when Go is there. */
function rategenPresent(): boolean {
  if (findRategen() !== null) return true;
  if (spawnSync("go", ["version"], { stdio: "ignore" }).status !== 0) return false;
  spawnSync("bash", [join(root, "bench/install-rategen.sh")], { stdio: "inherit", timeout: 300_000 });
  return findRategen() !== null;
}

const ready =
  requireServer("ghz (the bench's load generator)", ghzPresent(), "run bash bench/install-ghz.sh (needs Go)") &&
  requireServer("rategen (the bench's fixed-rate latency generator)", rategenPresent(), "run bash bench/install-rategen.sh (needs Go)");
const withH2load = ready && requireServer("h2load (the bench's one-key load generator)", findH2load() !== null, "apt-get install nghttp2-client");
const withRedisMongo =
  ready &&
  requireServer("redis-server (bench redis-mongo mode)", redisAvailable(), "apt-get install redis-server") &&
  requireServer("MongoDB-wire server (bench redis-mongo mode)", mongoWireAvailable(), "run .ci/install-mongo-wire.sh");

const counted = z.number().nonnegative();
const loadSchema = z.object({
  tool: z.enum(["ghz", "rategen"]),
  requests: counted,
  rps: counted,
  errors: counted,
  latencyMs: z.object({ p50: counted, p90: counted, p99: counted }),
});
const phaseSchema = z.object({
  ghz: loadSchema,
  resources: z.object({ cpuSeconds: counted, cpuCores: counted, peakRssBytes: counted }),
  cpuMicrosPerCheck: counted,
  checks: z
    .object({
      reasons: z.record(z.string(), z.number()),
      backendCalls: z.record(z.string(), z.number()),
      backendOver10Ms: z.record(z.string(), counted),
      gc: z.record(z.string(), z.object({ count: counted, totalMs: counted, over10Ms: counted })),
    })
    .nullable(),
});
const usageSchema = z.object({ rss: z.number().positive(), heapUsed: z.number().positive(), heapTotal: z.number().positive() });
const afterGcSchema = usageSchema.extend({ reduced: usageSchema });
const oneKeySchema = z.object({
  target: z.string(),
  h2load: z.object({ http200: counted, failed: counted, rps: counted }),
  probe: z.object({ before: z.object({ grpcStatus: z.literal(0), allowed: z.literal(true) }), after: z.object({ grpcStatus: z.literal(0), allowed: z.literal(true) }) }),
  grpcOk: counted,
  grpcErrors: counted.nullable(),
  allows: counted.nullable(),
  cpuMicrosPerCheck: counted,
  checks: z.object({ reasons: z.record(z.string(), z.number()) }).nullable(),
});
const resultSchema = z.object({
  machine: z.object({ cores: z.number().int().positive(), keygateNode: z.string().startsWith("v"), gitCommit: z.string() }),
  pinning: z.object({ serverCpu: z.number().nullable(), loadCpu: z.number().nullable(), note: z.string(), observedCpusAllowed: z.record(z.string(), z.string()) }),
  config: z.object({ keys: z.literal(200), accounts: z.literal(20), fixedRates: z.array(z.number()), fixedRateTools: z.array(z.string()) }),
  scenarios: z.array(
    z.object({
      target: z.string(),
      scenario: z.enum(SCENARIOS),
      data: z.object({ entries: counted }),
      saturation: phaseSchema,
      closedLoop: phaseSchema.extend({ ghz: loadSchema.extend({ endReason: z.string() }) }).nullable(),
      fixedRates: z.array(
        phaseSchema.extend({
          targetRps: counted,
          ghz: loadSchema.extend({
            openLoop: z.object({ scheduled: counted, sent: counted, dropped: counted, timedOut: counted, transportErrors: counted, sendLagMs: z.object({ p99: counted, max: counted }) }).optional(),
          }),
        }),
      ),
    }),
  ),
  oneKey: z.array(oneKeySchema),
  ratios: z.array(z.object({ target: z.string(), scenario: z.string(), throughput: counted, cpu: counted })),
  budget: z.array(z.object({ goal: z.string(), met: z.boolean().nullable() })),
  inTurns: z.array(
    z.object({
      scenario: z.enum(["hot", "flood-malformed"]),
      ceiling: z.object({ target: z.literal("noop-h2"), micros: z.array(z.number().positive()), errors: z.literal(0) }),
      keygate: z.object({ target: z.literal("embedded"), micros: z.array(z.number().positive()), errors: z.literal(0) }),
      ratio: z.number().positive(),
    }),
  ),
  memory: z.object({
    storeKeys: z.literal(1000),
    touchedKeys: z.literal(100),
    cachedKeys: z.literal(100),
    rssAfterTouchBytes: z.number().positive(),
    atStartAfterGc: afterGcSchema,
    afterTouchAfterGc: afterGcSchema,
    rssBytesPerCachedKey: z.number(),
    reducedRssBytesPerCachedKey: z.number(),
    writeBehind: z.object({ pendingAfterTouch: z.number().int().nonnegative(), drainSeconds: z.number().nonnegative() }),
  }),
});

function runBench(args: string[]): Promise<{ code: number | null; output: string }> {
  return new Promise((done) => {
    const child = spawn(process.execPath, ["--import", tsxLoader, join(root, "bench/run.ts"), ...args], { cwd: root, stdio: ["ignore", "pipe", "pipe"] });
    let output = "";
    child.stdout.on("data", (chunk: Buffer) => (output += chunk.toString()));
    child.stderr.on("data", (chunk: Buffer) => (output += chunk.toString()));
    child.on("exit", (code) => done({ code, output }));
  });
}

const dirs: string[] = [];
afterAll(() => {
  for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
});

describe.runIf(ready)("npm run bench (the harness itself, at tiny sizes)", () => {
  it("runs every scenario against both no-ops and keygate, h2load's one key, memory after GC, and writes a results JSON", { timeout: 240_000 }, async () => {
    const out = mkdtempSync(join(tmpdir(), "keygate-bench-test-"));
    dirs.push(out);
    const modes = withRedisMongo ? "embedded,redis-mongo" : "embedded";
    const { code, output } = await runBench([
      "--quick",
      ...["--keys", "200", "--accounts", "20", "--seconds", "1"],
      ...["--memory-keys", "1000", "--memory-touch", "100", "--mixed-entries", "400", "--flood-entries", "400"],
      ...["--modes", modes, "--out", out, "--no-build"],
    ]);
    expect(code, output).toBe(0);
    expect(output).toContain("budget (DESIGN.md, issue 13):");

    const files = readdirSync(out).filter((f) => f.endsWith(".json"));
    expect(files).toHaveLength(1);
    const result = resultSchema.parse(JSON.parse(readFileSync(join(out, files[0] ?? ""), "utf8")));

    const targets = ["noop-h2", "noop-grpc-js", ...modes.split(",")];
    for (const target of targets) {
      expect(result.scenarios.filter((s) => s.target === target).map((s) => s.scenario)).toEqual([...SCENARIOS]);
    }
    // Every ratio is to the raw node:http2 no-op, for every other target: ghz's saturation and rategen's closed loop.
    expect(result.ratios.filter((r) => r.scenario !== "one-key" && !r.scenario.endsWith("(closed loop)"))).toHaveLength((targets.length - 1) * SCENARIOS.length);
    expect(result.ratios.filter((r) => r.scenario.endsWith("(closed loop)"))).toHaveLength((targets.length - 1) * SCENARIOS.length);
    expect(output).toContain("rategen closed loop, many keys, saturation");
    // --quick: one round of hot and of flood-malformed in turns, a run of each, judged as the ratio of their medians.
    expect(result.inTurns.map((t) => [t.scenario, t.ceiling.micros.length, t.keygate.micros.length])).toEqual([
      ["hot", 1, 1],
      ["flood-malformed", 1, 1],
    ]);
    expect(result.budget.filter((l) => l.goal.includes("in turns with noop-h2, median of 1")).map((l) => [l.goal.split(" ")[1], l.met === null])).toEqual([
      ["hot", false],
      ["flood-malformed", false],
    ]);
    expect(result.ratios.some((r) => r.target === "noop-h2")).toBe(false);
    expect(result.config.fixedRates).toEqual([1000, 3000]);
    // Saturation is ghz's; every fixed-rate row is rategen's, open loop, with every scheduled call sent and answered.
    expect(result.config.fixedRateTools).toEqual(["rategen"]);
    expect(output).toContain("rategen (open loop), many keys, latency at fixed rates");
    expect(output).toContain("note: fixed-rate latency measured by rategen (bench/rategen): open loop");
    for (const s of result.scenarios) {
      expect(s.saturation.ghz.requests, `${s.target} ${s.scenario}`).toBeGreaterThan(0);
      expect(s.saturation.ghz.tool, `${s.target} ${s.scenario}`).toBe("ghz");
      expect(s.fixedRates.map((f) => f.targetRps), `${s.target} ${s.scenario}`).toEqual([1000, 3000]);
      for (const f of s.fixedRates) {
        const at = `${s.target} ${s.scenario} @${f.targetRps}/s`;
        expect(f.ghz.tool, at).toBe("rategen");
        expect(f.ghz.requests, at).toBeGreaterThan(0);
        expect(f.ghz.errors, at).toBe(0);
        const open = f.ghz.openLoop;
        expect(open, at).toBeDefined();
        // --seconds 1: the schedule is the rate's worth of calls, each sent and answered.
        expect(open?.scheduled, at).toBe(f.targetRps);
        expect(open?.sent, at).toBe(f.targetRps);
        expect(f.ghz.requests, at).toBe(f.targetRps);
        expect([open?.dropped, open?.timedOut, open?.transportErrors], at).toEqual([0, 0, 0]);
      }
      // The closed loop: rategen keeping ghz's calls in flight; cold sends each key once at most.
      const closed = s.closedLoop;
      expect(closed, `${s.target} ${s.scenario}`).not.toBeNull();
      expect(closed?.ghz.tool, `${s.target} ${s.scenario}`).toBe("rategen");
      expect(closed?.ghz.endReason, `${s.target} ${s.scenario}`).toMatch(/^closed loop: 64 in flight, \d+ sent$/);
      expect(closed?.ghz.requests, `${s.target} ${s.scenario}`).toBeGreaterThan(0);
      expect(closed?.ghz.errors, `${s.target} ${s.scenario}`).toBe(0);
      if (s.scenario === "cold") expect(closed?.ghz.requests, `${s.target} cold`).toBeLessThanOrEqual(s.data.entries);
      const errors = s.saturation.ghz.errors + (closed?.ghz.errors ?? 0) + s.fixedRates.reduce((sum, f) => sum + f.ghz.errors, 0);
      expect(errors, `${s.target} ${s.scenario}: non-OK gRPC statuses`).toBe(0);
    }

    // Memory is read after forced full GCs in keygate itself, then after a memory-reducing one,
    // which returns V8's free pages: its heap reservation is never larger than the plain GC's.
    expect(result.memory.afterTouchAfterGc.rss).toBeGreaterThan(0);
    // The after-touch figures wait for the write-behind (its timing decides how much was left).
    expect(output).toContain("after-touch GC figures read once the write-behind had written the");
    expect(result.memory.afterTouchAfterGc.reduced.heapTotal).toBeLessThanOrEqual(result.memory.afterTouchAfterGc.heapTotal);

    // Pinned when the machine allows it: servers on CPU 0, load generators on CPU 1, as the kernel saw them.
    if (result.pinning.serverCpu !== null) {
      expect(result.pinning).toMatchObject({ serverCpu: 0, loadCpu: 1 });
      expect(result.pinning.observedCpusAllowed).toMatchObject({ ghz: "1", rategen: "1", "noop-h2": "0", "noop-grpc-js": "0", "keygate embedded": "0" });
      if (withH2load) expect(result.pinning.observedCpusAllowed["h2load"]).toBe("1");
    }

    if (withH2load) {
      expect(result.oneKey.map((o) => o.target)).toEqual(targets);
      for (const o of result.oneKey) {
        expect(o.h2load.http200, o.target).toBeGreaterThan(0);
        expect(o.h2load.failed, o.target).toBe(0);
        expect(o.grpcOk, o.target).toBe(o.h2load.http200);
      }
      for (const o of result.oneKey.filter((x) => !x.target.startsWith("noop"))) {
        // keygate's own counts: every Check of the run was the allowed key, none a gRPC error.
        expect(o.grpcErrors, o.target).toBe(0);
        expect(Object.keys(o.checks?.reasons ?? {}), o.target).toEqual(["OK"]);
      }
      expect(result.ratios.filter((r) => r.scenario === "one-key").map((r) => r.target)).toEqual(targets.slice(1));
    }

    // keygate's own counts say the data files mean what the scenario names say.
    const embedded = (name: (typeof SCENARIOS)[number]) => result.scenarios.find((s) => s.target === "embedded" && s.scenario === name)?.saturation.checks;
    expect(Object.keys(embedded("hot")?.reasons ?? {})).toEqual(["OK"]);
    expect(Object.keys(embedded("mixed")?.reasons ?? {})).toEqual(expect.arrayContaining(["OK", "MALFORMED_KEY", "UNKNOWN_KEY", "KEY_REVOKED"]));
    expect(Object.keys(embedded("flood-malformed")?.reasons ?? {})).toEqual(["MALFORMED_KEY"]);
    expect(embedded("flood-malformed")?.backendCalls["store find_snapshot"] ?? 0).toBe(0);
    expect(embedded("cold")?.backendCalls["store find_snapshot"] ?? 0).toBeGreaterThan(0);
    // keygate's GC pauses come from its own /metrics. One short run on a busy machine may see no
    // scavenge, so the count is taken over every keygate phase of the run.
    const keygatePhases = result.scenarios.filter((s) => s.target === "embedded" || s.target === "redis-mongo").flatMap((s) => [s.saturation, ...s.fixedRates]);
    const gcs = keygatePhases.flatMap((phase) => Object.values(phase.checks?.gc ?? {}));
    expect(gcs.reduce((n, g) => n + g.count, 0)).toBeGreaterThan(0);
    for (const pauses of gcs) expect(pauses.over10Ms).toBeLessThanOrEqual(pauses.count);
    // Slow backend calls are a subset of the calls of the same backend and operation.
    for (const phase of keygatePhases) {
      for (const [series, slow] of Object.entries(phase.checks?.backendOver10Ms ?? {})) {
        expect(slow, series).toBeLessThanOrEqual(phase.checks?.backendCalls[series] ?? 0);
      }
    }
  });
});
