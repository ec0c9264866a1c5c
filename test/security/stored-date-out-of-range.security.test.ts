import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { DatabaseSync } from "node:sqlite";
import { status as GrpcStatus } from "@grpc/grpc-js";
import type { ServiceError } from "@grpc/grpc-js";
import { Redis } from "ioredis";
import mongoose from "mongoose";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { RedisSharedCache, redisOptions, snapshotSchema } from "../../src/cache/redis.js";
import { MongoKeyStore } from "../../src/store/mongo.js";
import { SqliteKeyStore } from "../../src/store/sqlite.js";
import { StoredValueError } from "../../src/store/stored-values.js";
import type { KeySnapshot } from "../../src/store/store.js";
import { checkInit, checkOutcome, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { mongoWireAvailable, startMongoWire } from "../harness/mongo-wire.js";
import type { MongoWire } from "../harness/mongo-wire.js";
import { until } from "../harness/poll.js";
import { requireServer } from "../harness/ports.js";
import { testKeyRecord } from "../harness/records.js";
import { redisAvailable, startRedis } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";

// Dates a JS Date cannot hold, as another tool leaves them. A BSON datetime is an int64 of
// milliseconds (a Go or Java "max date" sentinel is 9e18 and more); the driver reads one past
// ±8.64e15 as a Date whose getTime() is NaN. SQLite keeps 9e999 as a REAL that reads as Infinity.
// Such a time is neither null nor a time: a NaN revoked_at read as revoked on the replica that
// read the store, but JSON wrote it into L2 as null, and every replica that read L2 allowed the
// key; a NaN expires_at never expired. Each store's read refuses it (StoredValueError, so the
// Check answers UNAVAILABLE, gRPC 14, which the proxy's failure_mode_allow decides), and L2
// refuses to cache a snapshot its schema would not read back.

const UNAVAILABLE = `grpc-${GrpcStatus.UNAVAILABLE}`;
const PEPPER = "a-pepper-for-the-out-of-range-date-tests-0123456789";
const mongoReady = requireServer("MongoDB-wire server", mongoWireAvailable(), "run .ci/install-mongo-wire.sh or set KEYGATE_TEST_MONGODB_URI");
const redisReady = requireServer("redis-server", redisAvailable(), "apt-get install redis-server");

/** A Date the BSON serializer writes as a datetime of 9e18 ms, beyond a JS Date's range (it writes getTime()). */
class FarFutureDate extends Date {
  override getTime(): number {
    return 9e18;
  }
}
/** The same, 9e18 ms before 1970. */
class FarPastDate extends Date {
  override getTime(): number {
    return -9e18;
  }
}

/** "allow", a denial's code, or "grpc-<code>" for a gRPC error. */
async function outcome(kg: TestKeygate, secret: string): Promise<string> {
  try {
    return checkOutcome(await kg.check(checkInit({ "x-api-key": secret }))).code ?? "allow";
  } catch (error) {
    return `grpc-${(error as ServiceError).code}`;
  }
}

/** What a read of a key rejects with: the error, or null when it resolved. */
async function failure(read: Promise<unknown>): Promise<unknown> {
  return read.then(
    () => null,
    (error: unknown) => error,
  );
}

describe.runIf(mongoReady && redisReady)("out-of-range dates security: MongoDB, two replicas sharing L2", { timeout: 60_000 }, () => {
  let wire: MongoWire | undefined;
  let redis: RedisServer | null = null;
  let kg1: TestKeygate | undefined;
  let kg2: TestKeygate | undefined;
  let client: mongoose.mongo.MongoClient | undefined;
  let peek: Redis | undefined;
  let uri = "";
  let seq = 0;

  function started(): { kg1: TestKeygate; kg2: TestKeygate; client: mongoose.mongo.MongoClient; peek: Redis } {
    if (kg1 === undefined || kg2 === undefined || client === undefined || peek === undefined) throw new Error("not started");
    return { kg1, kg2, client, peek };
  }

  /** A new account with one key, never checked yet (so in no cache): its id, hash and secret. */
  async function issue(): Promise<{ ownerId: string; id: string; hash: string; secret: string }> {
    const { kg1, client } = started();
    const ownerId = `owner-far-date-${++seq}`;
    await kg1.admin.upsertAccount({ ownerId, plan: "business" });
    const created = await kg1.admin.createKey({ ownerId, name: "far date" });
    const id = created.key?.id ?? "";
    const doc = await client.db().collection<{ _id: string; hash: string }>("keys").findOne({ _id: id });
    if (doc === null) throw new Error("the key's document is not there");
    return { ownerId, id, hash: doc.hash, secret: created.secret };
  }

  async function editKey(id: string, set: mongoose.mongo.Document): Promise<void> {
    expect((await started().client.db().collection<{ _id: string }>("keys").updateOne({ _id: id }, { $set: set })).matchedCount).toBe(1);
  }

  beforeAll(async () => {
    wire = await startMongoWire();
    redis = await startRedis();
    if (redis === null) throw new Error("redis-server did not start");
    uri = `${wire.uri.replace(/\/[^/?]*(\?.*)?$/, "")}/keygate_far_dates`;
    const env = { KEYGATE_MONGODB_URI: uri, KEYGATE_REDIS_URL: redis.url, KEYGATE_PEPPER: PEPPER };
    kg1 = await startKeygate({ env });
    kg2 = await startKeygate({ env });
    client = await mongoose.mongo.MongoClient.connect(uri);
    peek = new Redis(redis.url);
  }, 120_000);
  afterAll(async () => {
    peek?.disconnect();
    await client?.close();
    await kg1?.stop();
    await kg2?.stop();
    await redis?.stop();
    await wire?.stop();
  });

  it("a revoked_at of 9e18 ms is UNAVAILABLE on both replicas, and never reaches L2 (where it read as not revoked)", async () => {
    const { kg1, kg2, peek } = started();
    const far = await issue();
    const control = await issue();
    await editKey(far.id, { revoked_at: new FarFutureDate(0), revoke_reason: "another tool" });

    expect(await outcome(kg1, far.secret)).toBe(UNAVAILABLE);
    // The control's fill goes out after every fill of the first Check, on the same connection: once
    // it is in L2, a fill of the far key would be too.
    expect(await outcome(kg1, control.secret)).toBe("allow");
    await until(async () => (await peek.exists(`kg:snap:${control.hash}`)) === 1, 5000, "the control key's L2 fill", { intervalMs: 20 });
    expect(await peek.exists(`kg:snap:${far.hash}`)).toBe(0);
    expect(await outcome(kg2, far.secret)).toBe(UNAVAILABLE);

    const logged = kg1.logLines.join("");
    expect(logged).toContain(`MongoDB key ${far.id}: the stored revoked_at field is not null or a date within 100,000,000 days of 1970`);
  });

  it("an expires_at of -9e18 ms is UNAVAILABLE, never an allow (it never expired)", async () => {
    const { kg1 } = started();
    const key = await issue();
    await editKey(key.id, { expires_at: new FarPastDate(0) });
    expect(await outcome(kg1, key.secret)).toBe(UNAVAILABLE);
  });

  it("an account whose created_at is 9e18 ms is UNAVAILABLE, the account named in the log", async () => {
    const { kg1, client } = started();
    const key = await issue();
    expect((await client.db().collection<{ _id: string }>("accounts").updateOne({ _id: key.ownerId }, { $set: { created_at: new FarFutureDate(0) } })).matchedCount).toBe(1);
    expect(await outcome(kg1, key.secret)).toBe(UNAVAILABLE);
    expect(kg1.logLines.join("")).toContain(`MongoDB account ${key.ownerId}: the stored created_at field is not a date within 100,000,000 days of 1970`);
  });

  it.each([
    ["revoked_at", "9e18 ms", new FarFutureDate(0), "null or a date"],
    ["expires_at", "-9e18 ms", new FarPastDate(0), "null or a date"],
    ["grace_ends_at", "9e18 ms", new FarFutureDate(0), "null or a date"],
    ["last_used_at", "-9e18 ms", new FarPastDate(0), "null or a date"],
    ["disabled_at", "9e18 ms", new FarFutureDate(0), "null or a date"],
    ["created_at", "-9e18 ms", new FarPastDate(0), "a date"],
    ["created_at", "null", null, "a date"],
    ["revoked_at", "a string", "2000-01-01T00:00:00Z", "null or a date"],
  ])("%s stored as %s: getKey, the lookup and listKeys each fail with a StoredValueError naming the key and the field", async (field, _label, stored, expected) => {
    const key = await issue();
    await editKey(key.id, { [field]: stored });
    const store = await MongoKeyStore.connect(uri);
    try {
      const reads = [() => store.getKey(key.id), () => store.findSnapshotByHash(key.hash), () => store.listKeys({ ownerId: key.ownerId, includeRevoked: true, limit: 10, nowMs: 1 })];
      for (const read of reads) {
        const error = await failure(read());
        expect(error).toBeInstanceOf(StoredValueError);
        expect(error instanceof Error ? error.message : "").toBe(`MongoDB key ${key.id}: the stored ${field} field is not ${expected} within 100,000,000 days of 1970`);
      }
    } finally {
      await store.close();
    }
  });
});

describe("out-of-range dates security: SQLite", () => {
  // node:sqlite reads 9e999 in an INTEGER column as Infinity, -9e999 as -Infinity; NaN is stored as NULL.
  it.each([
    ["revoked_at", "9e999"],
    ["expires_at", "9e999"],
    ["grace_ends_at", "-9e999"],
    ["last_used_at", "9e999"],
    ["disabled_at", "9e999"],
    ["created_at", "-9e999"],
  ])("%s stored as %s: every read of the key is a StoredValueError naming the key and the field", async (column, stored) => {
    const dir = mkdtempSync(join(tmpdir(), "keygate-far-dates-"));
    const path = join(dir, "keygate.db");
    const store = new SqliteKeyStore(path);
    try {
      const key = testKeyRecord("owner-far-sqlite", 1_800_000_000_000);
      await store.upsertAccount({ ownerId: key.ownerId }, { plan: "pro", subscriptionStatus: "active", role: "standard" }, 1);
      store.importKeys([key]);
      const editor = new DatabaseSync(path);
      editor.exec(`UPDATE keys SET ${column} = ${stored} WHERE id = '${key.id}'`);
      editor.close();
      const reads = [() => store.getKey(key.id), () => store.findSnapshotByHash(key.hash), () => store.listKeys({ ownerId: key.ownerId, includeRevoked: true, limit: 10, nowMs: 1 })];
      for (const read of reads) {
        const error = await failure(read());
        expect(error).toBeInstanceOf(StoredValueError);
        expect(error instanceof Error ? error.message : "").toBe(`SQLite key ${key.id}: the stored ${column} field is not a finite number of milliseconds`);
      }
    } finally {
      await store.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it("an account's updated_at stored as 9e999 fails the lookup, naming the account", async () => {
    const dir = mkdtempSync(join(tmpdir(), "keygate-far-dates-"));
    const path = join(dir, "keygate.db");
    const store = new SqliteKeyStore(path);
    try {
      const key = testKeyRecord("owner-far-sqlite-account", 1_800_000_000_000);
      await store.upsertAccount({ ownerId: key.ownerId }, { plan: "pro", subscriptionStatus: "active", role: "standard" }, 1);
      store.importKeys([key]);
      const editor = new DatabaseSync(path);
      editor.prepare("UPDATE accounts SET updated_at = 9e999 WHERE owner_id = ?").run(key.ownerId);
      editor.close();
      const error = await failure(store.findSnapshotByHash(key.hash));
      expect(error).toBeInstanceOf(StoredValueError);
      expect(error instanceof Error ? error.message : "").toBe(`SQLite account ${key.ownerId}: the stored updated_at field is not a finite number of milliseconds`);
    } finally {
      await store.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe("out-of-range dates security: L2 caches only what it reads back", () => {
  function snapshot(overrides: Partial<KeySnapshot["key"]>): KeySnapshot {
    const key = testKeyRecord("owner-far-l2", 1_800_000_000_000, overrides);
    return { key, account: { ownerId: key.ownerId, plan: "pro", subscriptionStatus: "active", role: "standard", createdAtMs: 1, updatedAtMs: 1 } };
  }

  it.each([Number.NaN, Number.POSITIVE_INFINITY, Number.NEGATIVE_INFINITY])("the schema refuses %s for a time, and null where a time is required", (value) => {
    expect(snapshotSchema.safeParse(snapshot({ revokedAtMs: value })).success).toBe(false);
    expect(snapshotSchema.safeParse(snapshot({ expiresAtMs: value })).success).toBe(false);
    expect(snapshotSchema.safeParse({ ...snapshot({}), account: { ...snapshot({}).account, createdAtMs: value } }).success).toBe(false);
    expect(snapshotSchema.safeParse(JSON.parse(JSON.stringify(snapshot({ createdAtMs: value })))).success).toBe(false);
    expect(snapshotSchema.safeParse(snapshot({ revokedAtMs: null })).success).toBe(true);
  });

  it.runIf(redisReady)("a snapshot with a NaN revokedAtMs is not written: the fill fails, and L2 holds nothing for it", async () => {
    const server = await startRedis();
    if (server === null) throw new Error("redis-server did not start");
    const redis = new Redis(server.url, redisOptions({ lazyConnect: false }));
    try {
      await until(() => redis.status === "ready", 5000, "connection ready", { intervalMs: 20 });
      const cache = new RedisSharedCache(redis, { ttlSeconds: 30, negativeTtlSeconds: 5 });
      const bad = snapshot({ revokedAtMs: Number.NaN });
      const error = await failure(cache.set(bad.key.hash, bad));
      expect(error instanceof Error ? error.message : "").toBe(`not cached in L2: the snapshot of key ${bad.key.id} holds a value its schema refuses (key.revokedAtMs)`);
      expect(await redis.keys("*")).toEqual([]);
      // Happy: the same snapshot revoked at a real time is written, and read back revoked.
      const good = snapshot({ revokedAtMs: 1_800_000_000_000 });
      expect(await cache.set(good.key.hash, good)).toBe(true);
      expect((await cache.get(good.key.hash))?.key.revokedAtMs).toBe(1_800_000_000_000);
    } finally {
      redis.disconnect();
      await server.stop();
    }
  });
});
