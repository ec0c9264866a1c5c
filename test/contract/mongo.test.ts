import mongoose from "mongoose";
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from "vitest";
import { pepperCheck } from "../../src/keys/pepper-check.js";
import { MONGO_SCHEMA_VERSION, MongoKeyStore, keyDocument } from "../../src/store/mongo.js";
import type { KeyDoc } from "../../src/store/mongo.js";
import { CapExceededError, PartialWriteError, StoreUnavailableError } from "../../src/store/errors.js";
import { TOPUP_KEY_RETENTION_MS, keyState } from "../../src/store/store.js";
import type { CreditDelta, KeyMode, KeyRecord, UsageDelta } from "../../src/store/store.js";
import { testKeyRecord } from "../harness/records.js";
import { mongoWireAvailable, startMongoWire } from "../harness/mongo-wire.js";
import type { MongoWire } from "../harness/mongo-wire.js";
import { requireServer } from "../harness/ports.js";
import { runKeyStoreContract } from "./key-store.contract.js";
import type { AccountDoc } from "../../src/store/mongo.js";

/** An index as listed by the server: its name, its key spec in field order, and uniqueness. */
interface ListedIndex {
  name: string | undefined;
  fields: Array<[string, unknown]>;
  unique: boolean;
}

async function listIndexes(client: mongoose.mongo.MongoClient, collection: string): Promise<ListedIndex[]> {
  const indexes = await client.db().collection(collection).indexes();
  // Field order is part of a compound index, so the spec is compared as an ordered list.
  return indexes.map((index) => ({ name: index.name, fields: Object.entries(index.key), unique: index.unique === true }));
}

/** A time for the records of the cases that need one. */
const NOW = 1_800_000_000_000;

/** The Key model's collection, typed: the one the store inserts keys through (MongoKeyStore#insertKey). */
function keyDocsOf(keys: mongoose.Model<KeyDoc>): mongoose.Collection<KeyDoc> {
  return keys.db.collection<KeyDoc>(keys.collection.collectionName);
}

/** An account document as the first release wrote it: no top-up total. */
type LegacyAccount = Omit<AccountDoc, "topup_total">;

