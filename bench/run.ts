/**
 * `npm run bench`: seeds keygate's stores, drives Authorization/Check with ghz (many keys, at
 * saturation), rategen (the same keys at fixed rates, open loop) and h2load (one key) against
 * keygate (embedded; Redis + MongoDB-wire) and two no-op servers (raw `node:http2`, the ceiling,
 * and grpc-js), with servers and load generators pinned to separate cores, and reports
 * throughput, CPU per Check, latency at fixed rates, memory after GC and errors per scenario.
 * README.md, "Performance", explains the figures.
 */
import { spawnSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { loadavg, tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { connectRedis } from "../src/cache/redis.js";
import { MongoKeyStore } from "../src/store/mongo.js";
import { SqliteKeyStore } from "../src/store/sqlite.js";
import { MONGO_WIRE_JVM_FLAGS, mongoWireAvailable, tryStartMongoWire } from "../test/harness/mongo-wire.js";
import { startRedis } from "../test/harness/redis-server.js";
import { checkRequest, writeScenarioData } from "./data.js";
import type { ScenarioData } from "./data.js";
import { findGhz, ghzInstallPath } from "./ghz.js";
import { findH2load, probeCheck, writeFixedRequest } from "./h2load.js";
import type { FixedRequest } from "./h2load.js";
import { jvmGcLogOption } from "./jvm-gc.js";
import { oneKey, pass, saturation } from "./measure.js";
import type { LoadSettings, OneKeyResult } from "./measure.js";
import { runMemory } from "./memory.js";
import type { MemoryResult } from "./memory.js";
import { parseOptions } from "./options.js";
import type { BenchOptions } from "./options.js";
import { benchPolicyInput, writeBenchPolicy } from "./policy.js";
import { configurePinning, observedAffinity, pinning, pinBackendPid } from "./pinning.js";
import { childPids, installSignalCleanup, round } from "./processes.js";
import { findJemalloc } from "../src/server/allocator.js";
import { KEYGATE_NODE_FLAGS } from "../src/server/node-flags.js";
import { ONE_KEY_PROFILE, profileRun } from "./profile.js";
import { findRategen, rategenInstallPath } from "./rategen.js";
import type { ProfiledRun } from "./profile.js";
import { budget, closedLoopTable, fixedRateTools, latencyHeading, latencyNote, latencyTable, machineInfo, memoryText, oneKeyTable, profileComparisonText, profileText, ratios, resultsTable, summarizeTurns, turnsText, writeResults } from "./report.js";
import type { Turns } from "./report.js";
import { SCENARIO_DESCRIPTIONS, TURN_SCENARIOS, runInTurns, runKeygateScenarios, runNoopScenarios } from "./scenarios.js";
import type { KeygateMode, ScenarioResult, TargetResults } from "./scenarios.js";
import { keysPerAccount, mongoBulkWriter, planKeys, storeWriter, verifySeed, writeSeed } from "./seed.js";
import type { PlannedKeys, SeedPlan, SeedTiming } from "./seed.js";
import { CEILING, NOOP_NAMES, NOOPS, distBuilt, startKeygate, startNoop } from "./targets.js";
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
  /** h2load's one request: a hot (unlimited-plan) key, framed once. */
  oneKeyRequest: FixedRequest;
  /** When the run started: names its results and kept profiles. */
  startedAt: Date;
  timings: Record<string, number>;
  notes: string[];
  skipped: Array<{ what: string; why: string }>;
  /** The malloc library keygate is started with (LD_PRELOAD), or null for the system's. */
  preload: string | null;
  /** The allocators keygate processes of the run reported, for the notes. */
  allocators: Set<string>;
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
  return async (label) => {
    const target = await startKeygate(label, { node: ctx.options.node, build: ctx.build, cwd: ctx.work, env: { ...ctx.env, ...env }, nodeArgs: [...ctx.options.nodeFlags, ...nodeArgs], preload: ctx.preload });
    ctx.allocators.add(target.allocator ?? "not reported");
    return target;
  };
}

/** A target's name: the mode, with the gRPC engine when the run names engines. */
function targetName(mode: string, engine: string | null): string {
  return engine === null ? mode : `${mode}:${engine}`;
}

/** The environment that selects a gRPC engine; empty for keygate's default. */
function engineEnv(engine: string | null): Record<string, string> {
  return engine === null ? {} : { KEYGATE_GRPC_ENGINE: engine };
}

/** Results of several targets: every scenario, and h2load's one-key runs. */
interface Collected {
  scenarios: ScenarioResult[];
  oneKey: OneKeyResult[];
}

function collect(into: Collected, r: TargetResults): void {
  into.scenarios.push(...r.scenarios);
  if (r.oneKey !== null) into.oneKey.push(r.oneKey);
}

/** Runs every scenario once per engine of the run; results of all engines, in order. */
async function perEngine(ctx: RunContext, mode: string, env: Record<string, string>, wrap: (start: (label: string) => Promise<Target>) => (label: string) => Promise<Target>, resetShared: () => Promise<void>): Promise<Collected> {
  const all: Collected = { scenarios: [], oneKey: [] };
  for (const engine of ctx.options.engines) {
    const name = targetName(mode, engine);
    const km: KeygateMode = { name, start: wrap(startWith(ctx, { ...env, ...engineEnv(engine) })), resetShared };
    const r = await timed(ctx, `${name}: scenarios`, () => runKeygateScenarios(km, ctx.settings, ctx.data, ctx.oneKeyRequest, log));
    collect(all, r);
  }
  return all;
}

/** Where a profile of `scenario` is kept: beside the results JSON, named by the run's start. */
function profileFile(ctx: RunContext, scenario: string): string {
  const dir = resolve(root, ctx.options.out);
  mkdirSync(dir, { recursive: true });
  return join(dir, `${ctx.startedAt.toISOString().replace(/[:.]/g, "-")}-${scenario}.cpuprofile`);
}

/** Embedded mode: SQLite seeded through the KeyStore API, then every scenario, the profile and memory. */
async function runEmbedded(ctx: RunContext): Promise<{ results: Collected; seeding: SeedTiming; memory: MemoryResult | null; profiles: ProfiledRun[]; turns: Turns[] }> {
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
  // The profile and the memory scenario run on the first engine named (keygate's default when none is).
  const env = { KEYGATE_DATA_DIR: dataDir };
  const first = { ...env, ...engineEnv(ctx.options.engines[0] ?? null) };
  const results = ctx.options.memoryOnly || ctx.options.profileOnly ? { scenarios: [], oneKey: [] } : await perEngine(ctx, "embedded", env, (start) => start, async () => undefined);
  const turns: Turns[] = [];
  const inTurns = TURN_SCENARIOS.filter((s) => ctx.options.scenarios.includes(s));
  if (ctx.options.turns > 0 && ctx.options.noops && !ctx.options.memoryOnly && !ctx.options.profileOnly && inTurns.length > 0) {
    // The CPU goals' figures, measured again with keygate (the first engine) and the ceiling in turns.
    const keygateName = targetName("embedded", ctx.options.engines[0] ?? null);
    const runs = await timed(ctx, "embedded: in turns", () =>
      runInTurns(
        [
          { name: CEILING, keygate: false, start: () => startNoop(ctx.options.node, CEILING) },
          { name: keygateName, keygate: true, start: () => startWith(ctx, first)(`keygate ${keygateName} (in turns)`) },
        ],
        ctx.settings,
        ctx.data,
        inTurns,
        ctx.options.turns,
        log,
      ),
    );
    for (const scenario of inTurns) {
      const summary = summarizeTurns(runs, CEILING, keygateName, scenario);
      if (summary !== null) turns.push(summary);
    }
  }
  const profiles: ProfiledRun[] = [];
  if (ctx.options.profile && !ctx.options.memoryOnly) {
    const start = (label: string, nodeArgs: readonly string[]): Promise<Target> => startWith(ctx, first, nodeArgs)(label);
    log("embedded: hot under --cpu-prof");
    profiles.push(
      await timed(ctx, "embedded: profile hot", () =>
        profileRun("embedded", "hot saturation (ghz, many keys)", start, (t) => pass(t, ctx.settings, ctx.data.hot), async (t) => (await saturation(t, ctx.settings, ctx.data.hot)).ghz.rps, profileFile(ctx, "hot")),
      ),
    );
    if (ctx.settings.h2load !== null) {
      // keygate, then the ceiling under the same load, so the report can say what keygate adds
      // to the transport.
      const startCeiling = (_label: string, nodeArgs: readonly string[]): Promise<Target> => startNoop(ctx.options.node, CEILING, nodeArgs);
      for (const [target, startTarget, file] of [["embedded", start, "one-key"], [CEILING, startCeiling, `${CEILING}-one-key`]] as const) {
        log(`${target}: ${ONE_KEY_PROFILE} under --cpu-prof`);
        profiles.push(
          await timed(ctx, `${target}: profile one key`, () =>
            profileRun(target, ONE_KEY_PROFILE, startTarget, (t) => probeCheck(t.grpcPort, ctx.oneKeyRequest.message), async (t) => (await oneKey(`${target} (profiled)`, t, ctx.settings, ctx.oneKeyRequest))?.h2load.rps ?? 0, profileFile(ctx, file)),
          ),
        );
      }
    }
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
        start: (label, nodeArgs, extraEnv) => startWith(ctx, { ...first, ...extraEnv }, nodeArgs)(label),
        workDir: ctx.work,
      }),
    );
    if (memory.touchedKeys < ctx.options.memoryTouch) ctx.notes.push(`memory: only ${memory.touchedKeys} keys could be touched (the secrets kept are those of the ${ctx.planned.records.length} seeded keys)`);
  }
  return { results, seeding, memory, profiles, turns };
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
async function runRedisMongo(ctx: RunContext): Promise<{ results: Collected; seeding: SeedTiming } | null> {
  const redis = await startRedis();
  if (redis === null) {
    ctx.skipped.push({ what: "redis-mongo", why: "redis-server is not on PATH (apt-get install redis-server)" });
    return null;
  }
  try {
    // Its stop-the-world GC pauses are logged, so each run can say which fell in it.
    const gcLog = join(ctx.work, "mongo-wire-gc.log");
    const wire = mongoWireAvailable() ? await tryStartMongoWire({ jvmOptions: [jvmGcLogOption(gcLog), ...ctx.options.backendJvmFlags] }) : null;
    if (wire === null) {
      ctx.skipped.push({ what: "redis-mongo", why: "the MongoDB-wire server is not installed (.ci/install-mongo-wire.sh)" });
      return null;
    }
    try {
      ctx.notes.push(`redis-mongo: ${wire.kind} and redis-server, both on 127.0.0.1 on the same machine`);
      if (wire.kind !== "external") {
        ctx.notes.push(
          `redis-mongo: mongo-java-server runs with the test harness's JVM flags (${[...MONGO_WIRE_JVM_FLAGS, ...ctx.options.backendJvmFlags].join(" ")}${ctx.options.backendJvmFlags.length > 0 ? ", the last from --backend-jvm-flags" : ""}): its stop-the-world GC pauses, logged with -Xlog:gc, hold every lookup sent meanwhile; "backend GC >10ms" counts those that overlapped each fixed-rate run`,
        );
      }
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
        ...childPids("MongoWireServer").map((pid) => ({ name: "mongo-java-server", pid, gcLog })),
      ];
      // By default the backends run beside the load generators, every thread, so that keygate's
      // core is keygate's alone (--backends-on server moves them onto it).
      for (const c of companions) pinBackendPid(c.pid, c.name);
      const wrap = (start: (label: string) => Promise<Target>) => async (label: string) => ({ ...(await start(label)), companions });
      const results = await perEngine(ctx, "redis-mongo", env, wrap, () => flushRedis(redis.url));
      return { results, seeding };
    } finally {
      await wire.stop();
    }
  } finally {
    await redis.stop();
  }
}

