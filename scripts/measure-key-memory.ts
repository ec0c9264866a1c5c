/**
 * Memory per cached key: builds the embedded Check path as src/server/app.ts wires it (SQLite
 * store, L1, in-process limiter, pipeline), issues N keys, sends each one Check (decoded from
 * Envoy's wire bytes, decided, answer encoded), then forces a full GC and reports what the cached
 * keys cost in RSS and V8 heap. The keys' secrets are held before and after, so they are not
 * counted.
 *
 *   node --expose-gc --import tsx scripts/measure-key-memory.ts [N]
 */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { create, toBinary } from "@bufbuild/protobuf";
import { pino } from "pino";
import { LifecycleService } from "../src/admin/lifecycle.js";
import { decodeCheckRequest } from "../src/authz/check-request.js";
import { DecisionPipeline } from "../src/authz/pipeline.js";
import { RouteTable } from "../src/authz/routes.js";
import { encodeCheckResponse } from "../src/authz/to-envoy.js";
import { SnapshotLookup } from "../src/cache/lookup.js";
import { LocalInvalidationBus, MemoryCache } from "../src/cache/memory.js";
import { DEFAULT_POLICY_INPUT, parsePolicy } from "../src/config.js";
import { CheckRequestSchema } from "../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import { KeyHasher } from "../src/keys/hasher.js";
import { KeyFormat } from "../src/keys/key-format.js";
import { LocalIdempotencyLedger } from "../src/limits/idempotency.js";
import { MemoryMeter } from "../src/limits/memory.js";
import { UsageRecorder } from "../src/limits/usage.js";
import { LastUsedRecorder } from "../src/store/last-used.js";
import { SqliteKeyStore } from "../src/store/sqlite.js";

const count = Number(process.argv[2] ?? 100_000);
const gc = globalThis.gc;
if (gc === undefined) throw new Error("run with node --expose-gc");
const collect = gc;

interface Sample {
  rss: number;
  heapUsed: number;
  external: number;
  arrayBuffers: number;
}

/** Memory after full collections, once the heap has stopped shrinking. */
async function settled(): Promise<Sample> {
  for (let i = 0; i < 4; i++) {
    collect();
    await new Promise((resolve) => setImmediate(resolve));
  }
  const { rss, heapUsed, external, arrayBuffers } = process.memoryUsage();
  return { rss, heapUsed, external, arrayBuffers };
}

const mb = (bytes: number): string => `${(bytes / 1_048_576).toFixed(1)} MB`;

async function main(): Promise<void> {
  const dataDir = mkdtempSync(join(tmpdir(), "keygate-memory-"));
  const start = await settled();
  const logger = pino({ level: "silent" });
  const policy = parsePolicy(DEFAULT_POLICY_INPUT);
  const nowMs = Date.now;
  // The same parts as buildKeygate's embedded mode.
  const store = new SqliteKeyStore(join(dataDir, "keygate.db"));
  const format = new KeyFormat("kg");
  const hasher = new KeyHasher("a-pepper-for-measuring-memory-only-0123456789");
  const usage = new UsageRecorder(store, logger, policy.limits.usageFlushSeconds * 1000);
  const meter = new MemoryMeter(store, usage);
  const bus = new LocalInvalidationBus();
  const local = new MemoryCache(policy.cache);
  const lookup = new SnapshotLookup({ local, store, shared: undefined, bus, logger });
  const lastUsed = new LastUsedRecorder(store, logger, policy.lastUsedFlushSeconds * 1000);
  const pipeline = new DecisionPipeline({
    format,
    hasher,
    lookup,
    routes: new RouteTable(policy.routes, policy.routeMatching),
    credentialHeaders: policy.credentialHeaders,
    lastUsed,
    meter,
    usage,
    policy,
    nowMs,
  });
  const lifecycle = new LifecycleService({ store, lookup, pipeline, format, hasher, policy, meter, usage, idempotency: new LocalIdempotencyLedger(), nowMs, logger });
  const built = await settled();

  // A typical Envoy request: the credential among fifteen headers.
  const headers: Record<string, string> = {
    ":authority": "api.example.com",
    ":method": "GET",
    ":path": "/v1/decks",
    ":scheme": "https",
    "user-agent": "curl/8.5.0",
    accept: "application/json",
    "accept-encoding": "gzip",
    "x-forwarded-for": "203.0.113.7",
    "x-forwarded-proto": "https",
    "x-envoy-expected-rq-timeout-ms": "15000",
    "x-request-id": "5f2b1c9e-8a7d-4e3f-9b6a-1c2d3e4f5a6b",
    "content-length": "0",
    "cache-control": "no-cache",
    "x-keygate-plan": "spoofed",
  };
  /** One Check as the gRPC handler runs it: decode, decide, encode. */
  const check = async (secret: string): Promise<boolean> => {
    const bytes = toBinary(
      CheckRequestSchema,
      create(CheckRequestSchema, { attributes: { request: { http: { id: "1", method: "GET", path: "/v1/decks", headers: { ...headers, "x-api-key": secret } } } } }),
    );
    const http = decodeCheckRequest(bytes).attributes?.request?.http;
    if (http === undefined) throw new Error("request did not decode");
    const decision = await pipeline.decide({ method: http.method, path: http.path, headers: http.headers, contextExtensions: undefined });
    encodeCheckResponse(decision, decision.allow ? Object.keys(http.headers) : [], http.id, nowMs());
    return decision.allow;
  };

  // One owner a key: every cached key brings its own account and rate bucket (the worst case).
  // One extra key is checked before the baseline, so one-time set-up of the Check path (lazily
  // built tables, compiled code) is not counted per key.
  const secrets: string[] = [];
  for (let i = 0; i <= count; i++) {
    const issued = await lifecycle.createKey({ ownerId: `owner-${i}`, name: "k", scopes: [], mode: "live", expiresAtMs: null, metadata: {} });
    secrets.push(issued.secret);
  }
  const [first = ""] = secrets;
  await check(first);
  await lastUsed.flush();
  await usage.flush();
  const issued = await settled();

  let allowed = 0;
  for (let i = 1; i <= count; i++) if (await check(secrets[i] ?? "")) allowed++;
  // Pending last-used and usage writes are write-behind queues, flushed on a timer in a server.
  await lastUsed.flush();
  await usage.flush();
  const cached = await settled();

  const per = (field: keyof Sample): string => `${Math.round((cached[field] - issued[field]) / count)} B`;
  console.log(`keys checked: ${count}, allowed: ${allowed}, in L1: ${local.size}`);
  console.log(`baseline RSS ${mb(start.rss)}; after building the Check path ${mb(built.rss)} (heap ${mb(built.heapUsed)}); after issuing ${mb(issued.rss)} (heap ${mb(issued.heapUsed)})`);
  console.log(`with ${count} cached keys: RSS ${mb(cached.rss)}, heap ${mb(cached.heapUsed)}, external ${mb(cached.external)}`);
  console.log(`per cached key: RSS ${per("rss")}, V8 heap ${per("heapUsed")}, external ${per("external")}`);
  // Keep everything the measurement is about reachable until here.
  if (secrets.length !== count + 1 || local.size < count) console.log("unexpected: not every key was cached");
  await bus.close();
  await store.close();
  rmSync(dataDir, { recursive: true, force: true });
}

await main();
