import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { checkInit, checkOutcome, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

// README (KeyAdmin API reference, after the table): "While a rotation's old key is in grace it is
// the same customer's old secret for the same access, so it follows the new key". UpdateKey sent
// to the OLD key (the predecessor in grace) must not give the old secret more than the new key has.
let kg: TestKeygate;
beforeAll(async () => { kg = await startKeygate(); });
afterAll(async () => { await kg.stop(); });

const check = async (secret: string, path: string): Promise<{ status: number; code: string | null }> =>
  checkOutcome(await kg.check(checkInit({ authorization: `Bearer ${secret}` }, path)));

describe("UpdateKey on a rotation's old key in grace", () => {
  it("widening the old key's scopes leaves the old secret no wider than its successor", async () => {
    await kg.admin.upsertAccount({ ownerId: "owner-grace-widen", plan: "business" });
    const created = await kg.admin.createKey({ ownerId: "owner-grace-widen", name: "k", scopes: ["tutor"] });
    const rotated = await kg.admin.rotateKey({ id: created.key?.id ?? "", graceDays: 7 });
    expect(await check(rotated.secret, "/v1/decks/1")).toEqual({ status: 403, code: "FORBIDDEN" });
    // Whatever UpdateKey answers (FAILED_PRECONDITION, or applying it to the successor too)...
    await kg.admin.updateKey({ id: created.key?.id ?? "", scopes: ["tutor", "decks"] }).catch(() => undefined);
    const successorNow = await check(rotated.secret, "/v1/decks/1");
    // ...the old secret must not reach a route the current key cannot.
    expect({ old: await check(created.secret, "/v1/decks/1"), successor: successorNow }).toEqual({
      old: successorNow,
      successor: successorNow,
    });
  });

  it("raising the old key's own rate_limit does not let the old secret past the shared bucket's limit", async () => {
    await kg.admin.upsertAccount({ ownerId: "owner-grace-rate", plan: "business" });
    const created = await kg.admin.createKey({ ownerId: "owner-grace-rate", name: "k", rateLimit: { limit: 2, windowSeconds: 3600 } });
    const rotated = await kg.admin.rotateKey({ id: created.key?.id ?? "", graceDays: 7 });
    await kg.admin.updateKey({ id: created.key?.id ?? "", rateLimit: { limit: 1000, windowSeconds: 3600 } }).catch(() => undefined);
    const successor = (await kg.admin.getKey({ id: rotated.key?.id ?? "" })).key?.rateLimit?.limit ?? 0;
    let allowed = 0;
    for (let i = 0; i < 10; i++) if ((await check(created.secret, "/v1/things")).status === 200) allowed += 1;
    // Old and new secret share one limit (README: rotation-rate-bucket): the old one gets at most
    // what the successor's limit allows in the hour.
    expect(allowed).toBeLessThanOrEqual(successor);
  });
});
