import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { stringify } from "yaml";
import { TestClock } from "../harness/clock.js";
import { checkInit, checkOutcome, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { LIMITS_POLICY } from "../harness/limits-policy.js";
import { requireServer } from "../harness/ports.js";
import { redisAvailable, startRedis } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";

// A live reload shortens the plan's window: 10 per 10 minutes becomes 10 per second ("plans ...
// take effect at once", README). A bucket time stored under the old window can be further ahead
// than the new full bucket reaches; it is rebased at the first refusal (refused for one interval),
// however much of the old bucket was used. A shared (Redis) bucket keeps a time a few seconds past
// a full bucket as a debt, since another replica whose clock runs ahead may have written it
// (rate-limit-clock-skew): there the key's own remaining life tells a time written under a longer
// window apart. Without it, an account that had used 5 of its 10 (a time 300 s ahead) was refused
// for 5 minutes on a plan allowing 10 a second, while one that used all 10 was served after 1 s.

const redisReady = requireServer("redis-server", redisAvailable(), "apt-get install redis-server");

const plan = (windowSeconds: number) => ({ maxActiveKeys: 5, rateLimit: { limit: 10, windowSeconds }, dailyQuota: null, monthlyCredits: null });
const OLD = { ...LIMITS_POLICY, plans: { ...LIMITS_POLICY.plans, small: plan(600) } };
const NEW = { ...LIMITS_POLICY, plans: { ...LIMITS_POLICY.plans, small: plan(1) } };

let redis: RedisServer | null = null;
beforeAll(async () => {
  if (redisReady) redis = await startRedis();
});
afterAll(async () => {
  await redis?.stop();
});

const meters = [
  { meter: "in-process", ready: true, env: (): Record<string, string> => ({}) },
  { meter: "Redis", ready: redisReady, env: (): Record<string, string> => ({ KEYGATE_REDIS_URL: redis?.url ?? "" }) },
];

describe.each(meters)("a reload that shortens a plan's window ($meter meter)", ({ ready, env }) => {
  let kg: TestKeygate | undefined;
  afterEach(async () => {
    await kg?.stop();
    kg = undefined;
  });

  it.runIf(ready)("an account that used half its old bucket is served one new interval after its first refusal, as one that used all of it", async () => {
    const clock = new TestClock();
    clock.freeze("2027-06-01T12:00:00.000Z");
    kg = await startKeygate({ policy: OLD, clock, env: env() });
    const secrets: Record<string, string> = {};
    for (const [ownerId, used] of [["half", 5], ["all", 10]] as const) {
      await kg.admin.upsertAccount({ ownerId, plan: "small" });
      secrets[ownerId] = (await kg.admin.createKey({ ownerId, name: "k" })).secret;
      for (let i = 0; i < used; i++) expect(checkOutcome(await kg.check(checkInit({ "x-api-key": secrets[ownerId] ?? "" }, "/v1/x"))).status).toBe(200);
    }
    writeFileSync(join(kg.dataDir, "policy.yaml"), stringify(NEW));
    expect(kg.app.reload().policy).toBe("applied");

    const answers: Record<string, number[]> = { half: [], all: [] };
    for (const step of [0, 1000, 1000]) {
      clock.advanceMs(step);
      for (const ownerId of ["half", "all"]) answers[ownerId]?.push(checkOutcome(await kg.check(checkInit({ "x-api-key": secrets[ownerId] ?? "" }, "/v1/x"))).status);
    }
    expect(answers).toEqual({ half: [429, 200, 200], all: [429, 200, 200] });
  });
});
