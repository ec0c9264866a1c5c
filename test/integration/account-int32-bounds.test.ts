import { ConnectError } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { MAX_INT32 } from "../../src/config.js";
import { TEST_POLICY, postJson, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

// KeyAdmin's Account message carries a plan's key caps and rate limit as int32 (max_active_keys,
// max_active_test_keys, rate_limit.limit, rate_limit.window_seconds). The policy took them up to
// 2^53 - 1, and a plan past 2^31 - 1 ("unlimited" keys, 10^10 a second) made every Account answer
// about its accounts unencodable over gRPC: UpsertAccount failed INTERNAL after its write, and a
// VerifyKey with a cost charged and then answered INTERNAL. The policy now stops at 2^31 - 1
// (test/unit/config-number-bounds.test.ts); this holds the bound to what the wire can carry.
const POLICY = {
  ...TEST_POLICY,
  plans: {
    ...TEST_POLICY.plans,
    manykeys: { maxActiveKeys: MAX_INT32, rateLimit: { limit: 100, windowSeconds: 60 }, dailyQuota: null, monthlyCredits: 10 },
    fast: { maxActiveKeys: 5, rateLimit: { limit: MAX_INT32, windowSeconds: 1 }, dailyQuota: null, monthlyCredits: null },
    long: { maxActiveKeys: 5, rateLimit: { limit: 1, windowSeconds: MAX_INT32 }, dailyQuota: null, monthlyCredits: null },
  },
  testMode: { maxActiveKeys: MAX_INT32 },
};

/** "ok", or the Connect code and message a call failed with. */
async function outcome(call: Promise<unknown>): Promise<string> {
  try {
    await call;
    return "ok";
  } catch (error) {
    return error instanceof ConnectError ? `${error.code} ${error.rawMessage}` : String(error);
  }
}

describe("plans at the int32 bound.happy", () => {
  let kg: TestKeygate;
  beforeAll(async () => {
    kg = await startKeygate({ policy: POLICY });
  });
  afterAll(async () => {
    await kg?.stop();
  });

  const { manykeys, fast, long } = POLICY.plans;
  it.each(Object.entries({ manykeys, fast, long }))(
    "UpsertAccount and GetAccount answer for an account on plan %s (gRPC and Connect JSON)",
    async (plan, { maxActiveKeys, rateLimit }) => {
      const ownerId = `int32-${plan}`;
      const upsert = await outcome(kg.admin.upsertAccount({ ownerId, plan }));
      const got = await kg.admin.getAccount({ ownerId });
      const json = await postJson(kg.ports.admin, "GetAccount", { ownerId });
      expect({ upsert, jsonStatus: json.status }).toEqual({ upsert: "ok", jsonStatus: 200 });
      expect(got.account).toMatchObject({ maxActiveKeys, maxActiveTestKeys: MAX_INT32, rateLimit });
    },
  );

  it("VerifyKey with a cost over gRPC charges once and answers", async () => {
    const ownerId = "int32-verify";
    await kg.admin.upsertAccount({ ownerId, plan: "manykeys" });
    const { secret } = await kg.admin.createKey({ ownerId, name: "k" });
    const verify = await outcome(kg.admin.verifyKey({ secret, cost: 4n, idempotencyKey: "verify-1" }));
    const { account } = await kg.admin.getAccount({ ownerId });
    expect({ verify, creditBalance: account?.creditBalance }).toEqual({ verify: "ok", creditBalance: 6n });
  });
});

describe("plans past the int32 bound.error", () => {
  it("keygate does not start, naming the field", async () => {
    let message = "started";
    try {
      const kg = await startKeygate({ policy: { ...POLICY, plans: { ...POLICY.plans, manykeys: { ...POLICY.plans.manykeys, maxActiveKeys: MAX_INT32 + 1 } } } });
      await kg.stop();
    } catch (error) {
      message = error instanceof Error ? `${error.name}: ${error.message}` : String(error);
    }
    expect(message).toMatch(/^ConfigError: invalid KEYGATE_CONFIG \(.*\): plans\.manykeys\.maxActiveKeys: must be at most 2147483647 /);
  });
});