function settingsOf(options: BenchOptions, ghz: string, rategen: string | null, h2load: string | null): LoadSettings {
  return {
    ghz,
    rategen,
    seconds: options.seconds,
    scenarios: options.scenarios,
    saturationFirst: options.saturationFirst,
    saturation: { connections: options.satConnections, concurrency: options.satConcurrency, cpus: options.ghzCpus },
    fixedRate: { connections: options.fixedConnections, concurrency: options.fixedConcurrency, cpus: options.ghzCpus, rates: options.rps },
    h2load: h2load === null || !options.oneKey ? null : { path: h2load, clients: options.h2loadClients, streams: options.h2loadStreams },
  };
}

function context(options: BenchOptions, ghz: string, rategen: string | null, h2load: string | null, work: string, notes: string[], startedAt: Date): RunContext {
  const build = prepareBuild(options, notes);
  notes.push(
    `keygate ran with the node flags it ships with (npm start, the image): ${KEYGATE_NODE_FLAGS.join(" ")}${options.nodeFlags.length > 0 ? `, then --node-flags: ${options.nodeFlags.join(" ")}` : ""}; the no-ops with node's defaults`,
  );
  if (options.gcThreadNice !== null) notes.push(`keygate ran with KEYGATE_GC_THREAD_NICE=${options.gcThreadNice} (--gc-thread-nice): V8's worker threads at that nice value`);
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
  const hotKey = planned.secrets.unlimited[0];
  if (hotKey === undefined) throw new Error("no unlimited-plan key to build h2load's request from");
  const oneKeyRequest = writeFixedRequest(join(dataDir, "one-key.grpc"), checkRequest(hotKey, 0));
  const preload = options.malloc === "jemalloc" ? findJemalloc() : null;
  return {
    options,
    settings: settingsOf(options, ghz, rategen, h2load),
    build,
    work,
    pepper,
    env: {
      KEYGATE_PEPPER: pepper,
      KEYGATE_ADMIN_TOKENS: `kgadm_bench_${randomBytes(24).toString("base64url")}`,
      KEYGATE_CONFIG: policyPath,
      KEYGATE_LOG_LEVEL: "info",
      // The bench measures capacity: at saturation, queueing alone keeps Checks longer than the
      // production budget (150 ms), which would turn them into UNAVAILABLE answers and count
      // refused work as throughput. The budget is moved out of the way, as in the tests.
      KEYGATE_CHECK_BUDGET_MS: "10000",
      ...(options.gcThreadNice === null ? {} : { KEYGATE_GC_THREAD_NICE: String(options.gcThreadNice) }),
    },
    maxActiveKeys,
    planned,
    data,
    oneKeyRequest,
    startedAt,
    timings: {},
    notes,
    skipped: [],
    preload,
    allocators: new Set<string>(),
  };
}

