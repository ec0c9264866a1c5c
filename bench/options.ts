import { Command, InvalidArgumentError } from "commander";
import { z } from "zod";
import { gcThreadNiceSchema } from "../src/config.js";
import { SCENARIOS } from "./scenarios.js";
import type { ScenarioName } from "./scenarios.js";

/** Every setting of a bench run, after defaults for full or quick mode. */
export interface BenchOptions {
  quick: boolean;
  keys: number;
  accounts: number;
  seconds: number;
  /** Fixed rates for latency, in Checks a second. */
  rps: number[];
  modes: Array<"embedded" | "redis-mongo">;
  /** The scenarios to run, in report order. */
  scenarios: ScenarioName[];
  /** Run h2load's one-key runs (when h2load is installed). */
  oneKey: boolean;
  /** keygate's gRPC engines to run (KEYGATE_GRPC_ENGINE); [null] runs keygate's default, unset. */
  engines: Array<"h2" | "grpc-js" | null>;
  pin: boolean;
  h2loadClients: number;
  h2loadStreams: number;
  memory: boolean;
  /** Only the seed and the memory scenario. */
  memoryOnly: boolean;
  /** Only the seed and the profiled runs (no ratios: the no-ops are not run). */
  profileOnly: boolean;
  /** Run the no-op ceilings (without them no ratio is computed). */
  noops: boolean;
  /** Extra node flags for every keygate process (an experiment's V8 flags, say). */
  nodeFlags: string[];
  /** keygate's malloc: jemalloc preloaded as the image preloads it (when installed), or the system's. */
  malloc: "jemalloc" | "system";
  /** KEYGATE_GC_THREAD_NICE for every keygate process; null leaves it unset (keygate's default). */
  gcThreadNice: number | null;
  memoryKeys: number;
  memoryTouch: number;
  hotKeys: number;
  mixedEntries: number;
  floodEntries: number;
  profile: boolean;
  out: string;
  node: string;
  build: boolean;
  source: boolean;
  dataFormat: "binary" | "json";
  satConnections: number;
  satConcurrency: number;
  fixedConnections: number;
  fixedConcurrency: number;
  ghzCpus: number;
  /** Measure fixed-rate latency with rategen (open loop) when it is built; false: with ghz. */
  rategen: boolean;
  /** Where redis-server and the MongoDB-wire server run when pinned: with keygate (server) or beside the load. */
  backendsOn: "server" | "load";
  /** JVM options for the MongoDB-wire server, after the test harness's own (a later option wins). */
  backendJvmFlags: string[];
  /** Rounds of embedded hot's and flood-malformed's closed loops in turns with the ceiling (0: none). */
  turns: number;
  /** Each scenario's saturation runs before its fixed rates, on the same process (the order before fixed rates came first). */
  saturationFirst: boolean;
}

const FULL = { keys: 100_000, accounts: 10_000, seconds: 6, memoryKeys: 1_000_000, memoryTouch: 100_000, hotKeys: 20_000, mixedEntries: 10_000, floodEntries: 20_000, turns: 3 };
const QUICK = { keys: 5_000, accounts: 500, seconds: 2, memoryKeys: 10_000, memoryTouch: 1_000, hotKeys: 1_000, mixedEntries: 1_000, floodEntries: 2_000, turns: 1 };

function count(value: string): number {
  const n = Number(value);
  if (!Number.isInteger(n) || n <= 0) throw new InvalidArgumentError("expected a whole number above 0");
  return n;
}

function countOrNone(value: string): number {
  const n = Number(value);
  if (!Number.isInteger(n) || n < 0) throw new InvalidArgumentError("expected a whole number, 0 or more");
  return n;
}

