import { Redis } from "ioredis";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { checkInit, checkOutcome, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { requireServer } from "../harness/ports.js";
import { redisAvailable, startRedis } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";

// limits.usageFlushSeconds takes any positive number up to 86400. The Redis meter keeps a credit
// hash for max(1 h, 3 flush intervals), sent in ms to PEXPIRE: 2048.2 s is 2048199.9999999998 ms in
// floats, three times that 6144599.999999999, which Redis refuses ("value is not an integer or out
// of range"). The charge and seed scripts send it after writing the credit hash, and a script's
// error undoes none of its writes: every metered charge spent its credits in Redis and then
// failed, before its rate bucket and daily quota were charged. fail-closed answered every metered
// Check UNAVAILABLE; fallback counted per replica, with a warn line per Check, a Redis balance
// drained by charges the store never heard of, and the hash left without an expiry; fail-open had
// no rate limit and no daily quota at all. Every duration the scripts take is now whole ms.
const ready = requireServer("redis-server", redisAvailable(), "apt-get install redis-server");

function policy(onRedisError: "fallback" | "fail-closed" | "fail-open", monthlyCredits = 10, limit = 1000) {
  return {
    defaultPlan: "metered",
    plans: { metered: { maxActiveKeys: 5, rateLimit: { limit, windowSeconds: 60 }, dailyQuota: null, monthlyCredits } },
    scopes: { catalog: ["read"], default: ["read"] },
    routes: [],
    limits: { usageFlushSeconds: 2048.2, onRedisError },
  };
}

/** Log lines saying the Redis meter failed and handed the charge to limits.onRedisError. */
function redisFailures(kg: TestKeygate): string[] {
  return kg.logLines.filter((line) => line.includes("Redis limits failed"));
}

describe.runIf(ready)("a fractional usageFlushSeconds with the Redis meter", () => {
  let redis: RedisServer;
  let client: Redis;
  const started: TestKeygate[] = [];

  beforeAll(async () => {
    const r = await startRedis();
    if (r === null) throw new Error("redis-server is not on PATH");
    redis = r;
    client = new Redis(redis.url);
  });
  afterAll(async () => {
    for (const kg of started) await kg.stop();
    client?.disconnect();
    await redis?.stop();
  });

  async function start(onRedisError: "fallback" | "fail-closed" | "fail-open", withRedis: boolean, monthlyCredits?: number, limit?: number): Promise<TestKeygate> {
    const kg = await startKeygate({ policy: policy(onRedisError, monthlyCredits, limit), env: withRedis ? { KEYGATE_REDIS_URL: redis.url } : {} });
    started.push(kg);
    return kg;
  }

  /** The outcomes of `count` Checks by a new key of a new account `ownerId`: "200", "429 RATE_LIMITED", or a gRPC error. */
  async function checks(kg: TestKeygate, ownerId: string, count = 3): Promise<string[]> {
    await kg.admin.upsertAccount({ ownerId, plan: "metered" });
    const { secret } = await kg.admin.createKey({ ownerId, name: "k" });
    const outcomes: string[] = [];
    for (let i = 0; i < count; i++) {
      try {
        const o = checkOutcome(await kg.check(checkInit({ "x-api-key": secret })));
        outcomes.push(`${o.status}${o.code === null ? "" : ` ${o.code}`}`);
      } catch (error) {
        outcomes.push(`grpc error ${error instanceof Error && "code" in error ? String(error.code) : String(error)}`);
      }
    }
    return outcomes;
  }

  it("embedded: three metered Checks pass (the reference)", async () => {
    expect(await checks(await start("fail-closed", false), "flush-embedded")).toEqual(["200", "200", "200"]);
  });

  it("Redis, fail-closed: the same three Checks pass, none UNAVAILABLE", async () => {
    const kg = await start("fail-closed", true);
    expect({ outcomes: await checks(kg, "flush-closed"), failures: redisFailures(kg) }).toEqual({ outcomes: ["200", "200", "200"], failures: [] });
  });

  it("Redis, fallback: Redis counts every charge once and the credit hash keeps its 3-interval expiry", async () => {
    const kg = await start("fallback", true);
    const outcomes = await checks(kg, "flush-fallback");
    const hash = await client.hgetall("kg:c:flush-fallback");
    const pttl = await client.pttl("kg:c:flush-fallback");
    // 3 x 2048.2 s, rounded up to the ms; a few ms have passed since it was set.
    expect({ outcomes, monthlyUsed: hash["monthly_used"], failures: redisFailures(kg) }).toEqual({ outcomes: ["200", "200", "200"], monthlyUsed: "3", failures: [] });
    expect(pttl).toBeGreaterThan(6_144_600 - 60_000);
    expect(pttl).toBeLessThanOrEqual(6_144_600);
  });

  it("Redis, fail-open: a rate limit of 2 a minute admits 2 Checks, as embedded does", async () => {
    const expected = await checks(await start("fail-open", false, 1000, 2), "flush-open-embedded", 5);
    expect(expected).toEqual(["200", "200", "429 RATE_LIMITED", "429 RATE_LIMITED", "429 RATE_LIMITED"]);
    expect(await checks(await start("fail-open", true, 1000, 2), "flush-open", 5)).toEqual(expected);
  });
});
