import { Code, ConnectError } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { CheckResponse } from "../../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import { TestClock } from "../harness/clock.js";
import { checkInit, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { LIMITS_POLICY } from "../harness/limits-policy.js";

// Test-mode keys (kg_test_…) are metered and limited apart from live keys: their own daily
// quota and key cap from the policy's testMode, no credits spent, and nothing of theirs counts
// toward the live quota, live credits or live cap.
const POLICY = {
  ...LIMITS_POLICY,
  plans: { ...LIMITS_POLICY.plans, paid: { maxActiveKeys: 1, rateLimit: { limit: 1000, windowSeconds: 60 }, dailyQuota: 3, monthlyCredits: 5 } },
  testMode: { dailyQuota: 2, maxActiveKeys: 2 },
};

function outcome(response: CheckResponse): { status: number; code: string; credits: string | undefined } {
  if (response.httpResponse.case === "okResponse") {
    const added = Object.fromEntries(response.httpResponse.value.responseHeadersToAdd.map((h) => [h.header?.key ?? "", h.header?.value ?? ""]));
    return { status: 200, code: "OK", credits: added["x-credits-remaining"] };
  }
  if (response.httpResponse.case !== "deniedResponse") throw new Error("no answer");
  const denied = response.httpResponse.value;
  const { error } = JSON.parse(denied.body) as { error: { code: string } };
  return { status: denied.status?.code ?? 0, code: error.code, credits: denied.headers.find((h) => h.header?.key === "x-credits-remaining")?.header?.value };
}

describe("test mode apart", () => {
  let kg: TestKeygate;
  let dataDir: string;
  const clock = new TestClock();
  beforeAll(async () => {
    clock.freeze("2026-12-03T12:00:00.000Z");
    kg = await startKeygate({ policy: POLICY, clock });
    dataDir = kg.dataDir;
  });
  afterAll(async () => {
    await kg.stop();
  });

  it("test keys have their own cap (testMode.maxActiveKeys) and do not use the plan's live cap", async () => {
    const ownerId = "test-mode-cap";
    await kg.admin.upsertAccount({ ownerId, plan: "paid" });
    await kg.admin.createKey({ ownerId, name: "live" });
    await kg.admin.createKey({ ownerId, name: "t1", mode: "test" });
    await kg.admin.createKey({ ownerId, name: "t2", mode: "test" });
    const refused = async (mode: string) => {
      try {
        await kg.admin.createKey({ ownerId, name: "over", mode });
      } catch (error) {
        if (error instanceof ConnectError) return [error.code, error.rawMessage];
      }
      return ["created"];
    };
    expect(await refused("test")).toEqual([Code.ResourceExhausted, 'plan "paid" allows at most 2 active test-mode keys']);
    expect(await refused("live")).toEqual([Code.ResourceExhausted, 'plan "paid" allows at most 1 active key']);
    expect((await kg.admin.getAccount({ ownerId })).account?.activeKeyCount).toBe(1);
  });

  it("test keys use their own daily quota and spend no credits; live keys keep all of theirs, also after a restart", async () => {
    const ownerId = "test-mode-meter";
    await kg.admin.upsertAccount({ ownerId, plan: "paid" });
    const live = (await kg.admin.createKey({ ownerId, name: "live" })).secret;
    const test = (await kg.admin.createKey({ ownerId, name: "test", mode: "test" })).secret;
    const check = async (secret: string) => outcome(await kg.check(checkInit({ "x-api-key": secret }, "/v1/x")));
    expect(await check(test)).toEqual({ status: 200, code: "OK", credits: undefined });
    expect(await check(test)).toEqual({ status: 200, code: "OK", credits: undefined });
    expect(await check(test)).toMatchObject({ status: 402, code: "QUOTA_EXCEEDED" });
    // The live key has its whole quota (3) and all 5 credits.
    expect(await check(live)).toEqual({ status: 200, code: "OK", credits: "4" });
    expect(await check(live)).toEqual({ status: 200, code: "OK", credits: "3" });
    expect((await kg.admin.getAccount({ ownerId })).account?.creditBalance).toBe(3n);
    // After a restart (which writes the pending usage) both quotas are reseeded from the stored usage, each from its own.
    await kg.stop({ keepData: true });
    kg = await startKeygate({ dataDir, policy: POLICY, clock });
    expect(await check(test)).toMatchObject({ status: 402, code: "QUOTA_EXCEEDED" });
    expect(await check(live)).toEqual({ status: 200, code: "OK", credits: "2" });
    expect(await check(live)).toMatchObject({ status: 402, code: "QUOTA_EXCEEDED" });
    const usage = await kg.admin.getUsage({ ownerId, from: "2026-12-03", to: "2026-12-03" });
    expect(usage.totals?.allowed).toBe(5n);
  });

  it("a ChargeUsage of a test key uses the test quota and spends nothing", async () => {
    const ownerId = "test-mode-charge";
    await kg.admin.upsertAccount({ ownerId, plan: "paid" });
    const created = await kg.admin.createKey({ ownerId, name: "test", mode: "test" });
    const keyId = created.key?.id ?? "";
    for (const i of [1, 2]) expect((await kg.admin.chargeUsage({ keyId, cost: 5n, idempotencyKey: `t-${i}` })).charged).toBe(true);
    expect(await kg.admin.chargeUsage({ keyId, cost: 5n, idempotencyKey: "t-3" })).toMatchObject({ charged: false, code: "QUOTA_EXCEEDED" });
    expect((await kg.admin.getAccount({ ownerId })).account?.creditBalance).toBe(5n);
  });
});