const rawSchema = z.object({
  quick: z.boolean().default(false),
  keys: z.number().optional(),
  accounts: z.number().optional(),
  seconds: z.number().optional(),
  rps: z.string(),
  modes: z.string(),
  scenarios: z.string(),
  oneKey: z.boolean().default(true),
  engines: z.string().optional(),
  pin: z.boolean(),
  h2loadClients: z.number(),
  h2loadStreams: z.number(),
  memory: z.boolean(),
  memoryOnly: z.boolean().default(false),
  profileOnly: z.boolean().default(false),
  noops: z.boolean().default(true),
  nodeFlags: z.string().default(""),
  malloc: z.enum(["jemalloc", "system"]),
  gcThreadNice: gcThreadNiceSchema.optional(),
  memoryKeys: z.number().optional(),
  memoryTouch: z.number().optional(),
  hotKeys: z.number().optional(),
  mixedEntries: z.number().optional(),
  floodEntries: z.number().optional(),
  profile: z.boolean().default(false),
  out: z.string(),
  node: z.string(),
  build: z.boolean(),
  source: z.boolean().default(false),
  dataFormat: z.enum(["binary", "json"]),
  satConnections: z.number(),
  satConcurrency: z.number(),
  fixedConnections: z.number(),
  fixedConcurrency: z.number(),
  ghzCpus: z.number(),
  rategen: z.boolean(),
  backendsOn: z.enum(["server", "load"]),
  backendJvmFlags: z.string().default(""),
  turns: z.number().optional(),
  saturationFirst: z.boolean().default(false),
});

const modeSchema = z.array(z.enum(["embedded", "redis-mongo"])).min(1);
const engineSchema = z.array(z.enum(["h2", "grpc-js"])).min(1);
const ratesSchema = z.array(z.number().int().positive()).min(1);

function list(value: string): string[] {
  return value.split(",").map((m) => m.trim()).filter((m) => m !== "");
}

/** Space-separated command-line flags (node's, the JVM's) as a list. */
export function flagList(value: string): string[] {
  return value.split(" ").filter((f) => f !== "");
}

/** The scenarios named in `value`, in report order whatever order they were given in. */
function scenarioList(value: string): ScenarioName[] {
  const named = list(value);
  const unknown = named.filter((n) => !SCENARIOS.some((s) => s === n));
  if (unknown.length > 0 || named.length === 0) {
    throw new InvalidArgumentError(`--scenarios: unknown or missing scenario ${JSON.stringify(unknown.join(","))}; expected some of ${SCENARIOS.join(", ")}`);
  }
  return SCENARIOS.filter((s) => named.includes(s));
}