/** What the run's keygate processes ran on: what was asked, what was preloaded, what keygate reported. */
function mallocNote(ctx: RunContext): string {
  const reported = ctx.allocators.size === 0 ? "no keygate started" : `keygate reported ${[...ctx.allocators].join(", ")}`;
  if (ctx.preload !== null) return `keygate's malloc: jemalloc, LD_PRELOAD=${ctx.preload} as the image runs it (${reported}); the no-ops with the system's`;
  if (ctx.options.malloc === "jemalloc") return `keygate's malloc: the system's, not jemalloc as the image runs it: libjemalloc2 is not installed (apt-get install libjemalloc2) (${reported})`;
  return `keygate's malloc: the system's (--malloc system) (${reported})`;
}

function standingNotes(results: readonly ScenarioResult[], options: BenchOptions, settings: LoadSettings): string[] {
  const pin = pinning();
  const notes = [
    pin.note,
    "cluster workers: not measured; keygate has no cluster mode to start (issue 6 makes it optional)",
    `ghz and rategen run with GOMAXPROCS=${options.ghzCpus} and h2load with one thread, on the same machine as the servers; saturation figures are what one load generator could drive`,
    latencyNote(results, settings, options.rategen),
    "a DENIED CheckResponse is gRPC OK: errors count non-OK gRPC statuses and keygate's own error decisions; denials come from keygate's /metrics",
    `every ratio is to ${CEILING} (a unary gRPC handler on node:http2 answering one fixed OK) in the same run; ${CEILING} does not decode the request, noop-grpc-js decodes it as a CheckRequest`,
  ];
  for (const name of Object.keys(NOOPS)) {
    const short = results.filter((r) => r.target === name && r.saturation.resources.cpuCores < 0.9);
    if (short.length === 0) continue;
    const used = short.map((r) => `${r.scenario} ${r.saturation.resources.cpuCores}`).join(", ");
    notes.push(`${name} used less than 0.9 of its core at saturation (${used} cores), so the load generator, not the server, set its throughput there; CPU per Check is the load-independent figure`);
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
  // A fresh clone after `npm install` has none: Go builds ghz, apt installs h2load (nghttp2-client),
  // Java and Maven build the MongoDB-wire server.
  installIfMissing("ghz", () => findGhz() !== null, "bench/install-ghz.sh");
  installIfMissing("h2load", () => findH2load() !== null, "bench/install-h2load.sh");
  if (options.modes.includes("redis-mongo")) installIfMissing("the MongoDB-wire server", mongoWireAvailable, ".ci/install-mongo-wire.sh");
  // rategen is built from this checkout's source: a changed source builds again (seconds, with Go).
  if (options.rategen) installIfMissing("rategen (for this source)", () => findRategen() !== null, "bench/install-rategen.sh");
  const ghz = findGhz();
  if (ghz === null) throw new Error(`ghz not found at ${ghzInstallPath()} or on PATH: run bash bench/install-ghz.sh (needs Go)`);
  const rategen = options.rategen ? findRategen() : null;
  if (options.rategen && rategen === null) log(`rategen is not built at ${rategenInstallPath()}: ghz measures fixed-rate latency (bash bench/install-rategen.sh needs Go)`);
  const h2load = findH2load();
  const pin = configurePinning(options.pin, options.backendsOn);
  log(pin.note);
  const startedAt = new Date();
  const notes: string[] = [];
  const work = mkdtempSync(join(tmpdir(), "keygate-bench-"));
  try {
    const ctx = context(options, ghz, rategen, h2load, work, notes, startedAt);
    if (h2load === null) ctx.skipped.push({ what: "h2load one-key runs", why: "h2load is not on PATH (apt-get install nghttp2-client, or bash bench/install-h2load.sh)" });
    const machine = machineInfo(options.node);
    const all: Collected = { scenarios: [], oneKey: [] };
    for (const name of options.memoryOnly || options.profileOnly || !options.noops ? [] : NOOP_NAMES) {
      const noop = await startNoop(options.node, name);
      try {
        collect(all, await timed(ctx, `${name}: scenarios`, () => runNoopScenarios(name, noop, ctx.settings, ctx.data, ctx.oneKeyRequest, log)));
      } finally {
        await noop.stop();
      }
    }
    const seeding: Record<string, SeedTiming> = {};
    let memory: MemoryResult | null = null;
    let profiles: ProfiledRun[] = [];
    let turns: Turns[] = [];
    if (options.modes.includes("embedded")) {
      const embedded = await runEmbedded(ctx);
      all.scenarios.push(...embedded.results.scenarios);
      all.oneKey.push(...embedded.results.oneKey);
      seeding["embedded"] = embedded.seeding;
      memory = embedded.memory;
      profiles = embedded.profiles;
      turns = embedded.turns;
    }
    if (options.modes.includes("redis-mongo") && !options.memoryOnly && !options.profileOnly) {
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
        all.scenarios.push(...redisMongo.results.scenarios);
        all.oneKey.push(...redisMongo.results.oneKey);
        seeding["redis-mongo"] = redisMongo.seeding;
      }
    }
    for (const s of ctx.skipped) log(`!!! SKIPPED ${s.what}: ${s.why}`);
    report({ ctx, machine, startedAt, results: all.scenarios, oneKey: all.oneKey, seeding, memory, profiles, turns });
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
}

function report(input: {
  ctx: RunContext;
  machine: ReturnType<typeof machineInfo>;
  startedAt: Date;
  results: ScenarioResult[];
  oneKey: OneKeyResult[];
  seeding: Record<string, SeedTiming>;
  memory: MemoryResult | null;
  profiles: ProfiledRun[];
  turns: Turns[];
}): void {
  const { ctx, results } = input;
  const rates = ratios(results, input.oneKey);
  const lines = budget(results, input.oneKey, input.memory, ctx.options.rps, input.turns);
  const notes = [...ctx.notes, mallocNote(ctx), ...standingNotes(results, ctx.options, ctx.settings)];
  const comparison = profileComparisonText(input.profiles, CEILING);
  const wallSeconds = round((performance.now() - startedAtMs) / 1000, 1);
  const pin = pinning();
  const affinity = observedAffinity();
  const path = writeResults(resolve(root, ctx.options.out), {
    schema: "keygate-bench/2",
    startedAt: input.startedAt.toISOString(),
    finishedAt: new Date().toISOString(),
    wallSeconds,
    quick: ctx.options.quick,
    machine: { ...input.machine, loadAverageAtEnd: loadavg().map((l) => round(l, 2)) },
    pinning: { serverCpu: pin.server, loadCpu: pin.load, note: pin.note, observedCpusAllowed: affinity },
    config: {
      keys: ctx.options.keys,
      accounts: ctx.options.accounts,
      plans: { meteredShare: 0.5, revokedShare: 0.01, maxActiveKeys: ctx.maxActiveKeys },
      policy: benchPolicyInput(ctx.maxActiveKeys),
      seconds: ctx.options.seconds,
      fixedRates: ctx.options.rps,
      saturation: ctx.settings.saturation,
      fixedRate: ctx.settings.fixedRate,
      h2load: ctx.settings.h2load,
      dataFormat: ctx.options.dataFormat,
      hotKeys: ctx.data.hot.entries,
      mixedEntries: ctx.options.mixedEntries,
      floodEntries: ctx.options.floodEntries,
      memoryKeys: ctx.options.memory ? ctx.options.memoryKeys : null,
      memoryTouch: ctx.options.memory ? ctx.options.memoryTouch : null,
      keygateBuild: ctx.build,
      malloc: { asked: ctx.options.malloc, preload: ctx.preload, reported: [...ctx.allocators] },
      gcThreadNice: ctx.options.gcThreadNice,
      nodeFlags: ctx.options.nodeFlags,
      backendJvmFlags: ctx.options.backendJvmFlags,
      turns: ctx.options.turns,
      modes: ctx.options.modes,
      engines: ctx.options.engines.map((e) => e ?? "default"),
      ceiling: CEILING,
      ghz: ctx.settings.ghz,
      rategen: ctx.settings.rategen,
      fixedRateTools: fixedRateTools(results),
    },
    scenarioDescriptions: SCENARIO_DESCRIPTIONS,
    seeding: input.seeding,
    scenarios: results,
    oneKey: input.oneKey,
    inTurns: input.turns,
    ratios: rates,
    budget: lines,
    memory: input.memory,
    profiles: input.profiles,
    skipped: ctx.skipped,
    notes,
    timings: ctx.timings,
  }, input.startedAt);
  const out = [
    "",
    `pinning: ${pin.note}`,
    `  CPUs each process was allowed (Cpus_allowed_list): ${Object.entries(affinity).map(([k, v]) => `${k} ${v}`).join(", ") || "none recorded"}`,
    "",
    `ghz, many keys, saturation (${ctx.settings.saturation.connections} connections, ${ctx.settings.saturation.concurrency} in flight):`,
    resultsTable(results, rates),
    "",
    `x h2 rps: throughput over ${CEILING}'s; x h2 CPU: CPU per Check over ${CEILING}'s (1.00 = as cheap as node:http2 itself; goals: hot <= 1.5, flood-malformed <= 1.2).`,
    "server cores: the server's CPU over wall time; backend cores: Redis + MongoDB-wire. Peak RSS is per scenario. Errors and denials include the fixed-rate runs.",
    "Ratios are target over ceiling: lower is better (the bench before issue 13 printed the ceiling over keygate).",
    "L1 hit %: lookups answered by L1 (hits and cached misses). Denials are gRPC OK answers that refuse (401/402/403/429).",
    "",
    ...(results.some((r) => r.closedLoop !== null)
      ? [
          `rategen closed loop, many keys, saturation (the same requests, ${ctx.settings.saturation.connections} connections, ${ctx.settings.saturation.concurrency} in flight; reads only each answer's grpc-status, so the server sets the pace; cold: each key once at most, on a fresh process):`,
          closedLoopTable(results, rates),
          "",
        ]
      : [`rategen closed loop: not run (${ctx.settings.rategen === null ? "rategen not built" : "data files not binary"})`, ""]),
    `${latencyHeading(results, ctx.settings)}:`,
    latencyTable(results),
    "CPU us/chk at a fixed rate spreads the server's idle cost (timers, GC) over fewer Checks than saturation does; compare CPU at saturation.",
    "GC >10ms: keygate's GC pauses over 10 ms during the run, any kind; major GC ms: its mark-compact pauses in total (nodejs_gc_duration_seconds, main thread only). I/O >10ms: keygate's Redis and store calls on the Check path that took over 10 ms, of all of them (keygate_backend_duration_seconds). backend GC >10ms: the MongoDB-wire server's stop-the-world GC pauses over 10 ms that overlapped the run (its JVM's -Xlog:gc), with the longest in ms; - without a Java backend.",
    "",
    ...(input.oneKey.length === 0
      ? [`h2load one key: not run (${ctx.options.oneKey ? "h2load missing" : "--no-one-key"})`]
      : [
          `h2load, one key (one fixed framed CheckRequest; ${ctx.settings.h2load?.clients ?? 0} connections x ${ctx.settings.h2load?.streams ?? 0} streams, 1 thread), saturation:`,
          oneKeyTable(input.oneKey, rates),
          "",
          "gRPC OK: HTTP 200 less keygate's own error decisions (h2load cannot read grpc-status trailers); grpc-js sent the same bytes before and after each run and got a gRPC OK allow.",
          "allows: keygate's own count over the run; it can exceed HTTP 200 by the streams in flight when h2load stopped.",
        ]),
    "",
    ...input.turns.flatMap((t) => [turnsText(t), ""]),
    "budget (DESIGN.md, issue 13):",
    ...lines.map((l) => `  [${l.met === null ? " -- " : l.met ? " ok " : "MISS"}] ${l.goal}: ${l.measured}`),
    ...(input.memory === null ? [] : ["", memoryText(input.memory)]),
    ...input.profiles.flatMap((p) => ["", profileText(p)]),
    ...(comparison === "" ? [] : ["", comparison]),
    "",
    ...notes.map((n) => `note: ${n}`),
    ...ctx.skipped.map((s) => `SKIPPED ${s.what}: ${s.why}`),
    "",
    `machine: ${input.machine.cpuModel}, ${input.machine.cores} cores, Node ${input.machine.keygateNode}, commit ${input.machine.gitCommit.slice(0, 12)}${input.machine.gitDirty ? " (with uncommitted changes)" : ""}`,
    `results: ${path}`,
    `total ${wallSeconds} s; phases: ${Object.entries(ctx.timings).map(([k, v]) => `${k} ${v} s`).join(", ")}`,
  ];
  process.stdout.write(`${out.join("\n")}\n`);
}

main().catch((error: unknown) => {
  process.stderr.write(`bench failed: ${error instanceof Error ? (error.stack ?? error.message) : String(error)}\n`);
  process.exit(1);
});
