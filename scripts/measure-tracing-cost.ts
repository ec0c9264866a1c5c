/**
 * What decision tracing costs a cache-hit Check, in process: the gRPC Check core (headers, the
 * pipeline, the encoded answer) run in a loop over one key in L1, with
 *   off      no tracer (the default; the request carries a traceparent all the same),
 *   dropped  a tracer whose sampler drops every span (always_off),
 *   sampled  every span recorded and handed to an exporter that does nothing.
 * Rounds interleave the three so a shared machine's noise lands on all of them; the report is the
 * median CPU time (user + system, so time spent waiting for a shared core is not counted) per
 * decision of each and its ratio to off, and the same in wall time.
 *
 *   taskset -c 1 node --import tsx scripts/measure-tracing-cost.ts [rounds] [decisions-per-round]
 */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { create, toBinary } from "@bufbuild/protobuf";
import { ExportResultCode } from "@opentelemetry/core";
import type { ExportResult } from "@opentelemetry/core";
import type { ReadableSpan, SpanExporter } from "@opentelemetry/sdk-trace";
import { pino } from "pino";
import { LifecycleService } from "../src/admin/lifecycle.js";
import { decodeCheckRequest } from "../src/authz/check-request.js";
import { DecisionPipeline } from "../src/authz/pipeline.js";
import { RouteTable } from "../src/authz/routes.js";
import { SnapshotLookup } from "../src/cache/lookup.js";
import { LocalInvalidationBus, MemoryCache } from "../src/cache/memory.js";
import { DEFAULT_POLICY_INPUT, parsePolicy } from "../src/config.js";
import { CheckRequestSchema } from "../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import { KeyHasher } from "../src/keys/hasher.js";
import { KeyFormat } from "../src/keys/key-format.js";
import { LocalIdempotencyLedger } from "../src/limits/idempotency.js";
import { MemoryMeter } from "../src/limits/memory.js";
import { UsageRecorder } from "../src/limits/usage.js";
import { createAuthzCore } from "../src/server/grpc-authz.js";
import type { AuthzCore } from "../src/server/grpc-authz.js";
import { Metrics } from "../src/server/metrics.js";
import { Readiness } from "../src/server/readiness.js";
import { LastUsedRecorder } from "../src/store/last-used.js";
import { SqliteKeyStore } from "../src/store/sqlite.js";
import { createTracing } from "../src/tracing/otlp.js";
import type { Tracing } from "../src/tracing/otlp.js";

const rounds = Number(process.argv[2] ?? 15);
const perRound = Number(process.argv[3] ?? 20_000);
// Yield to the event loop this often, so the batch processor's exports run as in a server.
const YIELD_EVERY = 256;

/** Accepts every batch and does nothing with it: what is left is the SDK's own cost. */
class NoopExporter implements SpanExporter {
  exported = 0;
  export(spans: ReadableSpan[], done: (result: ExportResult) => void): void {
    this.exported += spans.length;
    done({ code: ExportResultCode.SUCCESS });
  }
  async shutdown(): Promise<void> {}
}

const median = (values: readonly number[]): number => {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? (sorted[mid] ?? 0) : ((sorted[mid - 1] ?? 0) + (sorted[mid] ?? 0)) / 2;
};

