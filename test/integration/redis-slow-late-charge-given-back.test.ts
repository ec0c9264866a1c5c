import { describe, expect, it } from "vitest";
import { DEFAULT_POLICY_INPUT } from "../../src/config.js";
import { checkInit, checkOutcome } from "../harness/keygate.js";
import { until } from "../harness/poll.js";
import { requireServer } from "../harness/ports.js";
import { checkStatusOrCode, redisCallCount, suiteBehindSlowRedis } from "../harness/redis-charge.js";
import { redisAvailable } from "../harness/redis-server.js";

// README "One budget per Check". A Redis that answers every command 300 ms late: slower than a
// Check's budget (150 ms), far faster than ioredis's 1 s command timeout and the bus's 2 s of
// heartbeat silence, so Redis is never counted lost and no limits.onRedisError mode takes over.
// Every charged Check is answered UNAVAILABLE at its budget while the charge script it sent still
// runs in Redis. Its late answer was judged in full: the request counted ALLOWED in GetUsage, its
// credits recorded as spent, and Redis's quota counter and balance kept what it took, so a client
// told 503 three times was billed three times and its daily quota of 4 was gone. Now the meter
// gives back what a late allow took and the pipeline counts no late answer.

const ready = requireServer("redis-server", redisAvailable(), "apt-get install redis-server");

const POLICY = {
  ...DEFAULT_POLICY_INPUT,
  defaultPlan: "small",
  // Four requests an hour and four a day: a late charge kept in either leaves the fifth refused.
  plans: { small: { maxActiveKeys: 5, rateLimit: { limit: 4, windowSeconds: 3600 }, dailyQuota: 4, monthlyCredits: 10 } },
  scopes: { catalog: ["read"], default: ["read"] },
  routes: [],
};

describe.runIf(ready)("a Redis slower (300 ms) than the Check budget (150 ms)", () => {
  const slow = suiteBehindSlowRedis(POLICY, 150);

  it("Checks answered UNAVAILABLE are not billed, not counted allowed, and use up none of the daily quota", async () => {
    const kg = slow.kg();
    const ownerId = "slow-redis-late-charge";
    await kg.admin.upsertAccount({ ownerId, plan: "small" });
    const key = await kg.admin.createKey({ ownerId, name: "k" });
    const status = (): Promise<number | string> => checkStatusOrCode(kg, key.secret, "/v1/x");
    // One served while Redis is fast; it also loads the account's credit balance into Redis.
    expect(await status()).toBe(200);
    const chargesBefore = await redisCallCount(kg, "charge");
    slow.setDelay(300);
    const logged = kg.logLines.length;
    const answers: Array<number | string> = [];
    for (let i = 0; i < 3; i++) {
      answers.push(await status());
      // Its charge's give-back runs before the next Check's charge: a give-back takes the rate
      // slot back only while no charge came since (redis-meter-give-back-rate-slot.test.ts).
      await until(async () => (await redisCallCount(kg, "give_back")) >= i + 1, 5000, "the late charge given back", { intervalMs: 20 });
    }
    // Each waited out its budget: UNAVAILABLE (gRPC code 14).
    expect(answers).toEqual(["grpc 14", "grpc 14", "grpc 14"]);
    slow.setDelay(0);
    // The three charges answer (Redis allowed each), and each is given back.
    await until(async () => (await redisCallCount(kg, "charge")) >= chargesBefore + 3 && (await redisCallCount(kg, "give_back")) >= 3, 5000, "the three late charges answered and given back", { intervalMs: 20 });
    // Redis stayed counted healthy: it was only slow, so no limits.onRedisError mode stood in.
    expect(kg.logLines.slice(logged).some((l) => l.includes("heartbeats stopped coming back"))).toBe(false);
    const today = new Date().toISOString().slice(0, 10);
    const usage = await kg.admin.getUsage({ ownerId, from: today, to: today });
    // One request was served: one counted allowed and one credit billed; the 503s are counted nowhere.
    expect({ allowed: usage.totals?.allowed, credits: usage.totals?.creditsUsed, denied: usage.totals?.denied }).toEqual({ allowed: 1n, credits: 1n, denied: {} });
    // Redis holds one request of the rate and of the daily quota, and one credit spent: the next
    // is allowed, and leaves 2 of each and 8 credits.
    const next = await kg.check(checkInit({ "x-api-key": key.secret }, "/v1/x"));
    if (next.httpResponse.case !== "okResponse") throw new Error(`expected an allow, got ${JSON.stringify(checkOutcome(next))}`);
    const allowed = next.httpResponse.value;
    const header = (name: string): string | undefined => allowed.responseHeadersToAdd.find((h) => h.header?.key === name)?.header?.value;
    expect({ rate: header("x-ratelimit-remaining"), quota: /, "[^"]+";r=(\d+);/.exec(header("ratelimit") ?? "")?.[1], credits: header("x-credits-remaining") }).toEqual({ rate: "2", quota: "2", credits: "8" });
  }, 40_000);
});
