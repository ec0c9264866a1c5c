import { afterAll, beforeAll, describe, expect, it, vi } from "vitest";
import { DEFAULT_POLICY_INPUT } from "../../src/config.js";
import type { CreditState, UsageRow } from "../../src/store/store.js";
import { TestClock } from "../harness/clock.js";
import { httpCheck, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { until } from "../harness/poll.js";
import { requireServer } from "../harness/ports.js";
import { redisAvailable, startRedis } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";

// README, "One budget per Check": a Check answered after its budget is "not judged at all (nothing
// charged, used or counted)". The limits step waits on the store too: the in-process meter loads an
// account's balance and quota count on its first request, and the Redis meter loads a balance Redis
// does not hold before it sends its script again. A load that outlasts the budget leaves the Check
// answered 503; once it ends, nothing may be charged or counted for that Check. Each case holds the
// store's first read for the account until the Check has been answered, then lets it through and
// asks again: the next Check must find only its own charge.

const DAY = "2026-12-03";
// Long enough that the Checks not held finish within it on a loaded machine; the held ones wait it out.
const BUDGET_MS = "1000";

const POLICY = {
  ...DEFAULT_POLICY_INPUT,
  defaultPlan: "metered",
  plans: {
    metered: { maxActiveKeys: 5, rateLimit: { limit: 100, windowSeconds: 60 }, dailyQuota: null, monthlyCredits: 10 },
    daily: { maxActiveKeys: 5, rateLimit: { limit: 100, windowSeconds: 60 }, dailyQuota: 5, monthlyCredits: null },
  },
  scopes: { catalog: ["read", "write"], default: ["read"] },
  routes: [{ method: "*", pathPrefix: "/write", requiredScopes: ["write"] }],
};

/** Holds the store's first `method` read for `ownerId` until `release`; `state.done` once it has answered. */
function holdFirst(kg: TestKeygate, method: "getCredits" | "listUsage", ownerId: string) {
  const store = kg.app.store;
  let release: () => void = () => undefined;
  const gate = new Promise<void>((resolve) => (release = resolve));
  const state = { held: false, done: false };
  const hold = async <T>(id: string, read: () => Promise<T>): Promise<T> => {
    if (id !== ownerId || state.held) return read();
    state.held = true;
    await gate;
    const value = await read();
    state.done = true;
    return value;
  };
  let restore: () => void;
  if (method === "getCredits") {
    const real = store.getCredits.bind(store);
    const spy = vi.spyOn(store, "getCredits").mockImplementation((id: string): Promise<CreditState> => hold(id, () => real(id)));
    restore = () => spy.mockRestore();
  } else {
    const real = store.listUsage.bind(store);
    const spy = vi.spyOn(store, "listUsage").mockImplementation((id: string, from: string, to: string): Promise<UsageRow[]> => hold(id, () => real(id, from, to)));
    restore = () => spy.mockRestore();
  }
  return { state, release: () => release(), restore };
}

/** Answers one Check while `method`'s first read for the owner is held: 503, then lets the read finish. */
async function answeredWhileLoading(kg: TestKeygate, method: "getCredits" | "listUsage", ownerId: string, secret: string, path = "/check/v1/x"): Promise<void> {
  const held = holdFirst(kg, method, ownerId);
  try {
    const answer = await httpCheck(kg.ports.http, path, { "x-api-key": secret });
    expect([answer.status, held.state.held]).toEqual([503, true]);
    held.release();
    await until(() => held.state.done, 5000, "the held read answered");
    // What follows the load (a second read of the top-up total, the Redis seed) finishes in this turn or the next.
    await new Promise((resolve) => setImmediate(resolve));
  } finally {
    held.restore();
  }
}

async function totals(kg: TestKeygate, ownerId: string) {
  const usage = await kg.admin.getUsage({ ownerId, from: DAY, to: DAY });
  const account = await kg.admin.getAccount({ ownerId });
  return { allowed: usage.totals?.allowed, denied: usage.totals?.denied, creditsUsed: usage.totals?.creditsUsed, balance: account.account?.creditBalance };
}

function startedAt(): TestClock {
  const clock = new TestClock();
  clock.freeze(`${DAY}T12:00:00.000Z`);
  return clock;
}

describe("a Check answered UNAVAILABLE while the in-process meter loads its account", () => {
  let kg: TestKeygate;
  beforeAll(async () => {
    kg = await startKeygate({ policy: POLICY, clock: startedAt(), env: { KEYGATE_CHECK_BUDGET_MS: BUDGET_MS } });
  });
  afterAll(async () => kg?.stop());

  it("a balance loaded after the budget: nothing spent or counted; the next Check spends the first credit", async () => {
    const ownerId = "budget-balance-memory";
    const { secret } = await kg.admin.createKey({ ownerId, name: "k" });
    await answeredWhileLoading(kg, "getCredits", ownerId, secret);
    const next = await httpCheck(kg.ports.http, "/check/v1/x", { "x-api-key": secret });
    expect([next.status, next.headers.get("x-credits-remaining")]).toEqual([200, "9"]);
    expect(await totals(kg, ownerId)).toEqual({ allowed: 1n, denied: {}, creditsUsed: 1n, balance: 9n });
  });

  it("a daily quota count loaded after the budget: nothing used; the next Check uses the first of 5", async () => {
    const ownerId = "budget-quota-memory";
    await kg.admin.upsertAccount({ ownerId, plan: "daily" });
    const { secret } = await kg.admin.createKey({ ownerId, name: "k" });
    await answeredWhileLoading(kg, "listUsage", ownerId, secret);
    const next = await httpCheck(kg.ports.http, "/check/v1/x", { "x-api-key": secret });
    expect([next.status, next.headers.get("ratelimit")]).toEqual([200, '"minute";r=99;t=1, "day";r=4;t=43200']);
    expect((await kg.admin.getUsage({ ownerId, from: DAY, to: DAY })).totals?.allowed).toBe(1n);
  });

  it("a refusal whose limit headers load after the budget is not counted as refused", async () => {
    const ownerId = "budget-refusal-memory";
    const { secret } = await kg.admin.createKey({ ownerId, name: "k" });
    await answeredWhileLoading(kg, "getCredits", ownerId, secret, "/check/write");
    const next = await httpCheck(kg.ports.http, "/check/write", { "x-api-key": secret });
    expect([next.status, next.headers.get("x-credits-remaining")]).toEqual([403, "10"]);
    expect(await totals(kg, ownerId)).toEqual({ allowed: 0n, denied: { FORBIDDEN: 1n }, creditsUsed: 0n, balance: 10n });
  });
});

const redisReady = requireServer("redis-server", redisAvailable(), "apt-get install redis-server");

describe.runIf(redisReady)("a Check answered UNAVAILABLE while the Redis meter loads its account's balance", () => {
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

  // The script answers "balance not loaded"; the balance is read from the store (held past the
  // budget) and put into Redis, and the script is not sent again for the Check answered 503.
  it("nothing spent or counted; the next Check spends the first credit", async () => {
    const ownerId = "budget-balance-redis";
    const { secret } = await kg.admin.createKey({ ownerId, name: "k" });
    await answeredWhileLoading(kg, "getCredits", ownerId, secret);
    const next = await httpCheck(kg.ports.http, "/check/v1/x", { "x-api-key": secret });
    expect([next.status, next.headers.get("x-credits-remaining")]).toEqual([200, "9"]);
    expect(await totals(kg, ownerId)).toEqual({ allowed: 1n, denied: {}, creditsUsed: 1n, balance: 9n });
  });
});