if (requireServer("MongoDB-wire server", mongoWireAvailable(), "run .ci/install-mongo-wire.sh or set KEYGATE_TEST_MONGODB_URI")) {
  let server: MongoWire | undefined;
  const started = (): MongoWire => {
    if (server === undefined) throw new Error("the MongoDB-wire server did not start");
    return server;
  };
  beforeAll(async () => {
    server = await startMongoWire();
  });
  afterAll(async () => {
    await server?.stop();
  });

  /** A plain driver client and a store on the test server, for a case that writes documents itself; both closed after. */
  async function withClientAndStore(run: (client: mongoose.mongo.MongoClient, store: MongoKeyStore) => Promise<void>): Promise<void> {
    const client = new mongoose.mongo.MongoClient(started().uri, { serverSelectionTimeoutMS: 3000 });
    await client.connect();
    const store = await MongoKeyStore.connect(started().uri);
    try {
      await run(client, store);
    } finally {
      await store.close();
      await client.close();
    }
  }

  // Declared first, so it runs first: its connect is the first one on the fresh database.
  describe("MongoKeyStore.connect", () => {
    let client: mongoose.mongo.MongoClient | undefined;
    let store: MongoKeyStore | undefined;
    let collectionsBeforeConnect: string[] = [];

    beforeAll(async () => {
      client = new mongoose.mongo.MongoClient(started().uri, { serverSelectionTimeoutMS: 3000 });
      await client.connect();
      collectionsBeforeConnect = (await client.db().listCollections().toArray()).map((c) => c.name);
      store = await MongoKeyStore.connect(started().uri);
    });
    afterAll(async () => {
      await store?.close();
      await client?.close();
    });

    function connected(): mongoose.mongo.MongoClient {
      if (client === undefined) throw new Error("the MongoDB client did not connect");
      return client;
    }

    it("creates the keys indexes at start: unique hash, owner+state listing, project", async () => {
      expect(collectionsBeforeConnect).not.toContain("keys");
      const indexes = await listIndexes(connected(), "keys");
      expect(indexes).toContainEqual({ name: "hash_unique", fields: [["hash", 1]], unique: true });
      expect(indexes).toContainEqual({ name: "owner_state", fields: [["owner_id", 1], ["revoked_at", 1], ["_id", 1]], unique: false });
      expect(indexes).toContainEqual({ name: "project", fields: [["project_id", 1]], unique: false });
    });

    it("creates the usage and audit indexes at start", async () => {
      expect(collectionsBeforeConnect).not.toContain("usage");
      expect(collectionsBeforeConnect).not.toContain("audit");
      expect(await listIndexes(connected(), "usage")).toContainEqual({ name: "owner_day", fields: [["owner_id", 1], ["day", 1]], unique: false });
      const audit = await listIndexes(connected(), "audit");
      expect(audit).toContainEqual({ name: "owner", fields: [["owner_id", 1], ["_id", 1]], unique: false });
      expect(audit).toContainEqual({ name: "key", fields: [["key_id", 1], ["_id", 1]], unique: false });
    });
  });

  describe("MongoKeyStore on documents from an earlier version", () => {
    it("reads an account without a top-up total as 0 and starts counting it at the next top-up", async () => {
      await withClientAndStore(async (client, store) => {
        // An account document as the first release wrote it: no topup_total field.
        await client
          .db()
          .collection<LegacyAccount>("accounts")
          .insertOne({
            _id: "legacy-mongo",
            plan: "pro",
            subscription_status: "active",
            role: "standard",
            active_key_count: 0,
            created_at: new Date(1),
            updated_at: new Date(2),
            credit_period: "2026-10",
            monthly_used: 4,
            topup_balance: 70,
          });
        expect(await store.getCredits("legacy-mongo")).toEqual({ period: "2026-10", monthlyUsed: 4, topupBalance: 70, topupTotal: 0 });
        expect(await store.addCredits("legacy-mongo", 30)).toEqual({ period: "2026-10", monthlyUsed: 4, topupBalance: 100, topupTotal: 30 });
        expect((await store.getAccount("legacy-mongo"))?.plan).toBe("pro");
      });
    });

    it("tops up an account without a top-up total or keyed top-ups once per key, counting its total from 0", async () => {
      await withClientAndStore(async (client, store) => {
        await client
          .db()
          .collection<LegacyAccount>("accounts")
          .insertOne({ _id: "legacy-keyed", plan: "pro", subscription_status: "active", role: "standard", active_key_count: 0, created_at: new Date(1), updated_at: new Date(2), topup_balance: 70 });
        const topUp = { ownerId: "legacy-keyed", idempotencyKey: "order-1", amount: 30, topupTotal: 30, atMs: NOW };
        const after = { period: "", monthlyUsed: 0, topupBalance: 100, topupTotal: 30 };
        expect(await store.addCreditsOnce("legacy-keyed", 30, "order-1", NOW)).toEqual({ topUp, replayed: false, credits: after });
        expect(await store.addCreditsOnce("legacy-keyed", 30, "order-1", NOW + 1)).toEqual({ topUp, replayed: true, credits: after });
      });
    });
  });

  describe("MongoKeyStore.addCreditsOnce when an answer is lost", () => {
    let store: MongoKeyStore;
    let accounts: mongoose.Model<AccountDoc>;
    let owner = 0;
    beforeAll(async () => {
      store = await MongoKeyStore.connect(started().uri);
      const model = mongoose.connections.at(-1)?.models["Account"];
      if (model === undefined) throw new Error("the store's Account model was not found");
      accounts = model;
    });
    afterEach(() => {
      vi.restoreAllMocks();
    });
    afterAll(async () => {
      await store?.close();
    });

    type TopUpFilter = mongoose.mongo.Filter<mongoose.mongo.Document>;
    type TopUpUpdate = mongoose.mongo.UpdateFilter<mongoose.mongo.Document>;
    type TopUpOptions = mongoose.mongo.FindOneAndUpdateOptions;

    async function newAccount(): Promise<string> {
      const ownerId = `lost-topup-${++owner}`;
      await store.upsertAccount({ ownerId }, { plan: "basic", subscriptionStatus: "active", role: "standard" }, NOW);
      return ownerId;
    }

    /** The next findOneAndUpdate on accounts (the top-up's update) fails as a dropped connection does, after the server made it when `made`. */
    function loseNextUpdateAnswer(made: boolean): void {
      const collection = accounts.collection;
      const original = collection.findOneAndUpdate.bind(collection);
      vi.spyOn(collection, "findOneAndUpdate").mockImplementationOnce(async (filter: TopUpFilter, update: TopUpUpdate, options?: TopUpOptions) => {
        if (made) await original(filter, update, options ?? {});
        throw new mongoose.mongo.MongoNetworkError("connection 5 to 127.0.0.1:27017 closed");
      });
    }

    it("error: the update made but its answer lost: UNAVAILABLE, and the retry adds nothing and gets the top-up back", async () => {
      const ownerId = await newAccount();
      loseNextUpdateAnswer(true);
      await expect(store.addCreditsOnce(ownerId, 100, "order-lost", NOW)).rejects.toBeInstanceOf(StoreUnavailableError);
      expect(await store.getCredits(ownerId)).toEqual({ period: "", monthlyUsed: 0, topupBalance: 100, topupTotal: 100 });
      expect(await store.addCreditsOnce(ownerId, 100, "order-lost", NOW + 1000)).toEqual({
        topUp: { ownerId, idempotencyKey: "order-lost", amount: 100, topupTotal: 100, atMs: NOW },
        replayed: true,
        credits: { period: "", monthlyUsed: 0, topupBalance: 100, topupTotal: 100 },
      });
    });

    it("error: the update lost before it was made: the retry adds, once", async () => {
      const ownerId = await newAccount();
      loseNextUpdateAnswer(false);
      await expect(store.addCreditsOnce(ownerId, 100, "order-unsent", NOW)).rejects.toBeInstanceOf(StoreUnavailableError);
      expect(await store.getCredits(ownerId)).toEqual({ period: "", monthlyUsed: 0, topupBalance: 0, topupTotal: 0 });
      expect(await store.addCreditsOnce(ownerId, 100, "order-unsent", NOW + 1000)).toMatchObject({ replayed: false, credits: { topupBalance: 100, topupTotal: 100 } });
      expect(await store.addCreditsOnce(ownerId, 100, "order-unsent", NOW + 2000)).toMatchObject({ replayed: true, credits: { topupBalance: 100, topupTotal: 100 } });
    });

    it("happy: a top-up without a key between the read and the update makes it read again; both are counted", async () => {
      const ownerId = await newAccount();
      const collection = accounts.collection;
      const original = collection.findOneAndUpdate.bind(collection);
      vi.spyOn(collection, "findOneAndUpdate").mockImplementationOnce(async (filter: TopUpFilter, update: TopUpUpdate, options?: TopUpOptions) => {
        await store.addCredits(ownerId, 5);
        return original(filter, update, options ?? {});
      });
      expect(await store.addCreditsOnce(ownerId, 100, "order-raced", NOW)).toEqual({
        topUp: { ownerId, idempotencyKey: "order-raced", amount: 100, topupTotal: 105, atMs: NOW },
        replayed: false,
        credits: { period: "", monthlyUsed: 0, topupBalance: 105, topupTotal: 105 },
      });
    });

    it("happy: the account document keeps only the keyed top-ups of the last 24 hours; the next keyed top-up drops those older", async () => {
      const ownerId = await newAccount();
      for (let i = 0; i < 3; i++) await store.addCreditsOnce(ownerId, 1, `old-${i}`, NOW + i);
      await store.addCreditsOnce(ownerId, 1, "new", NOW + TOPUP_KEY_RETENTION_MS + 1);
      const doc = await accounts.findById(ownerId, { credit_topups: 1 }).lean<AccountDoc>();
      // old-0 and old-1 are 24 hours old or more; old-2, a millisecond younger, is kept.
      expect(doc?.credit_topups?.map((t) => [t.idempotency_key, t.amount, t.topup_total, t.at.getTime()])).toEqual([
        ["old-2", 1, 3, NOW + 2],
        ["new", 1, 4, NOW + TOPUP_KEY_RETENTION_MS + 1],
      ]);
    });
  });

  describe("schema step 2: test keys counted apart", () => {
    it("moves each counted test key of an earlier version from the live counter to the test counter, once", async () => {
      // A database of its own: resetting the schema version must not touch the contract's.
      const uri = started().uri.replace(/\/([^/?]+)(\?|$)/, "/$1_step2$2");
      const client = new mongoose.mongo.MongoClient(uri, { serverSelectionTimeoutMS: 3000 });
      await client.connect();
      const db = client.db();
      const ownerId = "legacy-test-slot";
      const legacyKey = (mode: "live" | "test", counted: boolean) => {
        const doc: Partial<KeyDoc> = keyDocument(testKeyRecord(ownerId, 1_800_000_000_000, { mode }), counted);
        // Written before test keys were counted apart: no test_slot.
        delete doc.test_slot;
        return doc as KeyDoc;
      };
      const rerunStepTwo = async (): Promise<MongoKeyStore> => {
        await db.collection<{ _id: string; version: number }>("keygate_schema").updateOne({ _id: "schema" }, { $set: { version: 1 } });
        return MongoKeyStore.connect(uri);
      };
      try {
        await db.collection<LegacyAccount>("accounts").insertOne({
          _id: ownerId,
          plan: "basic",
          subscription_status: "active",
          role: "standard",
          active_key_count: 2,
          created_at: new Date(1),
          updated_at: new Date(2),
        });
        await db.collection<KeyDoc>("keys").insertMany([legacyKey("live", true), legacyKey("test", true), legacyKey("test", false)]);
        for (let run = 0; run < 2; run++) await (await rerunStepTwo()).close();
        const account = await db.collection<AccountDoc>("accounts").findOne({ _id: ownerId });
        expect([account?.active_key_count, account?.active_test_key_count]).toEqual([1, 1]);
        expect(await db.collection<KeyDoc>("keys").countDocuments({ owner_id: ownerId, mode: "test", test_slot: true })).toBe(2);
        const store = await MongoKeyStore.connect(uri);
        try {
          const caps = { maxActiveKeysFor: (_plan: string, mode: string) => (mode === "test" ? 2 : 1), accountDefaults: { plan: "basic", subscriptionStatus: "active" as const, role: "standard" as const }, nowMs: 1_800_000_000_000 };
          await expect(store.createKey(testKeyRecord(ownerId, 1_800_000_000_000), caps)).rejects.toBeInstanceOf(CapExceededError);
          await store.createKey(testKeyRecord(ownerId, 1_800_000_000_000, { mode: "test" }), caps);
          await expect(store.createKey(testKeyRecord(ownerId, 1_800_000_000_000, { mode: "test" }), caps)).rejects.toBeInstanceOf(CapExceededError);
        } finally {
          await store.close();
        }
      } finally {
        await client.close();
      }
    });
  });

  describe("MongoKeyStore.pendingAt (keygate migrate --dry-run)", () => {
    it("on an empty database lists every step and creates no collection", async () => {
      const uri = started().uri.replace(/\/([^/?]+)(\?|$)/, "/$1_dry_run$2");
      const client = new mongoose.mongo.MongoClient(uri, { serverSelectionTimeoutMS: 3000 });
      await client.connect();
      try {
        const pending = await MongoKeyStore.pendingAt(uri);
        expect(pending.map((step) => step.version)).toEqual(Array.from({ length: MONGO_SCHEMA_VERSION }, (_, i) => i + 1));
        expect((await client.db().listCollections().toArray()).map((c) => c.name)).toEqual([]);
      } finally {
        await client.close();
      }
    });
  });

  describe("MongoKeyStore's pepper check and key prefix, kept in the keygate_schema document", () => {
    it("is added beside the schema version, which stays as it was: a version-only reader (the release before) sees the same document", async () => {
      // A database of its own: the contract's claims its check once.
      const uri = started().uri.replace(/\/([^/?]+)(\?|$)/, "/$1_pepper$2");
      const client = new mongoose.mongo.MongoClient(uri, { serverSelectionTimeoutMS: 3000 });
      await client.connect();
      const schema = client.db().collection<{ _id: string; version: number; pepper_check?: string }>("keygate_schema");
      const store = await MongoKeyStore.connect(uri);
      try {
        expect(await schema.findOne({ _id: "schema" })).toEqual({ _id: "schema", version: MONGO_SCHEMA_VERSION });
        const check = pepperCheck("mongo-pepper-of-at-least-32-characters-0123");
        expect(await store.claimPepperCheck(check)).toBe(check);
        expect(await schema.find().toArray()).toEqual([{ _id: "schema", version: MONGO_SCHEMA_VERSION, pepper_check: check }]);
        expect(await MongoKeyStore.pendingAt(uri)).toEqual([]);
      } finally {
        await store.close();
        await client.close();
      }
    });

    it("keeps the key prefix beside the check, the version as it was: a version-only reader sees nothing pending", async () => {
      const uri = started().uri.replace(/\/([^/?]+)(\?|$)/, "/$1_key_prefix$2");
      const client = new mongoose.mongo.MongoClient(uri, { serverSelectionTimeoutMS: 3000 });
      await client.connect();
      const schema = client.db().collection<{ _id: string; version: number; pepper_check?: string; key_prefix?: string }>("keygate_schema");
      const store = await MongoKeyStore.connect(uri);
      try {
        const check = pepperCheck("mongo-pepper-of-at-least-32-characters-0123");
        expect(await store.claimPepperCheck(check)).toBe(check);
        expect(await store.claimKeyPrefix("acme")).toBe("acme");
        expect(await schema.find().toArray()).toEqual([{ _id: "schema", version: MONGO_SCHEMA_VERSION, pepper_check: check, key_prefix: "acme" }]);
        expect(await MongoKeyStore.pendingAt(uri)).toEqual([]);
      } finally {
        await store.close();
        await client.close();
      }
    });

    it("of six replicas starting at once with three peppers, every one reads back the same check", async () => {
      const uri = started().uri.replace(/\/([^/?]+)(\?|$)/, "/$1_pepper_race$2");
      const stores = await Promise.all(Array.from({ length: 6 }, () => MongoKeyStore.connect(uri)));
      try {
        const checks = ["one", "two", "three"].map((name) => pepperCheck(`pepper-${name}-of-at-least-32-characters-0123`));
        const recorded = await Promise.all(stores.map((store, i) => store.claimPepperCheck(checks[i % 3] ?? "")));
        expect(new Set(recorded).size).toBe(1);
        expect(checks).toContain(recorded[0]);
      } finally {
        await Promise.all(stores.map((store) => store.close()));
      }
    });
  });

  describe("MongoKeyStore.applyUsage when a call fails part way", () => {
    const row = (keyId: string): UsageDelta => ({ ownerId: "partial-usage", keyId, day: "2026-12-06", outcome: "ALLOWED", count: 2, credits: 0 });

    it("names the rows the server refused as unapplied, and writes the others once", async () => {
      await withClientAndStore(async (client, store) => {
        // A row whose count is not a number: the server refuses to add to it.
        await client
          .db()
          .collection<{ _id: string; owner_id: string; key_id: string; day: string; outcome: string; count: string; credits: number }>("usage")
          .insertOne({ _id: "partial-usage|2026-12-06|key_bad|ALLOWED", owner_id: "partial-usage", key_id: "key_bad", day: "2026-12-06", outcome: "ALLOWED", count: "x", credits: 0 });
        const credit: CreditDelta = { ownerId: "partial-usage", period: "2026-12", monthlyUsed: 1, topupUsed: 0 };
        const error = await store.applyUsage([row("key_a"), row("key_bad"), row("key_b")], [credit]).then(() => null, (e: unknown) => e);
        if (!(error instanceof PartialWriteError)) throw new Error(`expected a PartialWriteError, got ${String(error)}`);
        const partial = error;
        expect(partial.unapplied).toEqual({ usage: [row("key_bad")], credits: [credit] });
        expect(partial.unsure).toBe(0);
        const counts = Object.fromEntries((await store.listUsage("partial-usage", "2026-12-06", "2026-12-06")).map((r) => [r.keyId, r.count]));
        expect(counts).toEqual({ key_a: 2, key_b: 2, key_bad: "x" });
      });
    });

    it("names every delta unapplied when nothing reached the server", async () => {
      const store = await MongoKeyStore.connect(started().uri);
      await store.close();
      const credit: CreditDelta = { ownerId: "partial-usage", period: "2026-12", monthlyUsed: 1, topupUsed: 0 };
      const error = await store.applyUsage([row("key_c")], [credit]).then(() => null, (e: unknown) => e);
      expect(error).toBeInstanceOf(PartialWriteError);
      expect(error).toMatchObject({ unapplied: { usage: [row("key_c")], credits: [credit] }, unsure: 0 });
      const credits = await store.applyUsage([], [credit]).then(() => null, (e: unknown) => e);
      expect(credits).toMatchObject({ unapplied: { usage: [], credits: [credit] }, unsure: 0 });
    });
  });

  describe("MongoKeyStore.rotateKey when the new key cannot be inserted", () => {
    const caps = { maxActiveKeysFor: () => 1, accountDefaults: { plan: "basic", subscriptionStatus: "active" as const, role: "standard" as const }, nowMs: NOW };
    let store: MongoKeyStore;
    let keys: mongoose.Model<KeyDoc>;
    let owner = 0;
    beforeAll(async () => {
      store = await MongoKeyStore.connect(started().uri);
      // The store's own connection, the newest one: its Key model is where the insert is failed.
      const model = mongoose.connections.at(-1)?.models["Key"];
      if (model === undefined) throw new Error("the store's Key model was not found");
      keys = model;
    });
    afterAll(async () => {
      vi.restoreAllMocks();
      await store?.close();
    });

    /** Fails the next insert of a key, after running `meanwhile` (a revoke racing the rotation). */
    function failNextInsert(meanwhile: () => Promise<unknown>): void {
      vi.spyOn(keyDocsOf(keys), "insertOne").mockImplementationOnce(async () => {
        await meanwhile();
        throw new Error("insert failed");
      });
    }

    it.each([
      ["with grace", NOW + 86_400_000],
      ["with no grace", NOW],
    ])("%s: a revoke that came in meanwhile stands, and the slot goes back to the account", async (_name, graceEndsAtMs) => {
      const ownerId = `rotate-undo-${++owner}`;
      const key = testKeyRecord(ownerId, NOW);
      await store.createKey(key, caps);
      failNextInsert(() => store.revokeKey(key.id, NOW + 1, "leaked"));
      await expect(store.rotateKey(key.id, testKeyRecord(ownerId, NOW), graceEndsAtMs, NOW)).rejects.toThrow("insert failed");
      const after = await store.getKey(key.id);
      expect(after).toMatchObject({ revokedAtMs: NOW + 1, revokeReason: "leaked", rotatedToId: null, graceEndsAtMs: null });
      // The revoked key holds no slot: one new key fits under the cap of one, a second does not.
      await store.createKey(testKeyRecord(ownerId, NOW), caps);
      await expect(store.createKey(testKeyRecord(ownerId, NOW), caps)).rejects.toBeInstanceOf(CapExceededError);
    });

    it("with nothing in between, the old key is put back active, holding its slot", async () => {
      const ownerId = `rotate-undo-${++owner}`;
      const key = testKeyRecord(ownerId, NOW);
      await store.createKey(key, caps);
      failNextInsert(async () => undefined);
      await expect(store.rotateKey(key.id, testKeyRecord(ownerId, NOW), NOW, NOW)).rejects.toThrow("insert failed");
      expect(await store.getKey(key.id)).toEqual(key);
      await expect(store.createKey(testKeyRecord(ownerId, NOW), caps)).rejects.toBeInstanceOf(CapExceededError);
    });

    it("with no grace, a failure to mark the old key revoked still returns the rotation: the old key is refused as rotated", async () => {
      const ownerId = `rotate-undo-${++owner}`;
      const key = testKeyRecord(ownerId, NOW);
      await store.createKey(key, caps);
      const next = testKeyRecord(ownerId, NOW);
      vi.spyOn(keys, "updateOne").mockRejectedValueOnce(new Error("connection lost"));
      const rotation = await store.rotateKey(key.id, next, NOW, NOW);
      expect(rotation.next).toEqual(next);
      const old = await store.getKey(key.id);
      expect(old === null ? null : keyState(old, NOW)).toBe("rotated");
      expect(await store.getKey(next.id)).toMatchObject({ id: next.id, revokedAtMs: null });
    });

    it("a revoke between the old key's rotation and its mark with no grace keeps its reason", async () => {
      const ownerId = `rotate-undo-${++owner}`;
      const key = testKeyRecord(ownerId, NOW);
      await store.createKey(key, caps);
      const next = testKeyRecord(ownerId, NOW);
      // The insert goes ahead as the store would make it, once the revoke is in.
      const insert = vi.spyOn(keyDocsOf(keys), "insertOne");
      insert.mockImplementationOnce(async () => {
        await store.revokeKey(key.id, NOW + 1, "leaked");
        insert.mockRestore();
        return keyDocsOf(keys).insertOne(keyDocument(next, true));
      });
      const rotation = await store.rotateKey(key.id, next, NOW, NOW);
      expect(rotation.previous).toMatchObject({ revokedAtMs: NOW + 1, revokeReason: "leaked", rotatedToId: next.id });
      expect(await store.getKey(next.id)).toMatchObject({ id: next.id, revokedAtMs: null });
    });
  });

  describe("MongoKeyStore when the answer to a key insert is lost", () => {
    const caps = { maxActiveKeysFor: () => 1, accountDefaults: { plan: "basic", subscriptionStatus: "active" as const, role: "standard" as const }, nowMs: NOW };
    const logged = { error: vi.fn() };
    let store: MongoKeyStore;
    let keys: mongoose.Model<KeyDoc>;
    let accounts: mongoose.Model<AccountDoc>;
    let owner = 0;
    beforeAll(async () => {
      store = await MongoKeyStore.connect(started().uri, { logger: logged });
      const models = mongoose.connections.at(-1)?.models;
      const key = models?.["Key"];
      const account = models?.["Account"];
      if (key === undefined || account === undefined) throw new Error("the store's models were not found");
      keys = key;
      accounts = account;
    });
    afterEach(() => {
      vi.restoreAllMocks();
      logged.error.mockClear();
    });
    afterAll(async () => {
      await store?.close();
    });

    /**
     * The next key insert fails as a dropped connection does: after the server made it
     * (`made`), or with the insert still on its way, which the returned call then delivers.
     */
    function loseNextInsertAnswer(record: KeyRecord, made: boolean): () => Promise<unknown> {
      const insert = vi.spyOn(keyDocsOf(keys), "insertOne");
      insert.mockImplementationOnce(async () => {
        insert.mockRestore();
        if (made) await keyDocsOf(keys).insertOne(keyDocument(record, true));
        throw new mongoose.mongo.MongoNetworkError("connection 3 to 127.0.0.1:27017 closed");
      });
      return () => keyDocsOf(keys).insertOne(keyDocument(record, true));
    }

    /**
     * The store cannot be asked whether the insert was made: its next upsert of a key (how it
     * asks) fails as a dropped connection does; other key updates (an undo) go through.
     */
    function loseNextKeyUpsert(): void {
      const collection = keys.collection;
      const original = collection.updateOne.bind(collection);
      const update = vi.spyOn(collection, "updateOne");
      update.mockImplementation(async (filter, change, options) => {
        if (options?.upsert !== true) return original(filter, change, options);
        update.mockRestore();
        throw new mongoose.mongo.MongoNetworkError("connection 4 to 127.0.0.1:27017 closed");
      });
    }

    async function slotsHeld(ownerId: string, mode: KeyMode = "live"): Promise<number | undefined> {
      const account = await accounts.findById(ownerId).lean<AccountDoc>();
      return mode === "test" ? account?.active_test_key_count : account?.active_key_count;
    }

    async function counted(id: string): Promise<boolean | undefined> {
      return (await keys.findById(id).lean<KeyDoc>())?.counted;
    }

    describe("createKey.error", () => {
      it.each<KeyMode>(["live", "test"])("%s: the key the insert made is revoked and its slot given back; a retry fits a cap of one, a third key is refused", async (mode) => {
        const ownerId = `lost-create-${++owner}`;
        const orphan = testKeyRecord(ownerId, NOW, { mode });
        loseNextInsertAnswer(orphan, true);
        await expect(store.createKey(orphan, caps)).rejects.toBeInstanceOf(StoreUnavailableError);
        expect(await store.getKey(orphan.id)).toMatchObject({ revokedAtMs: NOW, rotatedToId: null });
        expect([await counted(orphan.id), await slotsHeld(ownerId, mode)]).toEqual([false, 0]);
        await store.createKey(testKeyRecord(ownerId, NOW, { mode }), caps);
        // Revoking the orphan again (an operator who saw it) gives nothing back a second time.
        await store.revokeKey(orphan.id, NOW + 1, "orphan");
        await expect(store.createKey(testKeyRecord(ownerId, NOW, { mode }), caps)).rejects.toBeInstanceOf(CapExceededError);
        expect([await store.countActiveKeys(ownerId, NOW, mode), await slotsHeld(ownerId, mode)]).toEqual([1, 1]);
        expect(logged.error).not.toHaveBeenCalled();
      });

      it("an insert still on its way when its slot went back can no longer land", async () => {
        const ownerId = `lost-create-${++owner}`;
        const lost = testKeyRecord(ownerId, NOW);
        const lateInsert = loseNextInsertAnswer(lost, false);
        await expect(store.createKey(lost, caps)).rejects.toBeInstanceOf(StoreUnavailableError);
        expect(await slotsHeld(ownerId)).toBe(0);
        await expect(lateInsert()).rejects.toMatchObject({ code: 11000 });
        await store.createKey(testKeyRecord(ownerId, NOW), caps);
        await expect(store.createKey(testKeyRecord(ownerId, NOW), caps)).rejects.toBeInstanceOf(CapExceededError);
        expect([await store.countActiveKeys(ownerId, NOW), await slotsHeld(ownerId)]).toEqual([1, 1]);
      });

      it("when the store cannot be asked whether the insert was made, the slot is kept and the ids logged", async () => {
        const ownerId = `lost-create-${++owner}`;
        const orphan = testKeyRecord(ownerId, NOW);
        loseNextInsertAnswer(orphan, true);
        loseNextKeyUpsert();
        await expect(store.createKey(orphan, caps)).rejects.toBeInstanceOf(StoreUnavailableError);
        expect([await counted(orphan.id), await slotsHeld(ownerId)]).toEqual([true, 1]);
        await expect(store.createKey(testKeyRecord(ownerId, NOW), caps)).rejects.toBeInstanceOf(CapExceededError);
        expect([await store.countActiveKeys(ownerId, NOW), await slotsHeld(ownerId)]).toEqual([1, 1]);
        expect(logged.error.mock.calls).toEqual([[{ keyId: orphan.id, ownerId }, expect.any(String)]]);
      });
    });

    describe("rotateKey.error", () => {
      it.each([
        ["with grace", NOW + 86_400_000, "grace", null],
        ["with no grace", NOW, "revoked", "rotated"],
      ])("%s: the new key the insert made stands and the rotation is returned, as if answered; one slot held", async (_name, graceEndsAtMs, oldState, revokeReason) => {
        const ownerId = `lost-rotate-${++owner}`;
        const key = testKeyRecord(ownerId, NOW);
        await store.createKey(key, caps);
        const next = testKeyRecord(ownerId, NOW);
        loseNextInsertAnswer(next, true);
        const rotation = await store.rotateKey(key.id, next, graceEndsAtMs, NOW);
        expect(rotation.next).toEqual(next);
        expect(rotation.previous).toMatchObject({ id: key.id, rotatedToId: next.id, graceEndsAtMs, revokeReason });
        const old = await store.getKey(key.id);
        expect(old === null ? null : keyState(old, NOW)).toBe(oldState);
        expect([await counted(key.id), await counted(next.id)]).toEqual([false, true]);
        await expect(store.createKey(testKeyRecord(ownerId, NOW), caps)).rejects.toBeInstanceOf(CapExceededError);
        expect([await store.countActiveKeys(ownerId, NOW), await slotsHeld(ownerId)]).toEqual([1, 1]);
        expect(logged.error).not.toHaveBeenCalled();
      });

      it("a new key's insert still on its way is made by the store instead, and can no longer land", async () => {
        const ownerId = `lost-rotate-${++owner}`;
        const key = testKeyRecord(ownerId, NOW);
        await store.createKey(key, caps);
        const next = testKeyRecord(ownerId, NOW);
        const lateInsert = loseNextInsertAnswer(next, false);
        const rotation = await store.rotateKey(key.id, next, NOW + 86_400_000, NOW);
        expect(rotation.next).toEqual(next);
        await expect(lateInsert()).rejects.toMatchObject({ code: 11000 });
        expect(await store.getKey(next.id)).toEqual(next);
        await expect(store.createKey(testKeyRecord(ownerId, NOW), caps)).rejects.toBeInstanceOf(CapExceededError);
        expect([await store.countActiveKeys(ownerId, NOW), await slotsHeld(ownerId)]).toEqual([1, 1]);
      });

      it("when the store cannot be asked whether the new key was made, the rotation is not undone and the ids are logged", async () => {
        const ownerId = `lost-rotate-${++owner}`;
        const key = testKeyRecord(ownerId, NOW);
        await store.createKey(key, caps);
        const next = testKeyRecord(ownerId, NOW);
        loseNextInsertAnswer(next, true);
        loseNextKeyUpsert();
        await expect(store.rotateKey(key.id, next, NOW + 86_400_000, NOW)).rejects.toBeInstanceOf(StoreUnavailableError);
        expect(await store.getKey(key.id)).toMatchObject({ rotatedToId: next.id });
        expect([await counted(key.id), await counted(next.id)]).toEqual([false, true]);
        await expect(store.createKey(testKeyRecord(ownerId, NOW), caps)).rejects.toBeInstanceOf(CapExceededError);
        expect([await store.countActiveKeys(ownerId, NOW), await slotsHeld(ownerId)]).toEqual([1, 1]);
        expect(logged.error.mock.calls).toEqual([[{ keyId: next.id, ownerId }, expect.any(String)]]);
      });
    });
  });

  runKeyStoreContract("mongodb", async () => {
    const store = await MongoKeyStore.connect(started().uri);
    let databases = 0;
    const openAt = async (uri: string) => {
      const opened = await MongoKeyStore.connect(uri);
      return { store: opened, close: () => opened.close() };
    };
    return {
      store,
      twin: () => openAt(started().uri),
      empty() {
        const uri = started().uri.replace(/\/([^/?]+)(\?|$)/, `/$1_empty_${++databases}$2`);
        return () => openAt(uri);
      },
      async close() {
        await store.close();
      },
    };
  });
} else {
  describe.skip("KeyStore contract: mongodb", () => {
    it("needs a MongoDB-wire server", () => undefined);
  });
}
