import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Redis } from "ioredis";
import { stringify } from "yaml";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ADMIN_TOKEN, postJson, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { LIMITS_POLICY } from "../harness/limits-policy.js";
import { mongoWireAvailable, startMongoWire } from "../harness/mongo-wire.js";
import type { MongoWire } from "../harness/mongo-wire.js";
import { requireServer } from "../harness/ports.js";
import { sharedBackendEnv, spawnKeygate } from "../harness/process.js";
import type { KeygateProcess } from "../harness/process.js";
import { redisAvailable, startRedis } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";

const ready =
  requireServer("redis-server", redisAvailable(), "apt-get install redis-server") &&
  requireServer("MongoDB-wire server", mongoWireAvailable(), "run .ci/install-mongo-wire.sh");

async function check(port: number, secret: string, path = "/v1"): Promise<{ status: number; headers: Headers; body: string }> {
  const res = await fetch(`http://127.0.0.1:${port}/check${path}`, { headers: { "x-api-key": secret } });
  return { status: res.status, headers: res.headers, body: await res.text() };
}

async function createKey(adminPort: number, ownerId: string): Promise<{ secret: string; keyId: string }> {
  const created = await postJson(adminPort, "CreateKey", { ownerId, name: "limits" });
  const secret = created.json["secret"];
  const key = created.json["key"];
  const keyId = typeof key === "object" && key !== null && "id" in key ? key.id : undefined;
  if (typeof secret !== "string" || typeof keyId !== "string") throw new Error(`CreateKey failed: ${JSON.stringify(created.json)}`);
  return { secret, keyId };
}

async function issue(adminPort: number, ownerId: string, plan: string): Promise<string> {
  expect((await postJson(adminPort, "UpsertAccount", { ownerId, plan })).status).toBe(200);
  return (await createKey(adminPort, ownerId)).secret;
}

/** The account's credit fields as GetAccount reports them (Connect JSON: int64 as strings). */
async function credits(adminPort: number, ownerId: string): Promise<Record<string, unknown>> {
  const got = await postJson(adminPort, "GetAccount", { ownerId });
  expect(got.status).toBe(200);
  const account = got.json["account"];
  if (typeof account !== "object" || account === null) throw new Error(`GetAccount failed: ${JSON.stringify(got.json)}`);
  const fields: Record<string, unknown> = {};
  for (const [name, value] of Object.entries(account)) if (name.endsWith("Credits") || name === "creditBalance") fields[name] = value;
  return fields;
}

/** Runs `fn` on a fresh connection to the test's Redis, then closes it. */
async function withRedis<T>(url: string, fn: (redis: Redis) => Promise<T>): Promise<T> {
  const redis = new Redis(url, { lazyConnect: true, maxRetriesPerRequest: 1, retryStrategy: () => null });
  await redis.connect();
  try {
    return await fn(redis);
  } finally {
    redis.disconnect();
  }
}

const ONE_PROCESS_T0 = "2026-11-22T12:00:00.000Z";

