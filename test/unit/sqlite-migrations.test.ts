import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { DatabaseSync } from "node:sqlite";
import { afterEach, describe, expect, it } from "vitest";
import { MigrationsPendingError, NewerSchemaError } from "../../src/store/errors.js";
import { schemaVersion, text } from "../../src/store/sqlite-db.js";
import { SQLITE_MIGRATIONS, SQLITE_SCHEMA_VERSION, migrateSqlite, pendingSqliteMigrations } from "../../src/store/sqlite-migrations.js";
import { SqliteKeyStore } from "../../src/store/sqlite.js";

// Schemas of earlier keygate commits, extracted from git (test/fixtures/sqlite-schemas/README.md).
const schemas = resolve(import.meta.dirname, "../fixtures/sqlite-schemas");
const HISTORY = ["8653988", "6d7e42b", "43858b8", "1dffb08"] as const;

const dirs: string[] = [];
afterEach(() => {
  for (const dir of dirs.splice(0)) rmSync(dir, { recursive: true, force: true });
});

function tempDb(): string {
  const dir = mkdtempSync(join(tmpdir(), "keygate-migrate-"));
  dirs.push(dir);
  return join(dir, "keygate.db");
}

/** Every table's columns (name, type, not-null, default) and every index, in a comparable form. */
function shape(db: DatabaseSync): Record<string, unknown> {
  const tables = db.prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name").all();
  const out: Record<string, unknown> = {};
  for (const table of tables) {
    const name = text(table, "name");
    out[name] = db
      .prepare(`SELECT name, type, "notnull", dflt_value, pk FROM pragma_table_info('${name}') ORDER BY name`)
      .all();
  }
  out["indexes"] = db.prepare("SELECT name, tbl_name FROM sqlite_master WHERE type = 'index' ORDER BY name").all();
  return out;
}

function freshShape(): Record<string, unknown> {
  const db = new DatabaseSync(":memory:");
  try {
    migrateSqlite(db);
    return shape(db);
  } finally {
    db.close();
  }
}

