import mongoose from "mongoose";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { CapExceededError } from "../../src/store/errors.js";
import { MongoKeyStore, keyDocument } from "../../src/store/mongo.js";
import type { AccountDoc, KeyDoc } from "../../src/store/mongo.js";
import { testKeyRecord } from "../harness/records.js";
import { mongoWireAvailable, startMongoWire } from "../harness/mongo-wire.js";
import type { MongoWire } from "../harness/mongo-wire.js";
import { requireServer } from "../harness/ports.js";
import { startTcpRelay } from "../harness/tcp-relay.js";

// Schema step 2 ("test-mode keys hold slots of their own") moves each counted legacy test key's
// slot from active_key_count to active_test_key_count and marks the key (test_slot: true). A
// start that stops between the two writes (MongoDB lost, the pod killed while a large database
// migrates) must leave the next start able to finish the key without moving its slot twice or
// not at all. It used to mark first and move second, and the next start skipped the marked key:
// the live counter kept a slot no live key held, for good, and the test counter missed one.

const mongoReady = requireServer("MongoDB-wire server", mongoWireAvailable(), "run .ci/install-mongo-wire.sh");
const NOW = 1_800_000_000_000;

describe.runIf(mongoReady)("schema step 2 stopped part way, then started again", { timeout: 60_000 }, () => {
  let mongo: MongoWire | undefined;
  beforeAll(async () => {
    mongo = await startMongoWire();
  }, 120_000);
  afterAll(async () => {
    await mongo?.stop();
  });

  /** A database at schema version 1 holding one counted legacy test key; the first start through a relay that drops the command `cut` matches. */
  async function interruptedThenStarted(database: string, cut: (chunk: string) => boolean): Promise<unknown> {
    if (mongo === undefined) throw new Error("no server");
    const direct = mongo.uri.replace(/\/([^/?]+)(\?|$)/, `/$1_${database}$2`);
    // A database at schema version 1 (the release before step 2), made as the contract test makes one.
    await (await MongoKeyStore.connect(direct)).close();
    const client = new mongoose.mongo.MongoClient(direct, { serverSelectionTimeoutMS: 3000 });
    await client.connect();
    const db = client.db();
    const ownerId = "legacy-test-owner";
    const legacy: Partial<KeyDoc> = keyDocument(testKeyRecord(ownerId, NOW, { mode: "test" }), true);
    delete legacy.test_slot;
    await db.collection<{ _id: string; version: number }>("keygate_schema").updateOne({ _id: "schema" }, { $set: { version: 1 } });
    await db.collection("accounts").insertOne({ _id: ownerId as never, plan: "basic", subscription_status: "active", role: "standard", active_key_count: 1, created_at: new Date(1), updated_at: new Date(2) });
    await db.collection("keys").insertOne(legacy as never);

    const relay = await startTcpRelay(Number(new URL(direct).port));
    const viaRelay = new URL(direct);
    viaRelay.port = String(relay.port);
    relay.dropWhen = cut;
    const first = await MongoKeyStore.connect(viaRelay.toString(), { serverSelectionTimeoutMs: 1000 }).then(
      async (s) => {
        await s.close();
        return "started";
      },
      () => "failed",
    );
    await relay.listen();
    const store = await MongoKeyStore.connect(viaRelay.toString());
    try {
      const account = await db.collection<AccountDoc>("accounts").findOne({ _id: ownerId });
      const marked = await db.collection<KeyDoc>("keys").countDocuments({ owner_id: ownerId, test_slot: true });
      const caps = { maxActiveKeysFor: () => 1, accountDefaults: { plan: "basic", subscriptionStatus: "active" as const, role: "standard" as const }, nowMs: NOW };
      const attempt = (mode: "live" | "test") =>
        store.createKey(testKeyRecord(ownerId, NOW, { mode }), caps).then(
          () => "created",
          (e: unknown) => (e instanceof CapExceededError ? "RESOURCE_EXHAUSTED" : String(e)),
        );
      // One counted test key, no live key, caps of 1 each: a live key fits, a second test key does not.
      return { first, counters: [account?.active_key_count, account?.active_test_key_count], marked, live: await attempt("live"), test: await attempt("test") };
    } finally {
      await store.close();
      await relay.close();
      await client.close();
    }
  }

  const expected = { first: "failed", counters: [0, 1], marked: 1, live: "created", test: "RESOURCE_EXHAUSTED" };

  describe("error", () => {
    it("stopped as the slot move was sent (not made): the next start moves it and marks the key", async () => {
      const move = (chunk: string): boolean => chunk.includes("active_test_key_count") && chunk.includes("update");
      expect(await interruptedThenStarted("step2_move_cut", move)).toEqual(expected);
    });

    it("stopped after the slot move, as the key's mark was sent: the next start marks the key and does not move its slot again", async () => {
      const mark = (chunk: string): boolean => chunk.includes("update") && chunk.includes("test_slot") && !chunk.includes("active_test_key_count");
      expect(await interruptedThenStarted("step2_mark_cut", mark)).toEqual(expected);
    });
  });
});
