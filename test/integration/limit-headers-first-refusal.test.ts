import { Redis } from "ioredis";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { DEFAULT_POLICY_INPUT } from "../../src/config.js";
import { httpCheck, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { requireServer } from "../harness/ports.js";
import { redisAvailable, startRedis } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";

// README, Headers: X-Credits-Remaining on metered plans, on allows and on the refusals that report
// where the caller stands (403 before the limits step, 429, 402). The in-process meter loads an
// account's balance for any request, a refusal's too. The Redis meter's peek and its rate and
// quota refusals read only a balance some charge had loaded, so an account's first request, or
// its first since its credit hash went idle (an hour by default), answered without the header
// with Redis and with it embedded. Such a refusal now loads the balance first (allows never pay
// for it: they load it when they charge).
const ready = requireServer("redis-server", redisAvailable(), "apt-get install redis-server");

const POLICY = {
  ...DEFAULT_POLICY_INPUT,
  defaultPlan: "both",
  plans: {
    both: { maxActiveKeys: 5, rateLimit: { limit: 2, windowSeconds: 60 }, dailyQuota: 3, monthlyCredits: 100 },
    none: { maxActiveKeys: 5, rateLimit: { limit: 2, windowSeconds: 60 }, dailyQuota: 0, monthlyCredits: 100 },
  },
  scopes: { catalog: ["read", "write"], default: ["read"] },
  routes: [{ method: "*", pathPrefix: "/write", requiredScopes: ["write"] }],
};

interface Answer {
  status: number;
  credits: string | null;
}

describe.runIf(ready)("the first refusal of a metered account reports its balance, embedded and with Redis", () => {
  let redis: RedisServer;
  let client: Redis;
  let embedded: TestKeygate;
  let withRedis: TestKeygate;
  beforeAll(async () => {
    const started = await startRedis();
    if (started === null) throw new Error("redis-server is not on PATH");
    redis = started;
    client = new Redis(redis.url);
    embedded = await startKeygate({ policy: POLICY });
    withRedis = await startKeygate({ policy: POLICY, env: { KEYGATE_REDIS_URL: redis.url } });
  });
  afterAll(async () => {
    await embedded?.stop();
    await withRedis?.stop();
    client?.disconnect();
    await redis?.stop();
  });

  /** A key of a new account on `plan`, on each keygate. */
  async function keysOn(ownerId: string, plan: string): Promise<Array<[TestKeygate, string]>> {
    const keys: Array<[TestKeygate, string]> = [];
    for (const kg of [embedded, withRedis]) {
      await kg.admin.upsertAccount({ ownerId, plan });
      keys.push([kg, (await kg.admin.createKey({ ownerId, name: "k" })).secret]);
    }
    return keys;
  }

  async function answer(kg: TestKeygate, secret: string, path = "/check/v1/x"): Promise<Answer> {
    const got = await httpCheck(kg.ports.http, path, { "x-api-key": secret });
    return { status: got.status, credits: got.headers.get("x-credits-remaining") };
  }

  it("a 403 (scope) as the account's first request", async () => {
    const seen: Answer[] = [];
    for (const [kg, secret] of await keysOn("first-403", "both")) seen.push(await answer(kg, secret, "/check/write"));
    expect(seen).toEqual([
      { status: 403, credits: "100" },
      { status: 403, credits: "100" },
    ]);
  });

  it("a 402 (a daily quota of 0) as the account's first request", async () => {
    const seen: Answer[] = [];
    for (const [kg, secret] of await keysOn("first-402", "none")) seen.push(await answer(kg, secret));
    expect(seen).toEqual([
      { status: 402, credits: "100" },
      { status: 402, credits: "100" },
    ]);
  });

  it("a 429 as the first request after the credit hash went idle", async () => {
    const seen: Answer[][] = [];
    for (const [kg, secret] of await keysOn("first-429", "both")) {
      const answers = [await answer(kg, secret), await answer(kg, secret)];
      // As if idle past its lifetime: Redis dropped the hash; the spend is in the store or pending.
      if (kg === withRedis) expect(await client.del("kg:c:first-429")).toBe(1);
      answers.push(await answer(kg, secret));
      seen.push(answers);
    }
    const expected = [
      { status: 200, credits: "99" },
      { status: 200, credits: "98" },
      { status: 429, credits: "98" },
    ];
    expect(seen).toEqual([expected, expected]);
  });
});
