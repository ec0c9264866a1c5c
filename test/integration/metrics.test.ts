import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { KeyFormat } from "../../src/keys/key-format.js";
import { TEST_POLICY, checkInit, checkOutcome, httpCheck, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { requireServer } from "../harness/ports.js";
import { spawnKeygate } from "../harness/process.js";
import { redisAvailable, startRedis } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";

let kg: TestKeygate;
beforeAll(async () => {
  kg = await startKeygate();
});
afterAll(async () => {
  await kg.stop();
});

async function scrape(adminPort: number): Promise<string> {
  const res = await fetch(`http://127.0.0.1:${adminPort}/metrics`);
  expect(res.status).toBe(200);
  return res.text();
}

/** The value of one sample line, e.g. `keygate_checks_total{decision="allow",reason="OK",mode="grpc"}`. */
function sample(text: string, name: string, labels: Record<string, string>): number | undefined {
  for (const line of text.split("\n")) {
    if (!line.startsWith(`${name}{`) && !line.startsWith(`${name} `)) continue;
    const [series, value] = line.split(" ");
    if (series === undefined || value === undefined) continue;
    const ok = Object.entries(labels).every(([k, v]) => series.includes(`${k}="${v}"`));
    if (ok) return Number(value);
  }
  return undefined;
}

describe("/metrics", () => {
  it("counts known traffic by decision, reason and mode, with durations, cache results and queues", async () => {
    const created = await kg.admin.createKey({ ownerId: "metrics-owner", name: "m", scopes: ["tutor"] });
    const auth = { authorization: `Bearer ${created.secret}` };
    for (let i = 0; i < 3; i++) expect((await kg.check(checkInit(auth))).status?.code).toBe(0);
    for (let i = 0; i < 2; i++) expect((await kg.check(checkInit({}))).status?.code).toBe(16);
    expect((await httpCheck(kg.ports.http, "/check/v1/decks", auth)).status).toBe(403);
    const unknown = new KeyFormat("kg").generate("live");
    expect((await httpCheck(kg.ports.http, "/check", { "x-api-key": unknown })).status).toBe(401);
    expect((await httpCheck(kg.ports.http, "/check", { "x-api-key": unknown })).status).toBe(401);

    const text = await scrape(kg.ports.admin);
    expect(sample(text, "keygate_checks_total", { decision: "allow", reason: "OK", mode: "grpc" })).toBe(3);
    expect(sample(text, "keygate_checks_total", { decision: "deny", reason: "MISSING_CREDENTIAL", mode: "grpc" })).toBe(2);
    expect(sample(text, "keygate_checks_total", { decision: "deny", reason: "MISSING_SCOPE", mode: "http" })).toBe(1);
    expect(sample(text, "keygate_checks_total", { decision: "deny", reason: "UNKNOWN_KEY", mode: "http" })).toBe(2);
    expect(sample(text, "keygate_check_duration_seconds_count", { mode: "grpc" })).toBe(5);
    expect(sample(text, "keygate_check_duration_seconds_count", { mode: "http" })).toBe(3);
    expect(sample(text, "keygate_check_duration_seconds_bucket", { mode: "grpc", le: "0.0001" })).toBeGreaterThanOrEqual(0);
    // The first check of each key misses L1 and reads the store; the rest hit (or hit the negative cache).
    expect(sample(text, "keygate_cache_lookups_total", { layer: "l1", result: "miss" })).toBe(2);
    expect(sample(text, "keygate_cache_lookups_total", { layer: "l1", result: "hit" })).toBe(3);
    expect(sample(text, "keygate_cache_lookups_total", { layer: "l1", result: "negative" })).toBe(1);
    expect(sample(text, "keygate_backend_duration_seconds_count", { backend: "store", op: "find_snapshot" })).toBe(2);
    expect(sample(text, "keygate_write_behind_pending", { queue: "last_used" })).toBe(1);
    expect(sample(text, "keygate_write_behind_pending", { queue: "usage" })).toBe(2);
    expect(text).not.toContain(created.secret);
  });
});

describe.runIf(requireServer("redis-server", redisAvailable(), "apt-get install redis-server"))("/metrics with Redis", () => {
  let redis: RedisServer;
  let dataDir: string;
  let rkg: TestKeygate;
  let a = "";
  let b = "";
  beforeAll(async () => {
    const started = await startRedis();
    if (started === null) throw new Error("redis-server is not on PATH");
    redis = started;
    dataDir = mkdtempSync(join(tmpdir(), "keygate-metrics-redis-"));
    // One L1 entry of each kind, so a second key evicts the first and its next Check reaches L2.
    const policy = { ...TEST_POLICY, cache: { maxEntries: 1, ttlSeconds: 600, negativeMaxEntries: 1, negativeTtlSeconds: 600 } };
    const env = { KEYGATE_REDIS_URL: redis.url };
    // Keys are created by an earlier instance: a change published on the bus comes back to its
    // own L1 at a time of Redis's choosing, and would move a count from one series to another.
    const setup = await startKeygate({ dataDir, policy, env });
    a = (await setup.admin.createKey({ ownerId: "metrics-redis-a", name: "a" })).secret;
    b = (await setup.admin.createKey({ ownerId: "metrics-redis-b", name: "b" })).secret;
    await setup.stop({ keepData: true });
    rkg = await startKeygate({ dataDir, policy, env });
  });
  afterAll(async () => {
    await rkg?.stop();
    await redis?.stop();
    if (dataDir !== undefined) rmSync(dataDir, { recursive: true, force: true });
  });

  it("counts decisions, L1 and L2 results and Redis latency for known traffic", async () => {
    const check = async (secret: string): Promise<number | undefined> => (await rkg.check(checkInit({ authorization: `Bearer ${secret}` }))).status?.code;
    expect(await check(a)).toBe(0); // L1 miss, L2 miss, store
    expect(await check(a)).toBe(0); // L1 hit
    expect(await check(b)).toBe(0); // L1 miss, L2 miss, store; evicts a
    expect(await check(a)).toBe(0); // L1 miss, L2 hit
    const format = new KeyFormat("kg");
    const u = format.generate("live");
    const v = format.generate("live");
    const unknown = async (secret: string): Promise<number> => (await httpCheck(rkg.ports.http, "/check", { "x-api-key": secret })).status;
    expect(await unknown(u)).toBe(401); // L1 miss, L2 miss, store; a miss marker in both
    expect(await unknown(v)).toBe(401); // L1 miss, L2 miss, store; evicts u's marker
    expect(await unknown(u)).toBe(401); // L1 miss, L2 negative
    expect(await unknown(u)).toBe(401); // L1 negative

    const text = await scrape(rkg.ports.admin);
    expect(sample(text, "keygate_checks_total", { decision: "allow", reason: "OK", mode: "grpc" })).toBe(4);
    expect(sample(text, "keygate_checks_total", { decision: "deny", reason: "UNKNOWN_KEY", mode: "http" })).toBe(4);
    expect(sample(text, "keygate_checks_total", { decision: "error" })).toBeUndefined();
    expect(sample(text, "keygate_cache_lookups_total", { layer: "l1", result: "miss" })).toBe(6);
    expect(sample(text, "keygate_cache_lookups_total", { layer: "l1", result: "hit" })).toBe(1);
    expect(sample(text, "keygate_cache_lookups_total", { layer: "l1", result: "negative" })).toBe(1);
    expect(sample(text, "keygate_cache_lookups_total", { layer: "l2", result: "miss" })).toBe(4);
    expect(sample(text, "keygate_cache_lookups_total", { layer: "l2", result: "hit" })).toBe(1);
    expect(sample(text, "keygate_cache_lookups_total", { layer: "l2", result: "negative" })).toBe(1);
    expect(sample(text, "keygate_backend_duration_seconds_count", { backend: "store", op: "find_snapshot" })).toBe(4);
    expect(sample(text, "keygate_backend_duration_seconds_count", { backend: "redis", op: "l2_get" })).toBe(6);
    // One charge script run per allowed Check: the limits live in Redis.
    expect(sample(text, "keygate_backend_duration_seconds_count", { backend: "redis", op: "charge" })).toBe(4);
    expect(sample(text, "keygate_backend_errors_total", { backend: "redis" })).toBeUndefined();
  });

  it("counts the read of a refused key's limits as op peek, not as a charge", async () => {
    const before = await scrape(rkg.ports.admin);
    const charges = sample(before, "keygate_backend_duration_seconds_count", { backend: "redis", op: "charge" }) ?? 0;
    const peeks = sample(before, "keygate_backend_duration_seconds_count", { backend: "redis", op: "peek" }) ?? 0;
    // The default scope is tutor; /v1/decks needs decks: refused 403, its limits read, nothing charged.
    const refused = await rkg.check(checkInit({ authorization: `Bearer ${a}` }, "/v1/decks"));
    expect(checkOutcome(refused)).toEqual({ status: 403, code: "FORBIDDEN" });
    const after = await scrape(rkg.ports.admin);
    expect(sample(after, "keygate_backend_duration_seconds_count", { backend: "redis", op: "peek" })).toBe(peeks + 1);
    expect(sample(after, "keygate_backend_duration_seconds_count", { backend: "redis", op: "charge" }) ?? 0).toBe(charges);
  });
});

describe("/metrics with a broken store", () => {
  it("counts an undecidable Check as decision error, reason UNAVAILABLE, with the store error", async () => {
    const broken = await startKeygate();
    try {
      const created = await broken.admin.createKey({ ownerId: "metrics-broken", name: "k" });
      await broken.app.store.close();
      await expect(broken.check(checkInit({ authorization: `Bearer ${created.secret}` }))).rejects.toMatchObject({ code: 14 });
      expect((await httpCheck(broken.ports.http, "/check", { "x-api-key": created.secret })).status).toBe(503);

      const text = await scrape(broken.ports.admin);
      expect(sample(text, "keygate_checks_total", { decision: "error", reason: "UNAVAILABLE", mode: "grpc" })).toBe(1);
      expect(sample(text, "keygate_checks_total", { decision: "error", reason: "UNAVAILABLE", mode: "http" })).toBe(1);
      expect(sample(text, "keygate_checks_total", { decision: "allow" })).toBeUndefined();
      expect(sample(text, "keygate_checks_total", { decision: "deny" })).toBeUndefined();
      expect(sample(text, "keygate_backend_errors_total", { backend: "store", op: "find_snapshot" })).toBe(2);
      expect(sample(text, "keygate_check_duration_seconds_count", { mode: "grpc" })).toBe(1);
      expect(sample(text, "keygate_check_duration_seconds_count", { mode: "http" })).toBe(1);
    } finally {
      await broken.stop();
    }
  });
});

describe("/metrics of keygate serve", () => {
  it("includes the standard process and Node.js metrics next to keygate's own", async () => {
    const dir = mkdtempSync(join(tmpdir(), "keygate-metrics-serve-"));
    const served = await spawnKeygate({
      cwd: dir,
      env: { KEYGATE_DATA_DIR: join(dir, "data"), KEYGATE_HOST: "127.0.0.1", KEYGATE_GRPC_PORT: "0", KEYGATE_HTTP_AUTHZ_PORT: "0", KEYGATE_ADMIN_PORT: "0" },
    });
    try {
      const text = await scrape(served.ports.admin);
      expect(sample(text, "process_resident_memory_bytes", {})).toBeGreaterThan(0);
      expect(sample(text, "process_cpu_user_seconds_total", {})).toBeGreaterThan(0);
      expect(sample(text, "nodejs_eventloop_lag_p99_seconds", {})).toBeGreaterThanOrEqual(0);
      expect(sample(text, "nodejs_heap_size_used_bytes", {})).toBeGreaterThan(0);
      expect(text).toContain("# TYPE keygate_checks_total counter");
      // promtool check metrics: only counters end in _total.
      const misnamed = [...text.matchAll(/^# TYPE (\S+_total) (\S+)$/gm)].filter(([, , type]) => type !== "counter").map(([, name]) => name);
      expect(misnamed).toEqual([]);
      expect(sample(text, "nodejs_active_handles", { type: "Server" })).toBeGreaterThanOrEqual(1);
    } finally {
      await served.stop("SIGTERM");
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
