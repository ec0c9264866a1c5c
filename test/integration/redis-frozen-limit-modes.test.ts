import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { TEST_POLICY, checkInit, checkOutcome, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { until } from "../harness/poll.js";
import { requireServer } from "../harness/ports.js";
import { redisAvailable, startRedis } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";

// limits.onRedisError with a Redis that stops answering but keeps its connections open (frozen,
// or cut off by a partition): once keygate's heartbeats through it stop coming back, `fallback`
// counts in-process and `fail-open` lets requests through uncharged (README, "Plans, rate limits,
// quotas, credits and usage"). Each charge would otherwise wait out Redis's command timeout,
// longer than a Check's budget, and every charged Check would be UNAVAILABLE in both modes.

const ready = requireServer("redis-server", redisAvailable(), "apt-get install redis-server");

const POLICY = (mode: "fallback" | "fail-open") => ({
  ...TEST_POLICY,
  plans: { ...TEST_POLICY.plans, tiny: { maxActiveKeys: 5, rateLimit: { limit: 3, windowSeconds: 3600 }, dailyQuota: null, monthlyCredits: null } },
  limits: { onRedisError: mode },
});

const EXPECTED = {
  // A fresh in-process bucket of 3 an hour: three pass, the fourth is limited.
  fallback: [200, 200, 200, 429],
  "fail-open": [200, 200, 200, 200],
} as const;

for (const mode of ["fallback", "fail-open"] as const) {
  describe.runIf(ready)(`limits.onRedisError: ${mode}, Redis frozen, the default Check budget`, () => {
    let redis: RedisServer;
    let kg: TestKeygate;

    beforeAll(async () => {
      const started = await startRedis();
      if (started === null) throw new Error("redis-server is not on PATH");
      redis = started;
      kg = await startKeygate({ policy: POLICY(mode), env: { KEYGATE_REDIS_URL: redis.url, KEYGATE_CHECK_BUDGET_MS: "150" } });
    });

    afterAll(async () => {
      try {
        redis?.thaw();
      } catch {
        // not frozen
      }
      await kg?.stop();
      await redis?.stop();
    });

    it(`charged Checks are ${mode === "fallback" ? "counted in-process" : "let through uncharged"} once keygate knows Redis is frozen, and in Redis again after`, async () => {
      const ownerId = `frozen-${mode}`;
      await kg.admin.upsertAccount({ ownerId, plan: "tiny" });
      const key = await kg.admin.createKey({ ownerId, name: "k" });
      const status = async (): Promise<number | string> => {
        try {
          return checkOutcome(await kg.check(checkInit({ "x-api-key": key.secret }))).status;
        } catch (error) {
          return `grpc ${(error as { code?: number }).code}`;
        }
      };
      // One of the three in Redis's bucket.
      expect(await status()).toBe(200);
      const logged = kg.logLines.length;
      redis.freeze();
      try {
        await until(() => kg.logLines.slice(logged).some((l) => l.includes("heartbeats stopped coming back")), 15_000, "keygate noticing the frozen Redis", { intervalMs: 50 });
        const answers = [];
        for (let i = 0; i < 4; i++) answers.push(await status());
        expect(answers).toEqual(EXPECTED[mode]);
      } finally {
        redis.thaw();
      }
      // Redis answers again: once the bus hears it, its bucket (one used of three) counts again.
      const thawed = kg.logLines.length;
      await until(() => kg.logLines.slice(thawed).some((l) => l.includes("invalidation channel answering again")), 15_000, "keygate hearing Redis again", { intervalMs: 50 });
      expect([await status(), await status(), await status()]).toEqual([200, 200, 429]);
    }, 40_000);
  });
}
