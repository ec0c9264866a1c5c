import { copyFileSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { DatabaseSync } from "node:sqlite";
import mongoose from "mongoose";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { pepperCheck } from "../../src/keys/pepper-check.js";
import { schemaVersion } from "../../src/store/sqlite-db.js";
import { SQLITE_SCHEMA_VERSION } from "../../src/store/sqlite-migrations.js";
import { MONGO_SCHEMA_VERSION } from "../../src/store/mongo.js";
import { TestClock } from "../harness/clock.js";
import { checkInit, checkOutcome, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { mongoWireAvailable, startMongoWire } from "../harness/mongo-wire.js";
import type { MongoWire } from "../harness/mongo-wire.js";
import { requireServer } from "../harness/ports.js";

// Data written by the previous release (made by scripts/make-upgrade-fixture.ts running that
// release's own build, never by hand) opens under this keygate: every key answers as it did,
// usage, credits and audit are all there, and new keys can be made.
const RELEASE = "1dffb08";
const fixtureDir = resolve(import.meta.dirname, "../fixtures/upgrade", RELEASE);

interface Written {
  madeAtMs: number;
  day: string;
  keys: Record<"active" | "inGrace" | "successor" | "revoked" | "expiring" | "lapsed", { id: string; secret: string }>;
  usage: { ownerId: string; keyId: string; allowed: number };
  credits: { ownerId: string; added: number };
  auditEvents: number;
}

const release = JSON.parse(readFileSync(join(fixtureDir, "release.json"), "utf8")) as { commit: string; pepper: string };

function written(store: "sqlite" | "mongo"): Written {
  return JSON.parse(readFileSync(join(fixtureDir, `${store}-expected.json`), "utf8")) as Written;
}

/** The same assertions on either store: `start` opens keygate on the previous release's data. */
function upgradeSuite(store: "sqlite" | "mongo", start: (clock: TestClock) => Promise<TestKeygate>): void {
  const data = written(store);
  let keygate: TestKeygate | undefined;
  const running = (): TestKeygate => {
    if (keygate === undefined) throw new Error("keygate did not start on the fixture");
    return keygate;
  };

  beforeAll(async () => {
    // An hour after the release wrote it: the rotated key is in its 7-day grace, the expiring
    // key (10 minutes) has lapsed.
    const clock = new TestClock();
    clock.freeze(data.madeAtMs + 3_600_000);
    keygate = await start(clock);
  });
  afterAll(async () => {
    await keygate?.stop();
  });

  it("usage, credits and the audit trail the release wrote are all there", async () => {
    const usage = await running().admin.getUsage({ ownerId: data.usage.ownerId, from: data.day, to: data.day });
    expect(usage.byKey.map((row) => ({ keyId: row.keyId, keyName: row.keyName, day: row.day, allowed: Number(row.usage?.allowed ?? -1) }))).toEqual([
      { keyId: data.usage.keyId, keyName: "active", day: data.day, allowed: data.usage.allowed },
    ]);
    const account = await running().admin.getAccount({ ownerId: data.credits.ownerId });
    expect(account.account?.topupCredits).toBe(BigInt(data.credits.added));
    let events = 0;
    let pageToken = "";
    do {
      const page = await running().admin.listAuditEvents({ pageSize: 100, pageToken });
      events += page.events.length;
      pageToken = page.nextPageToken;
    } while (pageToken !== "");
    expect(events).toBe(data.auditEvents);
  });

  it("every key answers as it did: active, in grace and its successor allowed; revoked, lapsed and canceled denied", async () => {
    const answers: Record<string, { status: number; code: string | null }> = {};
    for (const [name, key] of Object.entries(data.keys)) {
      answers[name] = checkOutcome(await running().check(checkInit({ authorization: `Bearer ${key.secret}` })));
    }
    expect(answers).toEqual({
      active: { status: 200, code: null },
      inGrace: { status: 200, code: null },
      successor: { status: 200, code: null },
      revoked: { status: 401, code: "KEY_REVOKED" },
      expiring: { status: 401, code: "KEY_EXPIRED" },
      lapsed: { status: 402, code: "PLAN_REQUIRED" },
    });
  });

  it("the release's account takes a top-up with an idempotency key once: a repeat adds nothing and answers replayed", async () => {
    const ownerId = data.credits.ownerId;
    const first = await running().admin.addCredits({ ownerId, amount: 25n, reason: "after the upgrade", idempotencyKey: "upgrade-order-1" });
    const repeat = await running().admin.addCredits({ ownerId, amount: 25n, reason: "after the upgrade", idempotencyKey: "upgrade-order-1" });
    expect([first.replayed, first.account?.topupCredits, repeat.replayed, repeat.account?.topupCredits]).toEqual([
      false,
      BigInt(data.credits.added + 25),
      true,
      BigInt(data.credits.added + 25),
    ]);
  });

  it("new keys can be made, and are allowed", async () => {
    const created = await running().admin.createKey({ ownerId: data.usage.ownerId, name: "after the upgrade" });
    expect(created.key?.ownerId).toBe(data.usage.ownerId);
    expect(checkOutcome(await running().check(checkInit({ authorization: `Bearer ${created.secret}` })))).toEqual({ status: 200, code: null });
  });
}

describe(`upgrade from ${RELEASE}: SQLite`, () => {
  const dataDir = mkdtempSync(join(tmpdir(), "keygate-upgrade-"));
  afterAll(() => rmSync(dataDir, { recursive: true, force: true }));

  it("the fixture is the release's own, unversioned schema (no accounts.topup_total)", () => {
    const db = new DatabaseSync(join(fixtureDir, "sqlite/keygate.db"), { readOnly: true });
    try {
      expect(schemaVersion(db)).toBe(0);
      const columns = db.prepare("SELECT name FROM pragma_table_info('accounts')").all().map((c) => c["name"]);
      expect(columns).not.toContain("topup_total");
    } finally {
      db.close();
    }
  });

  upgradeSuite("sqlite", async (clock) => {
    copyFileSync(join(fixtureDir, "sqlite/keygate.db"), join(dataDir, "keygate.db"));
    return startKeygate({ dataDir, clock, env: { KEYGATE_PEPPER: release.pepper } });
  });

  it("the database is migrated to this keygate's schema version, and records the check of the release's pepper and the prefix of its keys", () => {
    const db = new DatabaseSync(join(dataDir, "keygate.db"), { readOnly: true });
    try {
      expect(schemaVersion(db)).toBe(SQLITE_SCHEMA_VERSION);
      expect(db.prepare("SELECT name, value FROM keygate_meta ORDER BY name").all()).toEqual([
        { name: "key_prefix", value: "kg" },
        { name: "pepper_check", value: pepperCheck(release.pepper) },
      ]);
    } finally {
      db.close();
    }
  });
});

if (requireServer("MongoDB-wire server", mongoWireAvailable(), "run .ci/install-mongo-wire.sh")) {
  describe(`upgrade from ${RELEASE}: MongoDB`, () => {
    let server: MongoWire | undefined;
    const uri = (): string => {
      if (server === undefined) throw new Error("the MongoDB-wire server did not start");
      return `${server.uri.replace(/\/[^/]*$/, "")}/keygate_upgrade`;
    };
    afterAll(async () => {
      await server?.stop();
    });

    upgradeSuite("mongo", async (clock) => {
      server = await startMongoWire();
      // Every collection exactly as the release left it, types and all (canonical Extended JSON).
      const dump = mongoose.mongo.BSON.EJSON.parse(readFileSync(join(fixtureDir, "mongo.json"), "utf8"), { relaxed: false }) as Record<string, mongoose.mongo.Document[]>;
      const client = await mongoose.mongo.MongoClient.connect(uri());
      try {
        for (const [name, docs] of Object.entries(dump)) if (docs.length > 0) await client.db().collection(name).insertMany(docs);
      } finally {
        await client.close();
      }
      return startKeygate({ clock, env: { KEYGATE_MONGODB_URI: uri(), KEYGATE_PEPPER: release.pepper } });
    });

    it("the database records this keygate's schema version, and the check of the release's pepper and the prefix of its keys beside it", async () => {
      const client = await mongoose.mongo.MongoClient.connect(uri());
      try {
        const doc = await client.db().collection<{ _id: string; version: number }>("keygate_schema").findOne({ _id: "schema" });
        expect(doc).toEqual({ _id: "schema", version: MONGO_SCHEMA_VERSION, pepper_check: pepperCheck(release.pepper), key_prefix: "kg" });
      } finally {
        await client.close();
      }
    });
  });
}
