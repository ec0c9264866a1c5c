import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { DatabaseSync } from "node:sqlite";
import { status as GrpcStatus } from "@grpc/grpc-js";
import type { ServiceError } from "@grpc/grpc-js";
import mongoose from "mongoose";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { MemoryCache } from "../../src/cache/memory.js";
import { SqliteKeyStore } from "../../src/store/sqlite.js";
import { StoredValueError } from "../../src/store/stored-values.js";
import type { KeySnapshot } from "../../src/store/store.js";
import { checkInit, checkOutcome, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { mongoWireAvailable, startMongoWire } from "../harness/mongo-wire.js";
import type { MongoWire } from "../harness/mongo-wire.js";
import { requireServer } from "../harness/ports.js";
import { testKeyRecord } from "../harness/records.js";

// Key records as a manual edit or another tool leaves them (a scope list keygate never writes, a
// rate limit under another spelling): a Check must never allow what the stored key does not
// grant. A value keygate never writes fails the store's read, so the Check answers UNAVAILABLE
// (gRPC 14), which the proxy's failure_mode_allow decides; never an allow.
//
// L1 shares one copy of each scope list across the process (module state), so each case uses a
// combination of scopes no other case in this file uses: the case that reads a key first then
// decides what a wrong shared list would be.

const UNAVAILABLE = `grpc-${GrpcStatus.UNAVAILABLE}`;

/** "allow", a denial's code, or "grpc-<code>" for a gRPC error. */
async function outcome(kg: TestKeygate, secret: string, path: string): Promise<string> {
  try {
    return checkOutcome(await kg.check(checkInit({ "x-api-key": secret }, path))).code ?? "allow";
  } catch (error) {
    return `grpc-${(error as ServiceError).code}`;
  }
}

async function outcomes(kg: TestKeygate, secret: string, path: string, count: number): Promise<string[]> {
  const answers: string[] = [];
  for (let i = 0; i < count; i++) answers.push(await outcome(kg, secret, path));
  return answers;
}

function issuer(kg: () => TestKeygate, prefix: string) {
  let seq = 0;
  return async (scopes: string[], rateLimit?: { limit: number; windowSeconds: number }): Promise<{ id: string; secret: string }> => {
    const ownerId = `${prefix}-${++seq}`;
    await kg().admin.upsertAccount({ ownerId, plan: "business" });
    const created = await kg().admin.createKey({ ownerId, name: "stored values", scopes, ...(rateLimit === undefined ? {} : { rateLimit }) });
    if (created.key === undefined) throw new Error("CreateKey returned no key");
    return { id: created.key.id, secret: created.secret };
  };
}

describe("stored values security: SQLite, through the Check", () => {
  let kg: TestKeygate | undefined;
  const running = (): TestKeygate => {
    if (kg === undefined) throw new Error("keygate did not start");
    return kg;
  };
  const issue = issuer(running, "owner-stored-sqlite");

  beforeAll(async () => {
    kg = await startKeygate();
  });
  afterAll(async () => {
    await kg?.stop();
  });

  /** Edits a key's row, as an operator's sqlite3 session would. */
  function editKey(id: string, column: "scopes" | "rate_limit", value: string): void {
    const db = new DatabaseSync(join(running().dataDir, "keygate.db"));
    try {
      db.prepare(`UPDATE keys SET ${column} = ? WHERE id = ?`).run(value, id);
    } finally {
      db.close();
    }
  }

  it("a scope list of one string 'decks,progress' is UNAVAILABLE, never the 'decks' of a real key read before it", async () => {
    const real = await issue(["decks", "progress"]);
    const odd = await issue(["tutor"]);
    editKey(odd.id, "scopes", JSON.stringify(["decks,progress"]));
    expect(await outcome(running(), real.secret, "/v1/decks/1")).toBe("allow");
    expect(await outcome(running(), odd.secret, "/v1/decks/1")).toBe(UNAVAILABLE);
  });

  it("a scope list of one string 'decks,webhooks' read first leaves a real ['decks', 'webhooks'] key its scopes", async () => {
    const odd = await issue(["tutor"]);
    editKey(odd.id, "scopes", JSON.stringify(["decks,webhooks"]));
    expect(await outcome(running(), odd.secret, "/v1/decks/1")).toBe(UNAVAILABLE);
    const real = await issue(["decks", "webhooks"]);
    expect(await outcome(running(), real.secret, "/v1/decks/1")).toBe("allow");
  });

  it("a scope list holding a list ([['progress', 'decks']]) is UNAVAILABLE, never the 'decks' of a real key", async () => {
    const real = await issue(["progress", "decks"]);
    const odd = await issue(["tutor"]);
    editKey(odd.id, "scopes", JSON.stringify([["progress", "decks"]]));
    expect(await outcome(running(), real.secret, "/v1/decks/1")).toBe("allow");
    expect(await outcome(running(), odd.secret, "/v1/decks/1")).toBe(UNAVAILABLE);
  });

  it("a scope list with a list among its names (['tutor', ['decks', 'webhooks']]) is UNAVAILABLE", async () => {
    const real = await issue(["tutor", "decks", "webhooks"]);
    const odd = await issue(["tutor"]);
    editKey(odd.id, "scopes", JSON.stringify(["tutor", ["decks", "webhooks"]]));
    expect(await outcome(running(), real.secret, "/v1/decks/1")).toBe("allow");
    expect(await outcome(running(), odd.secret, "/v1/decks/1")).toBe(UNAVAILABLE);
  });

  it("a rate limit stored as {limit, window_seconds} (not SQLite's windowSeconds) is UNAVAILABLE on every Check, never unlimited", async () => {
    const key = await issue([], { limit: 1, windowSeconds: 60 });
    editKey(key.id, "rate_limit", JSON.stringify({ limit: 1, window_seconds: 60 }));
    expect(await outcomes(running(), key.secret, "/v1/things", 5)).toEqual([UNAVAILABLE, UNAVAILABLE, UNAVAILABLE, UNAVAILABLE, UNAVAILABLE]);
  });

  it("the operator's log names the key and the field, never the stored value", async () => {
    const key = await issue(["tutor"]);
    const marker = "stored-value-marker";
    editKey(key.id, "scopes", JSON.stringify([`${marker},decks`]));
    expect(await outcome(running(), key.secret, "/v1/decks/1")).toBe(UNAVAILABLE);
    const logged = running().logLines.join("");
    expect(logged).toContain(`SQLite key ${key.id}: the stored scopes field is not a list of scope names`);
    expect(logged).not.toContain(marker);
  });

  it("happy: the rate limit as keygate writes it allows one request, then RATE_LIMITED", async () => {
    const key = await issue([], { limit: 1, windowSeconds: 60 });
    expect(await outcomes(running(), key.secret, "/v1/things", 3)).toEqual(["allow", "RATE_LIMITED", "RATE_LIMITED"]);
  });
});

describe("stored values security: every SQLite read of a key checks it", () => {
  // [column, stored text]: nothing keygate writes, each refused by getKey, listKeys and the cold lookup.
  const BAD: Array<["scopes" | "rate_limit", string]> = [
    ["scopes", JSON.stringify(["read,write"])],
    ["scopes", JSON.stringify([["read", "write"]])],
    ["scopes", JSON.stringify(["read", ["write"]])],
    ["scopes", JSON.stringify(["Read"])],
    ["scopes", JSON.stringify([7])],
    ["scopes", JSON.stringify("read")],
    ["scopes", JSON.stringify({ 0: "read" })],
    ["scopes", "read, write"],
    ["rate_limit", JSON.stringify({ limit: 1, window_seconds: 60 })],
    ["rate_limit", JSON.stringify({ limit: 0, windowSeconds: 60 })],
    ["rate_limit", JSON.stringify({ limit: 1.5, windowSeconds: 60 })],
    ["rate_limit", JSON.stringify({ limit: "1", windowSeconds: 60 })],
    ["rate_limit", JSON.stringify({ limit: 1, windowSeconds: -60 })],
    ["rate_limit", JSON.stringify({ limit: 1, windowSeconds: 2 ** 53 })],
    ["rate_limit", JSON.stringify([1, 60])],
    ["rate_limit", "{limit: 1}"],
  ];

  it.each(BAD)("%s stored as %s: StoredValueError naming the key and the field, not the value", async (column, stored) => {
    const dir = mkdtempSync(join(tmpdir(), "keygate-stored-values-"));
    const path = join(dir, "keygate.db");
    const store = new SqliteKeyStore(path);
    try {
      const key = testKeyRecord("owner-stored", 1_800_000_000_000, { rateLimit: { limit: 5, windowSeconds: 60 } });
      await store.upsertAccount({ ownerId: key.ownerId }, { plan: "pro", subscriptionStatus: "active", role: "standard" }, 1);
      store.importKeys([key]);
      const editor = new DatabaseSync(path);
      editor.prepare(`UPDATE keys SET ${column} = ? WHERE id = ?`).run(stored, key.id);
      editor.close();
      const field = new RegExp(`^SQLite key ${key.id}: the stored ${column} field is not `);
      for (const read of [store.getKey(key.id), store.findSnapshotByHash(key.hash), store.listKeys({ ownerId: key.ownerId, includeRevoked: true, limit: 10, nowMs: 1 })]) {
        const error: unknown = await read.then(() => null, (e: unknown) => e);
        expect(error).toBeInstanceOf(StoredValueError);
        expect(error instanceof Error ? error.message : "").toMatch(field);
        expect(error instanceof Error ? error.message : "").not.toContain(stored);
        expect(error instanceof Error ? error.cause : "").toBeUndefined();
      }
    } finally {
      await store.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it("happy: a key as keygate writes it, and one without a rate limit, read back whole", async () => {
    const store = new SqliteKeyStore(":memory:");
    try {
      const limited = testKeyRecord("owner-stored-ok", 1, { scopes: ["decks:read", "a.b_c-d"], rateLimit: { limit: 1_000_000, windowSeconds: 86_400 } });
      const unlimited = testKeyRecord("owner-stored-ok", 2, { scopes: [], metadata: { "billing.customer": "cus_1" } });
      await store.upsertAccount({ ownerId: "owner-stored-ok" }, { plan: "pro", subscriptionStatus: "active", role: "standard" }, 1);
      store.importKeys([limited, unlimited]);
      expect(await store.getKey(limited.id)).toEqual(limited);
      expect(await store.getKey(unlimited.id)).toEqual(unlimited);
    } finally {
      await store.close();
    }
  });
});

describe("stored values security: L1's shared scope lists", () => {
  function snapshot(id: string, scopes: string[]): KeySnapshot {
    const key = testKeyRecord(`owner-${id}`, 1, { id, scopes });
    return { key, account: { ownerId: key.ownerId, plan: "pro", subscriptionStatus: "active", role: "standard", createdAtMs: 1, updatedAtMs: 1 } };
  }

  it("a list whose names hold a comma is never shared with the list of those names, whichever L1 reads first", () => {
    const cache = new MemoryCache({ maxEntries: 10, ttlSeconds: 60, negativeMaxEntries: 10, negativeTtlSeconds: 60 });
    expect(cache.set("h1", snapshot("key_l1_a", ["l1.one", "l1.two"])).key.scopes).toEqual(["l1.one", "l1.two"]);
    expect(cache.set("h2", snapshot("key_l1_b", ["l1.one,l1.two"])).key.scopes).toEqual(["l1.one,l1.two"]);
    expect(cache.set("h3", snapshot("key_l1_c", ["l1.three,l1.four"])).key.scopes).toEqual(["l1.three,l1.four"]);
    expect(cache.set("h4", snapshot("key_l1_d", ["l1.three", "l1.four"])).key.scopes).toEqual(["l1.three", "l1.four"]);
  });
});

const mongoReady = requireServer("MongoDB-wire server", mongoWireAvailable(), "run .ci/install-mongo-wire.sh or set KEYGATE_TEST_MONGODB_URI");
const PEPPER = "a-pepper-for-the-stored-values-tests-0123456789";

describe.runIf(mongoReady)("stored values security: MongoDB documents", () => {
  let wire: MongoWire | undefined;
  let kg: TestKeygate | undefined;
  let client: mongoose.mongo.MongoClient | undefined;
  const running = (): TestKeygate => {
    if (kg === undefined) throw new Error("keygate did not start");
    return kg;
  };
  const keys = (): mongoose.mongo.Collection<{ _id: string }> => {
    if (client === undefined) throw new Error("the MongoDB client did not connect");
    return client.db().collection<{ _id: string }>("keys");
  };
  const issue = issuer(running, "owner-stored-mongo");

  beforeAll(async () => {
    wire = await startMongoWire();
    const uri = `${wire.uri.replace(/\/[^/?]*(\?.*)?$/, "")}/keygate_stored_values`;
    kg = await startKeygate({ env: { KEYGATE_MONGODB_URI: uri, KEYGATE_PEPPER: PEPPER } });
    client = await mongoose.mongo.MongoClient.connect(uri);
  }, 60_000);
  afterAll(async () => {
    await client?.close();
    await kg?.stop();
    await wire?.stop();
  });

  /** Edits a key's document, as a mongosh session would. */
  async function edit(id: string, update: mongoose.mongo.Document): Promise<void> {
    expect((await keys().updateOne({ _id: id }, update)).matchedCount).toBe(1);
  }

  it("scopes $pushed as one array (['webhooks', 'decks'] without $each) are UNAVAILABLE, never the 'decks' of a real key", async () => {
    const real = await issue(["tutor", "webhooks", "decks"]);
    expect(await outcome(running(), real.secret, "/v1/decks/1")).toBe("allow");
    const odd = await issue(["tutor"]);
    await edit(odd.id, { $push: { scopes: ["webhooks", "decks"] } });
    expect(await outcome(running(), odd.secret, "/v1/decks/1")).toBe(UNAVAILABLE);
  });

  it("a scope of one string 'webhooks,decks' read first is UNAVAILABLE and leaves a real ['webhooks', 'decks'] key its scopes", async () => {
    const odd = await issue(["tutor"]);
    await edit(odd.id, { $set: { scopes: ["webhooks,decks"] } });
    expect(await outcome(running(), odd.secret, "/v1/decks/1")).toBe(UNAVAILABLE);
    const real = await issue(["webhooks", "decks"]);
    expect(await outcome(running(), real.secret, "/v1/decks/1")).toBe("allow");
  });

  it.each([
    ["the API's camelCase spelling", { limit: 1, windowSeconds: 60 }],
    ["a limit as a string", { limit: "1", window_seconds: 60 }],
    ["a window of 0", { limit: 1, window_seconds: 0 }],
    ["a list", [1, 60]],
  ])("rate_limit edited with %s is UNAVAILABLE on every Check, never unlimited", async (_, rateLimit) => {
    const key = await issue([], { limit: 5, windowSeconds: 60 });
    await edit(key.id, { $set: { rate_limit: rateLimit } });
    expect(await outcomes(running(), key.secret, "/v1/things", 5)).toEqual([UNAVAILABLE, UNAVAILABLE, UNAVAILABLE, UNAVAILABLE, UNAVAILABLE]);
  });

  it("a missing revoked_at, or an expires_at stored as a string, is never an allow", async () => {
    const a = await issue([]);
    await edit(a.id, { $unset: { revoked_at: "" } });
    expect(await outcome(running(), a.secret, "/v1/things")).not.toBe("allow");
    const b = await issue([]);
    await edit(b.id, { $set: { expires_at: "2000-01-01T00:00:00Z" } });
    expect(await outcome(running(), b.secret, "/v1/things")).not.toBe("allow");
  });

  it("happy: the rate limit as keygate writes it allows one request, then RATE_LIMITED", async () => {
    const key = await issue([], { limit: 1, windowSeconds: 60 });
    expect(await outcomes(running(), key.secret, "/v1/things", 3)).toEqual(["allow", "RATE_LIMITED", "RATE_LIMITED"]);
  });
});

describe("stored values happy: metadata keys with '.' are stored on every store", () => {
  async function roundTrip(kg: TestKeygate, ownerId: string): Promise<string> {
    await kg.admin.upsertAccount({ ownerId, plan: "pro" });
    const metadata = { "billing.customer": "cus_1", "a.b.c": "x", plain: "y" };
    const created = await kg.admin.createKey({ ownerId, name: "dotted", metadata });
    const id = created.key?.id ?? "";
    expect(created.key?.metadata).toEqual(metadata);
    expect((await kg.admin.getKey({ id })).key?.metadata).toEqual(metadata);
    expect((await kg.admin.listKeys({ ownerId })).keys.map((k) => k.metadata)).toEqual([metadata]);
    expect(checkOutcome(await kg.check(checkInit({ "x-api-key": created.secret })))).toEqual({ status: 200, code: null });
    return id;
  }

  it("SQLite", async () => {
    const kg = await startKeygate();
    try {
      await roundTrip(kg, "owner-dotted-sqlite");
    } finally {
      await kg.stop();
    }
  });

  it.runIf(mongoReady)("MongoDB, as a plain subdocument (the shape mongoose's Map wrote), an empty one as {}", async () => {
    const wire = await startMongoWire();
    const uri = `${wire.uri.replace(/\/[^/?]*(\?.*)?$/, "")}/keygate_dotted_metadata`;
    const kg = await startKeygate({ env: { KEYGATE_MONGODB_URI: uri, KEYGATE_PEPPER: PEPPER } });
    const client = await mongoose.mongo.MongoClient.connect(uri);
    try {
      const id = await roundTrip(kg, "owner-dotted-mongo");
      const bare = await kg.admin.createKey({ ownerId: "owner-dotted-mongo", name: "bare" });
      const keys = client.db().collection<{ _id: string; metadata?: unknown }>("keys");
      expect((await keys.findOne({ _id: id }))?.metadata).toEqual({ "billing.customer": "cus_1", "a.b.c": "x", plain: "y" });
      expect((await keys.findOne({ _id: bare.key?.id ?? "" }))?.metadata).toEqual({});
    } finally {
      await client.close();
      await kg.stop();
      await wire.stop();
    }
  }, 60_000);
});
