import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { DEFAULT_POLICY_INPUT } from "../../src/config.js";
import { TestClock } from "../harness/clock.js";
import { checkInit, checkOutcome, httpCheck, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

// GetUsage counts every outcome of a Check once, under its own name, with the credits it spent.
const POLICY = {
  ...DEFAULT_POLICY_INPUT,
  defaultPlan: "small",
  plans: {
    small: { maxActiveKeys: 5, rateLimit: { limit: 100, windowSeconds: 60 }, dailyQuota: 3, monthlyCredits: 4 },
    slow: { maxActiveKeys: 5, rateLimit: { limit: 1, windowSeconds: 3600 }, dailyQuota: null, monthlyCredits: null },
  },
  scopes: { catalog: ["read", "write"], default: ["read"] },
  routes: [
    { method: "*", pathPrefix: "/write", requiredScopes: ["write"] },
    { method: "*", pathPrefix: "/free", metered: false },
  ],
};

let kg: TestKeygate;
const clock = new TestClock();
let seq = 0;
beforeAll(async () => {
  clock.freeze("2026-12-03T23:59:59.000Z");
  kg = await startKeygate({ policy: POLICY, clock });
});
afterAll(async () => kg.stop());

async function owner(plan = "small") {
  const ownerId = `usage-${++seq}`;
  await kg.admin.upsertAccount({ ownerId, plan });
  const key = await kg.admin.createKey({ ownerId, name: "k" });
  return { ownerId, keyId: key.key?.id ?? "", secret: key.secret };
}
const usage = async (ownerId: string, from = "2026-12-01", to = "2026-12-31") => kg.admin.getUsage({ ownerId, from, to });
const counts = (u: { allowed: bigint; denied: Record<string, bigint>; creditsUsed: bigint } | undefined) => ({
  allowed: Number(u?.allowed ?? -1n),
  denied: Object.fromEntries(Object.entries(u?.denied ?? {}).map(([k, v]) => [k, Number(v)])),
  credits: Number(u?.creditsUsed ?? -1n),
});

describe("GetUsage counts every outcome once", () => {
  it("allowed, unmetered, forbidden, quota, disabled, revoked; verify without cost counts nothing", async () => {
    const o = await owner();
    const h = { "x-api-key": o.secret };
    expect(checkOutcome(await kg.check(checkInit(h, "/v1/x"))).code).toBe(null); // allowed 1 credit
    expect((await httpCheck(kg.ports.http, "/check/v1/x", h)).status).toBe(200); // allowed
    expect(checkOutcome(await kg.check(checkInit(h, "/free/x"))).code).toBe(null); // unmetered
    expect(checkOutcome(await kg.check(checkInit(h, "/write/x"))).code).toBe("FORBIDDEN");
    expect(checkOutcome(await kg.check(checkInit(h, "/v1/x"))).code).toBe(null); // 3rd metered
    expect(checkOutcome(await kg.check(checkInit(h, "/v1/x"))).code).toBe("QUOTA_EXCEEDED");
    await kg.admin.verifyKey({ secret: o.secret });
    await kg.admin.verifyKey({ secret: o.secret, requiredScopes: ["write"] });
    await kg.admin.disableKey({ id: o.keyId });
    expect(checkOutcome(await kg.check(checkInit(h, "/v1/x"))).code).toBe("KEY_DISABLED");
    await kg.admin.enableKey({ id: o.keyId });
    await kg.admin.revokeKey({ id: o.keyId });
    expect(checkOutcome(await kg.check(checkInit(h, "/v1/x"))).code).toBe("KEY_REVOKED");
    const u = await usage(o.ownerId);
    expect(counts(u.totals)).toEqual({ allowed: 4, denied: { FORBIDDEN: 1, QUOTA_EXCEEDED: 1, KEY_DISABLED: 1, KEY_REVOKED: 1 }, credits: 3 });
    expect(u.byKey.length).toBe(1);
  });

  it("rate limit and plan-required refusals", async () => {
    const o = await owner("slow");
    const h = { "x-api-key": o.secret };
    expect(checkOutcome(await kg.check(checkInit(h, "/v1/x"))).code).toBe(null);
    expect(checkOutcome(await kg.check(checkInit(h, "/v1/x"))).code).toBe("RATE_LIMITED");
    await kg.admin.upsertAccount({ ownerId: o.ownerId, subscriptionStatus: "past_due" });
    expect(checkOutcome(await kg.check(checkInit(h, "/v1/x"))).code).toBe("PLAN_REQUIRED");
    expect(counts((await usage(o.ownerId)).totals)).toEqual({ allowed: 1, denied: { RATE_LIMITED: 1, PLAN_REQUIRED: 1 }, credits: 0 });
  });

  it("ChargeUsage and VerifyKey with cost count once each; replays count nothing; credits and insufficient", async () => {
    const o = await owner();
    expect((await kg.admin.chargeUsage({ ownerId: o.ownerId, cost: 2n, idempotencyKey: "a" })).charged).toBe(true);
    expect((await kg.admin.chargeUsage({ ownerId: o.ownerId, cost: 2n, idempotencyKey: "a" })).replayed).toBe(true);
    expect((await kg.admin.verifyKey({ secret: o.secret, cost: 1n, idempotencyKey: "b" })).charged).toBe(true);
    expect((await kg.admin.verifyKey({ secret: o.secret, cost: 1n, idempotencyKey: "b" })).charged).toBe(true);
    const short = await kg.admin.chargeUsage({ keyId: o.keyId, cost: 5n, idempotencyKey: "c" });
    expect(short.code).toBe("INSUFFICIENT_CREDITS");
    const u = await usage(o.ownerId);
    expect(counts(u.totals)).toEqual({ allowed: 2, denied: { INSUFFICIENT_CREDITS: 1 }, credits: 3 });
    const rows = u.byKey.map((r) => [r.keyId === "" ? "account" : r.keyId === o.keyId ? "key" : "other", counts(r.usage)]);
    expect(rows).toContainEqual(["account", { allowed: 1, denied: {}, credits: 2 }]);
    expect(rows).toContainEqual(["key", { allowed: 1, denied: { INSUFFICIENT_CREDITS: 1 }, credits: 1 }]);
  });

  it("a test key's requests are allowed and spend nothing", async () => {
    const o = await owner();
    const t = await kg.admin.createKey({ ownerId: o.ownerId, name: "t", mode: "test" });
    for (let i = 0; i < 2; i++) expect(checkOutcome(await kg.check(checkInit({ "x-api-key": t.secret }, "/v1/x"))).code).toBe(null);
    expect(checkOutcome(await kg.check(checkInit({ "x-api-key": t.secret }, "/free/x"))).code).toBe(null);
    expect(counts((await usage(o.ownerId)).totals)).toEqual({ allowed: 3, denied: {}, credits: 0 });
  });

  it("splits by UTC day at midnight, and from/to are inclusive", async () => {
    const o = await owner();
    const h = { "x-api-key": o.secret };
    clock.freeze("2026-12-04T23:59:59.999Z");
    expect(checkOutcome(await kg.check(checkInit(h, "/free/a"))).code).toBe(null);
    clock.freeze("2026-12-05T00:00:00.000Z");
    expect(checkOutcome(await kg.check(checkInit(h, "/free/a"))).code).toBe(null);
    expect(checkOutcome(await kg.check(checkInit(h, "/free/a"))).code).toBe(null);
    const all = await usage(o.ownerId);
    expect(all.byKey.map((r) => [r.day, Number(r.usage?.allowed)])).toEqual([["2026-12-04", 1], ["2026-12-05", 2]]);
    expect(counts((await usage(o.ownerId, "2026-12-05", "2026-12-05")).totals).allowed).toBe(2);
    expect(counts((await usage(o.ownerId, "2026-12-04", "2026-12-04")).totals).allowed).toBe(1);
  });
});
