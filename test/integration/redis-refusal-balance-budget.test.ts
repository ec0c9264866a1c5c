import { afterAll, beforeAll, describe, expect, it, vi } from "vitest";
import { DEFAULT_POLICY_INPUT } from "../../src/config.js";
import type { CreditState } from "../../src/store/store.js";
import { TestClock } from "../harness/clock.js";
import { httpCheck, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { until } from "../harness/poll.js";
import { requireServer } from "../harness/ports.js";
import { redisAvailable, startRedis } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";

// README "One budget per Check": a Check whose limits step was still loading the account's credit
// balance from the store when the budget ran out is answered UNAVAILABLE and neither charged nor
// counted. With Redis, a refusal (rate, quota) of an account whose balance is not loaded loads it
// to report X-Credits-Remaining; when that load outlasted the budget, the refusal was still
// counted in the account's usage (denied) although the client was told 503. It is abandoned now,
// as the in-process meter does.

const DAY = "2026-12-03";
const BUDGET_MS = "1000";

const POLICY = {
  ...DEFAULT_POLICY_INPUT,
  defaultPlan: "none",
  plans: {
    // A daily quota of 0 on a metered plan: the very first Check is refused QUOTA_EXCEEDED by the
    // script, with the balance not loaded (status 2, balance -1): #withBalance loads it.
    none: { maxActiveKeys: 5, rateLimit: { limit: 100, windowSeconds: 60 }, dailyQuota: 0, monthlyCredits: 10 },
  },
};

function holdFirstGetCredits(kg: TestKeygate, ownerId: string) {
  const store = kg.app.store;
  let release: () => void = () => undefined;
  const gate = new Promise<void>((resolve) => (release = resolve));
  const state = { held: false, done: false };
  const real = store.getCredits.bind(store);
  const spy = vi.spyOn(store, "getCredits").mockImplementation(async (id: string): Promise<CreditState> => {
    if (id !== ownerId || state.held) return real(id);
    state.held = true;
    await gate;
    const value = await real(id);
    state.done = true;
    return value;
  });
  return { state, release: () => release(), restore: () => spy.mockRestore() };
}

function startedAt(): TestClock {
  const clock = new TestClock();
  clock.freeze(`${DAY}T12:00:00.000Z`);
  return clock;
}

const redisReady = requireServer("redis-server", redisAvailable(), "apt-get install redis-server");

describe.runIf(redisReady)("Redis meter: a refusal whose balance loads after the Check budget", () => {
  let kg: TestKeygate;
  let redis: RedisServer;
  beforeAll(async () => {
    const started = await startRedis();
    if (started === null) throw new Error("redis-server is not on PATH");
    redis = started;
    kg = await startKeygate({ policy: POLICY, clock: startedAt(), env: { KEYGATE_CHECK_BUDGET_MS: BUDGET_MS, KEYGATE_REDIS_URL: redis.url } });
  });
  afterAll(async () => {
    await kg?.stop();
    await redis?.stop();
  });

  it("answered 503 is not counted as a QUOTA_EXCEEDED refusal (only the next Check's 402 is)", async () => {
    const ownerId = "withbalance-budget";
    const { secret } = await kg.admin.createKey({ ownerId, name: "k" });
    const held = holdFirstGetCredits(kg, ownerId);
    try {
      const first = await httpCheck(kg.ports.http, "/check/v1/x", { "x-api-key": secret });
      expect([first.status, held.state.held]).toEqual([503, true]);
      held.release();
      await until(() => held.state.done, 5000, "the held read answered");
      for (let i = 0; i < 5; i++) await new Promise((resolve) => setImmediate(resolve));
    } finally {
      held.restore();
    }
    const next = await httpCheck(kg.ports.http, "/check/v1/x", { "x-api-key": secret });
    expect([next.status, next.headers.get("x-credits-remaining")]).toEqual([402, "10"]);
    const usage = await kg.admin.getUsage({ ownerId, from: DAY, to: DAY });
    // One 402 answered; the 503 must not be counted as a refusal.
    expect({ allowed: usage.totals?.allowed ?? 0n, denied: usage.totals?.denied }).toEqual({ allowed: 0n, denied: { QUOTA_EXCEEDED: 1n } });
  });
});
