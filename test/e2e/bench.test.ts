import { spawn, spawnSync } from "node:child_process";
import { mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { pathToFileURL } from "node:url";
import { afterAll, describe, expect, it } from "vitest";
import { z } from "zod";
import { findGhz } from "../../bench/ghz.js";
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

const ready = requireServer("ghz (the bench's load generator)", ghzPresent(), "run bash bench/install-ghz.sh (needs Go)");
const withRedisMongo =
  ready &&
  requireServer("redis-server (bench redis-mongo mode)", redisAvailable(), "apt-get install redis-server") &&
  requireServer("MongoDB-wire server (bench redis-mongo mode)", mongoWireAvailable(), "run .ci/install-mongo-wire.sh");

const counted = z.number().nonnegative();
const phaseSchema = z.object({
  ghz: z.object({
    requests: counted,
    rps: counted,
    errors: counted,
    latencyMs: z.object({ p50: counted, p90: counted, p99: counted }),
  }),
  resources: z.object({ cpuSeconds: counted, cpuCores: counted, peakRssBytes: counted }),
  cpuMicrosPerCheck: counted,
  checks: z
    .object({ reasons: z.record(z.string(), z.number()), backendCalls: z.record(z.string(), z.number()) })
    .nullable(),
});
const resultSchema = z.object({
  machine: z.object({ cores: z.number().int().positive(), keygateNode: z.string().startsWith("v"), gitCommit: z.string() }),
  config: z.object({ keys: z.literal(200), accounts: z.literal(20) }),
  scenarios: z.array(z.object({ target: z.string(), scenario: z.enum(SCENARIOS), saturation: phaseSchema, fixedRate: phaseSchema })),
  ratios: z.array(z.object({ target: z.string(), scenario: z.string(), throughput: counted, cpuEfficiency: counted })),
  budget: z.array(z.object({ goal: z.string(), met: z.boolean().nullable() })),
  memory: z.object({ storeKeys: z.literal(1000), touchedKeys: z.literal(100), rssAfterTouchBytes: z.number().positive() }),
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
  it("runs every scenario against the no-op ceiling and keygate, and writes a results JSON", { timeout: 150_000 }, async () => {
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
    expect(output).toContain("budget (DESIGN.md, issue 6):");

    const files = readdirSync(out).filter((f) => f.endsWith(".json"));
    expect(files).toHaveLength(1);
    const result = resultSchema.parse(JSON.parse(readFileSync(join(out, files[0] ?? ""), "utf8")));

    const targets = ["noop", ...modes.split(",")];
    for (const target of targets) {
      expect(result.scenarios.filter((s) => s.target === target).map((s) => s.scenario)).toEqual([...SCENARIOS]);
    }
    expect(result.ratios).toHaveLength((targets.length - 1) * SCENARIOS.length);
    for (const s of result.scenarios) {
      expect(s.saturation.ghz.requests, `${s.target} ${s.scenario}`).toBeGreaterThan(0);
      expect(s.fixedRate.ghz.requests, `${s.target} ${s.scenario}`).toBeGreaterThan(0);
      expect(s.saturation.ghz.errors + s.fixedRate.ghz.errors, `${s.target} ${s.scenario}: non-OK gRPC statuses`).toBe(0);
    }

    // keygate's own counts say the data files mean what the scenario names say.
    const embedded = (name: (typeof SCENARIOS)[number]) => result.scenarios.find((s) => s.target === "embedded" && s.scenario === name)?.saturation.checks;
    expect(Object.keys(embedded("hot")?.reasons ?? {})).toEqual(["OK"]);
    expect(Object.keys(embedded("mixed")?.reasons ?? {})).toEqual(expect.arrayContaining(["OK", "MALFORMED_KEY", "UNKNOWN_KEY", "KEY_REVOKED"]));
    expect(Object.keys(embedded("flood-malformed")?.reasons ?? {})).toEqual(["MALFORMED_KEY"]);
    expect(embedded("flood-malformed")?.backendCalls["store find_snapshot"] ?? 0).toBe(0);
    expect(embedded("cold")?.backendCalls["store find_snapshot"] ?? 0).toBeGreaterThan(0);
  });
});