describe("SQLite schema migrations happy", () => {
  it.each(HISTORY)("a database made with the schema of %s migrates to the same schema as a new one, keeping its rows", async (commit) => {
    const path = tempDb();
    const old = new DatabaseSync(path);
    old.exec(readFileSync(join(schemas, `${commit}.sql`), "utf8"));
    old.prepare("INSERT INTO accounts (owner_id, plan, subscription_status, role, created_at, updated_at) VALUES ('acct_1', 'pro', 'active', 'standard', 1, 2)").run();
    old
      .prepare(
        `INSERT INTO keys (id, hash, owner_id, project_id, name, mode, start, last4, scopes, metadata, created_at)
         VALUES ('key_1', 'hash_1', 'acct_1', NULL, 'old key', 'live', 'kg_live_abcd', 'wxyz', '["read"]', '{"team":"core"}', 3)`,
      )
      .run();
    expect(schemaVersion(old)).toBe(0);
    old.close();

    const store = new SqliteKeyStore(path);
    try {
      const snapshot = await store.findSnapshotByHash("hash_1");
      expect(snapshot?.key).toMatchObject({ id: "key_1", name: "old key", scopes: ["read"], metadata: { team: "core" }, rateLimit: null });
      expect(snapshot?.account).toMatchObject({ ownerId: "acct_1", plan: "pro", subscriptionStatus: "active" });
      expect(await store.getCredits("acct_1")).toEqual({ period: "", monthlyUsed: 0, topupBalance: 0, topupTotal: 0 });
    } finally {
      await store.close();
    }
    const migrated = new DatabaseSync(path, { readOnly: true });
    try {
      expect(schemaVersion(migrated)).toBe(SQLITE_SCHEMA_VERSION);
      expect(shape(migrated)).toEqual(freshShape());
    } finally {
      migrated.close();
    }
  });

  it("a database at schema 2, as the release before keyed top-ups left it, gains credit_topups at step 3 and keeps its credits", async () => {
    const path = tempDb();
    const old = new DatabaseSync(path);
    expect(migrateSqlite(old, SQLITE_MIGRATIONS.filter((m) => m.version <= 2))).toEqual([1, 2]);
    old.prepare("INSERT INTO accounts (owner_id, plan, subscription_status, role, created_at, updated_at, topup_balance, topup_total) VALUES ('acct_1', 'pro', 'active', 'standard', 1, 2, 70, 90)").run();
    expect(old.prepare("SELECT name FROM sqlite_master WHERE name = 'credit_topups'").all()).toEqual([]);
    old.close();

    const store = new SqliteKeyStore(path);
    try {
      expect(await store.getCredits("acct_1")).toEqual({ period: "", monthlyUsed: 0, topupBalance: 70, topupTotal: 90 });
      expect(await store.addCreditsOnce("acct_1", 10, "order-1", 1_800_000_000_000)).toMatchObject({ replayed: false, credits: { topupBalance: 80, topupTotal: 100 } });
      expect(await store.addCreditsOnce("acct_1", 10, "order-1", 1_800_000_000_001)).toMatchObject({ replayed: true, credits: { topupBalance: 80, topupTotal: 100 } });
    } finally {
      await store.close();
    }
    const migrated = new DatabaseSync(path, { readOnly: true });
    try {
      expect(schemaVersion(migrated)).toBe(SQLITE_SCHEMA_VERSION);
      expect(shape(migrated)).toEqual(freshShape());
    } finally {
      migrated.close();
    }
  });

  it("a database at schema 3, as the release before the pepper check left it, gains keygate_meta at step 4, empty until a start claims the check", async () => {
    const path = tempDb();
    const old = new DatabaseSync(path);
    expect(migrateSqlite(old, SQLITE_MIGRATIONS.filter((m) => m.version <= 3))).toEqual([1, 2, 3]);
    expect(old.prepare("SELECT name FROM sqlite_master WHERE name = 'keygate_meta'").all()).toEqual([]);
    old.close();

    const store = new SqliteKeyStore(path);
    try {
      const reading = new DatabaseSync(path, { readOnly: true });
      try {
        expect(schemaVersion(reading)).toBe(4);
        expect(reading.prepare("SELECT name, value FROM keygate_meta").all()).toEqual([]);
      } finally {
        reading.close();
      }
      expect(await store.claimPepperCheck("check-a")).toBe("check-a");
      expect(await store.claimPepperCheck("check-b")).toBe("check-a");
    } finally {
      await store.close();
    }
    const migrated = new DatabaseSync(path, { readOnly: true });
    try {
      expect(shape(migrated)).toEqual(freshShape());
      expect(migrated.prepare("SELECT name, value FROM keygate_meta").all()).toEqual([{ name: "pepper_check", value: "check-a" }]);
    } finally {
      migrated.close();
    }
  });

  it("a second open, or a second process opening the file, applies nothing again", () => {
    const path = tempDb();
    const first = new DatabaseSync(path);
    const second = new DatabaseSync(path);
    try {
      expect(migrateSqlite(first)).toEqual(SQLITE_MIGRATIONS.map((m) => m.version));
      expect(migrateSqlite(second)).toEqual([]);
      expect(pendingSqliteMigrations(second)).toEqual([]);
    } finally {
      first.close();
      second.close();
    }
  });

  // `sqlite3 keygate.db .dump` carries every table, column and row but not user_version: the file
  // restored from it says 0, and its start applies every step again (step 2's ALTER TABLE failed
  // on the column already there, and the start with it).
  it("a database with the whole schema but user_version 0, as restored from sqlite3 .dump, applies every step again and keeps its rows", async () => {
    const path = tempDb();
    const dumped = new DatabaseSync(path);
    migrateSqlite(dumped);
    dumped.prepare("INSERT INTO accounts (owner_id, plan, subscription_status, role, created_at, updated_at) VALUES ('acct_1', 'pro', 'active', 'standard', 1, 2)").run();
    dumped
      .prepare(
        `INSERT INTO keys (id, hash, owner_id, project_id, name, mode, start, last4, scopes, metadata, created_at, disabled_at)
         VALUES ('key_1', 'hash_1', 'acct_1', NULL, 'old key', 'live', 'kg_live_abcd', 'wxyz', '["read"]', '{}', 3, 4)`,
      )
      .run();
    dumped.prepare("INSERT INTO credit_topups (owner_id, idempotency_key, amount, topup_total, at) VALUES ('acct_1', 'order-1', 5, 5, 6)").run();
    dumped.prepare("INSERT INTO keygate_meta (name, value) VALUES ('pepper_check', 'check-a')").run();
    dumped.exec("PRAGMA user_version = 0");
    expect(migrateSqlite(dumped)).toEqual(SQLITE_MIGRATIONS.map((m) => m.version));
    try {
      expect(schemaVersion(dumped)).toBe(SQLITE_SCHEMA_VERSION);
      expect(shape(dumped)).toEqual(freshShape());
      expect(dumped.prepare("SELECT id, disabled_at FROM keys").all()).toEqual([{ id: "key_1", disabled_at: 4 }]);
      expect(dumped.prepare("SELECT idempotency_key FROM credit_topups").all()).toEqual([{ idempotency_key: "order-1" }]);
      expect(dumped.prepare("SELECT name, value FROM keygate_meta").all()).toEqual([{ name: "pepper_check", value: "check-a" }]);
    } finally {
      dumped.close();
    }
  });

  it("steps are numbered 1, 2, 3… in order, and each says what it changes", () => {
    expect(SQLITE_MIGRATIONS.map((m) => m.version)).toEqual(SQLITE_MIGRATIONS.map((_, i) => i + 1));
    for (const step of SQLITE_MIGRATIONS) expect(step.description.length).toBeGreaterThan(20);
  });
});

