import { status as GrpcStatus } from "@grpc/grpc-js";
import { Redis } from "ioredis";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { RedisFailureMode } from "../../src/limits/redis.js";
import { checkInit, postJson, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { LIMITS_POLICY } from "../harness/limits-policy.js";
import { untilValue } from "../harness/poll.js";
import type { PollOptions } from "../harness/poll.js";
import { requireServer } from "../harness/ports.js";
import { redisAvailable, startRedis } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";

const ready = requireServer("redis-server", redisAvailable(), "apt-get install redis-server");
// These tests stop and start Redis, which only the harness's own redis-server allows.
const externalRedis = (process.env["KEYGATE_TEST_REDIS_URL"] ?? "") !== "";
if (ready && externalRedis) console.warn("\n!!! SKIPPING the Redis failure-mode tests: they need the harness's own redis-server, not KEYGATE_TEST_REDIS_URL\n");

const T0 = "2026-11-22T12:00:00.000Z";
// The "small" plan: 10 a minute, one slot every 6 s. With the clock frozen at T0, the first
// charge in an empty Redis moves the bucket to T0 + 6 s.
const FIRST_CHARGE_TAT = `${Date.parse(T0) + 6000}.${"0".repeat(17)}`;
const RECOVERY_TIMEOUT_MS = 20_000;
/**
 * Checks are repeated every 100 ms until keygate is back on Redis (it reconnects on its own
 * schedule); a timeout names the last answer.
 */
const RECOVERY: PollOptions<Answer> = {
  intervalMs: 100,
  detail: (last) => (last === undefined ? "" : `; last answer ${last.status} ${last.body}`),
};

interface Answer {
  status: number;
  headers: Headers;
  body: string;
}

async function check(port: number, secret: string): Promise<Answer> {
  const res = await fetch(`http://127.0.0.1:${port}/check/v1`, { headers: { "x-api-key": secret } });
  return { status: res.status, headers: res.headers, body: await res.text() };
}

function concurrentChecks(port: number, secret: string, count: number): Promise<Answer[]> {
  return Promise.all(Array.from({ length: count }, () => check(port, secret)));
}

/** The rate bucket's value in Redis, or null when Redis holds none. */
async function rateBucket(url: string, ownerId: string): Promise<string | null> {
  const redis = new Redis(url, { lazyConnect: true, maxRetriesPerRequest: 1, retryStrategy: () => null });
  await redis.connect();
  try {
    return await redis.get(`kg:rl:a:${ownerId}`);
  } finally {
    redis.disconnect();
  }
}

function failureLines(keygate: TestKeygate, mode: RedisFailureMode): string[] {
  return keygate.logLines.filter((line) => line.includes("Redis limits failed") && line.includes(`"mode":"${mode}"`));
}

/**
 * One keygate on its own redis-server, with `mode` as `limits.onRedisError` (unset: the
 * default). Each test freezes the clock, issues a key on the "small" plan and has one check
 * charged in Redis, so the key is cached before Redis goes away.
 */
function outage(mode: RedisFailureMode | undefined) {
  const fixture: { redis?: RedisServer; keygate?: TestKeygate } = {};
  beforeAll(async () => {
    const started = await startRedis();
    if (started === null) throw new Error("redis-server is not on PATH");
    fixture.redis = started;
    const policy = mode === undefined ? LIMITS_POLICY : { ...LIMITS_POLICY, limits: { ...LIMITS_POLICY.limits, onRedisError: mode } };
    fixture.keygate = await startKeygate({ policy, env: { KEYGATE_REDIS_URL: started.url } });
  });
  afterAll(async () => {
    await fixture.keygate?.stop();
    await fixture.redis?.stop();
  });
  return async (ownerId: string): Promise<{ redis: RedisServer; keygate: TestKeygate; secret: string }> => {
    const { redis, keygate } = fixture;
    if (redis === undefined || keygate === undefined) throw new Error("the outage fixture did not start");
    keygate.clock.freeze(T0);
    expect((await postJson(keygate.ports.admin, "UpsertAccount", { ownerId, plan: "small" })).status).toBe(200);
    const created = await postJson(keygate.ports.admin, "CreateKey", { ownerId, name: "outage" });
    const secret = created.json["secret"];
    if (typeof secret !== "string") throw new Error(`CreateKey failed: ${JSON.stringify(created.json)}`);
    const first = await check(keygate.ports.http, secret);
    expect([first.status, first.headers.get("x-ratelimit-remaining")]).toEqual([200, "9"]);
    expect(await rateBucket(redis.url, ownerId)).toBe(FIRST_CHARGE_TAT);
    expect(failureLines(keygate, mode ?? "fallback")).toEqual([]);
    return { redis, keygate, secret };
  };
}

/** After Redis is back: the bucket is in Redis again, and further checks log no failure. */
async function expectRedisInUse(redis: RedisServer, keygate: TestKeygate, secret: string, ownerId: string, mode: RedisFailureMode): Promise<void> {
  expect(await rateBucket(redis.url, ownerId)).toBe(FIRST_CHARGE_TAT);
  const failures = failureLines(keygate, mode).length;
  const next = await check(keygate.ports.http, secret);
  expect([next.status, next.headers.get("x-ratelimit-remaining")]).toEqual([200, "8"]);
  expect(failureLines(keygate, mode)).toHaveLength(failures);
}

describe.runIf(ready && !externalRedis)("when Redis fails", () => {
  describe("fail-closed", () => {
    const setup = outage("fail-closed");

    it("answers 503 UNAVAILABLE over HTTP and gRPC while Redis is down, and uses Redis again once it is back", async () => {
      const ownerId = "outage-closed";
      const { redis, keygate, secret } = await setup(ownerId);
      await redis.stop();

      const down = await check(keygate.ports.http, secret);
      expect(down.status).toBe(503);
      expect(JSON.parse(down.body).error.code).toBe("UNAVAILABLE");
      expect(down.headers.get("retry-after")).toBe("1");
      expect(down.headers.get("x-ratelimit-limit")).toBeNull();
      await expect(keygate.check(checkInit({ "x-api-key": secret }, "/v1"))).rejects.toMatchObject({ code: GrpcStatus.UNAVAILABLE });
      // Once a minute per kind of failure, however many Checks failed with it.
      expect(failureLines(keygate, "fail-closed").length).toBeGreaterThanOrEqual(1);

      await redis.start();
      const back = (await untilValue(() => check(keygate.ports.http, secret), (x) => x.status === 200, RECOVERY_TIMEOUT_MS, "checks passing again after Redis restarted", RECOVERY)).value;
      // An empty Redis: the first request after the outage is its first charge.
      expect(back.headers.get("x-ratelimit-remaining")).toBe("9");
      await expectRedisInUse(redis, keygate, secret, ownerId, "fail-closed");
    }, 60_000);
  });

  describe("fail-open", () => {
    const setup = outage("fail-open");

    it("lets every request through uncharged while Redis is down, and limits again once it is back", async () => {
      const ownerId = "outage-open";
      const { redis, keygate, secret } = await setup(ownerId);
      await redis.stop();

      const down = await concurrentChecks(keygate.ports.http, secret, 30);
      expect(down.map((x) => x.status)).toEqual(Array.from({ length: 30 }, () => 200));
      for (const answer of down) {
        expect(answer.headers.get("x-ratelimit-remaining")).toBe("10");
        expect(answer.headers.get("x-ratelimit-reset")).toBe("0");
      }
      // Each charge that found Redis failing logged it; once keygate knows Redis is gone, one line says so.
      expect(failureLines(keygate, "fail-open").length).toBeGreaterThanOrEqual(1);

      await redis.start();
      // Uncharged answers report a full bucket; the first one Redis charges reports 9.
      await untilValue(() => check(keygate.ports.http, secret), (x) => x.headers.get("x-ratelimit-remaining") === "9", RECOVERY_TIMEOUT_MS, "Redis charging again after it restarted", RECOVERY);
      await expectRedisInUse(redis, keygate, secret, ownerId, "fail-open");
      const limited = await concurrentChecks(keygate.ports.http, secret, 20);
      expect(limited.filter((x) => x.status === 200)).toHaveLength(8);
      expect(limited.filter((x) => x.status === 429)).toHaveLength(12);
    }, 60_000);
  });

  describe("fallback (the default)", () => {
    const setup = outage(undefined);

    it("counts in-process while Redis is down, exactly `limit` then 429, and uses Redis again once it is back", async () => {
      const ownerId = "outage-fallback";
      const { redis, keygate, secret } = await setup(ownerId);
      await redis.stop();

      // The in-process bucket starts full: it never saw the charge Redis took.
      const down = await concurrentChecks(keygate.ports.http, secret, 30);
      const allowed = down.filter((x) => x.status === 200);
      expect(allowed.map((x) => Number(x.headers.get("x-ratelimit-remaining"))).sort((p, q) => p - q)).toEqual([0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
      const limited = down.filter((x) => x.status === 429);
      expect(limited).toHaveLength(20);
      for (const answer of limited) {
        expect(JSON.parse(answer.body).error.code).toBe("RATE_LIMITED");
        expect(answer.headers.get("retry-after")).toBe("6");
      }
      expect(failureLines(keygate, "fallback").length).toBeGreaterThanOrEqual(1);

      await redis.start();
      // In-process the bucket is empty at the frozen clock, so a 200 means Redis decided.
      const back = (await untilValue(() => check(keygate.ports.http, secret), (x) => x.status === 200, RECOVERY_TIMEOUT_MS, "checks passing again after Redis restarted", RECOVERY)).value;
      expect(back.headers.get("x-ratelimit-remaining")).toBe("9");
      await expectRedisInUse(redis, keygate, secret, ownerId, "fallback");

      // Redis answered again, so the in-process counts were dropped: a second outage loads them
      // afresh (the bucket starts full again), never charging against what the first one left.
      await redis.stop();
      const again = await concurrentChecks(keygate.ports.http, secret, 30);
      expect(again.filter((x) => x.status === 200)).toHaveLength(10);
      expect(again.filter((x) => x.status === 429)).toHaveLength(20);
    }, 60_000);
  });
});
