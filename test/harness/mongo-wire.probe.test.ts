import mongoose from "mongoose";
import type { Connection } from "mongoose";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { mongoWireInstallDir, tryStartMongoWire } from "./mongo-wire.js";

// Checks that the harness's MongoDB-wire server gives the semantics keygate's Mongo store relies
// on: unique-index E11000, atomic conditional $inc, and sort+limit paging.

const server = await tryStartMongoWire();
const inCi = process.env["CI"] !== undefined && process.env["CI"] !== "" && process.env["CI"] !== "false";
const missing = `no MongoDB-wire server: nothing installed in ${mongoWireInstallDir()} and KEYGATE_TEST_MONGODB_URI is unset; run .ci/install-mongo-wire.sh`;

if (server === null) {
  if (inCi) {
    describe("mongo-wire harness", () => {
      it("has a MongoDB-wire server", () => {
        expect.fail(`CI must run the MongoDB suites, but there is ${missing}`);
      });
    });
  } else {
    console.warn(`\n!!! SKIPPING mongo-wire harness probe: ${missing}\n`);
    describe("mongo-wire harness", () => {
      it.skip(`needs a MongoDB-wire server (${missing})`, () => undefined);
    });
  }
} else {
  const accountSchema = new mongoose.Schema(
    { _id: { type: String, required: true }, plan: { type: String, required: true }, active_key_count: { type: Number, default: 0 } },
    { versionKey: false },
  );
  const keySchema = new mongoose.Schema(
    {
      _id: { type: String, required: true },
      owner_id: { type: String, required: true },
      hash: { type: String, required: true },
      revoked_at: { type: Date, default: null },
    },
    { versionKey: false, autoIndex: false },
  );
  keySchema.index({ hash: 1 }, { unique: true, name: "hash_unique" });
  keySchema.index({ owner_id: 1, revoked_at: 1, _id: 1 }, { name: "owner_state" });

  const accountModel = (c: Connection) => c.model("Account", accountSchema, "accounts");
  const keyModel = (c: Connection) => c.model("Key", keySchema, "keys");

  describe("mongo-wire harness", () => {
    let conn: Connection;
    let Account: ReturnType<typeof accountModel>;
    let Key: ReturnType<typeof keyModel>;

    beforeAll(async () => {
      conn = await mongoose.createConnection(server.uri, { serverSelectionTimeoutMS: 10_000 }).asPromise();
      Account = accountModel(conn);
      Key = keyModel(conn);
      // A model creates its collection in the background (mongoose's autoCreate). Until that
      // is done, the index test below can race it: on a busy machine the collection was created
      // after the indexes, and the server then enforced neither.
      await Promise.all([Account.init(), Key.init()]);
    });

    afterAll(async () => {
      try {
        await conn?.dropDatabase();
        await conn?.close();
      } finally {
        await server.stop();
      }
    });

    it(`answers a ping (${server.kind})`, async () => {
      const db = conn.db;
      if (db === undefined) throw new Error("connection has no db");
      expect(await db.admin().command({ ping: 1 })).toMatchObject({ ok: 1 });
    });

    it("creates the unique and compound indexes and rejects a duplicate with E11000", async () => {
      await Key.createIndexes();
      const names = (await Key.collection.indexes()).map((index) => index.name);
      expect(names).toEqual(expect.arrayContaining(["hash_unique", "owner_state"]));
      await Key.create({ _id: "k1", owner_id: "o1", hash: "h1" });
      const duplicate = await Key.create({ _id: "k2", owner_id: "o1", hash: "h1" }).then(
        () => null,
        (error: unknown) => error,
      );
      expect(duplicate).toBeInstanceOf(mongoose.mongo.MongoServerError);
      expect(duplicate).toMatchObject({ code: 11000 });
      expect(await Key.countDocuments({ hash: "h1" })).toBe(1);
    });

    it("admits exactly one of 50 concurrent conditional $inc updates under a cap of 1", async () => {
      await Account.create({ _id: "capped", plan: "free" });
      const cap = 1;
      const results = await Promise.all(
        Array.from({ length: 50 }, () => Account.updateOne({ _id: "capped", active_key_count: { $lt: cap } }, { $inc: { active_key_count: 1 } })),
      );
      expect(results.filter((r) => r.modifiedCount === 1)).toHaveLength(1);
      expect((await Account.findById("capped").lean())?.active_key_count).toBe(1);
    });

    it("findOneAndUpdate with upsert returns the new document", async () => {
      const created = await Account.findOneAndUpdate({ _id: "fresh" }, { $set: { plan: "pro" }, $setOnInsert: { active_key_count: 0 } }, { upsert: true, returnDocument: "after" }).lean();
      expect(created).toMatchObject({ _id: "fresh", plan: "pro", active_key_count: 0 });
      const bumped = await Account.findOneAndUpdate({ _id: "fresh" }, { $inc: { active_key_count: 2 } }, { returnDocument: "after" }).lean();
      expect(bumped?.active_key_count).toBe(2);
    });

    it("pages with sort + limit, counts and deletes", async () => {
      const ids = Array.from({ length: 25 }, (_, i) => `p${String(i).padStart(2, "0")}`);
      // Inserted out of order, so the pages prove the sort.
      await Key.insertMany([...ids].reverse().map((id) => ({ _id: id, owner_id: "pager", hash: `hash-${id}` })));
      const seen: string[] = [];
      const sizes: number[] = [];
      let after: string | undefined;
      for (;;) {
        const filter = after === undefined ? { owner_id: "pager", revoked_at: null } : { owner_id: "pager", revoked_at: null, _id: { $gt: after } };
        const page = await Key.find(filter).sort({ _id: 1 }).limit(10).lean();
        if (page.length === 0) break;
        sizes.push(page.length);
        seen.push(...page.map((doc) => doc._id));
        after = page[page.length - 1]?._id;
      }
      expect(sizes).toEqual([10, 10, 5]);
      expect(seen).toEqual(ids);
      expect(await Key.countDocuments({ owner_id: "pager" })).toBe(25);
      expect((await Key.deleteMany({ owner_id: "pager" })).deletedCount).toBe(25);
      expect(await Key.countDocuments({ owner_id: "pager" })).toBe(0);
    });
  });
}
