// Soak test: keygate under steady Check load with key churn (create, rotate, revoke) for a set
// time, then a verdict. Not part of `npm test`.
//   npm run soak -- --minutes 10 [--runner dist|tsx]
// Exits 1 when RSS grew more than 1.25x after warm-up, event-loop lag p99 grew more than 3x,
// or any Check was answered wrongly (an active key denied, a revoked or rotated-away key
// allowed) or failed in transport.
import { spawn } from "node:child_process";
import type { ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { pathToFileURL } from "node:url";
import { create } from "@bufbuild/protobuf";
import { Client as GrpcClient, credentials } from "@grpc/grpc-js";
import type { ServiceError } from "@grpc/grpc-js";
import { Command, Option } from "commander";
import { stringify } from "yaml";
import { z } from "zod";
import { DEFAULT_POLICY_INPUT } from "../src/config.js";
import { CheckRequestSchema } from "../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import type { CheckRequest, CheckResponse } from "../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import { authorizationDefinition } from "../src/server/grpc-authz.js";

const ADMIN_TOKEN = "kgadm_soak_token_0123456789abcdefghij";
const root = resolve(import.meta.dirname, "..");
const distCli = join(root, "dist/cli.js");
// --runner tsx: the sources through the tsx loader, named by absolute URL since keygate runs in another directory.
const SOURCE_SERVE_ARGS = ["--import", pathToFileURL(join(root, "node_modules/tsx/dist/loader.mjs")).href, join(root, "src/cli.ts"), "serve"];
/** Growth limits of the verdict, from the end of warm-up to the end of the run. */
const MAX_RSS_GROWTH = 1.25;
const MAX_LAG_GROWTH = 3;
/** Samples whose median is "start" (just after warm-up) and "end" (the last ones): one slow sample is noise. */
const WINDOW_SAMPLES = 3;
/** One Check in this many sends a key that was revoked or rotated away, which must be denied. */
const ENDED_KEY_EVERY = 8;

const options = new Command()
  .option("--minutes <n>", "how long to run", "10")
  .option("--warmup-seconds <n>", "seconds before the baseline is taken (at most a third of the run)", "60")
  .option("--concurrency <n>", "concurrent Check loops", "16")
  .option("--sample-seconds <n>", "seconds between samples", "10")
  .addOption(
    new Option("--runner <runner>", "run keygate from the compiled dist/cli.js or the TypeScript sources through tsx")
      .choices(["dist", "tsx"])
      .default(existsSync(distCli) ? "dist" : "tsx"),
  )
  .parse()
  .opts<{ minutes: string; warmupSeconds: string; concurrency: string; sampleSeconds: string; runner: "dist" | "tsx" }>();

interface Sample {
  atSeconds: number;
  rssMb: number;
  lagP99Ms: number;
  checks: number;
  wrongful: number;
  transportErrors: number;
  liveKeys: number;
}

/** A key the churn loop knows; `endingSince` is set when its revoke or rotation is sent, `endedAt` when it returned. */
interface SoakKey {
  id: string;
  secret: string;
  owner: string;
  endingSince?: number;
  endedAt?: number;
}

const listeningLine = z.object({ msg: z.literal("keygate listening"), grpcPort: z.number(), httpPort: z.number(), adminPort: z.number() });

/** Starts `node <args>` and resolves with its ports once it logs "keygate listening". */
function serve(args: readonly string[], cwd: string, env: Record<string, string>): Promise<{ child: ChildProcess; grpc: number; admin: number; exit: Promise<number | null> }> {
  const childEnv: NodeJS.ProcessEnv = {};
  for (const [name, value] of Object.entries(process.env)) if (!name.startsWith("KEYGATE_")) childEnv[name] = value;
  Object.assign(childEnv, env);
  const child = spawn(process.execPath, [...args], { cwd, env: childEnv, stdio: ["ignore", "pipe", "pipe"] });
  const exit = new Promise<number | null>((done) => child.on("exit", (code) => done(code)));
  let out = "";
  let err = "";
  child.stderr?.on("data", (chunk: Buffer) => (err = (err + chunk.toString()).slice(-8192)));
  return new Promise((ready, fail) => {
    const timer = setTimeout(() => fail(new Error(`keygate did not start within 30 s:\n${out}\n${err}`)), 30_000);
    let listening = false;
    child.stdout?.on("data", (chunk: Buffer) => {
      out = (out + chunk.toString()).slice(-65_536);
      if (listening) return;
      for (const line of out.split("\n")) {
        let json: unknown;
        try {
          json = JSON.parse(line);
        } catch {
          continue;
        }
        const parsed = listeningLine.safeParse(json);
        if (!parsed.success) continue;
        clearTimeout(timer);
        listening = true;
        ready({ child, grpc: parsed.data.grpcPort, admin: parsed.data.adminPort, exit });
        return;
      }
    });
    void exit.then((code) => {
      clearTimeout(timer);
      fail(new Error(`keygate exited with ${code}:\n${out}\n${err}`));
    });
  });
}

/** The newest modification time under `dir`, in ms. */
function newestMtimeMs(dir: string): number {
  let newest = 0;
  for (const entry of readdirSync(dir, { withFileTypes: true, recursive: true })) {
    if (entry.isFile()) newest = Math.max(newest, statSync(join(entry.parentPath, entry.name)).mtimeMs);
  }
  return newest;
}

async function admin(port: number, method: string, body: unknown): Promise<Record<string, unknown> | null> {
  const res = await fetch(`http://127.0.0.1:${port}/keygate.v1.KeyAdmin/${method}`, {
    method: "POST",
    headers: { "content-type": "application/json", authorization: `Bearer ${ADMIN_TOKEN}` },
    body: JSON.stringify(body),
  });
  const json: unknown = await res.json();
  if (res.status !== 200 || typeof json !== "object" || json === null) {
    console.error(`${method} failed: ${res.status} ${JSON.stringify(json)}`);
    return null;
  }
  return Object.fromEntries(Object.entries(json));
}

/** The key id and secret of a CreateKey or RotateKey answer. */
function issued(answer: Record<string, unknown> | null): { id: string; secret: string } | null {
  const key = answer?.["key"];
  const secret = answer?.["secret"];
  if (typeof secret !== "string" || typeof key !== "object" || key === null || !("id" in key) || typeof key.id !== "string") return null;
  return { id: key.id, secret };
}

function rssMb(pid: number): number {
  const status = readFileSync(`/proc/${pid}/status`, "utf8");
  const match = /VmRSS:\s+(\d+) kB/.exec(status);
  return match?.[1] === undefined ? 0 : Number(match[1]) / 1024;
}

/** p99 event-loop delay since the previous scrape (prom-client resets its histogram on each). */
async function eventLoopLagMs(adminPort: number): Promise<number> {
  const text = await (await fetch(`http://127.0.0.1:${adminPort}/metrics`)).text();
  const match = /^nodejs_eventloop_lag_p99_seconds (\S+)$/m.exec(text);
  return match?.[1] === undefined ? Number.NaN : Number(match[1]) * 1000;
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? (sorted[mid] ?? Number.NaN) : ((sorted[mid - 1] ?? Number.NaN) + (sorted[mid] ?? Number.NaN)) / 2;
}

const round = (n: number, digits = 1): number => Math.round(n * 10 ** digits) / 10 ** digits;

async function main(): Promise<number> {
  const minutes = Number(options.minutes);
  const warmupMs = Math.min(Number(options.warmupSeconds) * 1000, (minutes * 60_000) / 3);
  if (options.runner === "dist" && newestMtimeMs(join(root, "src")) > statSync(distCli).mtimeMs) {
    console.warn("warning: dist/ is older than src/; run `npm run build` to soak the current code");
  }
  const dir = mkdtempSync(join(tmpdir(), "keygate-soak-"));
  const policy = join(dir, "policy.yaml");
  writeFileSync(
    policy,
    stringify({
      ...DEFAULT_POLICY_INPUT,
      defaultPlan: "soak",
      plans: { soak: { maxActiveKeys: 1000, rateLimit: { limit: 1_000_000, windowSeconds: 60 }, dailyQuota: null, monthlyCredits: null } },
    }),
  );
  const keygate = await serve(options.runner === "dist" ? [distCli, "serve"] : SOURCE_SERVE_ARGS, dir, {
    KEYGATE_DATA_DIR: join(dir, "data"),
    KEYGATE_CONFIG: policy,
    KEYGATE_ADMIN_TOKENS: ADMIN_TOKEN,
    KEYGATE_HOST: "127.0.0.1",
    KEYGATE_GRPC_PORT: "0",
    KEYGATE_HTTP_AUTHZ_PORT: "0",
    KEYGATE_ADMIN_PORT: "0",
    KEYGATE_LOG_LEVEL: "info",
  });
  const pid = keygate.child.pid ?? 0;
  const live: SoakKey[] = [];
  // The most recently revoked or rotated-away keys; the load keeps sending them.
  const ended: SoakKey[] = [];
  let adminFailures = 0;
  const createKey = async (owner: string): Promise<void> => {
    const key = issued(await admin(keygate.admin, "CreateKey", { ownerId: owner, name: "soak" }));
    if (key === null) adminFailures += 1;
    else live.push({ ...key, owner });
  };
  const end = async (key: SoakKey, method: "RotateKey" | "RevokeKey"): Promise<Record<string, unknown> | null> => {
    key.endingSince = performance.now();
    const body = method === "RotateKey" ? { id: key.id, graceDays: 0 } : { id: key.id, reason: "soak" };
    const answer = await admin(keygate.admin, method, body);
    if (answer === null) {
      adminFailures += 1;
      return null;
    }
    key.endedAt = performance.now();
    ended.push(key);
    if (ended.length > 100) ended.shift();
    return answer;
  };
  for (let i = 0; i < 200; i++) await createKey(`soak-${i % 50}`);

  const channel = new GrpcClient(`127.0.0.1:${keygate.grpc}`, credentials.createInsecure());
  let checks = 0;
  let wrongful = 0;
  let transportErrors = 0;
  let endedKeyChecks = 0;
  const examples: string[] = [];
  const note = (what: string): void => {
    if (examples.length < 10) examples.push(what);
  };
  let running = true;
  const check = (key: SoakKey): Promise<void> =>
    new Promise((done) => {
      // Judged against what the churn loop had done: an allow is wrong only if the key's end had
      // returned before the Check was sent; a denial only if its end had not even been sent by the answer.
      const endedBeforeSend = key.endedAt !== undefined;
      if (endedBeforeSend) endedKeyChecks += 1;
      const request: CheckRequest = create(CheckRequestSchema, {
        attributes: { request: { http: { method: "GET", path: "/v1/x", headers: { authorization: `Bearer ${key.secret}` } } } },
      });
      channel.makeUnaryRequest<CheckRequest, CheckResponse>(
        authorizationDefinition.Check.path,
        authorizationDefinition.Check.requestSerialize,
        authorizationDefinition.Check.responseDeserialize,
        request,
        (error: ServiceError | null, response?: CheckResponse) => {
          checks += 1;
          if (error !== null || response === undefined) {
            transportErrors += 1;
            note(`transport: ${error?.code} ${error?.details}`);
          } else if (response.status?.code === 0 && endedBeforeSend) {
            wrongful += 1;
            note(`allowed ended key ${key.id}`);
          } else if (response.status?.code !== 0 && key.endingSince === undefined) {
            wrongful += 1;
            note(`denied active key ${key.id} with code ${response.status?.code}`);
          }
          done();
        },
      );
    });
  const loops = Array.from({ length: Number(options.concurrency) }, async (_, i) => {
    for (let n = i; running; n++) {
      const key = n % ENDED_KEY_EVERY === 0 && ended.length > 0 ? ended[n % ended.length] : live[n % live.length];
      if (key === undefined) await new Promise((r) => setTimeout(r, 10));
      else await check(key);
    }
  });
  // Churn: every 100 ms create a key and rotate or revoke one (keeping about 200 live).
  const churn = (async () => {
    for (let n = 0; running; n++) {
      await createKey(`soak-${n % 50}`);
      const victim = live.shift();
      if (victim !== undefined) {
        if (n % 2 === 0) {
          const rotated = issued(await end(victim, "RotateKey"));
          if (rotated !== null) live.push({ ...rotated, owner: victim.owner });
          const old = live.shift();
          if (old !== undefined) await end(old, "RevokeKey");
        } else {
          await end(victim, "RevokeKey");
        }
      }
      await new Promise((r) => setTimeout(r, 100));
    }
  })();

  const samples: Sample[] = [];
  const startedAt = Date.now();
  const sampleMs = Number(options.sampleSeconds) * 1000;
  await eventLoopLagMs(keygate.admin); // Resets the lag histogram after startup and key creation.
  while (Date.now() - startedAt < minutes * 60_000) {
    await new Promise((r) => setTimeout(r, sampleMs));
    const sample: Sample = {
      atSeconds: Math.round((Date.now() - startedAt) / 1000),
      rssMb: round(rssMb(pid)),
      lagP99Ms: round(await eventLoopLagMs(keygate.admin), 2),
      checks,
      wrongful,
      transportErrors,
      liveKeys: live.length,
    };
    samples.push(sample);
    console.log(JSON.stringify(sample));
  }
  running = false;
  await Promise.all([...loops, churn]);
  channel.close();
  keygate.child.kill("SIGTERM");
  const exitCode = await keygate.exit;
  rmSync(dir, { recursive: true, force: true });

  const afterWarmup = samples.filter((s) => s.atSeconds * 1000 >= warmupMs);
  const startWindow = afterWarmup.slice(0, WINDOW_SAMPLES);
  const endWindow = afterWarmup.slice(-WINDOW_SAMPLES);
  const rss = {
    start: round(median(startWindow.map((s) => s.rssMb))),
    peak: Math.max(...samples.map((s) => s.rssMb)),
    end: round(median(endWindow.map((s) => s.rssMb))),
  };
  const lag = {
    start: round(median(startWindow.map((s) => s.lagP99Ms)), 2),
    peak: Math.max(...samples.map((s) => s.lagP99Ms)),
    end: round(median(endWindow.map((s) => s.lagP99Ms)), 2),
  };
  const failures: string[] = [];
  if (afterWarmup.length < 2 * WINDOW_SAMPLES) failures.push(`only ${afterWarmup.length} samples after warm-up; run longer or sample more often`);
  if (!(rss.end <= rss.start * MAX_RSS_GROWTH)) failures.push(`RSS grew from ${rss.start} MB to ${rss.end} MB (limit ${MAX_RSS_GROWTH}x)`);
  if (!(lag.end <= lag.start * MAX_LAG_GROWTH)) failures.push(`event-loop lag p99 grew from ${lag.start} ms to ${lag.end} ms (limit ${MAX_LAG_GROWTH}x)`);
  if (wrongful > 0) failures.push(`${wrongful} wrongful answers`);
  if (transportErrors > 0) failures.push(`${transportErrors} transport errors`);
  if (adminFailures > 0) failures.push(`${adminFailures} failed KeyAdmin calls`);
  if (exitCode !== 0) failures.push(`keygate exited with ${exitCode} after SIGTERM`);
  console.log(
    JSON.stringify({
      runner: options.runner,
      minutes,
      warmupSeconds: warmupMs / 1000,
      checks,
      checksPerSecond: Math.round(checks / (minutes * 60)),
      endedKeyChecks,
      wrongful,
      transportErrors,
      adminFailures,
      exitCode,
      // start: median of the first samples after warm-up; end: median of the last ones.
      rssMb: rss,
      eventLoopLagP99Ms: lag,
      examples,
      verdict: failures.length === 0 ? "pass" : "fail",
      failures,
    }),
  );
  return failures.length === 0 ? 0 : 1;
}

process.exitCode = await main();