function command(): Command {
  return new Command()
    .name("bench")
    .description("Benchmarks keygate's Authorization/Check against no-op node:http2 and grpc-js servers with ghz and h2load (see issue 13)")
    .option("--quick", "small sizes and short runs (under 2 minutes)")
    .option("--keys <n>", "keys to seed (full 100000, quick 5000)", count)
    .option("--accounts <n>", "accounts the keys spread over (full 10000, quick 500)", count)
    .option("--seconds <n>", "length of each saturation and fixed-rate run (full 6, quick 2)", count)
    .option("--rps <list>", "the fixed rates for latency, Checks a second (e.g. 1000,3000,5000)", "1000,3000")
    .option("--modes <list>", "keygate modes: embedded, redis-mongo", "embedded,redis-mongo")
    .option("--scenarios <list>", `scenarios to run: ${SCENARIOS.join(", ")}`, SCENARIOS.join(","))
    .option("--no-one-key", "skip h2load's one-key runs")
    .option("--engines <list>", "keygate gRPC engines to run each mode with (KEYGATE_GRPC_ENGINE): h2, grpc-js; default: keygate's own default")
    .option("--no-pin", "do not pin servers and load generators to separate cores with taskset")
    .option("--backends-on <core>", "where redis-server and the MongoDB-wire server run when pinned: load (beside the load generators, keygate's core its own) or server (with keygate)", "load")
    .option("--backend-jvm-flags <flags>", "JVM options for the MongoDB-wire server after the harness's own, space-separated (e.g. \"-XX:-UseSerialGC -XX:+UseZGC\")")
    .option("--h2load-clients <n>", "h2load connections for the one-key run", count, 4)
    .option("--h2load-streams <n>", "h2load concurrent streams per connection", count, 16)
    .option("--no-memory", "skip the memory scenario")
    .option("--memory-only", "only seed the embedded store and run the memory scenario (no throughput, latency or profile runs)")
    .option("--no-noops", "skip the no-op ceilings (keygate's own figures only, no ratios)")
    .option("--profile-only", "only seed the embedded store and run the profiled runs (implies --profile --no-memory)")
    .option("--memory-keys <n>", "keys in the store for the memory scenario (full 1000000, quick 10000)", count)
    .option("--memory-touch <n>", "distinct keys touched in the memory scenario (full 100000, quick 1000)", count)
    .option("--hot-keys <n>", "distinct keys in the hot set (full 20000, quick 1000)", count)
    .option("--mixed-entries <n>", "requests in the mixed data file", count)
    .option("--flood-entries <n>", "requests in the flood data files", count)
    .option("--profile", "also run hot once under node --cpu-prof and summarize the profile")
    .option("--out <dir>", "where the results JSON goes", "bench/results")
    .option("--node <path>", "node binary for keygate and the no-op server", process.execPath)
    .option("--node-flags <flags>", "extra node flags for keygate, space-separated (e.g. --max-semi-space-size=8)")
    .option("--malloc <allocator>", "keygate's malloc: jemalloc (LD_PRELOAD, as the image runs it; when libjemalloc2 is installed) or system", "jemalloc")
    .option("--gc-thread-nice <n>", "KEYGATE_GC_THREAD_NICE for keygate (0 to 19; default: unset, keygate's default)")
    .option("--no-build", "use the existing dist/ instead of building it first")
    .option("--source", "run keygate from src/ through tsx instead of dist/")
    .option("--data-format <format>", "ghz request data: binary (size-delimited) or json (array)", "binary")
    .option("--sat-connections <n>", "ghz connections for saturation runs", count, 4)
    .option("--sat-concurrency <n>", "ghz workers for saturation runs", count, 64)
    .option("--fixed-connections <n>", "connections for fixed-rate runs (rategen or ghz)", count, 2)
    .option("--fixed-concurrency <n>", "ghz workers for fixed-rate runs when ghz measures them (enough to hold the rate at a few ms of latency)", count, 32)
    .option("--ghz-cpus <n>", "GOMAXPROCS of ghz and rategen (1 leaves a core to the server on 2 cores)", count, 1)
    .option("--no-rategen", "measure fixed-rate latency with ghz (closed loop) even when rategen is built")
    .option("--turns <n>", "rounds of embedded hot's and flood-malformed's rategen closed loops in turns with noop-h2, each on a fresh process, alternating which goes first (full 3, quick 1; 0 skips)", countOrNone)
    .option("--saturation-first", "run each scenario's saturation runs before its fixed rates (default: every scenario's fixed rates first, before any saturation run on the process)");
}

/** Parses the command line (commander) and fills in the full or quick defaults. */
export function parseOptions(argv: readonly string[]): BenchOptions {
  const program = command();
  program.parse([...argv]);
  const raw = rawSchema.parse(program.opts());
  const sizes = raw.quick ? QUICK : FULL;
  const keys = raw.keys ?? sizes.keys;
  const accounts = Math.min(raw.accounts ?? sizes.accounts, keys);
  return {
    ...raw,
    profile: raw.profile || raw.profileOnly,
    memory: raw.memory && !raw.profileOnly,
    keys,
    accounts,
    seconds: raw.seconds ?? sizes.seconds,
    rps: ratesSchema.parse(list(raw.rps).map(Number)),
    modes: modeSchema.parse(list(raw.modes)),
    scenarios: scenarioList(raw.scenarios),
    engines: raw.engines === undefined ? [null] : engineSchema.parse(list(raw.engines)),
    nodeFlags: flagList(raw.nodeFlags),
    backendJvmFlags: flagList(raw.backendJvmFlags),
    gcThreadNice: raw.gcThreadNice ?? null,
    memoryKeys: Math.max(raw.memoryKeys ?? sizes.memoryKeys, keys),
    memoryTouch: raw.memoryTouch ?? sizes.memoryTouch,
    hotKeys: raw.hotKeys ?? sizes.hotKeys,
    mixedEntries: raw.mixedEntries ?? sizes.mixedEntries,
    floodEntries: raw.floodEntries ?? sizes.floodEntries,
    turns: raw.turns ?? sizes.turns,
  };
}
