import mongoose from "mongoose";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { StoreUnavailableError } from "../../src/store/errors.js";
import { MongoKeyStore, lookupAnswer } from "../../src/store/mongo.js";
import type { AccountDoc } from "../../src/store/mongo.js";
import { MAX_KEYED_TOPUPS } from "../../src/store/store.js";
import type { CreateLimits } from "../../src/store/store.js";
import { mongoWireAvailable, startMongoWire } from "../harness/mongo-wire.js";
import type { MongoWire } from "../harness/mongo-wire.js";
import { until } from "../harness/poll.js";
import { requireServer } from "../harness/ports.js";
import { testKeyRecord } from "../harness/records.js";

// The cold key lookup reads up to 64 keys in one `aggregate` and takes its answer from the
// reply's first batch. MongoDB ends a batch at 16 MiB of documents (BSONObjMaxUserSize) and keeps
// a cursor for the rest; a lookup that read the first batch alone then found hashes missing and
// failed all 64 Checks, of every owner in the batch, and left the cursor open on the server. An
// account's keyed top-ups live in its document (credit_topups: up to MAX_KEYED_TOPUPS records of a
// key of up to 200 characters, README "Top-ups with an idempotency key"), and the lookup joined
// the whole account onto each key: 64 keys of one such account came to 17.5 MB. These cases guard
// that the joined account leaves those arrays out, and that a reply which does leave a cursor
// open fails cleanly and kills it. The MongoDB-wire test server never splits a reply, so the
// first case replays the command keygate sent and measures the batch against MongoDB's limit.

const NOW = 1_800_000_000_000;
const LIMITS: CreateLimits = {
  maxActiveKeysFor: () => 1000,
  accountDefaults: { plan: "basic", subscriptionStatus: "active", role: "standard" },
  nowMs: NOW,
};
/** MongoDB's most bytes of documents in one reply batch (BSONObjMaxUserSize). */
const MONGODB_BATCH_LIMIT = 16 * 1024 * 1024;

/** How many of `sizes` MongoDB puts in a first batch: it always sends the first document. */
function firstBatchCount(sizes: readonly number[]): number {
  let count = 0;
  let used = 0;
  for (const size of sizes) {
    if (count > 0 && used + size > MONGODB_BATCH_LIMIT) break;
    used += size;
    count += 1;
  }
  return count;
}

const mongoReady = requireServer("MongoDB-wire server", mongoWireAvailable(), "run .ci/install-mongo-wire.sh or set KEYGATE_TEST_MONGODB_URI");