describe("SQLite schema migrations sad", () => {
  it("a database written by a newer keygate is refused, and nothing is written", () => {
    const path = tempDb();
    const db = new DatabaseSync(path);
    db.exec(`PRAGMA user_version = ${SQLITE_SCHEMA_VERSION + 1}`);
    db.close();
    expect(() => new SqliteKeyStore(path)).toThrow(NewerSchemaError);
    expect(() => new SqliteKeyStore(path)).toThrow(`schema version ${SQLITE_SCHEMA_VERSION + 1}, newer than this keygate knows (${SQLITE_SCHEMA_VERSION})`);
    const after = new DatabaseSync(path, { readOnly: true });
    try {
      expect(after.prepare("SELECT name FROM sqlite_master").all()).toEqual([]);
    } finally {
      after.close();
    }
  });

  it("with migration turned off, a database that needs a step is refused by name, and nothing is written", () => {
    const path = tempDb();
    const old = new DatabaseSync(path);
    old.exec(readFileSync(join(schemas, "1dffb08.sql"), "utf8"));
    old.close();
    expect(() => new SqliteKeyStore(path, { migrate: false })).toThrow(MigrationsPendingError);
    expect(() => new SqliteKeyStore(path, { migrate: false })).toThrow(`needs schema steps ${SQLITE_MIGRATIONS.map((m) => m.version).join(", ")}: run \`keygate migrate\``);
    const after = new DatabaseSync(path, { readOnly: true });
    try {
      expect(schemaVersion(after)).toBe(0);
      const columns = after.prepare("SELECT name FROM pragma_table_info('accounts')").all().map((c) => c["name"]);
      expect(columns).not.toContain("topup_total");
    } finally {
      after.close();
    }
  });

  it("a step that fails leaves the database at the version before it", () => {
    const db = new DatabaseSync(":memory:");
    try {
      const failing = [
        ...SQLITE_MIGRATIONS,
        {
          version: SQLITE_SCHEMA_VERSION + 1,
          description: "a step that adds a table, then fails",
          apply(target: DatabaseSync) {
            target.exec("CREATE TABLE half_done (x INTEGER)");
            throw new Error("step failed");
          },
        },
      ];
      expect(() => migrateSqlite(db, failing)).toThrow("step failed");
      expect(schemaVersion(db)).toBe(SQLITE_SCHEMA_VERSION);
      expect(db.prepare("SELECT name FROM sqlite_master WHERE name = 'half_done'").all()).toEqual([]);
    } finally {
      db.close();
    }
  });
});
