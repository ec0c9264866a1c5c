import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { postJson, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

// Free text holding a credential is refused, but other systems' ids of a like shape are kept:
// a Stripe Checkout Session id ("cs_live_" and 58 characters) is no keygate key.

const STRIPE_CHECKOUT_SESSION = `cs_live_a1${"B2c3D4e5F6g7H8".repeat(4)}`; // synthetic, Stripe's Checkout Session id shape

let kg: TestKeygate;
beforeAll(async () => {
  kg = await startKeygate();
});
afterAll(async () => kg?.stop());

async function balance(ownerId: string): Promise<number> {
  const got = await postJson(kg.ports.admin, "GetAccount", { ownerId });
  return Number((got.json["account"] as Record<string, unknown>)["topupCredits"] ?? 0);
}

describe("free text happy: ids of a key's shape from other systems", () => {
  it("reason naming the Checkout Session that paid (README: 'Why (an order id, say)'): credits added", async () => {
    const ownerId = "order-id-stripe";
    expect((await postJson(kg.ports.admin, "UpsertAccount", { ownerId, plan: "basic" })).status).toBe(200);
    const before = await balance(ownerId);
    const answer = await postJson(kg.ports.admin, "AddCredits", { ownerId, amount: "500", reason: `stripe checkout ${STRIPE_CHECKOUT_SESSION}`, idempotencyKey: STRIPE_CHECKOUT_SESSION });
    expect({ status: answer.status, added: (await balance(ownerId)) - before }).toEqual({ status: 200, added: 500 });
  });

  it("CreateKey with the Checkout Session in metadata: the key is issued", async () => {
    const ownerId = "order-id-stripe-meta";
    await postJson(kg.ports.admin, "UpsertAccount", { ownerId, plan: "basic" });
    const created = await postJson(kg.ports.admin, "CreateKey", { ownerId, name: "bought", metadata: { stripe_checkout_session: STRIPE_CHECKOUT_SESSION } });
    expect(created.status).toBe(200);
  });
});
