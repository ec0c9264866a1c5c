/**
 * `npm run bench`: seeds keygate's stores, drives Authorization/Check with ghz against keygate
 * (embedded; Redis + MongoDB-wire) and a no-op grpc-js server, and reports throughput, latency
 * at a fixed rate, CPU, memory and errors per scenario. README.md, "Performance", explains the figures.
 */
import { spawnSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { loadavg, tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { connectRedis } from "../src/cache/redis.js";
import { MongoKeyStore } from "../src/store/mongo.js";
import { SqliteKeyStore } from "../src/store/sqlite.js";
import { mongoWireAvailable, tryStartMongoWire } from "../test/harness/mongo-wire.js";
import { startRedis } from "../test/harness/redis-server.js";
import { writeScenarioData } from "./data.js";
import type { ScenarioData } from "./data.js";
import { findGhz, ghzInstallPath } from "./ghz.js";
import type { LoadSettings } from "./measure.js";
import { runMemory } from "./memory.js";
import type { MemoryResult } from "./memory.js";
import { parseOptions } from "./options.js";
import type { BenchOptions } from "./options.js";
import { benchPolicyInput, writeBenchPolicy } from "./policy.js";
import { childPids, installSignalCleanup, round } from "./processes.js";
import { profileHot } from "./profile.js";
import type { ProfiledRun } from "./profile.js";
import { budget, machineInfo, memoryText, profileText, ratios, resultsTable, writeResults } from "./report.js";
import { SCENARIO_DESCRIPTIONS, runKeygateScenarios, runNoopScenarios } from "./scenarios.js";
import type { KeygateMode, ScenarioResult } from "./scenarios.js";
import { keysPerAccount, mongoBulkWriter, planKeys, storeWriter, verifySeed, writeSeed } from "./seed.js";
import type { PlannedKeys, SeedPlan, SeedTiming } from "./seed.js";
import { distBuilt, startKeygate, startNoop } from "./targets.js";
import type { KeygateBuild, Target } from "./targets.js";

const root = resolve(import.meta.dirname, "..");
const startedAtMs = performance.now();

function log(message: string): void {
  process.stderr.write(`[bench ${((performance.now() - startedAtMs) / 1000).toFixed(1).padStart(6)} s] ${message}\n`);
}

/** Everything one run shares between its phases. */
interface RunContext {
  options: BenchOptions;
  settings: LoadSettings;
  build: KeygateBuild;
  work: string;
  pepper: string;
  /** KEYGATE_* variables every keygate of the run gets. */
  env: Record<string, string>;
  maxActiveKeys: number;
  planned: PlannedKeys;
  data: ScenarioData;
  timings: Record<string, number>;
  notes: string[];
  skipped: Array<{ what: string; why: string }>;
}

async function timed<T>(ctx: RunContext, phase: string, work: () => Promise<T>): Promise<T> {
  const started = performance.now();
  try {
    return await work();
  } finally {
    ctx.timings[phase] = round((performance.now() - started) / 1000, 1);
  }
}

/** Builds dist/ (unless told not to) so keygate runs as `npm start` runs it. */
function prepareBuild(options: BenchOptions, notes: string[]): KeygateBuild {
  if (options.source) {
    notes.push("keygate ran from src/ through the tsx loader (--source)");
    return "source";
  }
  if (options.build) {
    log("building dist/ (tsc -p tsconfig.build.json)");
    const result = spawnSync(join(root, "node_modules/.bin/tsc"), ["-p", "tsconfig.build.json"], { cwd: root, encoding: "utf8" });
    if (result.status === 0) {
      notes.push("keygate ran from dist/, built with tsc -p tsconfig.build.json at the start of the run");
      return "dist";
    }
    log(`build failed, running keygate from src/ through tsx instead:\n${result.stdout}${result.stderr}`);
    notes.push("the build failed, so keygate ran from src/ through the tsx loader");
    return "source";
  }
  if (distBuilt()) {
    notes.push("keygate ran from the existing dist/ (--no-build), which may be older than src/");
    return "dist";
  }
  notes.push("no dist/ and --no-build: keygate ran from src/ through the tsx loader");
  return "source";
}

function startWith(ctx: RunContext, env: Record<string, string>, nodeArgs: readonly string[] = []): (label: string) => Promise<Target> {
  return (label) => startKeygate(label, { node: ctx.options.node, build: ctx.build, cwd: ctx.work, env: { ...ctx.env, ...env }, nodeArgs });
}

/** Embedded mode: SQLite seeded through the KeyStore API, then every scenario, the profile and memory. */
async function runEmbedded(ctx: RunContext): Promise<{ results: ScenarioResult[]; seeding: SeedTiming; memory: MemoryResult | null; profile: ProfiledRun | null }> {
  const dataDir = join(ctx.work, "embedded");
  mkdirSync(dataDir, { recursive: true, mode: 0o700 });
  const databasePath = join(dataDir, "keygate.db");
  const store = new SqliteKeyStore(databasePath);
  let seeding: SeedTiming;
  try {
    log(`embedded: seeding ${ctx.planned.records.length} keys over ${ctx.planned.accounts.length} accounts into SQLite`);
    seeding = await timed(ctx, "embedded: seed", () => writeSeed(storeWriter(store, ctx.maxActiveKeys), ctx.planned));
    await verifySeed(store, ctx.planned.secrets, ctx.pepper);
  } finally {
    await store.close();
  }
  const env = { KEYGATE_DATA_DIR: dataDir };
  const mode: KeygateMode = { name: "embedded", start: startWith(ctx, env), resetShared: async () => undefined };
  const results = await timed(ctx, "embedded: scenarios", () => runKeygateScenarios(mode, ctx.settings, ctx.data, log));
  let profile: ProfiledRun | null = null;
  if (ctx.options.profile) {
    log("embedded: hot under --cpu-prof");
    profile = await timed(ctx, "embedded: profile", () => profileHot((label, nodeArgs) => startWith(ctx, env, nodeArgs)(label), ctx.settings, ctx.data.hot));
  }
  let memory: MemoryResult | null = null;
  if (ctx.options.memory) {
    log(`embedded: memory (${ctx.options.memoryKeys} keys in the store, ${ctx.options.memoryTouch} touched)`);
    memory = await timed(ctx, "embedded: memory", () =>
      runMemory({
        databasePath,
        existingKeys: ctx.planned.records.length,
        totalKeys: ctx.options.memoryKeys,
        touchKeys: ctx.options.memoryTouch,
        accounts: ctx.planned.accounts.length,
        pepper: ctx.pepper,
        maxActiveKeys: ctx.maxActiveKeys,
        touch: ctx.data.touch,
        settings: ctx.settings,
        start: mode.start,
      }),
    );
    if (memory.touchedKeys < ctx.options.memoryTouch) ctx.notes.push(`memory: only ${memory.touchedKeys} keys could be touched (the secrets kept are those of the ${ctx.planned.records.length} seeded keys)`);
  }
  return { results, seeding, memory, profile };
}

async function flushRedis(url: string): Promise<void> {
  const client = await connectRedis(url);
  try {
    await client.flushall();
  } finally {
    await client.quit();
  }
}

/** Redis + MongoDB-wire: servers from the test harness, MongoDB seeded in bulk, then every scenario. */
async function runRedisMongo(ctx: RunContext): Promise<{ results: ScenarioResult[]; seeding: SeedTiming } | null> {
  const redis = await startRedis();
  if (redis === null) {
    ctx.skipped.push({ what: "redis-mongo", why: "redis-server is not on PATH (apt-get install redis-server)" });
    return null;
  }
  try {
    const wire = mongoWireAvailable() ? await tryStartMongoWire() : null;
    if (wire === null) {
      ctx.skipped.push({ what: "redis-mongo", why: "the MongoDB-wire server is not installed (.ci/install-mongo-wire.sh)" });
      return null;
    }
    try {
      ctx.notes.push(`redis-mongo: ${wire.kind} and redis-server, both on 127.0.0.1 on the same machine`);
      log(`redis-mongo: seeding ${ctx.planned.records.length} keys into ${wire.kind}`);
      const writer = await mongoBulkWriter(wire.uri);
      let seeding: SeedTiming;
      try {
        seeding = await timed(ctx, "redis-mongo: seed", () => writeSeed(writer, ctx.planned));
      } finally {
        await writer.close();
      }
      const store = await MongoKeyStore.connect(wire.uri);
      try {
        await verifySeed(store, ctx.planned.secrets, ctx.pepper);
      } finally {
        await store.close();
      }
      const env = { KEYGATE_DATA_DIR: join(ctx.work, "redis-mongo"), KEYGATE_MONGODB_URI: wire.uri, KEYGATE_REDIS_URL: redis.url };
      const companions = [
        ...childPids(`:${redis.port}`).map((pid) => ({ name: "redis-server", pid })),
        ...childPids("MongoWireServer").map((pid) => ({ name: "mongo-java-server", pid })),
      ];
      const start = startWith(ctx, env);
      const mode: KeygateMode = {
        name: "redis-mongo",
        start: async (label) => ({ ...(await start(label)), companions }),
        resetShared: () => flushRedis(redis.url),
      };
      const results = await timed(ctx, "redis-mongo: scenarios", () => runKeygateScenarios(mode, ctx.settings, ctx.data, log));
      return { results, seeding };
    } finally {
      await wire.stop();
    }
  } finally {
    await redis.stop();
  }
}

function settingsOf(options: BenchOptions, ghz: string): LoadSettings {
  return {
    ghz,
    seconds: options.seconds,
    saturation: { connections: options.satConnections, concurrency: options.satConcurrency, cpus: options.ghzCpus },
    fixedRate: { connections: options.fixedConnections, concurrency: options.fixedConcurrency, cpus: options.ghzCpus, rps: options.rps },
  };
}

function context(options: BenchOptions, ghz: string, work: string, notes: string[]): RunContext {
  const build = prepareBuild(options, notes);
  const pepper = randomBytes(32).toString("base64url");
  const plan: SeedPlan = { keys: options.keys, accounts: options.accounts, meteredShare: 0.5, revokedShare: 0.01 };
  const maxActiveKeys = Math.max(keysPerAccount(options.keys, options.accounts), keysPerAccount(options.memoryKeys, options.accounts));
  const policyPath = join(work, "policy.yaml");
  writeBenchPolicy(policyPath, maxActiveKeys);
  log(`making ${options.keys} keys and the data files (${options.dataFormat})`);
  const planned = planKeys(plan, pepper);
  const dataDir = join(work, "data");
  mkdirSync(dataDir);
  const data = writeScenarioData(dataDir, planned.secrets, { hotKeys: options.hotKeys, mixedEntries: options.mixedEntries, floodEntries: options.floodEntries }, options.dataFormat);
  return {
    options,
    settings: settingsOf(options, ghz),
    build,
    work,
    pepper,
    env: {
      KEYGATE_PEPPER: pepper,
      KEYGATE_ADMIN_TOKENS: `kgadm_bench_${randomBytes(24).toString("base64url")}`,
      KEYGATE_CONFIG: policyPath,
      KEYGATE_LOG_LEVEL: "info",
    },
    maxActiveKeys,
    planned,
    data,
    timings: {},
    notes,
    skipped: [],
  };
}

function standingNotes(results: readonly ScenarioResult[], options: BenchOptions): string[] {
  const notes = [
    "cluster workers: not measured; keygate has no cluster mode to start (issue 6 makes it optional)",
    `ghz runs on the same machine as the servers, with GOMAXPROCS=${options.ghzCpus}; saturation figures are what one ghz process could drive`,
    "latency percentiles are ghz's, client side, and include ghz's own scheduling on the shared cores",
    "a DENIED CheckResponse is gRPC OK: errors count non-OK gRPC statuses and keygate's own error decisions; denials come from keygate's /metrics",
  ];
  for (const r of results) {
    if (r.target !== "noop") continue;
    const cores = r.saturation.resources.cpuCores;
    if (cores < 0.9) notes.push(`noop ${r.scenario}: the ceiling used ${cores} cores at saturation, so the load generator, not the server, set it; "x noop CPU" (CPU per Check) is the load-independent ratio`);
  }
  return notes;
}

/** Runs a repository install script when what it installs is missing; its output goes to stderr. */
function installIfMissing(what: string, present: () => boolean, script: string): void {
  if (present()) return;
  log(`${what} is not installed: running bash ${script}`);
  const result = spawnSync("bash", [join(root, script)], { cwd: root, stdio: ["ignore", 2, 2] });
  if (result.status !== 0) log(`bash ${script} exited with ${String(result.status)}`);
}

async function main(): Promise<void> {
  installSignalCleanup();
  const options = parseOptions(process.argv);
  // A fresh clone after `npm install` has neither: Go builds ghz, Java and Maven the MongoDB-wire server.
  installIfMissing("ghz", () => findGhz() !== null, "bench/install-ghz.sh");
  if (options.modes.includes("redis-mongo")) installIfMissing("the MongoDB-wire server", mongoWireAvailable, ".ci/install-mongo-wire.sh");
  const ghz = findGhz();
  if (ghz === null) throw new Error(`ghz not found at ${ghzInstallPath()} or on PATH: run bash bench/install-ghz.sh (needs Go)`);
  const startedAt = new Date();
  const notes: string[] = [];
  const work = mkdtempSync(join(tmpdir(), "keygate-bench-"));
  try {
    const ctx = context(options, ghz, work, notes);
    const machine = machineInfo(options.node);
    const results: ScenarioResult[] = [];
    const noop = await startNoop(options.node);
    try {
      results.push(...(await timed(ctx, "noop: scenarios", () => runNoopScenarios(noop, ctx.settings, ctx.data, log))));
    } finally {
      await noop.stop();
    }
    const seeding: Record<string, SeedTiming> = {};
    let memory: MemoryResult | null = null;
    let profile: ProfiledRun | null = null;
    if (options.modes.includes("embedded")) {
      const embedded = await runEmbedded(ctx);
      results.push(...embedded.results);
      seeding["embedded"] = embedded.seeding;
      memory = embedded.memory;
      profile = embedded.profile;
    }
    if (options.modes.includes("redis-mongo")) {
      // A mode that breaks part-way still leaves the others' figures to report; the run then exits 1.
      const redisMongo = await runRedisMongo(ctx).catch((error: unknown) => {
        const message = error instanceof Error ? error.message : String(error);
        log(`redis-mongo failed:\n${message}`);
        const firstLine = message.split("\n")[0] ?? "";
        ctx.skipped.push({ what: "redis-mongo", why: `failed part-way: ${firstLine}` });
        process.exitCode = 1;
        return null;
      });
      if (redisMongo !== null) {
        results.push(...redisMongo.results);
        seeding["redis-mongo"] = redisMongo.seeding;
      }
    }
    for (const s of ctx.skipped) log(`!!! SKIPPED ${s.what}: ${s.why}`);
    report({ ctx, machine, startedAt, results, seeding, memory, profile });
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
}

function report(input: {
  ctx: RunContext;
  machine: ReturnType<typeof machineInfo>;
  startedAt: Date;
  results: ScenarioResult[];
  seeding: Record<string, SeedTiming>;
  memory: MemoryResult | null;
  profile: ProfiledRun | null;
}): void {
  const { ctx, results } = input;
  const rates = ratios(results);
  const lines = budget(results, rates);
  const notes = [...ctx.notes, ...standingNotes(results, ctx.options)];
  const wallSeconds = round((performance.now() - startedAtMs) / 1000, 1);
  const path = writeResults(resolve(root, ctx.options.out), {
    schema: "keygate-bench/1",
    startedAt: input.startedAt.toISOString(),
    finishedAt: new Date().toISOString(),
    wallSeconds,
    quick: ctx.options.quick,
    machine: { ...input.machine, loadAverageAtEnd: loadavg().map((l) => round(l, 2)) },
    config: {
      keys: ctx.options.keys,
      accounts: ctx.options.accounts,
      plans: { meteredShare: 0.5, revokedShare: 0.01, maxActiveKeys: ctx.maxActiveKeys },
      policy: benchPolicyInput(ctx.maxActiveKeys),
      seconds: ctx.options.seconds,
      fixedRateRps: ctx.options.rps,
      saturation: ctx.settings.saturation,
      fixedRate: ctx.settings.fixedRate,
      dataFormat: ctx.options.dataFormat,
      hotKeys: ctx.data.hot.entries,
      mixedEntries: ctx.options.mixedEntries,
      floodEntries: ctx.options.floodEntries,
      memoryKeys: ctx.options.memory ? ctx.options.memoryKeys : null,
      memoryTouch: ctx.options.memory ? ctx.options.memoryTouch : null,
      keygateBuild: ctx.build,
      modes: ctx.options.modes,
      ghz: ctx.settings.ghz,
    },
    scenarioDescriptions: SCENARIO_DESCRIPTIONS,
    seeding: input.seeding,
    scenarios: results,
    ratios: rates,
    budget: lines,
    memory: input.memory,
    profile: input.profile,
    skipped: ctx.skipped,
    notes,
    timings: ctx.timings,
  }, input.startedAt);
  const out = [
    "",
    resultsTable(results, rates, ctx.options.rps),
    "",
    "x noop: saturation throughput over the no-op server's; x noop CPU: the no-op's CPU per Check over keygate's (1.00 = as cheap as the ceiling).",
    `p50/p90/p99 and CPU cores at ${ctx.options.rps} Checks/s; backend cores (Redis + MongoDB-wire) at saturation. Peak RSS is per scenario.`,
    "L1 hit %: lookups answered by L1 (hits and cached misses) at saturation. Denials are gRPC OK answers that refuse (401/402/403/429).",
    "",
    "budget (DESIGN.md, issue 6):",
    ...lines.map((l) => `  [${l.met === null ? " -- " : l.met ? " ok " : "MISS"}] ${l.goal}: ${l.measured}`),
    ...(input.memory === null ? [] : ["", memoryText(input.memory)]),
    ...(input.profile === null ? [] : ["", profileText(input.profile)]),
    "",
    ...notes.map((n) => `note: ${n}`),
    ...ctx.skipped.map((s) => `SKIPPED ${s.what}: ${s.why}`),
    "",
    `results: ${path}`,
    `total ${wallSeconds} s; phases: ${Object.entries(ctx.timings).map(([k, v]) => `${k} ${v} s`).join(", ")}`,
  ];
  process.stdout.write(`${out.join("\n")}\n`);
}

main().catch((error: unknown) => {
  process.stderr.write(`bench failed: ${error instanceof Error ? (error.stack ?? error.message) : String(error)}\n`);
  process.exit(1);
});
