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

// Two replicas share one Redis bucket; one's wall clock runs 2 s ahead ("a few seconds off", which
// the README tolerates). The plan allows 60 a minute (one interval is 1 s). With both clocks frozen
// (no time passes), the account gets at most the plan's 60 plus what the 2 s of skew can give (2
// more), however its requests are spread over the replicas. A refusal on the replica whose clock
// is right used to read the bucket time the fast replica wrote as "further ahead than a full
// bucket" and rebase it to its own now + one window: that moved the stored time back by the skew,
// the fast replica found room again, and round-robin traffic got every request through the fast
// replica (179 of 300 allowed). Only a time past a full bucket by more than REBASE_BEYOND_MS (a
// clock stepped ahead, rate-limit-clock-ahead) is rebased now.

const redisReady = requireServer("redis-server", redisAvailable(), "apt-get install redis-server");

const POLICY = {
  ...LIMITS_POLICY,
  plans: { ...LIMITS_POLICY.plans, small: { maxActiveKeys: 5, rateLimit: { limit: 60, windowSeconds: 60 }, dailyQuota: null, monthlyCredits: null } },
};

describe.runIf(redisReady)("GCRA bucket shared by replicas whose clocks differ by less than a window (Redis)", () => {
  let redis: RedisServer;
  let dataDir: string;
  const replicas: TestKeygate[] = [];
  afterAll(async () => {
    await Promise.allSettled(replicas.map((kg) => kg.stop()));
    await redis?.stop();
    if (dataDir !== undefined) rmSync(dataDir, { recursive: true, force: true });
  });

  it("round-robin over a replica 2 s ahead and one on time gets no more than the limit plus the skew's worth", async () => {
    const up = await startRedis();
    if (up === null) throw new Error("redis-server is not on PATH");
    redis = up;
    dataDir = mkdtempSync(join(tmpdir(), "keygate-rate-skew-"));
    const right = new TestClock();
    right.freeze("2027-06-01T12:00:00.000Z");
    const ahead = new TestClock();
    ahead.freeze("2027-06-01T12:00:02.000Z");
    const a = await startKeygate({ dataDir, policy: POLICY, clock: right, env: { KEYGATE_REDIS_URL: redis.url } });
    replicas.push(a);
    const b = await startKeygate({ dataDir, policy: POLICY, clock: ahead, env: { KEYGATE_REDIS_URL: redis.url } });
    replicas.push(b);

    const ownerId = "rate-skew";
    await a.admin.upsertAccount({ ownerId, plan: "small" }); // 60 a minute
    const { secret } = await a.admin.createKey({ ownerId, name: "rate" });

    const allowed = { right: 0, ahead: 0 };
    for (let i = 0; i < 300; i++) {
      const replica = i % 2 === 0 ? b : a;
      const outcome = checkOutcome(await replica.check(checkInit({ "x-api-key": secret }, "/v1/x")));
      if (outcome.status === 200) allowed[replica === b ? "ahead" : "right"] += 1;
      else expect(outcome).toEqual({ status: 429, code: "RATE_LIMITED" });
    }
    // No time passed on either clock: 60, plus at most 2 for the 2 s one clock is ahead.
    expect(allowed.right + allowed.ahead, JSON.stringify(allowed)).toBeLessThanOrEqual(62);
  });
});
