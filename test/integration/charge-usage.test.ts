import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Code } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it, vi } from "vitest";
import { StoreUnavailableError } from "../../src/store/errors.js";
import { TestClock } from "../harness/clock.js";
import { adminRefusal, checkInit, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { LIMITS_POLICY } from "../harness/limits-policy.js";
import { requireServer } from "../harness/ports.js";
import { redisAvailable, startRedis } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";

// ChargeUsage meters what a backend knows (a cost known after the response, a background job,
// usage shared by a web app and the API) against the same daily quota and credits as Checks.

const BALANCE = 20;
const POLICY = {
  ...LIMITS_POLICY,
  plans: {
    ...LIMITS_POLICY.plans,
    paid: { maxActiveKeys: 5, rateLimit: { limit: 1000, windowSeconds: 60 }, dailyQuota: null, monthlyCredits: BALANCE },
    daily: { maxActiveKeys: 5, rateLimit: { limit: 1000, windowSeconds: 60 }, dailyQuota: 4, monthlyCredits: null },
  },
};

const redisReady = requireServer("redis-server", redisAvailable(), "apt-get install redis-server");

const refusal = adminRefusal;

async function balance(kg: TestKeygate, ownerId: string): Promise<bigint> {
  return (await kg.admin.getAccount({ ownerId })).account?.creditBalance ?? -1n;
}

/**
 * Runs `call` while the store cannot count keys, which every account answer reads: a top-up's
 * write goes through, its answer cannot be built.
 */
async function withAccountReadsFailing<T>(kg: TestKeygate, call: () => Promise<T>): Promise<T> {
  const spy = vi.spyOn(kg.app.store, "countActiveKeys").mockRejectedValue(new StoreUnavailableError("injected: the store stopped answering reads"));
  try {
    return await call();
  } finally {
    spy.mockRestore();
  }
}

describe("ChargeUsage (one replica)", () => {
  let kg: TestKeygate;
  let seq = 0;
  beforeAll(async () => {
    const clock = new TestClock();
    clock.freeze("2026-12-03T12:00:00.000Z");
    kg = await startKeygate({ policy: POLICY, clock });
  });
  afterAll(async () => {
    await kg.stop();
  });

  async function account(plan: string): Promise<{ ownerId: string; keyId: string; secret: string }> {
    const ownerId = `charge-${++seq}`;
    await kg.admin.upsertAccount({ ownerId, plan });
    const created = await kg.admin.createKey({ ownerId, name: "charge" });
    return { ownerId, keyId: created.key?.id ?? "", secret: created.secret };
  }

  it("charges the credits a backend names, and a retry with the same idempotency key charges nothing and answers the same", async () => {
    const { ownerId } = await account("paid");
    const first = await kg.admin.chargeUsage({ ownerId, cost: 7n, idempotencyKey: "order-1001" });
    expect([first.charged, first.code, first.replayed, first.ownerId, first.keyId]).toEqual([true, "OK", false, ownerId, ""]);
    expect(first.headers["x-credits-remaining"]).toBe(String(BALANCE - 7));
    const retry = await kg.admin.chargeUsage({ ownerId, cost: 7n, idempotencyKey: "order-1001" });
    expect([retry.charged, retry.code, retry.replayed]).toEqual([true, "OK", true]);
    expect(retry.headers).toEqual(first.headers);
    expect(await balance(kg, ownerId)).toBe(BigInt(BALANCE - 7));
    const second = await kg.admin.chargeUsage({ ownerId, cost: 7n, idempotencyKey: "order-1002" });
    expect([second.charged, second.headers["x-credits-remaining"]]).toEqual([true, String(BALANCE - 14)]);
    // Not enough left: refused as a Check would be, nothing spent.
    const short = await kg.admin.chargeUsage({ ownerId, cost: 7n, idempotencyKey: "order-1003" });
    expect([short.charged, short.code, short.message]).toEqual([false, "INSUFFICIENT_CREDITS", "This request costs 7 credits and the account has 6 left. Add credits or wait for the monthly renewal."]);
    expect(await balance(kg, ownerId)).toBe(6n);
  });

  it("uses the daily quota that Checks use: four uses a day, whichever way they come", async () => {
    const { ownerId, keyId, secret } = await account("daily");
    for (let i = 0; i < 2; i++) expect((await kg.admin.chargeUsage({ ownerId, keyId, cost: 0n, idempotencyKey: `job-${i}` })).charged).toBe(true);
    for (let i = 0; i < 2; i++) expect((await kg.check(checkInit({ "x-api-key": secret }, "/v1/x"))).status?.code).toBe(0);
    const check = await kg.check(checkInit({ "x-api-key": secret }, "/v1/x"));
    expect(check.httpResponse.case === "deniedResponse" ? check.httpResponse.value.status?.code : 0).toBe(402);
    const charge = await kg.admin.chargeUsage({ ownerId, keyId, cost: 0n, idempotencyKey: "job-late" });
    expect([charge.charged, charge.code, charge.keyId]).toEqual([false, "QUOTA_EXCEEDED", keyId]);
    expect(charge.headers["ratelimit-policy"]).toBe('"minute";q=6000;w=60, "day";q=4;w=86400');
  });

  it("a key that may not be used is refused with its state's code, and charges nothing", async () => {
    const { ownerId, keyId } = await account("paid");
    await kg.admin.revokeKey({ id: keyId, reason: "leaked" });
    const revoked = await kg.admin.chargeUsage({ keyId, cost: 1n, idempotencyKey: "after-revoke" });
    expect([revoked.charged, revoked.code, revoked.ownerId]).toEqual([false, "KEY_REVOKED", ownerId]);
    expect(await balance(kg, ownerId)).toBe(BigInt(BALANCE));
    await kg.admin.upsertAccount({ ownerId, subscriptionStatus: "canceled" });
    const canceled = await kg.admin.chargeUsage({ ownerId, cost: 1n, idempotencyKey: "after-cancel" });
    expect([canceled.charged, canceled.code]).toEqual([false, "PLAN_REQUIRED"]);
  });

  it("bad input is INVALID_ARGUMENT or NOT_FOUND naming the problem, and charges nothing", async () => {
    const { ownerId, keyId } = await account("paid");
    const other = await account("paid");
    expect(await refusal(kg.admin.chargeUsage({ ownerId, cost: 1n, idempotencyKey: "" }))).toEqual({ code: Code.InvalidArgument, message: "idempotency_key: must be 1-200 printable ASCII characters, unique per charge (it is required)" });
    expect((await refusal(kg.admin.chargeUsage({ ownerId, cost: 1n, idempotencyKey: "x".repeat(201) }))).code).toBe(Code.InvalidArgument);
    expect(await refusal(kg.admin.chargeUsage({ ownerId, cost: -1n, idempotencyKey: "neg" }))).toEqual({ code: Code.InvalidArgument, message: "cost: must be a whole number from 0 to 1000000000" });
    expect(await refusal(kg.admin.chargeUsage({ cost: 1n, idempotencyKey: "nobody" }))).toEqual({ code: Code.InvalidArgument, message: "owner_id: is required when key_id is not given" });
    expect((await refusal(kg.admin.chargeUsage({ ownerId: "no-such-owner", cost: 1n, idempotencyKey: "ghost" }))).code).toBe(Code.NotFound);
    expect((await refusal(kg.admin.chargeUsage({ keyId: "key_00000000000000000000000000", cost: 1n, idempotencyKey: "ghost" }))).code).toBe(Code.NotFound);
    expect(await refusal(kg.admin.chargeUsage({ ownerId: other.ownerId, keyId, cost: 1n, idempotencyKey: "cross" }))).toEqual({ code: Code.InvalidArgument, message: `key_id: belongs to another owner than "${other.ownerId}"` });
    expect(await balance(kg, ownerId)).toBe(BigInt(BALANCE));
    expect(await balance(kg, other.ownerId)).toBe(BigInt(BALANCE));
  });

  it("an idempotency key is the owner's own: another owner's same key is another charge", async () => {
    const a = await account("paid");
    const b = await account("paid");
    expect((await kg.admin.chargeUsage({ ownerId: a.ownerId, cost: 2n, idempotencyKey: "shared-id" })).replayed).toBe(false);
    expect((await kg.admin.chargeUsage({ ownerId: b.ownerId, cost: 2n, idempotencyKey: "shared-id" })).replayed).toBe(false);
    expect([await balance(kg, a.ownerId), await balance(kg, b.ownerId)]).toEqual([BigInt(BALANCE - 2), BigInt(BALANCE - 2)]);
  });

  it("VerifyKey with a cost charges a valid key, once per idempotency key; a refused charge makes the answer invalid; an invalid key costs nothing", async () => {
    const { ownerId, keyId, secret } = await account("paid");
    const first = await kg.admin.verifyKey({ secret, cost: 12n, idempotencyKey: "verify-1" });
    expect([first.valid, first.code, first.charged, first.key?.id, first.headers["x-credits-remaining"]]).toEqual([true, "OK", true, keyId, String(BALANCE - 12)]);
    const retry = await kg.admin.verifyKey({ secret, cost: 12n, idempotencyKey: "verify-1" });
    expect([retry.valid, retry.charged, retry.headers["x-credits-remaining"]]).toEqual([true, true, String(BALANCE - 12)]);
    const short = await kg.admin.verifyKey({ secret, cost: 12n, idempotencyKey: "verify-2" });
    expect([short.valid, short.code, short.charged, short.message]).toEqual([false, "INSUFFICIENT_CREDITS", false, "This request costs 12 credits and the account has 8 left. Add credits or wait for the monthly renewal."]);
    // Without a cost, VerifyKey charges nothing, as before.
    const plain = await kg.admin.verifyKey({ secret });
    expect([plain.valid, plain.charged, plain.headers]).toEqual([true, false, {}]);
    await kg.admin.revokeKey({ id: keyId, reason: "done" });
    const revoked = await kg.admin.verifyKey({ secret, cost: 1n, idempotencyKey: "verify-3" });
    expect([revoked.valid, revoked.code, revoked.charged]).toEqual([false, "KEY_REVOKED", false]);
    expect(await balance(kg, ownerId)).toBe(BigInt(BALANCE - 12));
    expect((await refusal(kg.admin.verifyKey({ secret, cost: 1n }))).code).toBe(Code.InvalidArgument);
  });

  it("an AddCredits whose answer could not be read has added once: a retry with its idempotency key adds nothing and answers replayed", async () => {
    const ownerId = `topup-unanswered-${++seq}`;
    await kg.admin.upsertAccount({ ownerId, plan: "paid" });
    const failed = await withAccountReadsFailing(kg, () => refusal(kg.admin.addCredits({ ownerId, amount: 100n, reason: "order 1", idempotencyKey: "pay-1" })));
    expect(failed).toEqual({ code: Code.Unavailable, message: "the key store is unavailable; retry shortly" });
    // The caller saw an error and retries, as it should: the top-up is already saved.
    const retry = await kg.admin.addCredits({ ownerId, amount: 100n, reason: "order 1", idempotencyKey: "pay-1" });
    expect([retry.replayed, retry.account?.topupCredits, retry.account?.creditBalance]).toEqual([true, 100n, BigInt(BALANCE + 100)]);
    expect(await balance(kg, ownerId)).toBe(BigInt(BALANCE + 100));
    const audited = (await kg.admin.listAuditEvents({ ownerId })).events.filter((e) => e.action === "credits.add");
    expect(audited.map((e) => e.changes["idempotency_key"])).toEqual(['"pay-1"']);
  });

  it("an AddCredits whose first account read fails once still answers the account, added once", async () => {
    const ownerId = `topup-read-retried-${++seq}`;
    await kg.admin.upsertAccount({ ownerId, plan: "paid" });
    const spy = vi.spyOn(kg.app.store, "countActiveKeys").mockRejectedValueOnce(new StoreUnavailableError("injected: one read refused"));
    const added = await kg.admin.addCredits({ ownerId, amount: 5n, reason: "order 2", idempotencyKey: "pay-2" }).finally(() => spy.mockRestore());
    expect([added.replayed, added.account?.topupCredits]).toEqual([false, 5n]);
    expect(await balance(kg, ownerId)).toBe(BigInt(BALANCE + 5));
  });

  it(`50 concurrent ChargeUsage and Checks against a balance of ${BALANCE} leave exactly ${BALANCE} charged`, async () => {
    const { ownerId, secret } = await account("paid");
    const outcomes = await Promise.all(
      Array.from({ length: 50 }, async (_, i) => {
        if (i % 2 === 0) return (await kg.admin.chargeUsage({ ownerId, cost: 1n, idempotencyKey: `c-${i}` })).charged === true;
        return (await kg.check(checkInit({ "x-api-key": secret }, "/v1/x"))).status?.code === 0;
      }),
    );
    expect(outcomes.filter(Boolean).length).toBe(BALANCE);
    expect(await balance(kg, ownerId)).toBe(0n);
  });
});

describe.runIf(redisReady)("ChargeUsage (two replicas sharing Redis)", () => {
  let redis: RedisServer;
  let dataDir: string;
  const replicas: TestKeygate[] = [];

  beforeAll(async () => {
    const started = await startRedis();
    if (started === null) throw new Error("redis-server is not on PATH");
    redis = started;
    dataDir = mkdtempSync(join(tmpdir(), "keygate-charge-"));
    const clock = new TestClock();
    clock.freeze("2026-12-03T12:00:00.000Z");
    // One after the other: the first start writes the pepper the other reads.
    for (let i = 0; i < 2; i++) replicas.push(await startKeygate({ dataDir, policy: POLICY, clock, env: { KEYGATE_REDIS_URL: redis.url } }));
  });
  afterAll(async () => {
    await Promise.allSettled(replicas.map((kg) => kg.stop()));
    await redis?.stop();
    rmSync(dataDir, { recursive: true, force: true });
  });

  it(`50 concurrent ChargeUsage and Checks spread over both against a balance of ${BALANCE} leave exactly ${BALANCE} charged`, async () => {
    const [a, b] = replicas as [TestKeygate, TestKeygate];
    const ownerId = "charge-two-replicas";
    await a.admin.upsertAccount({ ownerId, plan: "paid" });
    const { secret } = await a.admin.createKey({ ownerId, name: "charge" });
    const outcomes = await Promise.all(
      Array.from({ length: 50 }, async (_, i) => {
        const kg = i % 4 < 2 ? a : b;
        if (i % 2 === 0) return (await kg.admin.chargeUsage({ ownerId, cost: 1n, idempotencyKey: `c-${i}` })).charged === true;
        return (await kg.check(checkInit({ "x-api-key": secret }, "/v1/x"))).status?.code === 0;
      }),
    );
    expect(outcomes.filter(Boolean).length).toBe(BALANCE);
    expect(await balance(a, ownerId)).toBe(0n);
    expect(await balance(b, ownerId)).toBe(0n);
  });

  it("a retry on the other replica with the same idempotency key charges nothing", async () => {
    const [a, b] = replicas as [TestKeygate, TestKeygate];
    const ownerId = "charge-retry-elsewhere";
    await a.admin.upsertAccount({ ownerId, plan: "paid" });
    const first = await a.admin.chargeUsage({ ownerId, cost: 5n, idempotencyKey: "invoice-77" });
    const retry = await b.admin.chargeUsage({ ownerId, cost: 5n, idempotencyKey: "invoice-77" });
    expect([first.charged, first.replayed, retry.charged, retry.replayed]).toEqual([true, false, true, true]);
    expect(retry.headers).toEqual(first.headers);
    expect(await balance(b, ownerId)).toBe(BigInt(BALANCE - 5));
  });

  it("an AddCredits retried on the other replica with the same idempotency key adds once; a ChargeUsage key of the same text is another key", async () => {
    const [a, b] = replicas as [TestKeygate, TestKeygate];
    const ownerId = "topup-retry-elsewhere";
    await a.admin.upsertAccount({ ownerId, plan: "paid" });
    const first = await a.admin.addCredits({ ownerId, amount: 7n, reason: "order 9", idempotencyKey: "pay-9" });
    const retry = await b.admin.addCredits({ ownerId, amount: 7n, reason: "order 9", idempotencyKey: "pay-9" });
    expect([first.replayed, retry.replayed]).toEqual([false, true]);
    expect(retry.account).toEqual(first.account);
    expect(await balance(b, ownerId)).toBe(BigInt(BALANCE + 7));
    expect((await b.admin.chargeUsage({ ownerId, cost: 1n, idempotencyKey: "pay-9" })).replayed).toBe(false);
    expect(await balance(a, ownerId)).toBe(BigInt(BALANCE + 6));
  });

  it("an AddCredits whose answer could not be read on one replica, retried on the other, adds once", async () => {
    const [a, b] = replicas as [TestKeygate, TestKeygate];
    const ownerId = "topup-unanswered-elsewhere";
    await a.admin.upsertAccount({ ownerId, plan: "paid" });
    const failed = await withAccountReadsFailing(a, () => refusal(a.admin.addCredits({ ownerId, amount: 40n, reason: "order 10", idempotencyKey: "pay-10" })));
    expect(failed.code).toBe(Code.Unavailable);
    const retry = await b.admin.addCredits({ ownerId, amount: 40n, reason: "order 10", idempotencyKey: "pay-10" });
    expect([retry.replayed, retry.account?.topupCredits]).toEqual([true, 40n]);
    expect(await balance(a, ownerId)).toBe(BigInt(BALANCE + 40));
    expect(await balance(b, ownerId)).toBe(BigInt(BALANCE + 40));
  });
});
