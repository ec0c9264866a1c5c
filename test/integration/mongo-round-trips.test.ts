import fc from "fast-check";
import mongoose from "mongoose";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { newKeyId } from "../../src/keys/ids.js";
import { StoreUnavailableError } from "../../src/store/errors.js";
import { MongoKeyStore, keyDocument } from "../../src/store/mongo.js";
import type { AccountDoc, KeyDoc } from "../../src/store/mongo.js";
import type { CreateLimits, KeyRecord } from "../../src/store/store.js";
import { mongoWireAvailable, startMongoWire } from "../harness/mongo-wire.js";
import type { MongoWire } from "../harness/mongo-wire.js";
import { requireServer } from "../harness/ports.js";
import { testKeyRecord } from "../harness/records.js";
import { startTcpRelay } from "../harness/tcp-relay.js";

// A Check on a key that no cache holds reads it from MongoDB with findSnapshotByHash. These cases
// count the commands that read sends, with the driver's command monitoring, against the
// harness's MongoDB-wire server, and check that the one-command read gives exactly what the
// store's by-id reads (mongoose, the same mappers) give for the same documents.

const NOW = 1_800_000_000_000;
const DAY = 86_400_000;
const LIMITS: CreateLimits = {
  maxActiveKeysFor: () => 1000,
  accountDefaults: { plan: "basic", subscriptionStatus: "active", role: "standard" },
  nowMs: NOW,
};

function record(ownerId: string, overrides: Partial<KeyRecord> = {}): KeyRecord {
  return testKeyRecord(ownerId, NOW, overrides);
}

/** A key document as the releases before per-key rate limits wrote it: no rate_limit field (nor disabled_at). */
type LegacyKey = Omit<KeyDoc, "rate_limit" | "disabled_at">;

/** An account document as the first release wrote it: no top-up total. */
type LegacyAccount = Omit<AccountDoc, "topup_total">;

