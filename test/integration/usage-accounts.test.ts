import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { TestClock } from "../harness/clock.js";
import { startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { LIMITS_POLICY } from "../harness/limits-policy.js";

// An account's ChargeUsage without key_id is counted under no key. Such rows of two accounts in
// one flush interval must stay apart: each account's usage is its own in GetUsage, and its
// daily quota is reloaded from its own rows after a restart.

const T0 = "2026-12-03T12:00:00.000Z";

describe("account-level ChargeUsage of two owners in one flush interval", () => {
  let kg: TestKeygate;
  beforeAll(async () => {
    const clock = new TestClock();
    clock.freeze(T0);
    kg = await startKeygate({ policy: LIMITS_POLICY, clock });
  });
  afterAll(async () => {
    await kg.stop();
  });

  it("each owner's GetUsage shows its own charges", async () => {
    await kg.admin.upsertAccount({ ownerId: "usage-a", plan: "quota" });
    await kg.admin.upsertAccount({ ownerId: "usage-b", plan: "quota" });
    expect((await kg.admin.chargeUsage({ ownerId: "usage-a", cost: 0n, idempotencyKey: "a-1" })).charged).toBe(true);
    for (let i = 0; i < 3; i++) expect((await kg.admin.chargeUsage({ ownerId: "usage-b", cost: 0n, idempotencyKey: `b-${i}` })).charged).toBe(true);
    const a = await kg.admin.getUsage({ ownerId: "usage-a", from: "2026-12-03", to: "2026-12-03" });
    const b = await kg.admin.getUsage({ ownerId: "usage-b", from: "2026-12-03", to: "2026-12-03" });
    expect({ a: a.totals?.allowed, b: b.totals?.allowed }).toEqual({ a: 1n, b: 3n });
  });
});

describe("the daily quota after a restart", () => {
  it("owner B, who used its whole quota of 5 by ChargeUsage, is still at its quota after a restart", async () => {
    const clock = new TestClock();
    clock.freeze(T0);
    const first = await startKeygate({ policy: LIMITS_POLICY, clock });
    await first.admin.upsertAccount({ ownerId: "restart-a", plan: "quota" });
    await first.admin.upsertAccount({ ownerId: "restart-b", plan: "quota" });
    expect((await first.admin.chargeUsage({ ownerId: "restart-a", cost: 0n, idempotencyKey: "a-1" })).charged).toBe(true);
    for (let i = 0; i < 5; i++) expect((await first.admin.chargeUsage({ ownerId: "restart-b", cost: 0n, idempotencyKey: `b-${i}` })).charged).toBe(true);
    expect((await first.admin.chargeUsage({ ownerId: "restart-b", cost: 0n, idempotencyKey: "b-over" })).code).toBe("QUOTA_EXCEEDED");
    await first.stop({ keepData: true });

    const clock2 = new TestClock();
    clock2.freeze(T0);
    const restarted = await startKeygate({ policy: LIMITS_POLICY, clock: clock2, dataDir: first.dataDir });
    try {
      const b = await restarted.admin.chargeUsage({ ownerId: "restart-b", cost: 0n, idempotencyKey: "b-after-restart" });
      const a = await restarted.admin.chargeUsage({ ownerId: "restart-a", cost: 0n, idempotencyKey: "a-after-restart" });
      // B has used 5 of 5 today: refused. A has used 1 of 5: charged.
      expect({ b: b.code, a: a.code }).toEqual({ b: "QUOTA_EXCEEDED", a: "OK" });
    } finally {
      await restarted.stop();
    }
  });
});
