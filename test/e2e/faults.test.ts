import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Redis } from "ioredis";
import { stringify } from "yaml";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { KeyFormat } from "../../src/keys/key-format.js";
import { ADMIN_TOKEN, TEST_POLICY, postJson } from "../harness/keygate.js";
import { mongoWireAvailable, startMongoWire } from "../harness/mongo-wire.js";
import type { MongoWire } from "../harness/mongo-wire.js";
import { until } from "../harness/poll.js";
import { requireServer } from "../harness/ports.js";
import { sharedBackendEnv, spawnKeygate } from "../harness/process.js";
import type { KeygateProcess } from "../harness/process.js";
import { redisAvailable, startRedis } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";

/** Polls every 20 ms: these waits are for traffic to pile up and backends to come back, not measured delays. */
const POLL = { intervalMs: 20 } as const;

const ready =
  requireServer("MongoDB-wire server", mongoWireAvailable(), "run .ci/install-mongo-wire.sh") &&
  requireServer("redis-server", redisAvailable(), "apt-get install redis-server");

/** The rate limit of the "small" plan: after Redis comes back, exactly this many pass, then 429. */
const SMALL_LIMIT = 5;

type Phase = "before" | "down" | "after";

/**
 * HTTP-mode Check loops counting answers by phase, kind of key and status (-1: transport error).
 * An answer to a request that was sent in one phase and answered in another, or sent while the
 * test was switching phases, counts under "transition": it proves nothing about either side.
 */
class PhasedLoad {
  #phase: Phase | "transition" = "before";
  #running = true;
  readonly #loops: Array<Promise<void>> = [];
  readonly #counts = new Map<string, Map<number, number>>();
  readonly #slowestMs = new Map<string, number>();

  constructor(private readonly port: number) {}

  set phase(phase: Phase | "transition") {
    this.#phase = phase;
  }

