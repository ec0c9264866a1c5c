// Compares the CPU a Check costs on two builds of keygate, the working tree's and a git
// revision's, in alternating runs on this machine: a change of a few percent is lost in the
// noise between two bench runs (which measure each build once, minutes apart), but shows when
// the builds take turns under the same one-key load. Not part of `npm test`.
//   npx tsx scripts/compare-builds.ts --base <rev> [--rounds 5] [--seconds 5] [--key valid|unknown|malformed] [--grpc-timeout 1S] [--malloc jemalloc|system] [--keys n [--owners n]] [--node-flags "..."] [--head-node-flags "..."]
// Each run: a fresh embedded keygate (the bench's policy, the node flags keygate ships with)
// pinned to CPU 0, h2load (4 connections × 16 streams, one fixed request) on CPU 1 for
// --warmup seconds, then --seconds measured: keygate's user + system CPU (/proc) over the Checks
// answered. Prints one line per run and, per build, the median and the range, then the ratio of
// the medians. --grpc-timeout sends that header with every Check, as Envoy does. The key: `valid` (created through KeyAdmin, unlimited plan: the cached allow),
// `unknown` (well formed, never stored: a cached miss) or `malformed` (refused by its checksum).
// `--keys <n>` (valid keys only) measures many keys instead: n keys created once through KeyAdmin
// (a data directory every run starts from a copy of), one request per key in turn, driven by
// rategen's closed loop (4 connections, 64 in flight, bench/rategen) after a warm-up that caches
// every key; the no-op gets the same requests.
// keygate runs on jemalloc (LD_PRELOAD, as the image runs it) unless --malloc system;
// `--base system-malloc` takes turns between the working tree on jemalloc and on the system's.
import { cpSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { sizeDelimitedEncode } from "@bufbuild/protobuf/wire";
import { execFileSync } from "node:child_process";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { Command } from "commander";
import { z } from "zod";
import { checkRequest, malformedKey } from "../bench/data.js";
import type { DataFile } from "../bench/data.js";
import { findH2load, runH2load, writeFixedRequest } from "../bench/h2load.js";
import { flagList } from "../bench/options.js";
import { findRategen, runRategen } from "../bench/rategen.js";
import { configurePinning } from "../bench/pinning.js";
import { writeBenchPolicy } from "../bench/policy.js";
import { cpuSeconds, installSignalCleanup, spawnTracked } from "../bench/processes.js";
import { CEILING, startNoop } from "../bench/targets.js";
import { CheckRequestSchema } from "../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import { KeyFormat } from "../src/keys/key-format.js";
import { findJemalloc } from "../src/server/allocator.js";
import { KEYGATE_NODE_FLAGS } from "../src/server/node-flags.js";

const root = resolve(import.meta.dirname, "..");
// Under node_modules so that each build's dist/ resolves keygate's dependencies from here.
const buildsDir = join(root, "node_modules", ".cache", "keygate-compare");

const options = z
  .object({
    base: z.string().min(1),
    rounds: z.coerce.number().int().positive(),
    seconds: z.coerce.number().int().positive(),
    warmup: z.coerce.number().int().nonnegative(),
    key: z.enum(["valid", "unknown", "malformed"]),
    grpcTimeout: z.string().regex(/^\d{1,8}[HMSmun]$/, "1 to 8 digits and a unit: H M S m u n").optional(),
    malloc: z.enum(["jemalloc", "system"]),
    keys: z.coerce.number().int().min(1).max(200_000),
    owners: z.coerce.number().int().min(1).max(200_000),
    nodeFlags: z.string().default(""),
    headNodeFlags: z.string().default(""),
  })
  .refine((o) => o.keys === 1 || o.key === "valid", { message: "--keys above 1 needs --key valid" })
  .refine((o) => o.keys === 1 || o.grpcTimeout === undefined, { message: "--grpc-timeout goes with h2load's one key only" })
  .parse(
    new Command()
      .requiredOption("--base <rev>", "the git revision to compare the working tree with, noop for the node:http2 no-op, or system-malloc for the working tree on the system's malloc")
      .option("--rounds <n>", "runs of each build, alternating", "5")
      .option("--seconds <n>", "measured seconds a run", "5")
      .option("--warmup <n>", "seconds of the same load before each measurement", "3")
      .option("--key <kind>", "valid, unknown or malformed", "valid")
      .option("--grpc-timeout <value>", "a grpc-timeout header on every Check (e.g. 1S)")
      .option("--malloc <allocator>", "keygate's malloc: jemalloc (LD_PRELOAD, as the image runs it) or system", "jemalloc")
      .option("--keys <n>", "valid keys, one request each in turn, under rategen's closed loop (1: h2load's one key)", "1")
      .option("--owners <n>", "owners the many keys are spread over, in turn (the bench's hot keys: 10000)", "100")
      .option("--node-flags <flags>", "extra node flags for every keygate run, space-separated (e.g. --cpu-prof --cpu-prof-dir=/tmp/prof)")
      .option("--head-node-flags <flags>", "extra node flags for the working tree's runs only (with --base HEAD: the same code with and without them)")
      .parse()
      .opts(),
  );

/** Builds the sources in `dir` (src/, tsconfig*.json, package.json) into `dir`/dist. */
function build(dir: string): void {
  execFileSync(join(root, "node_modules", ".bin", "tsc"), ["-p", join(dir, "tsconfig.build.json")], { stdio: "inherit" });
}

function prepare(name: string, fill: (dir: string) => void): string {
  const dir = join(buildsDir, name);
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(dir, { recursive: true });
  fill(dir);
  build(dir);
  return dir;
}

const SOURCES = ["src", "tsconfig.json", "tsconfig.build.json", "package.json"];
const working = prepare("working-tree", (dir) => {
  for (const entry of SOURCES) cpSync(join(root, entry), join(dir, entry), { recursive: true });
});
const AGAINST_NOOP = options.base === "noop";
const AGAINST_SYSTEM_MALLOC = options.base === "system-malloc";
const JEMALLOC = options.malloc === "jemalloc" || AGAINST_SYSTEM_MALLOC ? findJemalloc() : null;
if (JEMALLOC === null && (options.malloc === "jemalloc" || AGAINST_SYSTEM_MALLOC)) throw new Error("libjemalloc2 is not installed (apt-get install libjemalloc2), or pass --malloc system");
const baseCommit = AGAINST_NOOP || AGAINST_SYSTEM_MALLOC ? "" : execFileSync("git", ["rev-parse", "--short", options.base], { cwd: root, encoding: "utf8" }).trim();
const base = AGAINST_NOOP || AGAINST_SYSTEM_MALLOC
  ? null
  : prepare(`base-${baseCommit}`, (dir) => {
      const archive = execFileSync("git", ["archive", "--format=tar", baseCommit, ...SOURCES], { cwd: root, maxBuffer: 1 << 30 });
      execFileSync("tar", ["-x", "-C", dir], { input: archive });
    });

const MANY = options.keys > 1;
const EXTRA_NODE_FLAGS = flagList(options.nodeFlags);
const HEAD_NODE_FLAGS = flagList(options.headNodeFlags);
const h2load = findH2load();
if (!MANY && h2load === null) throw new Error("h2load is not on PATH: bash bench/install-h2load.sh");
const rategen = MANY ? findRategen() : null;
if (MANY && rategen === null) throw new Error("rategen is not built from this source: bash bench/install-rategen.sh");
installSignalCleanup();
configurePinning(true);

const PORTS = { grpc: 19381, http: 19382, admin: 19383 } as const;

async function ready(): Promise<void> {
  for (let attempt = 0; attempt < 300; attempt++) {
    try {
      if ((await fetch(`http://127.0.0.1:${PORTS.admin}/readyz`)).ok) return;
    } catch {
      // not listening yet
    }
    await new Promise((done) => setTimeout(done, 100));
  }
  throw new Error("keygate did not become ready within 30 s");
}

async function keyFor(dataDir: string): Promise<string> {
  const format = new KeyFormat("kg");
  if (options.key === "unknown") return format.generate("live");
  if (options.key === "malformed") return malformedKey(format.generate("live"), 0);
  return createKey(readFileSync(join(dataDir, "admin-token"), "utf8").trim(), "compare");
}

/** One h2load run of `request` against `port` after the warm-up: CPU µs of `pid` per Check answered. */
async function loadAndMeasure(pid: number, port: number, request: ReturnType<typeof writeFixedRequest>): Promise<{ micros: number; checks: number }> {
  const run = { port, request, clients: 4, streams: 16, headers: options.grpcTimeout === undefined ? [] : [`grpc-timeout: ${options.grpcTimeout}`] };
  if (options.warmup > 0) await runH2load(h2load as string, { ...run, seconds: options.warmup });
  const before = cpuSeconds(pid);
  const result = await runH2load(h2load as string, { ...run, seconds: options.seconds });
  const used = cpuSeconds(pid) - before;
  if (result.failed > 0) throw new Error(`${result.failed} of the measured requests failed`);
  return { micros: (used * 1e6) / result.http200, checks: result.http200 };
}

/** The many-key run: rategen's closed loop over `data` after the warm-up; CPU µs of `pid` per Check answered OK. */
async function loadManyAndMeasure(pid: number, port: number, data: DataFile): Promise<{ micros: number; checks: number }> {
  const run = { port, data, concurrency: 64, connections: 4, cpus: 1 };
  if (options.warmup > 0) await runRategen(rategen as string, { ...run, seconds: options.warmup });
  const before = cpuSeconds(pid);
  const result = await runRategen(rategen as string, { ...run, seconds: options.seconds });
  const used = cpuSeconds(pid) - before;
  if (result.errors > 0) throw new Error(`${result.errors} of the measured calls were not gRPC OK: ${JSON.stringify(result.errorMessages)}`);
  return { micros: (used * 1e6) / result.requests, checks: result.requests };
}

/** One request per key, in turn, as a rategen data file (size-delimited CheckRequests). */
function writeManyKeyData(path: string, secrets: readonly string[]): DataFile {
  writeFileSync(path, Buffer.concat(secrets.map((secret, i) => sizeDelimitedEncode(CheckRequestSchema, checkRequest(secret, i)))));
  return { path, entries: secrets.length, format: "binary", composition: { valid: secrets.length } };
}

/**
 * The many-key data directory, made once: a keygate on the working tree creates the keys through
 * KeyAdmin (over --owners owners, 100 unless given) and stops; every run starts from a copy, so each build reads the
 * same SQLite file and pepper. Returns the directory and the secrets.
 */
async function prepareManyKeys(): Promise<{ template: string; secrets: string[] }> {
  const template = join(buildsDir, `keys-${options.keys}`);
  rmSync(template, { recursive: true, force: true });
  mkdirSync(template, { recursive: true });
  const secrets: string[] = [];
  await withKeygate(working, JEMALLOC, [], template, async (dataDir) => {
    const token = readFileSync(join(dataDir, "admin-token"), "utf8").trim();
    for (let i = 0; i < options.keys; i += 32) {
      const batch = Array.from({ length: Math.min(32, options.keys - i) }, (_, j) => createKey(token, `compare-${(i + j) % options.owners}`));
      secrets.push(...(await Promise.all(batch)));
    }
  });
  process.stdout.write(`${secrets.length} keys created for the many-key runs\n`);
  return { template, secrets };
}

async function createKey(token: string, ownerId: string): Promise<string> {
  const response = await fetch(`http://127.0.0.1:${PORTS.admin}/keygate.v1.KeyAdmin/CreateKey`, {
    method: "POST",
    headers: { "content-type": "application/json", authorization: `Bearer ${token}` },
    body: JSON.stringify({ ownerId, name: "compare", scopes: ["read"] }),
  });
  const secret = ((await response.json()) as { secret?: unknown }).secret;
  if (typeof secret !== "string") throw new Error(`CreateKey answered ${response.status} without a secret`);
  return secret;
}

/**
 * One run of the node:http2 no-op as the bench starts it (its own process, Node's default
 * flags), pinned where keygate runs, under the same load and request.
 */
async function measureNoop(): Promise<{ micros: number; checks: number }> {
  const dataDir = mkdtempSync(join(tmpdir(), "keygate-compare-"));
  try {
    const noop = await startNoop(process.execPath, CEILING);
    try {
      if (many !== null) return await loadManyAndMeasure(noop.process.pid, noop.grpcPort, writeManyKeyData(join(dataDir, "requests.bin"), many.secrets));
      const format = new KeyFormat("kg");
      const key = options.key === "malformed" ? malformedKey(format.generate("live"), 0) : format.generate("live");
      return await loadAndMeasure(noop.process.pid, noop.grpcPort, writeFixedRequest(join(dataDir, "request.grpc"), checkRequest(key, 0)));
    } finally {
      await noop.stop();
    }
  } finally {
    rmSync(dataDir, { recursive: true, force: true });
  }
}

/**
 * Runs `build` on `preload` (LD_PRELOAD; null: the system's malloc) with the bench's policy and
 * `dataDir`/data as its data directory, pinned as a server, until `use` is done.
 */
async function withKeygate<T>(build: string, preload: string | null, flags: readonly string[], dataDir: string, use: (keygateData: string, pid: number) => Promise<T>): Promise<T> {
  const policy = join(dataDir, "policy.yaml");
  writeBenchPolicy(policy, Math.max(100, options.keys));
  const env = {
    PATH: process.env["PATH"] ?? "",
    KEYGATE_CONFIG: policy,
    KEYGATE_DATA_DIR: join(dataDir, "data"),
    KEYGATE_GRPC_PORT: String(PORTS.grpc),
    KEYGATE_HTTP_AUTHZ_PORT: String(PORTS.http),
    KEYGATE_ADMIN_PORT: String(PORTS.admin),
    KEYGATE_LOG_LEVEL: "warn",
    LD_PRELOAD: preload ?? "",
  };
  const server = spawnTracked("keygate", process.execPath, [...KEYGATE_NODE_FLAGS, ...EXTRA_NODE_FLAGS, ...flags, join(build, "dist", "cli.js"), "serve"], { cwd: dataDir, env, role: "server" });
  try {
    await ready();
    return await use(env.KEYGATE_DATA_DIR, server.pid);
  } finally {
    await server.stop("SIGTERM");
  }
}

/** One run of `build` on `preload` with `flags` after the others: CPU µs per Check answered. */
async function measure(build: string, preload: string | null, flags: readonly string[] = []): Promise<{ micros: number; checks: number }> {
  const dataDir = mkdtempSync(join(tmpdir(), "keygate-compare-"));
  try {
    if (many !== null) {
      cpSync(join(many.template, "data"), join(dataDir, "data"), { recursive: true });
      const data = writeManyKeyData(join(dataDir, "requests.bin"), many.secrets);
      return await withKeygate(build, preload, flags, dataDir, (_, pid) => loadManyAndMeasure(pid, PORTS.grpc, data));
    }
    return await withKeygate(build, preload, flags, dataDir, async (keygateData, pid) => {
      const request = writeFixedRequest(join(dataDir, "request.grpc"), checkRequest(await keyFor(keygateData), 0));
      return loadAndMeasure(pid, PORTS.grpc, request);
    });
  } finally {
    rmSync(dataDir, { recursive: true, force: true });
  }
}

const many = MANY ? await prepareManyKeys() : null;

const builds = [
  { name: AGAINST_SYSTEM_MALLOC ? "working tree on jemalloc" : "working tree", run: () => measure(working, JEMALLOC, HEAD_NODE_FLAGS), runs: [] as number[] },
  AGAINST_SYSTEM_MALLOC
    ? { name: "working tree on the system's malloc", run: () => measure(working, null), runs: [] as number[] }
    : base === null
      ? { name: CEILING, run: measureNoop, runs: [] as number[] }
      : { name: `base ${baseCommit}`, run: () => measure(base, JEMALLOC), runs: [] as number[] },
];
for (let round = 0; round < options.rounds; round++) {
  // Alternate which build goes first, so neither always follows the other.
  const order = round % 2 === 0 ? builds : [...builds].reverse();
  for (const b of order) {
    const { micros, checks } = await b.run();
    b.runs.push(micros);
    process.stdout.write(`round ${round + 1} ${b.name}: ${micros.toFixed(2)} µs CPU a Check (${checks} Checks)\n`);
  }
}
const median = (values: readonly number[]): number => {
  const sorted = [...values].sort((a, b) => a - b);
  const middle = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? (sorted[middle] as number) : ((sorted[middle - 1] as number) + (sorted[middle] as number)) / 2;
};
for (const b of builds) {
  process.stdout.write(`${b.name}: median ${median(b.runs).toFixed(2)} µs, ${Math.min(...b.runs).toFixed(2)} to ${Math.max(...b.runs).toFixed(2)} (${MANY ? `${options.keys} valid keys, closed loop` : `${options.key} key`})\n`);
}
const [head, old] = builds as [(typeof builds)[number], (typeof builds)[number]];
process.stdout.write(`${head.name} / ${AGAINST_NOOP ? CEILING : AGAINST_SYSTEM_MALLOC ? "the system's malloc" : "base"}: ${(median(head.runs) / median(old.runs)).toFixed(3)}\n`);
writeFileSync(join(buildsDir, "last.json"), JSON.stringify({ base: AGAINST_NOOP ? CEILING : AGAINST_SYSTEM_MALLOC ? "system-malloc" : baseCommit, malloc: options.malloc, key: options.key, keys: options.keys, builds: builds.map(({ name, runs }) => ({ name, runs })) }, null, 2));
