import mongoose from "mongoose";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { CheckResponse } from "../../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import { keyDocument, keySchema } from "../../src/store/mongo.js";
import { checkInit, startKeygate, TEST_POLICY } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { mongoWireAvailable, startMongoWire } from "../harness/mongo-wire.js";
import type { MongoWire } from "../harness/mongo-wire.js";
import { requireServer } from "../harness/ports.js";
import { testKeyRecord } from "../harness/records.js";

// KeyAdmin accepts metadata keys of /^[A-Za-z0-9_.-]{1,64}$/, so "prototype" and "__proto__" are
// valid keys, and "prototype" a valid forwardMetadata name. SQLite stored them; the MongoDB store
// inserted keys with mongoose's Model.create, whose document building skips its "special
// properties", so they were dropped silently while CreateKey answered OK with them. Keys now go in
// through the driver, in the shape Model.create gave them.

const mongoReady = requireServer("MongoDB-wire server", mongoWireAvailable(), "run .ci/install-mongo-wire.sh");
const SPECIAL = { prototype: "eu-west", team: "core" };

function allowHeaders(response: CheckResponse): Record<string, string> {
  if (response.httpResponse.case !== "okResponse") throw new Error(`expected an allow, got ${response.httpResponse.case ?? "nothing"}`);
  return Object.fromEntries(response.httpResponse.value.headers.map((h) => [h.header?.key ?? "", h.header?.value ?? ""]));
}

describe.runIf(mongoReady)("MongoDB keeps every metadata key KeyAdmin accepts", { timeout: 60_000 }, () => {
  let mongo: MongoWire | undefined;
  let kg: TestKeygate;
  let connection: mongoose.Connection | undefined;
  beforeAll(async () => {
    mongo = await startMongoWire();
    kg = await startKeygate({
      policy: { ...TEST_POLICY, forwardMetadata: ["prototype", "team"] },
      env: { KEYGATE_MONGODB_URI: mongo.uri, KEYGATE_PEPPER: "metadata-prototype-pepper-0123456789abcdef" },
    });
    connection = await mongoose.createConnection(mongo.uri).asPromise();
  }, 120_000);
  afterAll(async () => {
    await connection?.close();
    await kg?.stop();
    await mongo?.stop();
  });

  it("a key created with metadata {prototype, team} reads back and forwards both", async () => {
    const created = await kg.admin.createKey({ ownerId: "meta-proto", name: "k", metadata: SPECIAL });
    expect(created.key?.metadata).toEqual(SPECIAL);
    expect((await kg.admin.getKey({ id: created.key?.id ?? "" })).key?.metadata).toEqual(SPECIAL);
    const headers = allowHeaders(await kg.check(checkInit({ authorization: `Bearer ${created.secret}` })));
    expect([headers["x-keygate-meta-team"], headers["x-keygate-meta-prototype"]]).toEqual(["core", "eu-west"]);
  });

  it("a rotation's new key keeps them, and UpdateKey leaves them", async () => {
    const created = await kg.admin.createKey({ ownerId: "meta-proto-rotate", name: "k", metadata: SPECIAL });
    const rotated = await kg.admin.rotateKey({ id: created.key?.id ?? "", graceDays: 1 });
    await kg.admin.updateKey({ id: rotated.key?.id ?? "", name: "renamed" });
    expect((await kg.admin.getKey({ id: rotated.key?.id ?? "" })).key?.metadata).toEqual(SPECIAL);
  });

  it("a key whose metadata holds __proto__ keeps it as an entry", async () => {
    const record = testKeyRecord("meta-dunder", Date.now(), { metadata: JSON.parse('{"__proto__":"x","team":"core"}') as Record<string, string> });
    await kg.app.store.createKey(record, { maxActiveKeysFor: () => 5, accountDefaults: { plan: "business", subscriptionStatus: "active", role: "standard" }, nowMs: Date.now() });
    const read = await kg.app.store.getKey(record.id);
    expect(Object.entries(read?.metadata ?? {})).toEqual([
      ["__proto__", "x"],
      ["team", "core"],
    ]);
  });

  it("the document is the one Model.create wrote: the same fields, types and defaults, no __v", async () => {
    if (connection === undefined) throw new Error("no connection");
    const record = testKeyRecord("meta-shape", Date.UTC(2026, 11, 7), { rateLimit: { limit: 5, windowSeconds: 60 }, expiresAtMs: Date.UTC(2027, 0, 1), projectId: "p1" });
    await kg.app.store.createKey(record, { maxActiveKeysFor: () => 5, accountDefaults: { plan: "business", subscriptionStatus: "active", role: "standard" }, nowMs: Date.now() });
    const byCreate = connection.model("KeyByCreate", keySchema, "keys_by_create");
    // The model creates its collection and indexes in the background (mongoose's autoCreate and
    // autoIndex); an insert racing them made the MongoDB-wire server fail with "Unknown error".
    await byCreate.init();
    await byCreate.create(keyDocument(record, true));
    const db = connection.db;
    if (db === undefined) throw new Error("no database");
    const [inserted, created] = await Promise.all([db.collection("keys").findOne({ _id: record.id as never }), db.collection("keys_by_create").findOne({ _id: record.id as never })]);
    expect(inserted).not.toBeNull();
    expect(inserted).toStrictEqual(created);
    expect(Object.keys(inserted ?? {}).sort()).toEqual(Object.keys(created ?? {}).sort());
  });
});