  /** Starts `concurrency` loops that send `next(n)` as the key and count the answers under `kind`. */
  add(kind: string, concurrency: number, next: (n: number) => string): void {
    for (let i = 0; i < concurrency; i++) {
      this.#loops.push(
        (async () => {
          for (let n = i; this.#running; n += concurrency) {
            const sentIn = this.#phase;
            const sentAt = performance.now();
            let status = -1;
            try {
              const res = await fetch(`http://127.0.0.1:${this.port}/check/v1/x`, { headers: { "x-api-key": next(n) } });
              await res.arrayBuffer();
              status = res.status;
            } catch {
              // Counted as -1: a transport error is a failed check.
            }
            const phase = sentIn === this.#phase ? sentIn : "transition";
            const id = `${phase}|${kind}`;
            const byStatus = this.#counts.get(id) ?? new Map<number, number>();
            byStatus.set(status, (byStatus.get(status) ?? 0) + 1);
            this.#counts.set(id, byStatus);
            this.#slowestMs.set(id, Math.max(this.#slowestMs.get(id) ?? 0, Math.round(performance.now() - sentAt)));
          }
        })(),
      );
    }
  }

  /** Answers by status for one phase and kind. */
  answers(phase: Phase, kind: string): Map<number, number> {
    return this.#counts.get(`${phase}|${kind}`) ?? new Map<number, number>();
  }

  count(phase: Phase, kind: string, status?: number): number {
    const byStatus = this.answers(phase, kind);
    if (status !== undefined) return byStatus.get(status) ?? 0;
    let total = 0;
    for (const n of byStatus.values()) total += n;
    return total;
  }

  /** `{ phase: { kind: { status: count, slowestMs } } }`, for the log. */
  summary(): Record<string, Record<string, Record<string, number>>> {
    const out: Record<string, Record<string, Record<string, number>>> = {};
    for (const [id, byStatus] of this.#counts) {
      const [phase = "", kind = ""] = id.split("|");
      const forPhase = out[phase] ?? {};
      forPhase[kind] = { ...Object.fromEntries(byStatus), slowestMs: this.#slowestMs.get(id) ?? 0 };
      out[phase] = forPhase;
    }
    return out;
  }

  async stop(): Promise<void> {
    this.#running = false;
    await Promise.all(this.#loops);
  }
}

/** The value of one sample in Prometheus text, or undefined when the series is absent. */
function sample(text: string, name: string, labels: Record<string, string>): number | undefined {
  for (const line of text.split("\n")) {
    if (!line.startsWith(`${name}{`) && !line.startsWith(`${name} `)) continue;
    const [series, value] = line.split(" ");
    if (series === undefined || value === undefined) continue;
    if (Object.entries(labels).every(([k, v]) => series.includes(`${k}="${v}"`))) return Number(value);
  }
  return undefined;
}

function secretOf(created: { json: Record<string, unknown> }): string {
  const secret = created.json["secret"];
  if (typeof secret !== "string") throw new Error(`CreateKey failed: ${JSON.stringify(created.json)}`);
  return secret;
}

describe.runIf(ready)("faults under load (one replica on MongoDB and Redis)", () => {
  let mongo: MongoWire;
  let redis: RedisServer;
  let keygate: KeygateProcess;
  let dir: string;
  /** Keys the load checks from the start: cached in L1 and L2 before any outage. */
  const secrets: string[] = [];
  /** Keys created before the MongoDB outage and kept out of the load until it begins: in no cache. */
  const neverChecked: string[] = [];
  let smallSecret = "";

  beforeAll(async () => {
    const started = await startRedis();
    if (started === null) throw new Error("redis-server is not on PATH");
    redis = started;
    mongo = await startMongoWire();
    dir = mkdtempSync(join(tmpdir(), "keygate-faults-"));
    const policy = join(dir, "policy.yaml");
    // "load": a rate limit the load cannot reach; these tests count fault answers, and a 429 from
    // a fast machine would be a correct refusal that hides what they measure. "small": a limit
    // the test reaches on purpose, to see limits enforced again after Redis returns.
    const plans = {
      ...TEST_POLICY.plans,
      load: { maxActiveKeys: 100, rateLimit: { limit: 10_000_000, windowSeconds: 60 }, dailyQuota: null, monthlyCredits: null },
      small: { maxActiveKeys: 1, rateLimit: { limit: SMALL_LIMIT, windowSeconds: 3600 }, dailyQuota: null, monthlyCredits: null },
    };
    // Cache lifetimes longer than the file runs, so "cached" stays cached through both outages.
    const cache = { maxEntries: 10_000, ttlSeconds: 600, negativeMaxEntries: 10_000, negativeTtlSeconds: 5 };
    writeFileSync(policy, stringify({ ...TEST_POLICY, plans, cache }));
    keygate = await spawnKeygate({
      cwd: dir,
      env: sharedBackendEnv({
        mongoUri: mongo.uri,
        redisUrl: redis.url,
        pepper: "faults-test-pepper-0123456789abcdefghijklm",
        policyFile: policy,
        adminToken: ADMIN_TOKEN,
        // A paused MongoDB costs each uncached Check its whole budget: 1 s keeps the test short.
        extra: { KEYGATE_CHECK_BUDGET_MS: "1000" },
      }),
    });
    const admin = keygate.ports.admin;
    for (let i = 0; i < 20; i++) {
      await postJson(admin, "UpsertAccount", { ownerId: `faults-${i}`, plan: "load" });
      secrets.push(secretOf(await postJson(admin, "CreateKey", { ownerId: `faults-${i}`, name: "f" })));
    }
    await postJson(admin, "UpsertAccount", { ownerId: "faults-reserve", plan: "load" });
    for (let i = 0; i < 10; i++) neverChecked.push(secretOf(await postJson(admin, "CreateKey", { ownerId: "faults-reserve", name: `r${i}` })));
    await postJson(admin, "UpsertAccount", { ownerId: "faults-small", plan: "small" });
    smallSecret = secretOf(await postJson(admin, "CreateKey", { ownerId: "faults-small", name: "s" }));
  }, 120_000);

  afterAll(async () => {
    await keygate?.stop("SIGKILL");
    await Promise.allSettled([redis?.stop(), mongo?.stop()]);
    if (dir !== undefined) rmSync(dir, { recursive: true, force: true });
  });

  it("Redis killed and restarted during load: no failed check, and limits come back", async () => {
    const traffic = new PhasedLoad(keygate.ports.http);
    traffic.add("cached", 8, (n) => secrets[n % secrets.length] ?? "");
    await new Promise((r) => setTimeout(r, 500));
    traffic.phase = "transition";
    await redis.stop();
    traffic.phase = "down";
    await new Promise((r) => setTimeout(r, 1500));
    traffic.phase = "transition";
    await redis.start();
    const restartedAt = performance.now();
    // Recovered when a change can tell the caches again (the bus and L2 are back).
    await until(async () => (await postJson(keygate.ports.admin, "UpsertAccount", { ownerId: "faults-0", plan: "load" })).status === 200, 15_000, "Redis back (UpsertAccount answering 200)", POLL);
    const recoveryMs = performance.now() - restartedAt;
    traffic.phase = "after";
    await new Promise((r) => setTimeout(r, 300));

    // The small plan's bucket lives in Redis again: exactly its limit passes, then 429, and the
    // bucket key exists in the restarted (empty) Redis, so the in-process fallback did not do it.
    const small: number[] = [];
    for (let i = 0; i <= SMALL_LIMIT; i++) {
      const res = await fetch(`http://127.0.0.1:${keygate.ports.http}/check/v1/x`, { headers: { "x-api-key": smallSecret } });
      await res.arrayBuffer();
      small.push(res.status);
    }
    const client = new Redis(redis.url, { lazyConnect: true, maxRetriesPerRequest: 1 });
    await client.connect();
    const bucket = await client.get("kg:rl:a:faults-small");
    await client.quit();
    await traffic.stop();

    console.log(
      `Redis outage under load: answers by phase and status ${JSON.stringify(traffic.summary())}; recovered ${recoveryMs.toFixed(0)} ms after restart; small plan after recovery ${JSON.stringify(small)}`,
    );
    for (const phase of ["before", "down", "after"] as const) {
      expect(traffic.count(phase, "cached"), phase).toBeGreaterThan(0);
      expect([...traffic.answers(phase, "cached").keys()], phase).toEqual([200]);
    }
    expect(small).toEqual([...Array.from({ length: SMALL_LIMIT }, () => 200), 429]);
    expect(bucket).not.toBeNull();
  });

  it("MongoDB stopped during load: cached keys pass, undecidable keys get 503 and never an allow, and it recovers", async () => {
    const format = new KeyFormat("kg");
    const traffic = new PhasedLoad(keygate.ports.http);
    traffic.add("cached", 4, (n) => secrets[n % secrets.length] ?? "");
    await new Promise((r) => setTimeout(r, 500));
    traffic.phase = "transition";
    await mongo.pause();
    const stoppedAt = performance.now();
    traffic.phase = "down";
    // Only now do keys that no cache holds join the load: created before the outage but never
    // checked, and well-formed keys no store has ever seen (a new one each request, so the
    // negative cache cannot answer them either).
    traffic.add("never-checked", 2, (n) => neverChecked[n % neverChecked.length] ?? "");
    traffic.add("fresh", 2, () => format.generate("live"));
    // A paused server is not seen as disconnected at once: each lookup waits out its deadline
    // (the Check budget) before it is answered 503, so wait for enough of them.
    await until(
      () => traffic.count("down", "never-checked", 503) >= 20 && traffic.count("down", "fresh", 503) >= 20,
      20_000,
      "20 503s each for never-checked and fresh keys during the MongoDB outage",
      { ...POLL, detail: () => ` ${JSON.stringify(traffic.summary())}` },
    );
    traffic.phase = "transition";
    await mongo.start();
    const restartedAt = performance.now();
    // The test server comes back empty; recovery is the first key created and checked after it.
    let created = 0;
    await until(
      async () => {
        await postJson(keygate.ports.admin, "UpsertAccount", { ownerId: "faults-after", plan: "load" }).catch(() => undefined);
        const after = await postJson(keygate.ports.admin, "CreateKey", { ownerId: "faults-after", name: `after-${created++}` }).catch(() => null);
        const secret = after?.json["secret"];
        if (typeof secret !== "string") return false;
        return (await fetch(`http://127.0.0.1:${keygate.ports.http}/check`, { headers: { "x-api-key": secret } })).status === 200;
      },
      30_000,
      "MongoDB back (a new key created and allowed)",
      POLL,
    );
    const recoveryMs = performance.now() - restartedAt;
    traffic.phase = "after";
    await until(
      () => ["cached", "never-checked", "fresh"].every((kind) => traffic.count("after", kind) >= 20),
      15_000,
      "20 answers for each kind of key after recovery",
      { ...POLL, detail: () => ` ${JSON.stringify(traffic.summary())}` },
    );
    await traffic.stop();
    const metrics = await (await fetch(`http://127.0.0.1:${keygate.ports.admin}/metrics`)).text();
    const storeErrors = sample(metrics, "keygate_backend_errors_total", { backend: "store", op: "find_snapshot" });

    console.log(
      `MongoDB outage under load (${((restartedAt - stoppedAt) / 1000).toFixed(1)} s): answers by phase, kind and status ${JSON.stringify(traffic.summary())}; recovered ${recoveryMs.toFixed(0)} ms after restart; store find_snapshot errors ${storeErrors}`,
    );
    expect([...traffic.answers("before", "cached").keys()]).toEqual([200]);
    // While MongoDB was down: cached keys passed. A key no cache held could not be decided, so
    // it got 503 every time: never a 200, and never a 401 that would call a real key unknown
    // (nor a negative-cache entry that would keep saying so after recovery).
    expect(traffic.count("down", "cached", 200)).toBeGreaterThan(0);
    expect([...traffic.answers("down", "cached").keys()]).toEqual([200]);
    for (const kind of ["never-checked", "fresh"]) {
      expect(traffic.count("down", kind, 503), kind).toBeGreaterThan(0);
      expect([...traffic.answers("down", kind).keys()], kind).toEqual([503]);
    }
    // After recovery nothing is undecidable. The test server came back empty, so keys only the
    // store knew are now unknown (401), never allowed; cached keys still pass from the caches.
    expect([...traffic.answers("after", "cached").keys()]).toEqual([200]);
    for (const kind of ["never-checked", "fresh"]) expect([...traffic.answers("after", kind).keys()], kind).toEqual([401]);
    expect(storeErrors).toBeGreaterThan(0);
  });
});
