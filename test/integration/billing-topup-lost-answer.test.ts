import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Code } from "@connectrpc/connect";
import mongoose from "mongoose";
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from "vitest";
import { StoreUnavailableError } from "../../src/store/errors.js";
import type { KeyedTopUp } from "../../src/store/store.js";
import { TestClock } from "../harness/clock.js";
import { adminRefusal, checkInit, checkOutcome, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { LIMITS_POLICY } from "../harness/limits-policy.js";
import { mongoWireAvailable, startMongoWire } from "../harness/mongo-wire.js";
import type { MongoWire } from "../harness/mongo-wire.js";
import { requireServer } from "../harness/ports.js";
import { redisAvailable, startRedis } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";

/**
 * AddCredits' idempotency key exists for the caller's retry after an answer it did not get. When
 * the store made the top-up but its answer was lost (MongoDB: the update reached the server, then
 * the connection dropped), the call answers UNAVAILABLE and the ledger forgets the key, as it
 * forgets every call that throws. The store recorded the key with the credits, so the caller's
 * retry, on any replica, adds nothing, and tells the live balance in Redis about the top-up the
 * failed call never told it of.
 */

const redisReady = requireServer("redis-server", redisAvailable(), "apt-get install redis-server");
const mongoReady = requireServer("MongoDB-wire server", mongoWireAvailable(), "run .ci/install-mongo-wire.sh");
const MONGO_PEPPER = "topup-lost-pepper-0123456789abcdefghijkl";
const TOP_UP = { ownerId: "payer-lost", amount: 100n, reason: "order 9", idempotencyKey: "order-9" } as const;

/**
 * Two replicas on one store and one Redis: `lose` makes replica A's next top-up write lose its
 * answer after it is made; it is given A and the MongoDB connections A opened (none on SQLite).
 */
function lostAnswerSuite(storeEnv: () => Record<string, string>, lose: (a: TestKeygate, connections: readonly mongoose.Connection[]) => void): void {
  let redis: RedisServer | null = null;
  let dataDir: string;
  const replicas: TestKeygate[] = [];
  let connectionsOfA: mongoose.Connection[] = [];

  beforeAll(async () => {
    redis = await startRedis();
    if (redis === null) throw new Error("redis-server is not on PATH");
    dataDir = mkdtempSync(join(tmpdir(), "kg-billing-lost-"));
    const clock = new TestClock();
    clock.freeze("2026-11-22T12:00:00.000Z");
    // One after the other: the first start writes the pepper the other reads.
    for (let i = 0; i < 2; i++) {
      const before = mongoose.connections.length;
      replicas.push(await startKeygate({ dataDir, policy: LIMITS_POLICY, clock, env: { ...storeEnv(), KEYGATE_REDIS_URL: redis.url } }));
      if (i === 0) connectionsOfA = mongoose.connections.slice(before);
    }
  });
  afterEach(() => {
    vi.restoreAllMocks();
  });
  afterAll(async () => {
    await Promise.allSettled(replicas.map((kg) => kg.stop()));
    rmSync(dataDir, { recursive: true, force: true });
    await redis?.stop();
  });

  it("error: the first call answers UNAVAILABLE; the retry on the other replica adds nothing, answers replayed, and the live balance counts the top-up once", async () => {
    const [a, b] = replicas;
    if (a === undefined || b === undefined) throw new Error("replicas did not start");
    await a.admin.upsertAccount({ ownerId: TOP_UP.ownerId, plan: "metered" });
    const { secret } = await a.admin.createKey({ ownerId: TOP_UP.ownerId, name: "app" });
    // One charged Check loads the live balance into Redis: 3 monthly credits, 1 spent.
    expect(checkOutcome(await a.check(checkInit({ "x-api-key": secret })))).toEqual({ status: 200, code: null });
    expect((await b.admin.getAccount({ ownerId: TOP_UP.ownerId })).account?.creditBalance).toBe(2n);

    lose(a, connectionsOfA);
    expect(await adminRefusal(a.admin.addCredits(TOP_UP))).toEqual({ code: Code.Unavailable, message: "the key store is unavailable; retry shortly" });
    // The payment service retries, as the key is meant for; the load balancer picks replica B.
    const retry = await b.admin.addCredits(TOP_UP);
    expect([retry.replayed, retry.account?.topupCredits, retry.account?.creditBalance]).toEqual([true, 100n, 102n]);
    for (const kg of [a, b]) {
      const { account } = await kg.admin.getAccount({ ownerId: TOP_UP.ownerId });
      expect([account?.topupCredits, account?.creditBalance]).toEqual([100n, 102n]);
    }
    // A's ledger never kept the key (its call failed): a repeat there is answered by the store.
    const again = await a.admin.addCredits(TOP_UP);
    expect([again.replayed, again.account?.topupCredits, again.account?.creditBalance]).toEqual([true, 100n, 102n]);
  });
}

describe.runIf(redisReady)("AddCredits retried after a lost store answer: SQLite, two replicas sharing Redis", () => {
  lostAnswerSuite(
    () => ({}),
    (a) => {
      // The embedded store's write is local; its answer is lost here by failing the call after it.
      const store = a.app.store;
      const addCreditsOnce = store.addCreditsOnce.bind(store);
      vi.spyOn(store, "addCreditsOnce").mockImplementationOnce(async (...args: Parameters<typeof addCreditsOnce>): Promise<KeyedTopUp | null> => {
        await addCreditsOnce(...args);
        throw new StoreUnavailableError("injected: the answer was lost after the write");
      });
    },
  );
});

describe.runIf(redisReady && mongoReady)("AddCredits retried after a lost store answer: MongoDB, two replicas sharing Redis", () => {
  let mongo: MongoWire | undefined;
  beforeAll(async () => {
    mongo = await startMongoWire();
  });
  afterAll(async () => {
    await mongo?.stop();
  });
  lostAnswerSuite(
    () => {
      if (mongo === undefined) throw new Error("the MongoDB-wire server did not start");
      return { KEYGATE_MONGODB_URI: mongo.uri, KEYGATE_PEPPER: MONGO_PEPPER };
    },
    (_a, connections) => {
      const accounts = connections.find((c) => c.models["Account"] !== undefined)?.models["Account"];
      if (accounts === undefined) throw new Error("replica A's Account model was not found");
      // The next update of an account document (the top-up's) is made by the server, and then
      // the connection drops before its answer arrives.
      const collection = accounts.collection;
      const original = collection.findOneAndUpdate.bind(collection);
      vi.spyOn(collection, "findOneAndUpdate").mockImplementationOnce(
        async (filter: mongoose.mongo.Filter<mongoose.mongo.Document>, update: mongoose.mongo.UpdateFilter<mongoose.mongo.Document>, options?: mongoose.mongo.FindOneAndUpdateOptions) => {
          await original(filter, update, options ?? {});
          throw new mongoose.mongo.MongoNetworkError("connection 7 to 127.0.0.1:27017 closed");
        },
      );
    },
  );
});
