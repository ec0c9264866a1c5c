import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { TestClock } from "../harness/clock.js";
import { checkInit, checkOutcome, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { LIMITS_POLICY } from "../harness/limits-policy.js";
import { requireServer } from "../harness/ports.js";
import { redisAvailable, startRedis } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";

// The shared GCRA bucket is judged on each replica's own clock (the script takes `now` from the
// caller). One replica whose wall clock jumped 1 h ahead (a bad NTP step, a VM resumed) writes the
// bucket's arrival time 1 h into the future with one allowed request; replicas with a right clock
// refused the account for the whole hour. A time further ahead than a full bucket reaches is now
// a full bucket's debt from the reader's clock: refused for one interval (6 s at 10 a minute),
// then the bucket drains as usual.

const redisReady = requireServer("redis-server", redisAvailable(), "apt-get install redis-server");

describe.runIf(redisReady)("rate limit with one replica's clock stepped 1 h ahead (Redis)", () => {
  let redis: RedisServer;
  let dataDir: string;
  const replicas: TestKeygate[] = [];
  afterAll(async () => {
    await Promise.allSettled(replicas.map((kg) => kg.stop()));
    await redis?.stop();
    if (dataDir !== undefined) rmSync(dataDir, { recursive: true, force: true });
  });

  it("one request through the replica whose clock is ahead does not lock the account out on the others", async () => {
    const up = await startRedis();
    if (up === null) throw new Error("redis-server is not on PATH");
    redis = up;
    dataDir = mkdtempSync(join(tmpdir(), "keygate-rate-ahead-"));
    const right = new TestClock();
    right.freeze("2027-06-01T12:00:00.000Z");
    const ahead = new TestClock();
    ahead.freeze("2027-06-01T13:00:00.000Z");
    const a = await startKeygate({ dataDir, policy: LIMITS_POLICY, clock: right, env: { KEYGATE_REDIS_URL: redis.url } });
    replicas.push(a);
    const b = await startKeygate({ dataDir, policy: LIMITS_POLICY, clock: ahead, env: { KEYGATE_REDIS_URL: redis.url } });
    replicas.push(b);

    const ownerId = "rate-ahead";
    await a.admin.upsertAccount({ ownerId, plan: "small" }); // 10 a minute
    const { secret } = await a.admin.createKey({ ownerId, name: "rate" });
    expect(checkOutcome(await a.check(checkInit({ "x-api-key": secret }, "/v1/x")))).toEqual({ status: 200, code: null });
    // One request through the replica an hour ahead.
    expect(checkOutcome(await b.check(checkInit({ "x-api-key": secret }, "/v1/x")))).toEqual({ status: 200, code: null });
    // The replica with the right clock reads a bucket an hour ahead: a full bucket's debt from
    // its now, one interval of 6 s, not the hour.
    const retryAfterOf = (answer: Awaited<ReturnType<typeof a.check>>): string | undefined =>
      answer.httpResponse.case === "deniedResponse" ? answer.httpResponse.value.headers.find((h) => h.header?.key.toLowerCase() === "retry-after")?.header?.value : undefined;
    const next = await a.check(checkInit({ "x-api-key": secret }, "/v1/x"));
    expect({ ...checkOutcome(next), retryAfter: retryAfterOf(next) }).toEqual({ status: 429, code: "RATE_LIMITED", retryAfter: "6" });
    right.freeze("2027-06-01T12:00:05.999Z");
    expect(checkOutcome(await a.check(checkInit({ "x-api-key": secret }, "/v1/x")))).toEqual({ status: 429, code: "RATE_LIMITED" });
    right.freeze("2027-06-01T12:00:06.000Z");
    expect(checkOutcome(await a.check(checkInit({ "x-api-key": secret }, "/v1/x")))).toEqual({ status: 200, code: null });
  });
});
