import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { stringify } from "yaml";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ADMIN_TOKEN, postJson, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { LIMITS_POLICY } from "../harness/limits-policy.js";
import { mongoWireAvailable, startMongoWire } from "../harness/mongo-wire.js";
import type { MongoWire } from "../harness/mongo-wire.js";
import { requireServer } from "../harness/ports.js";
import { spawnKeygate } from "../harness/process.js";
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

async function issue(adminPort: number, ownerId: string, plan: string): Promise<string> {
  expect((await postJson(adminPort, "UpsertAccount", { ownerId, plan })).status).toBe(200);
  const created = await postJson(adminPort, "CreateKey", { ownerId, name: "limits" });
  const secret = created.json["secret"];
  if (typeof secret !== "string") throw new Error(`CreateKey failed: ${JSON.stringify(created.json)}`);
  return secret;
}

describe.runIf(ready)("limits shared through Redis", () => {
  let redis: RedisServer;
  let mongo: MongoWire;
  let single: TestKeygate;
  let a: KeygateProcess;
  let b: KeygateProcess;
  let dir: string;

  beforeAll(async () => {
    const started = await startRedis();
    if (started === null) throw new Error("redis-server is not on PATH");
    redis = started;
    mongo = await startMongoWire();
    single = await startKeygate({ policy: LIMITS_POLICY, env: { KEYGATE_REDIS_URL: redis.url } });
    dir = mkdtempSync(join(tmpdir(), "keygate-limits-"));
    const policy = join(dir, "policy.yaml");
    writeFileSync(policy, stringify(LIMITS_POLICY));
    const env = {
      KEYGATE_MONGODB_URI: mongo.uri,
      KEYGATE_REDIS_URL: redis.url,
      KEYGATE_PEPPER: "limits-test-pepper-0123456789abcdefghijklmn",
      KEYGATE_ADMIN_TOKENS: ADMIN_TOKEN,
      KEYGATE_CONFIG: policy,
      KEYGATE_HOST: "127.0.0.1",
      KEYGATE_GRPC_PORT: "0",
      KEYGATE_HTTP_AUTHZ_PORT: "0",
      KEYGATE_ADMIN_PORT: "0",
      KEYGATE_LOG_LEVEL: "info",
    };
    [a, b] = await Promise.all([spawnKeygate({ cwd: dir, env }), spawnKeygate({ cwd: dir, env })]);
  }, 120_000);

  afterAll(async () => {
    await Promise.allSettled([a?.stop("SIGKILL"), b?.stop("SIGKILL"), single?.stop()]);
    await Promise.allSettled([redis?.stop(), mongo?.stop()]);
    if (dir !== undefined) rmSync(dir, { recursive: true, force: true });
  });

  describe("one keygate process", () => {
    it("exactly `limit` of 3 x limit concurrent checks pass, with exact headers on allow and 429", async () => {
      single.clock.freeze("2026-11-22T12:00:00.000Z");
      const secret = await issue(single.ports.admin, "redis-one-rate", "small");
      const answers = await Promise.all(Array.from({ length: 30 }, () => check(single.ports.http, secret)));
      expect(answers.filter((x) => x.status === 200)).toHaveLength(10);
      const limited = answers.filter((x) => x.status === 429);
      expect(limited).toHaveLength(20);
      const remaining = answers.filter((x) => x.status === 200).map((x) => Number(x.headers.get("x-ratelimit-remaining")));
      expect(remaining.sort((p, q) => p - q)).toEqual([0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
      const unpaid = await postJson(single.ports.admin, "UpsertAccount", { ownerId: "redis-one-rate", subscriptionStatus: "past_due" });
      expect(unpaid.status).toBe(200);
      const planRequired = await check(single.ports.http, secret);
      expect(planRequired.status).toBe(402);
      expect(planRequired.headers.get("ratelimit")).toBe('"minute";r=0;t=60');
      for (const answer of limited) {
        expect(JSON.parse(answer.body).error.code).toBe("RATE_LIMITED");
        expect(answer.headers.get("retry-after")).toBe("6");
        expect(answer.headers.get("ratelimit")).toBe('"minute";r=0;t=60');
      }
    });

    it("402 QUOTA_EXCEEDED with the day's headers, and a reset at UTC midnight", async () => {
      single.clock.freeze("2026-11-22T23:59:30.000Z");
      const secret = await issue(single.ports.admin, "redis-one-quota", "quota");
      for (let i = 0; i < 5; i++) expect((await check(single.ports.http, secret)).status).toBe(200);
      const refused = await check(single.ports.http, secret);
      expect(refused.status).toBe(402);
      expect(JSON.parse(refused.body).error.message).toBe("The daily quota of 5 requests is used up. It resets at 2026-11-23T00:00:00.000Z.");
      expect(refused.headers.get("retry-after")).toBe("30");
      expect(refused.headers.get("ratelimit-policy")).toBe('"minute";q=100;w=60, "day";q=5;w=86400');
      single.clock.freeze("2026-11-23T00:00:00.000Z");
      expect((await check(single.ports.http, secret)).status).toBe(200);
    });
  });

  describe("two keygate processes", () => {
    it("exactly `limit` of 3 x limit concurrent checks pass across both replicas", async () => {
      const secret = await issue(a.ports.admin, "redis-two-rate", "small");
      const answers = await Promise.all(Array.from({ length: 30 }, (_, i) => check(i % 2 === 0 ? a.ports.http : b.ports.http, secret)));
      expect(answers.filter((x) => x.status === 200)).toHaveLength(10);
      expect(answers.filter((x) => x.status === 429)).toHaveLength(20);
    });

    it("no double spend: with a balance of 7, exactly 7 of 20 concurrent checks pass; a top-up adds", async () => {
      const ownerId = "redis-two-credits";
      const secret = await issue(a.ports.admin, ownerId, "metered");
      const topped = await postJson(b.ports.admin, "AddCredits", { ownerId, amount: "4", reason: "test" });
      expect((topped.json["account"] as { creditBalance?: string }).creditBalance).toBe("7");
      const answers = await Promise.all(Array.from({ length: 20 }, (_, i) => check(i % 2 === 0 ? a.ports.http : b.ports.http, secret)));
      expect(answers.filter((x) => x.status === 200)).toHaveLength(7);
      const refused = answers.filter((x) => x.status === 402);
      expect(refused).toHaveLength(13);
      for (const answer of refused) expect(JSON.parse(answer.body).error.code).toBe("INSUFFICIENT_CREDITS");
      await postJson(a.ports.admin, "AddCredits", { ownerId, amount: "2", reason: "second order" });
      expect((await check(b.ports.http, secret)).status).toBe(200);
      expect((await check(a.ports.http, secret)).status).toBe(200);
      expect((await check(b.ports.http, secret)).status).toBe(402);
    });

    it("usage from both replicas is in MongoDB after a SIGTERM", async () => {
      const ownerId = "redis-two-usage";
      const secret = await issue(a.ports.admin, ownerId, "small");
      for (let i = 0; i < 4; i++) expect((await check(a.ports.http, secret)).status).toBe(200);
      for (let i = 0; i < 3; i++) expect((await check(b.ports.http, secret)).status).toBe(200);
      expect(await a.stop("SIGTERM")).toBe(0);
      const today = new Date().toISOString().slice(0, 10);
      const usage = await postJson(b.ports.admin, "GetUsage", { ownerId, from: today, to: today });
      expect(usage.json["totals"]).toEqual({ allowed: "7" });
    });
  });
});