async function main(): Promise<void> {
  const dataDir = mkdtempSync(join(tmpdir(), "keygate-tracing-cost-"));
  const logger = pino({ level: "silent" });
  const policy = parsePolicy(DEFAULT_POLICY_INPUT);
  const nowMs = Date.now;
  // The same parts as buildKeygate's embedded mode.
  const store = new SqliteKeyStore(join(dataDir, "keygate.db"));
  const format = new KeyFormat("kg");
  const hasher = new KeyHasher("a-pepper-for-measuring-tracing-only-0123456789");
  const usage = new UsageRecorder(store, logger, 3_600_000);
  // A plan no loop can exhaust, so every decision is the same allow.
  const meter = new MemoryMeter(store, usage);
  const bus = new LocalInvalidationBus();
  const local = new MemoryCache(policy.cache);
  const lookup = new SnapshotLookup({ local, store, shared: undefined, bus, logger, storeSystem: store.kind });
  const lastUsed = new LastUsedRecorder(store, logger, 3_600_000);
  const unlimited = { ...policy, plans: { ...policy.plans, basic: { maxActiveKeys: 1, rateLimit: { limit: 1_000_000_000, windowSeconds: 60 }, dailyQuota: null, quotas: {}, monthlyCredits: null } } };
  const pipeline = new DecisionPipeline({ format, hasher, lookup, routes: new RouteTable(policy.routes, policy.routeMatching), credentialHeaders: policy.credentialHeaders, lastUsed, meter, usage, policy: unlimited, nowMs });
  const lifecycle = new LifecycleService({ store, lookup, pipeline, format, hasher, policy: unlimited, meter, usage, idempotency: new LocalIdempotencyLedger(), nowMs, logger });
  const issued = await lifecycle.createKey({ ownerId: "owner-1", name: "k", scopes: [], mode: "live", expiresAtMs: null, metadata: {} });

  const metrics = new Metrics({ defaultMetrics: false });
  const readiness = new Readiness();
  const sampledExporter = new NoopExporter();
  const dropped: Tracing = createTracing({ serviceName: "keygate", sampler: "always_off", samplerRatio: 1, scheduleDelayMs: 100 }, logger, new NoopExporter());
  const sampled: Tracing = createTracing({ serviceName: "keygate", sampler: "parentbased_always_on", samplerRatio: 1, scheduleDelayMs: 100 }, logger, sampledExporter);
  const cores: Record<string, AuthzCore> = {
    off: createAuthzCore({ pipeline, readiness, metrics, logger, nowMs }, true),
    dropped: createAuthzCore({ pipeline, readiness, metrics, logger, nowMs, tracer: dropped.tracer }, true),
    sampled: createAuthzCore({ pipeline, readiness, metrics, logger, nowMs, tracer: sampled.tracer }, true),
  };

  // A typical Envoy request with the proxy's trace context, decoded once: the decoder is the same for all three.
  const bytes = toBinary(
    CheckRequestSchema,
    create(CheckRequestSchema, {
      attributes: {
        request: {
          http: {
            id: "5f2b1c9e-8a7d-4e3f-9b6a-1c2d3e4f5a6b",
            method: "GET",
            path: "/v1/decks",
            headers: {
              ":authority": "api.example.com",
              ":path": "/v1/decks",
              "user-agent": "curl/8.5.0",
              accept: "application/json",
              "x-forwarded-for": "203.0.113.7",
              "x-request-id": "5f2b1c9e-8a7d-4e3f-9b6a-1c2d3e4f5a6b",
              traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
              tracestate: "envoy=1",
              "x-api-key": issued.secret,
            },
          },
        },
      },
    }),
  );
  const request = decodeCheckRequest(bytes);
  let answered = 0;
  let failed = 0;
  const reply = (_target: null, answer: Uint8Array | null): void => {
    if (answer === null) failed++;
    else answered++;
  };

  /** One round: [CPU ns, wall ns] per decision. */
  const run = async (core: AuthzCore, n: number): Promise<[number, number]> => {
    const cpu = process.cpuUsage();
    const started = process.hrtime.bigint();
    for (let i = 0; i < n; i++) {
      core.check(request, null, reply);
      if (i % YIELD_EVERY === YIELD_EVERY - 1) await new Promise((resolve) => setImmediate(resolve));
    }
    const wall = Number(process.hrtime.bigint() - started) / n;
    const used = process.cpuUsage(cpu);
    return [((used.user + used.system) * 1000) / n, wall];
  };

  // Warm-up: the key into L1, and every path compiled.
  for (const core of Object.values(cores)) {
    core.check(request, null, reply);
    await new Promise((resolve) => setTimeout(resolve, 50));
    await run(core, perRound);
  }
  const samples: Record<string, number[]> = { off: [], dropped: [], sampled: [] };
  const wallSamples: Record<string, number[]> = { off: [], dropped: [], sampled: [] };
  const names = Object.keys(cores);
  for (let r = 0; r < rounds; r++) {
    // Rotate the order each round, so none always runs first.
    for (let k = 0; k < names.length; k++) {
      const name = names[(r + k) % names.length] ?? "off";
      const core = cores[name];
      if (core === undefined) continue;
      const [cpu, wall] = await run(core, perRound);
      samples[name]?.push(cpu);
      wallSamples[name]?.push(wall);
    }
  }
  await sampled.shutdown();
  await dropped.shutdown();
  if (failed > 0) throw new Error(`${failed} decisions failed`);

  console.log(`decisions: ${answered}, rounds: ${rounds} x ${perRound} per variant, spans exported (sampled): ${sampledExporter.exported}`);
  for (const [label, table] of [["CPU", samples], ["wall", wallSamples]] as const) {
    const off = median(table["off"] ?? []);
    for (const name of names) {
      const ns = median(table[name] ?? []);
      const spread = (table[name] ?? []).map((v) => Math.round(v)).sort((a, b) => a - b);
      console.log(`${label.padEnd(4)} ${name.padEnd(8)} ${ns.toFixed(0).padStart(6)} ns/decision  x${(ns / off).toFixed(2)} of off   (min ${spread[0]}, max ${spread[spread.length - 1]})`);
    }
  }
  await lastUsed.stop();
  await usage.stop();
  await store.close();
  rmSync(dataDir, { recursive: true, force: true });
}

await main();
