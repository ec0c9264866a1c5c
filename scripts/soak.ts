// Soak test: keygate under steady Check load with key churn (create, rotate, revoke) for a set
// time. Reports RSS and event-loop lag at the start, the peak and the end. Not part of `npm test`.
//   npm run soak -- --minutes 10
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { create } from "@bufbuild/protobuf";
import { Client as GrpcClient, credentials } from "@grpc/grpc-js";
import type { ServiceError } from "@grpc/grpc-js";
import { Command } from "commander";
import { stringify } from "yaml";
import { DEFAULT_POLICY_INPUT } from "../src/config.js";
import { CheckRequestSchema } from "../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import type { CheckRequest, CheckResponse } from "../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import { authorizationDefinition } from "../src/server/grpc-authz.js";
import { spawnKeygate } from "../test/harness/process.js";

const ADMIN_TOKEN = "kgadm_soak_token_0123456789abcdefghij";

const options = new Command()
  .option("--minutes <n>", "how long to run", "10")
  .option("--concurrency <n>", "concurrent Check loops", "16")
  .option("--sample-seconds <n>", "seconds between samples", "10")
  .parse()
  .opts<{ minutes: string; concurrency: string; sampleSeconds: string }>();

interface Sample {
  atSeconds: number;
  rssMb: number;
  lagMs: number;
  checks: number;
  failures: number;
  keys: number;
}

async function admin(port: number, method: string, body: unknown): Promise<Record<string, unknown>> {
  const res = await fetch(`http://127.0.0.1:${port}/keygate.v1.KeyAdmin/${method}`, {
    method: "POST",
    headers: { "content-type": "application/json", authorization: `Bearer ${ADMIN_TOKEN}` },
    body: JSON.stringify(body),
  });
  const json: unknown = await res.json();
  if (typeof json !== "object" || json === null) throw new Error(`${method}: unexpected answer`);
  return Object.fromEntries(Object.entries(json));
}

function rssMb(pid: number): number {
  const status = readFileSync(`/proc/${pid}/status`, "utf8");
  const match = /VmRSS:\s+(\d+) kB/.exec(status);
  return match?.[1] === undefined ? 0 : Number(match[1]) / 1024;
}

async function eventLoopLagMs(adminPort: number): Promise<number> {
  const text = await (await fetch(`http://127.0.0.1:${adminPort}/metrics`)).text();
  const match = /^nodejs_eventloop_lag_p99_seconds (\S+)$/m.exec(text);
  return match?.[1] === undefined ? Number.NaN : Number(match[1]) * 1000;
}

async function main(): Promise<void> {
  const minutes = Number(options.minutes);
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
  const keygate = await spawnKeygate({
    cwd: dir,
    env: {
      KEYGATE_DATA_DIR: join(dir, "data"),
      KEYGATE_CONFIG: policy,
      KEYGATE_ADMIN_TOKENS: ADMIN_TOKEN,
      KEYGATE_HOST: "127.0.0.1",
      KEYGATE_GRPC_PORT: "0",
      KEYGATE_HTTP_AUTHZ_PORT: "0",
      KEYGATE_ADMIN_PORT: "0",
      KEYGATE_LOG_LEVEL: "info",
    },
  });
  const pid = keygate.child.pid ?? 0;
  const live: Array<{ id: string; secret: string; owner: string }> = [];
  const createKey = async (owner: string): Promise<void> => {
    const created = await admin(keygate.ports.admin, "CreateKey", { ownerId: owner, name: "soak" });
    const key = created["key"];
    const secret = created["secret"];
    if (typeof secret === "string" && typeof key === "object" && key !== null && "id" in key && typeof key.id === "string") live.push({ id: key.id, secret, owner });
  };
  for (let i = 0; i < 200; i++) await createKey(`soak-${i % 50}`);

  const channel = new GrpcClient(`127.0.0.1:${keygate.ports.grpc}`, credentials.createInsecure());
  let checks = 0;
  let failures = 0;
  let running = true;
  const check = (secret: string): Promise<void> =>
    new Promise((done) => {
      const request: CheckRequest = create(CheckRequestSchema, {
        attributes: { request: { http: { method: "GET", path: "/v1/x", headers: { authorization: `Bearer ${secret}` } } } },
      });
      channel.makeUnaryRequest<CheckRequest, CheckResponse>(
        authorizationDefinition.Check.path,
        authorizationDefinition.Check.requestSerialize,
        authorizationDefinition.Check.responseDeserialize,
        request,
        (error: ServiceError | null) => {
          checks += 1;
          if (error !== null) failures += 1;
          done();
        },
      );
    });
  const loops = Array.from({ length: Number(options.concurrency) }, async (_, i) => {
    for (let n = i; running; n++) await check(live[n % live.length]?.secret ?? "");
  });
  // Churn: every 100 ms create a key, rotate one, revoke one (keeping about 200 live).
  const churn = (async () => {
    for (let n = 0; running; n++) {
      await createKey(`soak-${n % 50}`);
      const victim = live.shift();
      if (victim !== undefined) {
        if (n % 2 === 0) {
          const rotated = await admin(keygate.ports.admin, "RotateKey", { id: victim.id, graceDays: 0 });
          const secret = rotated["secret"];
          const key = rotated["key"];
          if (typeof secret === "string" && typeof key === "object" && key !== null && "id" in key && typeof key.id === "string") live.push({ id: key.id, secret, owner: victim.owner });
          const old = live.shift();
          if (old !== undefined) await admin(keygate.ports.admin, "RevokeKey", { id: old.id, reason: "soak" });
        } else {
          await admin(keygate.ports.admin, "RevokeKey", { id: victim.id, reason: "soak" });
        }
      }
      await new Promise((r) => setTimeout(r, 100));
    }
  })();

  const samples: Sample[] = [];
  const startedAt = Date.now();
  const sampleMs = Number(options.sampleSeconds) * 1000;
  while (Date.now() - startedAt < minutes * 60_000) {
    await new Promise((r) => setTimeout(r, sampleMs));
    const sample: Sample = {
      atSeconds: Math.round((Date.now() - startedAt) / 1000),
      rssMb: Math.round(rssMb(pid) * 10) / 10,
      lagMs: Math.round((await eventLoopLagMs(keygate.ports.admin)) * 100) / 100,
      checks,
      failures,
      keys: live.length,
    };
    samples.push(sample);
    console.log(JSON.stringify(sample));
  }
  running = false;
  await Promise.all([...loops, churn]);
  channel.close();
  await keygate.stop("SIGTERM");
  rmSync(dir, { recursive: true, force: true });

  const first = samples[0];
  const last = samples.at(-1);
  const peakRss = Math.max(...samples.map((s) => s.rssMb));
  const peakLag = Math.max(...samples.map((s) => s.lagMs));
  console.log(
    JSON.stringify({
      minutes,
      checks,
      failures,
      checksPerSecond: Math.round(checks / (minutes * 60)),
      rssMb: { start: first?.rssMb, peak: peakRss, end: last?.rssMb },
      eventLoopLagP99Ms: { start: first?.lagMs, peak: peakLag, end: last?.lagMs },
    }),
  );
}

await main();