if (requireServer("MongoDB-wire server", mongoWireAvailable(), "run .ci/install-mongo-wire.sh or set KEYGATE_TEST_MONGODB_URI")) {
  let server: MongoWire | undefined;
  let store: MongoKeyStore | undefined;
  let raw: mongoose.mongo.MongoClient | undefined;
  const commands: mongoose.mongo.CommandStartedEvent[] = [];
  const started = (): { store: MongoKeyStore; db: mongoose.mongo.Db } => {
    if (store === undefined || raw === undefined) throw new Error("the MongoDB-wire server or the store did not start");
    return { store, db: raw.db() };
  };
  let owner = 0;
  const nextOwner = (): string => `round-trips-owner-${++owner}`;

  /** The commands `operation` sent, by name, with its result. */
  async function counted<T>(operation: () => Promise<T>): Promise<{ result: T; sent: string[] }> {
    commands.length = 0;
    const result = await operation();
    return { result, sent: commands.map((c) => c.commandName) };
  }

  beforeAll(async () => {
    server = await startMongoWire();
    store = await MongoKeyStore.connect(server.uri, { onCommandStarted: (event) => commands.push(event) });
    raw = new mongoose.mongo.MongoClient(server.uri, { serverSelectionTimeoutMS: 3000 });
    await raw.connect();
  });
  afterAll(async () => {
    await store?.close();
    await raw?.close();
    await server?.stop();
  });

  describe("MongoKeyStore cold lookup: one round trip", () => {
    it("a known key costs exactly one command, an aggregate joining keys and accounts, and reads back whole", async () => {
      const { store } = started();
      const ownerId = nextOwner();
      const key = record(ownerId, { projectId: "p1", expiresAtMs: NOW + DAY, scopes: ["read", "write"] });
      await store.createKey(key, LIMITS);
      const { result, sent } = await counted(() => store.findSnapshotByHash(key.hash));
      expect(sent).toEqual(["aggregate"]);
      expect(commands[0]?.command["aggregate"]).toBe("lookup_anchor");
      const joined = JSON.stringify(commands[0]?.command["pipeline"]);
      expect(joined).toContain('"from":"keys"');
      expect(joined).toContain('"from":"accounts"');
      expect(result).toEqual({ key, account: await store.getAccount(ownerId) });
      expect(result?.account).toMatchObject({ ownerId, plan: "basic", subscriptionStatus: "active", role: "standard" });
    });

    it("an unknown hash costs exactly one command and reads as null", async () => {
      const { store } = started();
      const { result, sent } = await counted(() => store.findSnapshotByHash("round-trips-no-such-hash"));
      expect(sent).toEqual(["aggregate"]);
      expect(result).toBeNull();
    });

    it("64 cold lookups made together cost one command, each answered with its own key, with no getMore or killCursors", async () => {
      const { store } = started();
      const ownerIds = [nextOwner(), nextOwner()];
      const keys = Array.from({ length: 48 }, (_, i) => record(ownerIds[i % 2] ?? ""));
      for (const key of keys) await store.createKey(key, LIMITS);
      const hashes = [...keys.map((k) => k.hash), ...Array.from({ length: 16 }, (_, i) => `round-trips-unknown-${i}`)];
      const { result, sent } = await counted(() => Promise.all(hashes.map((hash) => store.findSnapshotByHash(hash))));
      expect(sent).toEqual(["aggregate"]);
      expect(result.map((snapshot) => snapshot?.key.id ?? null)).toEqual([...keys.map((k) => k.id), ...Array.from({ length: 16 }, () => null)]);
      expect(result.map((snapshot) => snapshot?.account.ownerId ?? null)).toEqual([...keys.map((k) => k.ownerId), ...Array.from({ length: 16 }, () => null)]);
      for (const [i, key] of keys.entries()) expect(result[i]?.key).toEqual(key);
    });

    it("150 lookups made together, 20 of them repeats, go as commands of at most 64 distinct keys, every lookup answered", async () => {
      const { store } = started();
      const ownerId = nextOwner();
      const keys = Array.from({ length: 100 }, () => record(ownerId));
      for (const key of keys) await store.createKey(key, LIMITS);
      const unknown = Array.from({ length: 30 }, (_, i) => `round-trips-batch-unknown-${i}`);
      const hashes = [...keys.map((k) => k.hash), ...unknown, ...keys.slice(0, 20).map((k) => k.hash)];
      const { result, sent } = await counted(() => Promise.all(hashes.map((hash) => store.findSnapshotByHash(hash))));
      // Two commands go out at once (64 and 64 keys); the last 2 distinct keys and the 20 repeats wait for one of them.
      // Which starts second depends on the pool: the second 64 waits for a new connection, and the
      // 22 can take the first one's connection back before that one is open.
      expect(sent).toEqual(["aggregate", "aggregate", "aggregate"]);
      const asked = commands.map((c) => {
        const pipeline = c.command["pipeline"] as Array<Record<string, { hash?: { $literal?: unknown } }>>;
        return pipeline[1]?.["$project"]?.hash?.$literal as string[];
      });
      expect(asked.map((list) => list.length).sort((a, b) => b - a)).toEqual([64, 64, 22]);
      expect(asked[0]?.length).toBe(64);
      for (const list of asked) expect(new Set(list).size).toBe(list.length);
      expect(new Set(asked.flat()).size).toBe(130);
      expect(result.map((snapshot) => snapshot?.key.id ?? null)).toEqual([...keys.map((k) => k.id), ...unknown.map(() => null), ...keys.slice(0, 20).map((k) => k.id)]);
    });

    it("two keys with one hash (the unique index gone) fail the lookup: neither key is chosen", async () => {
      if (server === undefined || raw === undefined) throw new Error("the MongoDB-wire server did not start");
      const uri = new URL(server.uri);
      const database = `${uri.pathname.slice(1)}_two_keys`;
      uri.pathname = `/${database}`;
      const twice = await MongoKeyStore.connect(uri.toString());
      try {
        const ownerId = nextOwner();
        const first = record(ownerId);
        await twice.createKey(first, LIMITS);
        const keys = raw.db(database).collection<KeyDoc>("keys");
        await keys.dropIndex("hash_unique");
        await keys.insertOne(keyDocument(record(ownerId, { hash: first.hash }), true));
        expect(await keys.countDocuments({ hash: first.hash })).toBe(2);
        const error = await twice.findSnapshotByHash(first.hash).then(
          (snapshot) => snapshot,
          (reason: unknown) => reason,
        );
        expect(error).toBeInstanceOf(StoreUnavailableError);
        expect(error).toMatchObject({ message: "MongoDB answered a key lookup with two keys for one hash" });
      } finally {
        await twice.close();
      }
    });

    it("an emptied anchor collection is refilled and the lookup asked again, never read as an unknown key", async () => {
      const { store, db } = started();
      const key = record(nextOwner());
      await store.createKey(key, LIMITS);
      expect((await db.collection<{ _id: string }>("lookup_anchor").deleteMany({})).deletedCount).toBe(1);
      const healed = await counted(() => store.findSnapshotByHash(key.hash));
      expect(healed.sent).toEqual(["aggregate", "update", "aggregate"]);
      expect(healed.result?.key).toEqual(key);
      expect(await db.collection<{ _id: string }>("lookup_anchor").countDocuments()).toBe(1);
      const after = await counted(() => store.findSnapshotByHash(key.hash));
      expect(after.sent).toEqual(["aggregate"]);
      expect(after.result?.key).toEqual(key);
      // Lookups that all find it gone at once all place it, and all answer.
      await db.collection<{ _id: string }>("lookup_anchor").deleteMany({});
      const together = await Promise.all(Array.from({ length: 32 }, (_, i) => store.findSnapshotByHash(i % 2 === 0 ? key.hash : `round-trips-absent-${i}`)));
      expect(together.map((snapshot) => snapshot?.key.id ?? null)).toEqual(Array.from({ length: 32 }, (_, i) => (i % 2 === 0 ? key.id : null)));
      expect(await db.collection<{ _id: string }>("lookup_anchor").countDocuments()).toBe(1);
    });

    it("a key whose account document is gone reads as null, in one command", async () => {
      const { store, db } = started();
      const ownerId = nextOwner();
      const key = record(ownerId);
      await store.createKey(key, LIMITS);
      expect((await db.collection<{ _id: string }>("accounts").deleteOne({ _id: ownerId })).deletedCount).toBe(1);
      const { result, sent } = await counted(() => store.findSnapshotByHash(key.hash));
      expect(sent).toEqual(["aggregate"]);
      expect(result).toBeNull();
    });

    it("reads rotated, revoked, rate-limited and used keys exactly as the by-id reads do", async () => {
      const { store } = started();
      const ownerId = nextOwner();
      await store.upsertAccount({ ownerId, plan: "pro", subscriptionStatus: "past_due", role: "premium" }, LIMITS.accountDefaults, NOW + 3);
      const old = record(ownerId, { metadata: {}, scopes: [] });
      await store.createKey(old, LIMITS);
      await store.updateKey(old.id, { rateLimit: { limit: 7, windowSeconds: 30 } });
      await store.touchLastUsed(new Map([[old.id, NOW + 11]]));
      const next = record(ownerId, { projectId: "p2" });
      await store.rotateKey(old.id, next, NOW + DAY, NOW);
      const revoked = record(ownerId);
      await store.createKey(revoked, LIMITS);
      await store.revokeKey(revoked.id, NOW + 5, "leaked");
      for (const key of [old, next, revoked]) {
        const { result, sent } = await counted(() => store.findSnapshotByHash(key.hash));
        expect(sent).toEqual(["aggregate"]);
        expect(result).toEqual({ key: await store.getKey(key.id), account: await store.getAccount(ownerId) });
      }
      const oldSnapshot = await store.findSnapshotByHash(old.hash);
      expect(oldSnapshot?.key).toMatchObject({ rotatedToId: next.id, graceEndsAtMs: NOW + DAY, rateLimit: { limit: 7, windowSeconds: 30 }, lastUsedAtMs: NOW + 11 });
      // createKey touches the account (its implicit upsert at LIMITS.nowMs), the upsert above created it.
      expect(oldSnapshot?.account).toEqual({ ownerId, plan: "pro", subscriptionStatus: "past_due", role: "premium", createdAtMs: NOW + 3, updatedAtMs: NOW });
    });

    it("reads documents written by earlier versions as the by-id reads do: a key without rate_limit has none", async () => {
      const { store, db } = started();
      const ownerId = nextOwner();
      await db.collection<LegacyAccount>("accounts").insertOne({
        _id: ownerId,
        plan: "pro",
        subscription_status: "active",
        role: "standard",
        active_key_count: 1,
        created_at: new Date(1),
        updated_at: new Date(2),
        credit_period: "2026-10",
        monthly_used: 4,
        topup_balance: 70,
      });
      const legacy: LegacyKey = {
        _id: newKeyId(),
        hash: `round-trips-legacy-${ownerId}`,
        owner_id: ownerId,
        project_id: null,
        name: "from an earlier version",
        mode: "test",
        start: "kg_test_abcd",
        last4: "wxyz",
        scopes: ["read"],
        metadata: { team: "core" },
        created_at: new Date(NOW),
        last_used_at: null,
        expires_at: null,
        revoked_at: null,
        revoke_reason: null,
        grace_ends_at: null,
        rotated_to_id: null,
        counted: true,
      };
      await db.collection<LegacyKey>("keys").insertOne(legacy);
      const { result, sent } = await counted(() => store.findSnapshotByHash(legacy.hash));
      expect(sent).toEqual(["aggregate"]);
      expect(result).toEqual({ key: await store.getKey(legacy._id), account: await store.getAccount(ownerId) });
      expect(result?.key).toMatchObject({ id: legacy._id, mode: "test", rateLimit: null, metadata: { team: "core" } });
      expect(result?.account).toEqual({ ownerId, plan: "pro", subscriptionStatus: "active", role: "standard", createdAtMs: 1, updatedAtMs: 2 });
    });

    it("agrees with the by-id reads on generated keys (property, 40 runs)", async () => {
      const { store } = started();
      // Strings that start with "$" as often as not: an aggregation stage that evaluated stored
      // values as expressions (as mongo-java-server's $arrayElemAt does) would lose or break them.
      const text = fc.oneof(
        fc.string({ minLength: 1, maxLength: 12 }),
        fc.string({ maxLength: 8 }).map((tail) => `$${tail}`),
      );
      // Scopes are scope names (a store read refuses anything else); metadata keys are what
      // KeyAdmin accepts, "." included.
      const scope = fc.stringMatching(/^[a-z][a-z0-9_.:-]{0,8}$/);
      const metadataKey = fc.stringMatching(/^[A-Za-z0-9_.-]{1,8}$/);
      const optionalTime = fc.option(fc.integer({ min: 0, max: 4_000_000_000_000 }), { nil: null });
      await fc.assert(
        fc.asyncProperty(
          fc.record({
            projectId: fc.option(text, { nil: null }),
            name: text,
            mode: fc.constantFrom("live" as const, "test" as const),
            scopes: fc.array(scope, { maxLength: 4 }),
            metadata: fc.dictionary(metadataKey, text, { maxKeys: 3, noNullPrototype: true }),
            expiresAtMs: optionalTime,
            rateLimit: fc.option(fc.record({ limit: fc.integer({ min: 1, max: 1_000_000 }), windowSeconds: fc.integer({ min: 1, max: 86_400 }) }), { nil: null }),
          }),
          async (fields) => {
            const key = record(nextOwner(), fields);
            await store.createKey(key, LIMITS);
            const { result, sent } = await counted(() => store.findSnapshotByHash(key.hash));
            expect(sent).toEqual(["aggregate"]);
            expect(result).toEqual({ key, account: await store.getAccount(key.ownerId) });
          },
        ),
        { numRuns: 40 },
      );
    });
  });

  describe("MongoKeyStore cold lookup: a server that stops answering", () => {
    it("is StoreUnavailableError after the lookup deadline, never a null, and reads again once it answers", async () => {
      if (server === undefined) throw new Error("the MongoDB-wire server did not start");
      const port = Number(new URL(server.uri).port);
      // freeze() is a paused or partitioned server as the driver sees it: connections stay open and nothing comes back.
      const relay = await startTcpRelay(port);
      const uri = new URL(server.uri);
      uri.port = String(relay.port);
      const paused = await MongoKeyStore.connect(uri.toString());
      try {
        const ownerId = nextOwner();
        const key = record(ownerId);
        await paused.createKey(key, LIMITS);
        expect((await paused.findSnapshotByHash(key.hash))?.key.id).toBe(key.id);
        relay.freeze();
        // An answer of any kind (a snapshot, or null: "no such key") would be wrong here.
        const error = await paused.findSnapshotByHash(key.hash).then(
          () => "answered",
          (reason: unknown) => reason,
        );
        expect(error).toBeInstanceOf(StoreUnavailableError);
        expect(error).toMatchObject({ message: "MongoDB did not answer a key lookup within 1000 ms" });
        relay.thaw();
        expect((await paused.findSnapshotByHash(key.hash))?.key.id).toBe(key.id);
      } finally {
        relay.thaw();
        await paused.close();
        await relay.close();
      }
    });
  });
} else {
  describe.skip("MongoKeyStore cold lookup", () => {
    it("needs a MongoDB-wire server", () => undefined);
  });
}