describe.runIf(mongoReady)("the cold lookup on the MongoDB-wire server", () => {
  let server: MongoWire | undefined;
  let store: MongoKeyStore | undefined;
  let raw: mongoose.mongo.MongoClient | undefined;
  const commands: mongoose.mongo.CommandStartedEvent[] = [];
  const started = (): { store: MongoKeyStore; raw: mongoose.mongo.MongoClient } => {
    if (store === undefined || raw === undefined) throw new Error("the MongoDB-wire server or the store did not start");
    return { store, raw };
  };

  beforeAll(async () => {
    server = await startMongoWire();
    store = await MongoKeyStore.connect(server.uri, { onCommandStarted: (event) => commands.push(event) });
    raw = new mongoose.mongo.MongoClient(server.uri, { serverSelectionTimeoutMS: 3000 });
    await raw.connect();
  }, 60_000);
  afterAll(async () => {
    await store?.close();
    await raw?.close();
    await server?.stop();
  });

  describe("MongoDB cold lookup: the reply batch", () => {
    it("64 cold lookups of an account at the keyed top-up bound fit in one MongoDB reply batch, the account read as getAccount reads it", async () => {
      const { store, raw } = started();
      const ownerId = "batch-size-topups-owner";
      const keys = Array.from({ length: 64 }, () => testKeyRecord(ownerId, NOW));
      for (const key of keys) await store.createKey(key, LIMITS);
      // 1,000 keyed top-ups within 24 hours, each key 200 printable ASCII characters: both at
      // the bounds AddCredits documents and accepts.
      for (let i = 0; i < MAX_KEYED_TOPUPS; i++) {
        const idempotencyKey = `order-${String(i).padStart(6, "0")}-`.padEnd(200, "x");
        const made = await store.addCreditsOnce(ownerId, 1, idempotencyKey, NOW + i);
        expect(made?.replayed).toBe(false);
      }
      // And a slot claim (a token this release does not know, which the store keeps and ignores).
      const accounts = raw.db().collection<AccountDoc>("accounts");
      await accounts.updateOne({ _id: ownerId }, { $push: { slot_claims: "batch-size-claim" } });
      const stored = await accounts.findOne({ _id: ownerId });
      expect({ topUps: stored?.credit_topups?.length, claims: stored?.slot_claims }).toEqual({ topUps: MAX_KEYED_TOPUPS, claims: ["batch-size-claim"] });

      commands.length = 0;
      const snapshots = await Promise.all(keys.map((key) => store.findSnapshotByHash(key.hash)));
      expect(snapshots.map((s) => s?.key.id)).toEqual(keys.map((k) => k.id));
      const account = await store.getAccount(ownerId);
      for (const snapshot of snapshots) expect(snapshot?.account).toEqual(account);
      const aggregates = commands.filter((c) => c.commandName === "aggregate");
      expect(aggregates).toHaveLength(1);
      const sent = aggregates[0]?.command;
      if (sent === undefined) throw new Error("no aggregate was sent");
      // One document more than the hashes: MongoDB leaves the cursor open after a batch of exactly
      // batchSize documents (it has not read past the last), which this server does not show.
      expect(sent["cursor"]).toEqual({ batchSize: 65 });

      // The same command, answered by the same server: the batch keygate reads, and where
      // MongoDB would end it.
      const reply = await raw.db(String(sent["$db"])).command({ aggregate: sent["aggregate"], pipeline: sent["pipeline"], cursor: sent["cursor"] });
      const batch = (reply["cursor"] as { firstBatch: Array<{ account?: Record<string, unknown> }> }).firstBatch;
      expect(batch).toHaveLength(64);
      for (const doc of batch) {
        expect(doc.account).toMatchObject({ _id: ownerId, plan: "basic" });
        expect(doc.account).not.toHaveProperty("credit_topups");
        expect(doc.account).not.toHaveProperty("slot_claims");
      }
      const sizes = batch.map((doc) => mongoose.mongo.BSON.calculateObjectSize(doc));
      const total = sizes.reduce((a, b) => a + b, 0);
      expect({ fits: firstBatchCount(sizes), withinLimit: total <= MONGODB_BATCH_LIMIT }).toEqual({ fits: 64, withinLimit: true });
    }, 120_000);

    it("a reply that leaves a cursor open fails the lookup and kills the cursor, leaving none on the server", async () => {
      const { raw } = started();
      // The MongoDB-wire server answers an aggregate in one batch whatever batchSize asks, but a
      // find with batchSize 1 leaves a real cursor open: the reply MongoDB gives past 16 MiB.
      const db = raw.db(`${raw.db().databaseName}_open_cursor`);
      await db.collection<{ hash: string }>("lookup_anchor").insertMany([{ hash: "h1" }, { hash: "h2" }, { hash: "h3" }]);
      const find = { find: "lookup_anchor", projection: { _id: 0 }, batchSize: 1 };
      const cursorOf = (reply: mongoose.mongo.Document): mongoose.mongo.Long => mongoose.mongo.Long.fromValue((reply["cursor"] as { id: number | mongoose.mongo.Long }).id);
      const getMore = (id: mongoose.mongo.Long): Promise<unknown> => db.command({ getMore: id, collection: "lookup_anchor", batchSize: 1 }).then(() => "open", (error: unknown) => error);

      // A cursor left alone stays open: what the lookup must not leave behind.
      const control = cursorOf(await db.command(find));
      expect(control.isZero()).toBe(false);
      expect(await getMore(control)).toBe("open");
      await db.command({ killCursors: "lookup_anchor", cursors: [control] });

      const reply = await db.command(find);
      const id = cursorOf(reply);
      expect(id.isZero()).toBe(false);
      const sent: mongoose.mongo.Document[] = [];
      const run = (command: mongoose.mongo.Document): Promise<mongoose.mongo.Document> => {
        sent.push(command);
        return db.command(command);
      };
      const error = (() => {
        try {
          return lookupAnswer(reply, run);
        } catch (thrown) {
          return thrown;
        }
      })();
      expect(error).toBeInstanceOf(StoreUnavailableError);
      expect(error).toMatchObject({ message: "MongoDB answered the key lookup in more than one batch" });
      expect(sent).toEqual([{ killCursors: "lookup_anchor", cursors: [id] }]);
      await until(async () => (await getMore(id)) instanceof mongoose.mongo.MongoServerError, 5000, "the lookup's cursor is gone from the server");
      expect(await getMore(id)).toMatchObject({ code: 43 });
    });
  });
});
