import mongoose from "mongoose";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { MongoKeyStore } from "../../src/store/mongo.js";
import { mongoWireAvailable, startMongoWire } from "../harness/mongo-wire.js";
import type { MongoWire } from "../harness/mongo-wire.js";
import { requireServer } from "../harness/ports.js";

// README "Production: MongoDB and Redis": the unique index on the key hash, the index by owner
// and state and the one by project are "all created at start". They were created only by schema
// step 1, so a database at the current version that had lost one (dropped by hand, restored with
// mongorestore --noIndexRestore) started without it, silently: no unique hash, and every cold
// Check's $lookup by hash a scan of the keys collection.

const mongoReady = requireServer("MongoDB-wire server", mongoWireAvailable(), "run .ci/install-mongo-wire.sh");

/** Every index keygate declares, by collection: name, fields in order, uniqueness. */
const DECLARED = {
  keys: [
    ["hash_unique", [["hash", 1]], true],
    ["owner_state", [["owner_id", 1], ["revoked_at", 1], ["_id", 1]], false],
    ["project", [["project_id", 1]], false],
  ],
  usage: [["owner_day", [["owner_id", 1], ["day", 1]], false]],
  audit: [
    ["owner", [["owner_id", 1], ["_id", 1]], false],
    ["key", [["key_id", 1], ["_id", 1]], false],
  ],
} as const;

describe.runIf(mongoReady)("MongoKeyStore.connect creates missing indexes on every start", { timeout: 60_000 }, () => {
  let mongo: MongoWire | undefined;
  let client: mongoose.mongo.MongoClient;
  let database = 0;
  beforeAll(async () => {
    mongo = await startMongoWire();
    client = new mongoose.mongo.MongoClient(mongo.uri, { serverSelectionTimeoutMS: 3000 });
    await client.connect();
  }, 120_000);
  afterAll(async () => {
    await client?.close();
    await mongo?.stop();
  });

  /** A fresh database on the test server, at the current schema version: its URI and its driver handle. */
  async function migratedDatabase(): Promise<{ uri: string; db: mongoose.mongo.Db }> {
    if (mongo === undefined) throw new Error("the MongoDB-wire server did not start");
    const name = `indexes_${++database}`;
    const uri = mongo.uri.replace(/\/([^/?]+)(\?|$)/, `/${name}$2`);
    await (await MongoKeyStore.connect(uri)).close();
    return { uri, db: client.db(name) };
  }

  async function indexes(db: mongoose.mongo.Db, collection: string): Promise<Array<[string | undefined, Array<[string, unknown]>, boolean]>> {
    return (await db.collection(collection).indexes()).map((index) => [index.name, Object.entries(index.key), index.unique === true]);
  }

  /** What connect answered: "started", or its error's message. */
  async function start(uri: string): Promise<string> {
    return MongoKeyStore.connect(uri).then(
      async (store) => {
        await store.close();
        return "started";
      },
      (e: unknown) => (e instanceof Error ? e.message : String(e)),
    );
  }

  describe("happy", () => {
    it("a database at the current version without its unique hash index gets it back at start", async () => {
      const { uri, db } = await migratedDatabase();
      await db.collection("keys").dropIndex("hash_unique");
      expect(await indexes(db, "keys")).not.toContainEqual(DECLARED.keys[0]);
      expect(await start(uri)).toBe("started");
      expect(await indexes(db, "keys")).toContainEqual(DECLARED.keys[0]);
    });

    it("a database restored without any of keygate's indexes gets every one back at start", async () => {
      const { uri, db } = await migratedDatabase();
      for (const collection of Object.keys(DECLARED)) await db.collection(collection).dropIndexes();
      expect(await start(uri)).toBe("started");
      for (const [collection, declared] of Object.entries(DECLARED)) {
        const present = await indexes(db, collection);
        for (const index of declared) expect(present).toContainEqual(index);
      }
    });

    it("a start on a database with every index leaves them as they were", async () => {
      const { uri, db } = await migratedDatabase();
      const before = await indexes(db, "keys");
      expect(await start(uri)).toBe("started");
      expect(await indexes(db, "keys")).toEqual(before);
    });
  });

  describe("error", () => {
    it("an index named hash_unique that is not unique fails the start, naming it", async () => {
      const { uri, db } = await migratedDatabase();
      await db.collection("keys").dropIndex("hash_unique");
      await db.collection("keys").createIndex({ hash: 1 }, { name: "hash_unique" });
      const answer = await start(uri);
      expect(answer).toMatch(/^MongoDB could not create keygate's unique index keys\.hash_unique on \{"hash":1\}: .+; drop the index in its way and start keygate again$/);
    });
  });
});
