import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Code } from "@connectrpc/connect";
import { Redis } from "ioredis";
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from "vitest";
import { TestClock } from "../harness/clock.js";
import { adminRefusal, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { LIMITS_POLICY } from "../harness/limits-policy.js";
import { until } from "../harness/poll.js";
import { requireServer } from "../harness/ports.js";
import { redisAvailable, startRedis } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";

// ChargeUsage and VerifyKey with a cost keep their answer under (owner, idempotency_key). A call
// that reuses the key for ANOTHER charge (another cost, another key of the owner or none, another
// quota, a test key's free charge then a live key's) must not be answered with the first charge:
// it would read `charged: true` and never be billed (a backend passing its client's request id
// through lets a cheap call's id buy an expensive one, and a test integration's ids make the live
// ones free). It is refused with INVALID_ARGUMENT naming idempotency_key, charging nothing, as
// AddCredits refuses a key reused for another amount; the identical retry still replays. With
// Redis the check holds in both places an answer is kept: the ledger (kg:idem:…) and the charge
// script's kept reply (kg:cu:…, which answers when the ledger's answer was lost). The kept reply
// carries what the ledger compares (mode, the cost and quota as asked, and the key): with only
// what the meter charged, another key's charge (or a test key's of another cost, all charged as
// 0) was answered from it and never billed, and the ledger then kept that call's fingerprint with
// the first charge, refusing the first charge's own retry. A kept answer an earlier release wrote
// (no record of what it charged) replays as it did; one kept without the key (mode:cost:quota as
// charged) replays to a call whose mode, cost and quota match.

const BALANCE = 100;
const POLICY = {
  ...LIMITS_POLICY,
  plans: {
    ...LIMITS_POLICY.plans,
    paid: { maxActiveKeys: 5, rateLimit: { limit: 1000, windowSeconds: 60 }, dailyQuota: null, quotas: { exports: 50 }, monthlyCredits: BALANCE },
  },
};
const DAY = "2026-12-03";

const redisReady = requireServer("redis-server", redisAvailable(), "apt-get install redis-server");

/** The refusal of a key kept for `usedFor`, asked for `thisOne`. */
function reused(usedFor: string, thisOne: string): { code: Code; message: string } {
  return {
    code: Code.InvalidArgument,
    message: `idempotency_key: was used for ${usedFor}, and this one is ${thisOne}; nothing was charged: a different charge needs a key of its own`,
  };
}

async function balance(kg: TestKeygate, ownerId: string): Promise<bigint | undefined> {
  return (await kg.admin.getAccount({ ownerId })).account?.creditBalance;
}

/** A paid account with a live key and a test key. */
async function accountWithKeys(kg: TestKeygate, ownerId: string): Promise<{ live: { id: string; secret: string }; test: { id: string; secret: string } }> {
  await kg.admin.upsertAccount({ ownerId, plan: "paid" });
  const live = await kg.admin.createKey({ ownerId, name: "live" });
  const test = await kg.admin.createKey({ ownerId, name: "sandbox", mode: "test" });
  return { live: { id: live.key?.id ?? "", secret: live.secret }, test: { id: test.key?.id ?? "", secret: test.secret } };
}

describe("an idempotency key reused for another charge (one keygate, SQLite, in-process ledger)", () => {
  let kg: TestKeygate;
  beforeAll(async () => {
    const clock = new TestClock();
    clock.freeze(`${DAY}T12:00:00.000Z`);
    kg = await startKeygate({ policy: POLICY, clock });
  });
  afterAll(async () => {
    await kg?.stop();
  });

  it("error: another cost is refused, charging nothing; the identical retry still replays", async () => {
    const ownerId = "reuse-cost";
    await kg.admin.upsertAccount({ ownerId, plan: "paid" });
    const cheap = await kg.admin.chargeUsage({ ownerId, cost: 1n, idempotencyKey: "req-1" });
    expect([cheap.charged, cheap.replayed]).toEqual([true, false]);
    expect(await adminRefusal(kg.admin.chargeUsage({ ownerId, cost: 90n, idempotencyKey: "req-1" }))).toEqual(
      reused("a charge of 1 credits by the account", "a charge of 90 credits by the account"),
    );
    expect(await balance(kg, ownerId)).toBe(BigInt(BALANCE - 1));
    const retry = await kg.admin.chargeUsage({ ownerId, cost: 1n, idempotencyKey: "req-1" });
    expect([retry.charged, retry.replayed, await balance(kg, ownerId)]).toEqual([true, true, BigInt(BALANCE - 1)]);
  });

  it("error: another key of the owner, the owner itself, or another quota is refused", async () => {
    const ownerId = "reuse-key-quota";
    const { live } = await accountWithKeys(kg, ownerId);
    const other = (await kg.admin.createKey({ ownerId, name: "other" })).key?.id ?? "";
    await kg.admin.chargeUsage({ keyId: live.id, cost: 2n, idempotencyKey: "job-1" });
    expect(await adminRefusal(kg.admin.chargeUsage({ keyId: other, cost: 2n, idempotencyKey: "job-1" }))).toEqual(
      reused(`a charge of 2 credits by key ${live.id}`, `a charge of 2 credits by key ${other}`),
    );
    expect(await adminRefusal(kg.admin.chargeUsage({ ownerId, cost: 2n, idempotencyKey: "job-1" }))).toEqual(
      reused(`a charge of 2 credits by key ${live.id}`, "a charge of 2 credits by the account"),
    );
    expect(await adminRefusal(kg.admin.chargeUsage({ keyId: live.id, cost: 2n, idempotencyKey: "job-1", quota: "exports" }))).toEqual(
      reused(`a charge of 2 credits by key ${live.id}`, `a charge of 2 credits by key ${live.id} against quota "exports"`),
    );
    expect(await balance(kg, ownerId)).toBe(BigInt(BALANCE - 2));
  });

  it("security: a test key's free ChargeUsage does not make a live key's charge with the same key free", async () => {
    const ownerId = "reuse-test-live";
    const { live, test } = await accountWithKeys(kg, ownerId);
    const free = await kg.admin.chargeUsage({ keyId: test.id, cost: 3n, idempotencyKey: "order-1" });
    expect([free.charged, free.replayed, await balance(kg, ownerId)]).toEqual([true, false, BigInt(BALANCE)]);
    expect(await adminRefusal(kg.admin.chargeUsage({ keyId: live.id, cost: 3n, idempotencyKey: "order-1" }))).toEqual(
      reused(`a charge of 3 credits by test key ${test.id}`, `a charge of 3 credits by key ${live.id}`),
    );
    expect(await balance(kg, ownerId)).toBe(BigInt(BALANCE));
    // With a key of its own, the live charge is billed.
    const billed = await kg.admin.chargeUsage({ keyId: live.id, cost: 3n, idempotencyKey: "order-1-live" });
    expect([billed.charged, billed.replayed, await balance(kg, ownerId)]).toEqual([true, false, BigInt(BALANCE - 3)]);
  });

  it("security: VerifyKey with a cost: a test key's charge does not make a live key's charge with the same key free", async () => {
    const ownerId = "reuse-verify";
    const { live, test } = await accountWithKeys(kg, ownerId);
    const sandbox = await kg.admin.verifyKey({ secret: test.secret, cost: 90n, idempotencyKey: "client-req-7" });
    expect([sandbox.valid, sandbox.charged, await balance(kg, ownerId)]).toEqual([true, true, BigInt(BALANCE)]);
    expect(await adminRefusal(kg.admin.verifyKey({ secret: live.secret, cost: 90n, idempotencyKey: "client-req-7" }))).toEqual(
      reused(`a charge of 90 credits by test key ${test.id}`, `a charge of 90 credits by key ${live.id}`),
    );
    expect(await balance(kg, ownerId)).toBe(BigInt(BALANCE));
    const again = await kg.admin.verifyKey({ secret: test.secret, cost: 90n, idempotencyKey: "client-req-7" });
    expect([again.valid, again.charged, await balance(kg, ownerId)]).toEqual([true, true, BigInt(BALANCE)]);
  });
});

describe.runIf(redisReady)("an idempotency key reused for another charge (two replicas sharing Redis and a SQLite data directory)", () => {
  let redis: RedisServer;
  let client: Redis;
  let dataDir: string;
  const replicas: TestKeygate[] = [];
  beforeAll(async () => {
    const started = await startRedis();
    if (started === null) throw new Error("redis-server is not on PATH");
    redis = started;
    client = new Redis(redis.url);
    dataDir = mkdtempSync(join(tmpdir(), "keygate-charge-reuse-"));
    const clock = new TestClock();
    clock.freeze(`${DAY}T12:00:00.000Z`);
    for (let i = 0; i < 2; i++) replicas.push(await startKeygate({ dataDir, policy: POLICY, clock, env: { KEYGATE_REDIS_URL: redis.url } }));
  });
  afterEach(() => vi.restoreAllMocks());
  afterAll(async () => {
    client?.disconnect();
    await Promise.allSettled(replicas.map((kg) => kg.stop()));
    await redis?.stop();
    rmSync(dataDir, { recursive: true, force: true });
  });

  function pair(): [TestKeygate, TestKeygate] {
    const [a, b] = replicas;
    if (a === undefined || b === undefined) throw new Error("the replicas did not start");
    return [a, b];
  }

  /**
   * Makes the ledger's write of an answer (JSON, put in place of the call's claim by a script) fail
   * twice, as a Redis blip right after the charge would: the answer is then only in kg:cu:….
   */
  function loseLedgerAnswer(): void {
    const realEval = Redis.prototype.eval;
    let failures = 0;
    vi.spyOn(Redis.prototype, "eval").mockImplementation(function (this: Redis, ...args: unknown[]) {
      if (typeof args[4] === "string" && args[4].startsWith("{") && failures < 2) {
        failures += 1;
        return Promise.reject(new Error("injected: connection reset")) as never;
      }
      return (realEval as (...a: unknown[]) => unknown).apply(this, args) as never;
    });
  }

  /** Lets the claim the lost answer left run out now instead of after 30 s. */
  async function lapseClaim(ownerId: string, idempotencyKey: string): Promise<void> {
    const claim = `kg:idem:${ownerId} ${idempotencyKey}`;
    expect(await client.get(claim)).toMatch(/^running:/);
    await client.pexpire(claim, 1);
    await until(async () => (await client.exists(claim)) === 0, 5000, "the claim ran out");
  }

  it("security: a live key's charge on one replica is refused after a test key's charge with the same key on the other", async () => {
    const [a, b] = pair();
    const ownerId = "reuse-redis-test-live";
    const { live, test } = await accountWithKeys(a, ownerId);
    expect((await a.admin.chargeUsage({ keyId: test.id, cost: 3n, idempotencyKey: "order-1" })).charged).toBe(true);
    expect(await adminRefusal(b.admin.chargeUsage({ keyId: live.id, cost: 3n, idempotencyKey: "order-1" }))).toEqual(
      reused(`a charge of 3 credits by test key ${test.id}`, `a charge of 3 credits by key ${live.id}`),
    );
    expect(await balance(b, ownerId)).toBe(BigInt(BALANCE));
    const retry = await b.admin.chargeUsage({ keyId: test.id, cost: 3n, idempotencyKey: "order-1" });
    expect([retry.charged, retry.replayed]).toEqual([true, true]);
  });

  it("error: another cost on the other replica is refused, charging nothing", async () => {
    const [a, b] = pair();
    const ownerId = "reuse-redis-cost";
    await a.admin.upsertAccount({ ownerId, plan: "paid" });
    await a.admin.chargeUsage({ ownerId, cost: 1n, idempotencyKey: "req-1" });
    expect(await adminRefusal(b.admin.chargeUsage({ ownerId, cost: 90n, idempotencyKey: "req-1" }))).toEqual(
      reused("a charge of 1 credits by the account", "a charge of 90 credits by the account"),
    );
    expect(await balance(a, ownerId)).toBe(BigInt(BALANCE - 1));
  });

  it("error: with the ledger's answer lost, the charge Redis kept refuses another cost; the identical retry replays it, counted once", async () => {
    const [a, b] = pair();
    const ownerId = "reuse-redis-kept";
    await a.admin.upsertAccount({ ownerId, plan: "paid" });
    loseLedgerAnswer();
    const first = await a.admin.chargeUsage({ ownerId, cost: 5n, idempotencyKey: "job-1" });
    vi.restoreAllMocks();
    expect([first.charged, first.replayed]).toEqual([true, false]);
    await lapseClaim(ownerId, "job-1");
    expect(await adminRefusal(b.admin.chargeUsage({ ownerId, cost: 9n, idempotencyKey: "job-1" }))).toEqual(
      reused("a charge of 5 credits by the account", "a charge of 9 credits by the account"),
    );
    // Let go, not marked failed: a retry after a failure records the kept charge again.
    expect(await client.get(`kg:idem:${ownerId} job-1`)).toBeNull();
    // On the replica that charged, whose usage (its own, not yet flushed) GetUsage reads.
    const retry = await a.admin.chargeUsage({ ownerId, cost: 5n, idempotencyKey: "job-1" });
    expect([retry.charged, retry.replayed]).toEqual([true, true]);
    expect(await balance(a, ownerId)).toBe(BigInt(BALANCE - 5));
    const usage = await a.admin.getUsage({ ownerId, from: DAY, to: DAY });
    expect({ allowed: usage.totals?.allowed, creditsUsed: usage.totals?.creditsUsed }).toEqual({ allowed: 1n, creditsUsed: 5n });
  });

  it("happy: answers an earlier release kept (no record of what was charged) replay as before, in the ledger and in Redis's kept charge", async () => {
    const [a, b] = pair();
    const ownerId = "reuse-redis-legacy";
    await a.admin.upsertAccount({ ownerId, plan: "paid" });
    // The ledger's answer, as an earlier release stored it: without its fingerprint.
    await a.admin.chargeUsage({ ownerId, cost: 2n, idempotencyKey: "job-ledger" });
    const ledgerKey = `kg:idem:${ownerId} job-ledger`;
    const stored = await client.get(ledgerKey);
    const { fingerprint, ...earlier } = JSON.parse(stored ?? "null") as { fingerprint?: unknown };
    expect(fingerprint).toEqual({ cost: 2, keyId: "", quota: "", mode: "live" });
    await client.set(ledgerKey, JSON.stringify(earlier), "KEEPTTL");
    const fromLedger = await b.admin.chargeUsage({ ownerId, cost: 7n, idempotencyKey: "job-ledger" });
    expect([fromLedger.charged, fromLedger.replayed]).toEqual([true, true]);

    // Redis's kept charge, as an earlier release wrote it: ten places, no 11th.
    loseLedgerAnswer();
    await a.admin.chargeUsage({ ownerId, cost: 3n, idempotencyKey: "job-kept" });
    vi.restoreAllMocks();
    await lapseClaim(ownerId, "job-kept");
    const keptKey = `kg:cu:${ownerId} job-kept`;
    const kept = (await client.get(keptKey)) ?? "";
    expect(kept.split(",").slice(10)).toEqual(["live:3::"]);
    await client.set(keptKey, kept.split(",").slice(0, 10).join(","), "KEEPTTL");
    const fromKept = await b.admin.chargeUsage({ ownerId, cost: 8n, idempotencyKey: "job-kept" });
    expect([fromKept.charged, fromKept.replayed]).toEqual([true, true]);
    expect(await balance(a, ownerId)).toBe(BigInt(BALANCE - 5));
  });
  it("security: with the ledger's answer lost, another key's charge is refused, not answered from the kept one and never billed; the first key's retry replays it", async () => {
    const [a, b] = pair();
    const ownerId = "reuse-redis-kept-key";
    await a.admin.upsertAccount({ ownerId, plan: "paid" });
    const first = (await a.admin.createKey({ ownerId, name: "first" })).key?.id ?? "";
    const other = (await a.admin.createKey({ ownerId, name: "other" })).key?.id ?? "";
    loseLedgerAnswer();
    const charged = await a.admin.chargeUsage({ keyId: first, cost: 5n, idempotencyKey: "job-key" });
    vi.restoreAllMocks();
    expect([charged.charged, charged.replayed]).toEqual([true, false]);
    await lapseClaim(ownerId, "job-key");
    expect((await client.get(`kg:cu:${ownerId} job-key`))?.split(",").slice(10)).toEqual([`live:5::${first}`]);
    expect(await adminRefusal(b.admin.chargeUsage({ keyId: other, cost: 5n, idempotencyKey: "job-key" }))).toEqual(
      reused(`a charge of 5 credits by key ${first}`, `a charge of 5 credits by key ${other}`),
    );
    expect(await adminRefusal(b.admin.chargeUsage({ ownerId, cost: 5n, idempotencyKey: "job-key" }))).toEqual(
      reused(`a charge of 5 credits by key ${first}`, "a charge of 5 credits by the account"),
    );
    expect(await client.get(`kg:idem:${ownerId} job-key`)).toBeNull();
    // The first key's retry replays its kept charge, and the ledger keeps that charge's fingerprint
    // with it (were it another call's, this very retry would be refused from then on).
    const retry = await a.admin.chargeUsage({ keyId: first, cost: 5n, idempotencyKey: "job-key" });
    expect([retry.charged, retry.replayed]).toEqual([true, true]);
    const ledgered = JSON.parse((await client.get(`kg:idem:${ownerId} job-key`)) ?? "null") as { fingerprint?: unknown };
    expect(ledgered.fingerprint).toEqual({ cost: 5, keyId: first, quota: "", mode: "live" });
    const again = await b.admin.chargeUsage({ keyId: first, cost: 5n, idempotencyKey: "job-key" });
    expect([again.charged, again.replayed, await balance(a, ownerId)]).toEqual([true, true, BigInt(BALANCE - 5)]);
  });

  it("error: with the ledger's answer lost, a test key's charge of another cost or quota is refused (both charged as 0); its identical retry replays", async () => {
    const [a, b] = pair();
    const ownerId = "reuse-redis-kept-test";
    const { test } = await accountWithKeys(a, ownerId);
    loseLedgerAnswer();
    await a.admin.chargeUsage({ keyId: test.id, cost: 3n, idempotencyKey: "job-test" });
    vi.restoreAllMocks();
    await lapseClaim(ownerId, "job-test");
    expect((await client.get(`kg:cu:${ownerId} job-test`))?.split(",").slice(10)).toEqual([`test:3::${test.id}`]);
    expect(await adminRefusal(b.admin.chargeUsage({ keyId: test.id, cost: 9n, idempotencyKey: "job-test" }))).toEqual(
      reused(`a charge of 3 credits by test key ${test.id}`, `a charge of 9 credits by test key ${test.id}`),
    );
    expect(await adminRefusal(b.admin.chargeUsage({ keyId: test.id, cost: 3n, idempotencyKey: "job-test", quota: "exports" }))).toEqual(
      reused(`a charge of 3 credits by test key ${test.id}`, `a charge of 3 credits by test key ${test.id} against quota "exports"`),
    );
    const retry = await a.admin.chargeUsage({ keyId: test.id, cost: 3n, idempotencyKey: "job-test" });
    expect([retry.charged, retry.replayed, await balance(a, ownerId)]).toEqual([true, true, BigInt(BALANCE)]);
  });
});