describe.runIf(ready)("limits shared through Redis", () => {
  let redis: RedisServer;
  let mongo: MongoWire;
  let single: TestKeygate;
  let a: KeygateProcess;
  let b: KeygateProcess;
  let restarted: KeygateProcess | undefined;
  let dir: string;
  let env: Record<string, string>;

  beforeAll(async () => {
    const started = await startRedis();
    if (started === null) throw new Error("redis-server is not on PATH");
    redis = started;
    mongo = await startMongoWire();
    single = await startKeygate({ policy: LIMITS_POLICY, env: { KEYGATE_REDIS_URL: redis.url } });
    dir = mkdtempSync(join(tmpdir(), "keygate-limits-"));
    const policy = join(dir, "policy.yaml");
    writeFileSync(policy, stringify(LIMITS_POLICY));
    env = sharedBackendEnv({ mongoUri: mongo.uri, redisUrl: redis.url, pepper: "limits-test-pepper-0123456789abcdefghijklmn", policyFile: policy, adminToken: ADMIN_TOKEN });
    [a, b] = await Promise.all([spawnKeygate({ cwd: dir, env }), spawnKeygate({ cwd: dir, env })]);
  }, 120_000);

  afterAll(async () => {
    await Promise.allSettled([a?.stop("SIGKILL"), b?.stop("SIGKILL"), restarted?.stop("SIGKILL"), single?.stop()]);
    await Promise.allSettled([redis?.stop(), mongo?.stop()]);
    if (dir !== undefined) rmSync(dir, { recursive: true, force: true });
  });

  describe("one keygate process", () => {
    it("exactly `limit` of 3 x limit concurrent checks pass, with exact headers on allow and 429", async () => {
      single.clock.freeze(ONE_PROCESS_T0);
      const secret = await issue(single.ports.admin, "redis-one-rate", "small");
      const answers = await Promise.all(Array.from({ length: 30 }, () => check(single.ports.http, secret)));
      const allowed = answers.filter((x) => x.status === 200);
      expect(allowed).toHaveLength(10);
      const limited = answers.filter((x) => x.status === 429);
      expect(limited).toHaveLength(20);
      const remaining = allowed.map((x) => Number(x.headers.get("x-ratelimit-remaining")));
      expect(remaining.sort((p, q) => p - q)).toEqual([0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
      // The clock is frozen, so the n-th allowed request leaves 10 - n and a bucket full again in 6n s.
      for (const answer of allowed) {
        const left = Number(answer.headers.get("x-ratelimit-remaining"));
        const resetSeconds = 6 * (10 - left);
        expect(answer.headers.get("x-ratelimit-limit")).toBe("10");
        expect(answer.headers.get("x-ratelimit-reset")).toBe(String(resetSeconds));
        expect(answer.headers.get("ratelimit-policy")).toBe('"minute";q=10;w=60');
        expect(answer.headers.get("ratelimit")).toBe(`"minute";r=${left};t=${resetSeconds}`);
        expect(answer.headers.get("retry-after")).toBeNull();
      }
      const unpaid = await postJson(single.ports.admin, "UpsertAccount", { ownerId: "redis-one-rate", subscriptionStatus: "past_due" });
      expect(unpaid.status).toBe(200);
      const planRequired = await check(single.ports.http, secret);
      expect(planRequired.status).toBe(402);
      expect(planRequired.headers.get("ratelimit")).toBe('"minute";r=0;t=60');
      for (const answer of limited) {
        expect(JSON.parse(answer.body).error.code).toBe("RATE_LIMITED");
        expect(answer.headers.get("x-ratelimit-limit")).toBe("10");
        expect(answer.headers.get("x-ratelimit-remaining")).toBe("0");
        expect(answer.headers.get("x-ratelimit-reset")).toBe("60");
        expect(answer.headers.get("retry-after")).toBe("6");
        expect(answer.headers.get("ratelimit-policy")).toBe('"minute";q=10;w=60');
        expect(answer.headers.get("ratelimit")).toBe('"minute";r=0;t=60');
      }
    });

    it("402 QUOTA_EXCEEDED with the day's headers, and a reset at UTC midnight", async () => {
      single.clock.freeze("2026-11-22T23:59:30.000Z");
      const secret = await issue(single.ports.admin, "redis-one-quota", "quota");
      for (let i = 0; i < 4; i++) expect((await check(single.ports.http, secret)).status).toBe(200);
      const last = await check(single.ports.http, secret);
      expect(last.status).toBe(200);
      // Five requests at one instant: 95 of 100 left, a bucket full in 3 s, none of the day's 5.
      expect(last.headers.get("x-ratelimit-remaining")).toBe("95");
      expect(last.headers.get("ratelimit")).toBe('"minute";r=95;t=3, "day";r=0;t=30');
      const refused = await check(single.ports.http, secret);
      expect(refused.status).toBe(402);
      expect(JSON.parse(refused.body).error.code).toBe("QUOTA_EXCEEDED");
      expect(JSON.parse(refused.body).error.message).toBe("The daily quota of 5 requests is used up. It resets at 2026-11-23T00:00:00.000Z.");
      expect(refused.headers.get("retry-after")).toBe("30");
      expect(refused.headers.get("x-ratelimit-limit")).toBe("100");
      // Refused after the rate step: its slot is not taken, so the caller still has 95.
      expect(refused.headers.get("x-ratelimit-remaining")).toBe("95");
      expect(refused.headers.get("x-ratelimit-reset")).toBe("3");
      expect(refused.headers.get("ratelimit-policy")).toBe('"minute";q=100;w=60, "day";q=5;w=86400');
      expect(refused.headers.get("ratelimit")).toBe('"minute";r=95;t=3, "day";r=0;t=30');
      single.clock.freeze("2026-11-23T00:00:00.000Z");
      const nextDay = await check(single.ports.http, secret);
      expect(nextDay.status).toBe(200);
      expect(nextDay.headers.get("ratelimit")).toBe('"minute";r=99;t=1, "day";r=4;t=86400');
    });

    it("the counts above live in Redis: its keys hold them, and nothing fell back to in-process limits", async () => {
      expect(single.logLines.filter((line) => line.includes("Redis limits failed"))).toEqual([]);
      const stored = await withRedis(redis.url, (client) =>
        client.mget("kg:rl:a:redis-one-rate", "kg:q:redis-one-quota:2026-11-22", "kg:q:redis-one-quota:2026-11-23"),
      );
      // Ten requests at T0 moved the bucket's theoretical arrival time 10 x 6 s ahead (whole
      // milliseconds, and the fraction of one to 17 places).
      expect(stored).toEqual([`${Date.parse(ONE_PROCESS_T0) + 60_000}.${"0".repeat(17)}`, "5", "1"]);
    });
  });

  describe("two keygate processes", () => {
    it("exactly `limit` of 3 x limit concurrent checks pass across both replicas", async () => {
      const secret = await issue(a.ports.admin, "redis-two-rate", "small");
      const burstStarted = Date.now();
      const answers = await Promise.all(Array.from({ length: 30 }, (_, i) => check(i % 2 === 0 ? a.ports.http : b.ports.http, secret)));
      // Each replica reads its clock before its script reaches Redis: on a busy machine a refusal
      // can carry a time from before the last allow, up to the burst's length earlier.
      const burstSeconds = Math.ceil((Date.now() - burstStarted) / 1000);
      expect(answers.filter((x) => x.status === 200)).toHaveLength(10);
      const limited = answers.filter((x) => x.status === 429);
      expect(limited).toHaveLength(20);
      for (const answer of limited) {
        expect(JSON.parse(answer.body).error.code).toBe("RATE_LIMITED");
        expect(answer.headers.get("x-ratelimit-limit")).toBe("10");
        expect(answer.headers.get("x-ratelimit-remaining")).toBe("0");
        // A real clock here: the next slot opens at most 6 s after the burst.
        expect(Number(answer.headers.get("retry-after"))).toBeGreaterThanOrEqual(1);
        expect(Number(answer.headers.get("retry-after"))).toBeLessThanOrEqual(6 + burstSeconds);
      }
    });

    it("no double spend: with a balance of 7, exactly 7 of 20 concurrent checks pass; a top-up adds", async () => {
      const ownerId = "redis-two-credits";
      const secret = await issue(a.ports.admin, ownerId, "metered");
      const topped = await postJson(b.ports.admin, "AddCredits", { ownerId, amount: "4", reason: "test" });
      expect(topped.json["account"]).toMatchObject({ creditBalance: "7" });
      const answers = await Promise.all(Array.from({ length: 20 }, (_, i) => check(i % 2 === 0 ? a.ports.http : b.ports.http, secret)));
      const allowed = answers.filter((x) => x.status === 200);
      expect(allowed).toHaveLength(7);
      // One atomic balance: each allowed request saw a different one.
      expect(allowed.map((x) => Number(x.headers.get("x-credits-remaining"))).sort((p, q) => p - q)).toEqual([0, 1, 2, 3, 4, 5, 6]);
      const refused = answers.filter((x) => x.status === 402);
      expect(refused).toHaveLength(13);
      for (const answer of refused) {
        const error = JSON.parse(answer.body).error;
        expect(error.code).toBe("INSUFFICIENT_CREDITS");
        expect(error.message).toBe("This request costs 1 credit and the account has 0 left. Add credits or wait for the monthly renewal.");
        expect(answer.headers.get("x-credits-remaining")).toBe("0");
        expect(answer.headers.get("retry-after")).toBeNull();
        expect(answer.headers.get("x-ratelimit-limit")).toBe("100");
        expect(answer.headers.get("ratelimit-policy")).toBe('"minute";q=100;w=60');
        // A real clock: 7 of 100 were taken and a slot comes back every 0.6 s. Each replica reads
        // its clock before the script runs, so a refusal may be judged a few ms behind the last
        // charge and see one slot fewer; 90 leaves room for that under load.
        const left = Number(answer.headers.get("x-ratelimit-remaining"));
        expect(left).toBeGreaterThanOrEqual(90);
        expect(left).toBeLessThanOrEqual(100);
        expect(answer.headers.get("ratelimit")).toBe(`"minute";r=${left};t=${answer.headers.get("x-ratelimit-reset") ?? ""}`);
      }
      await postJson(a.ports.admin, "AddCredits", { ownerId, amount: "2", reason: "second order" });
      expect((await check(b.ports.http, secret)).status).toBe(200);
      expect((await check(a.ports.http, secret)).status).toBe(200);
      expect((await check(b.ports.http, secret)).status).toBe(402);
    });

    // Last in the block: it stops both replicas.
    it("after SIGTERM of both replicas, a fresh process reports exact usage and the same credit balance", async () => {
      const today = new Date().toISOString().slice(0, 10);
      const rateOwner = "redis-restart-rate";
      expect((await postJson(a.ports.admin, "UpsertAccount", { ownerId: rateOwner, plan: "hourly" })).status).toBe(200);
      const first = await createKey(a.ports.admin, rateOwner);
      const second = await createKey(b.ports.admin, rateOwner);
      for (let i = 0; i < 3; i++) expect((await check(a.ports.http, first.secret)).status).toBe(200);
      expect((await check(b.ports.http, second.secret)).status).toBe(200);
      for (let i = 0; i < 2; i++) expect((await check(b.ports.http, second.secret)).status).toBe(429);
      expect((await check(a.ports.http, first.secret)).status).toBe(429);
      expect((await check(a.ports.http, first.secret, "/write")).status).toBe(403);

      const creditOwner = "redis-restart-credits";
      expect((await postJson(a.ports.admin, "UpsertAccount", { ownerId: creditOwner, plan: "metered" })).status).toBe(200);
      const metered = await createKey(a.ports.admin, creditOwner);
      expect((await postJson(b.ports.admin, "AddCredits", { ownerId: creditOwner, amount: "4", reason: "first order" })).status).toBe(200);
      // [replica, path, status, credits left]: costs are /expensive 2, /free 0, else 1.
      const steps: Array<[KeygateProcess, string, number, string]> = [
        [a, "/expensive", 200, "5"],
        [b, "/v1", 200, "4"],
        [a, "/free", 200, "4"],
        [b, "/expensive", 200, "2"],
        [a, "/expensive", 200, "0"],
        [b, "/v1", 402, "0"],
      ];
      for (const [replica, path, status, left] of steps) {
        const answer = await check(replica.ports.http, metered.secret, path);
        expect([path, answer.status, answer.headers.get("x-credits-remaining")]).toEqual([path, status, left]);
      }
      const toppedUp = await postJson(a.ports.admin, "AddCredits", { ownerId: creditOwner, amount: "5", reason: "second order" });
      expect(toppedUp.json["account"]).toMatchObject({ creditBalance: "5" });
      expect((await check(b.ports.http, metered.secret)).headers.get("x-credits-remaining")).toBe("4");
      const before = await credits(b.ports.admin, creditOwner);
      // 9 bought, 8 spent: the 3 of the month first, then 5 of the top-ups.
      expect(before).toEqual({ creditBalance: "4", monthlyCredits: "3", topupCredits: "4" });

      // One after the other: two replicas flushing an account's first spend of a month at the
      // same moment lose one's monthly_used in MongoKeyStore#spendCredits (a known race).
      expect(await a.stop("SIGTERM")).toBe(0);
      expect(await b.stop("SIGTERM")).toBe(0);
      const fresh = await spawnKeygate({ cwd: dir, env });
      restarted = fresh;

      const rateUsage = await postJson(fresh.ports.admin, "GetUsage", { ownerId: rateOwner, from: today, to: today });
      expect(rateUsage.status).toBe(200);
      expect(rateUsage.json["totals"]).toEqual({ allowed: "4", denied: { RATE_LIMITED: "3", FORBIDDEN: "1" } });
      expect(byKeySorted(rateUsage.json["byKey"])).toEqual(
        byKeySorted([
          { keyId: first.keyId, keyName: "limits", day: today, usage: { allowed: "3", denied: { RATE_LIMITED: "1", FORBIDDEN: "1" } } },
          { keyId: second.keyId, keyName: "limits", day: today, usage: { allowed: "1", denied: { RATE_LIMITED: "2" } } },
        ]),
      );
      const creditUsage = await postJson(fresh.ports.admin, "GetUsage", { ownerId: creditOwner, from: today, to: today });
      const meteredCounts = { allowed: "6", denied: { INSUFFICIENT_CREDITS: "1" }, creditsUsed: "8" };
      expect(creditUsage.json["totals"]).toEqual(meteredCounts);
      expect(creditUsage.json["byKey"]).toEqual([{ keyId: metered.keyId, keyName: "limits", day: today, usage: meteredCounts }]);

      expect(await credits(fresh.ports.admin, creditOwner)).toEqual(before);
      // The rate bucket is Redis's, so the restart did not refill it.
      expect((await check(fresh.ports.http, first.secret)).status).toBe(429);
      // Without Redis's copy of the balance, the store's must be the same.
      expect(await withRedis(redis.url, (client) => client.del(`kg:c:${creditOwner}`))).toBe(1);
      expect(await credits(fresh.ports.admin, creditOwner)).toEqual(before);
      const reloaded = await check(fresh.ports.http, metered.secret);
      expect([reloaded.status, reloaded.headers.get("x-credits-remaining")]).toEqual([200, "3"]);
    });
  });
});

/** GetUsage's by_key entries in a fixed order, to compare without relying on the store's. */
function byKeySorted(entries: unknown): unknown[] {
  if (!Array.isArray(entries)) throw new Error(`by_key is not a list: ${JSON.stringify(entries)}`);
  return [...entries].sort((p: unknown, q: unknown) => JSON.stringify(p).localeCompare(JSON.stringify(q)));
}
