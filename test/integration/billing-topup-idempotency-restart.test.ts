import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Code } from "@connectrpc/connect";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { TOPUP_KEY_RETENTION_MS } from "../../src/store/store.js";
import { TestClock } from "../harness/clock.js";
import { adminRefusal, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { LIMITS_POLICY } from "../harness/limits-policy.js";
import { mongoWireAvailable, startMongoWire } from "../harness/mongo-wire.js";
import type { MongoWire } from "../harness/mongo-wire.js";
import { requireServer } from "../harness/ports.js";

/**
 * README (KeyAdmin reference, AddCredits): "optional idempotency_key (the order or payment id; a
 * repeat for the owner within 24 hours adds nothing)". Without Redis the idempotency ledger is
 * the process's own, so a payment webhook retried after a restart or a deploy found no key there
 * and added the credits again. The store keeps the key with the credits it added: the retry
 * adds nothing on either store, for 24 hours from the top-up.
 */

const TOP_UP = { ownerId: "payer", amount: 100n, reason: "order 1234", idempotencyKey: "order-1234" } as const;
const MONGO_PEPPER = "topup-restart-pepper-0123456789abcdefghij";

/** The same cases on one store: `env` is what points keygate at it (nothing for the data directory's SQLite). */
function restartSuite(env: () => Record<string, string>): void {
  let dataDir: string;
  const clock = new TestClock();
  const running: TestKeygate[] = [];
  const start = async (): Promise<TestKeygate> => {
    const kg = await startKeygate({ dataDir, policy: LIMITS_POLICY, clock, env: env() });
    running.push(kg);
    return kg;
  };
  const stop = async (kg: TestKeygate): Promise<void> => {
    running.splice(running.indexOf(kg), 1);
    await kg.stop({ keepData: true });
  };

  beforeAll(() => {
    dataDir = mkdtempSync(join(tmpdir(), "kg-billing-topup-"));
    clock.freeze("2026-11-22T12:00:00.000Z");
  });
  // A case that failed part way leaves its keygate running: stopped here, so the next case can open the data directory.
  afterEach(async () => {
    for (const kg of running.splice(0)) await kg.stop({ keepData: true });
  });
  afterAll(() => {
    rmSync(dataDir, { recursive: true, force: true });
  });

  it("happy: a retry after a restart adds nothing and answers replayed; 24 hours after the top-up the key adds again", async () => {
    const first = await start();
    await first.admin.upsertAccount({ ownerId: TOP_UP.ownerId, plan: "metered" });
    const added = await first.admin.addCredits(TOP_UP);
    expect([added.replayed, added.account?.topupCredits, added.account?.creditBalance]).toEqual([false, 100n, 103n]);
    const again = await first.admin.addCredits(TOP_UP);
    expect([again.replayed, again.account?.topupCredits]).toEqual([true, 100n]);
    await stop(first);

    clock.advanceMs(60_000);
    const second = await start();
    const retry = await second.admin.addCredits(TOP_UP);
    expect([retry.replayed, retry.account?.topupCredits, retry.account?.creditBalance]).toEqual([true, 100n, 103n]);
    const audited = (await second.admin.listAuditEvents({ ownerId: TOP_UP.ownerId })).events.filter((e) => e.action === "credits.add");
    expect(audited.map((e) => e.changes["idempotency_key"])).toEqual(['"order-1234"']);
    await stop(second);

    // The top-up was made 60 s before the clock was moved: now it is 24 hours old.
    clock.advanceMs(TOPUP_KEY_RETENTION_MS - 60_000);
    const third = await start();
    const late = await third.admin.addCredits(TOP_UP);
    expect([late.replayed, late.account?.topupCredits]).toEqual([false, 200n]);
    await stop(third);
  });

  it("error: after a restart, the key reused for another amount is refused naming idempotency_key, and nothing is added", async () => {
    const ownerId = "payer-other-amount";
    const first = await start();
    await first.admin.upsertAccount({ ownerId, plan: "metered" });
    await first.admin.addCredits({ ownerId, amount: 100n, reason: "order 77", idempotencyKey: "order-77" });
    await stop(first);

    const second = await start();
    expect(await adminRefusal(second.admin.addCredits({ ownerId, amount: 50n, reason: "order 77", idempotencyKey: "order-77" }))).toEqual({
      code: Code.InvalidArgument,
      message: "idempotency_key: was used for a top-up of 100 credits, and this one is for 50; nothing was added: a different top-up needs a key of its own",
    });
    expect((await second.admin.getAccount({ ownerId })).account?.topupCredits).toBe(100n);
    // The store's replay puts the key in this process's ledger; a repeat for another amount that
    // the ledger answers is refused the same way.
    const repeat = await second.admin.addCredits({ ownerId, amount: 100n, reason: "order 77", idempotencyKey: "order-77" });
    expect([repeat.replayed, repeat.account?.topupCredits]).toEqual([true, 100n]);
    expect((await adminRefusal(second.admin.addCredits({ ownerId, amount: 50n, reason: "order 77", idempotencyKey: "order-77" }))).code).toBe(Code.InvalidArgument);
    expect((await second.admin.getAccount({ ownerId })).account?.topupCredits).toBe(100n);
    await stop(second);
  });
}

describe("AddCredits idempotency key across a restart: SQLite (embedded)", () => {
  restartSuite(() => ({}));
});

const mongoReady = requireServer("MongoDB-wire server", mongoWireAvailable(), "run .ci/install-mongo-wire.sh");

describe.runIf(mongoReady)("AddCredits idempotency key across a restart: MongoDB", () => {
  let mongo: MongoWire | undefined;
  beforeAll(async () => {
    mongo = await startMongoWire();
  });
  afterAll(async () => {
    await mongo?.stop();
  });
  restartSuite(() => {
    if (mongo === undefined) throw new Error("the MongoDB-wire server did not start");
    return { KEYGATE_MONGODB_URI: mongo.uri, KEYGATE_PEPPER: MONGO_PEPPER };
  });
});
