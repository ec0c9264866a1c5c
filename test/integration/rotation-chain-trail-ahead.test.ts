import { afterEach, describe, expect, it } from "vitest";
import { TestClock } from "../harness/clock.js";
import { TEST_POLICY, checkInit, checkOutcome, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

// After the clock went back, the trail's newest record is ahead of it. A rotation judged by that
// time instead of the clock missed a chain's earlier key whose grace ends between the two, while
// Check (by the clock) still let it in: two keys of the chain in grace, A passing. Keys are judged
// by the clock; only the revoke's record time follows the trail.

let kg: TestKeygate | undefined;
afterEach(async () => {
  await kg?.stop();
  kg = undefined;
});

describe("a chain rotation after a clock step back", () => {
  it("still revokes the earlier key Check lets in", async () => {
    const clock = new TestClock();
    clock.freeze("2027-05-20T10:00:00.000Z");
    kg = await startKeygate({ clock, policy: TEST_POLICY });
    const k = kg;
    const check = async (secret: string) => checkOutcome(await k.check(checkInit({ authorization: `Bearer ${secret}` }, "/v1/things")));
    const ownerId = "chain-ahead-chain";
    await k.admin.upsertAccount({ ownerId, plan: "basic" });
    const a = await k.admin.createKey({ ownerId, name: "k", scopes: ["tutor"] });
    const b = await k.admin.rotateKey({ id: a.key?.id ?? "", graceDays: 1 }); // A in grace until 05-21 10:00
    clock.freeze("2027-05-21T11:00:00.000Z");
    await k.admin.upsertAccount({ ownerId, subscriptionStatus: "past_due" }); // trail newest at 05-21 11:00
    clock.freeze("2027-05-21T09:00:00.000Z"); // step back 2 h: A in grace again by the clock
    await k.admin.upsertAccount({ ownerId, subscriptionStatus: "active" });
    expect(await check(a.secret)).toEqual({ status: 200, code: null });
    await k.admin.rotateKey({ id: b.key?.id ?? "", graceDays: 7 });
    const aState = (await k.admin.getKey({ id: a.key?.id ?? "" })).key?.state;
    const aCheck = await check(a.secret);
    console.log("A after B->C:", aState, aCheck);
    expect(aCheck).toEqual({ status: 401, code: "KEY_REVOKED" });
  });
});
