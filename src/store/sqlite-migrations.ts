import type { DatabaseSync } from "node:sqlite";
import { NewerSchemaError } from "./errors.js";
import type { SchemaStep } from "./errors.js";
import { immediateTransaction, schemaVersion, text } from "./sqlite-db.js";

/**
 * The SQLite schema's history. A database records the last step applied in `PRAGMA user_version`;
 * opening it applies the steps after that, in order, each in its own IMMEDIATE transaction (so two
 * processes opening one file at once apply each step once). A database newer than the last step
 * here was written by a newer keygate and is refused: this one would not know its columns.
 *
 * Never change what a released step makes: add the next one. Every step is idempotent (a column
 * added only where missing, IF NOT EXISTS): a file restored from `sqlite3 .dump` holds the whole
 * schema but not its user_version (.dump drops it), so its start applies every step again.
 */
export interface SqliteMigration extends SchemaStep {
  apply(db: DatabaseSync): void;
}

/** Tables and indexes as keygate has them, minus columns added after each table first shipped. */
const BASELINE_TABLES = `
CREATE TABLE IF NOT EXISTS accounts (
  owner_id TEXT PRIMARY KEY,
  plan TEXT NOT NULL,
  subscription_status TEXT NOT NULL,
  role TEXT NOT NULL,
  created_at INTEGER NOT NULL,
  updated_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS keys (
  id TEXT PRIMARY KEY,
  hash TEXT NOT NULL UNIQUE,
  owner_id TEXT NOT NULL REFERENCES accounts(owner_id),
  project_id TEXT,
  name TEXT NOT NULL,
  mode TEXT NOT NULL,
  start TEXT NOT NULL,
  last4 TEXT NOT NULL,
  scopes TEXT NOT NULL,
  metadata TEXT NOT NULL,
  created_at INTEGER NOT NULL,
  last_used_at INTEGER,
  expires_at INTEGER,
  revoked_at INTEGER,
  revoke_reason TEXT,
  grace_ends_at INTEGER,
  rotated_to_id TEXT
);
CREATE TABLE IF NOT EXISTS audit (
  id TEXT PRIMARY KEY,
  at INTEGER NOT NULL,
  actor TEXT NOT NULL,
  action TEXT NOT NULL,
  key_id TEXT,
  owner_id TEXT,
  changes TEXT NOT NULL,
  source TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_owner ON audit (owner_id, id);
CREATE INDEX IF NOT EXISTS audit_key ON audit (key_id, id);
CREATE TABLE IF NOT EXISTS usage (
  owner_id TEXT NOT NULL,
  key_id TEXT NOT NULL,
  day TEXT NOT NULL,
  outcome TEXT NOT NULL,
  count INTEGER NOT NULL,
  credits INTEGER NOT NULL,
  PRIMARY KEY (owner_id, day, key_id, outcome)
);
CREATE INDEX IF NOT EXISTS keys_owner_state ON keys (owner_id, revoked_at, id);
CREATE INDEX IF NOT EXISTS keys_project ON keys (project_id);
`;

/**
 * Columns that keygate added to a table before schemas were versioned, with the definition that
 * fills existing rows. A file from any of those versions lacks a suffix of them.
 */
const UNVERSIONED_COLUMNS: ReadonlyArray<{ table: string; column: string; definition: string }> = [
  { table: "keys", column: "rate_limit", definition: "TEXT" },
  { table: "accounts", column: "credit_period", definition: "TEXT NOT NULL DEFAULT ''" },
  { table: "accounts", column: "monthly_used", definition: "INTEGER NOT NULL DEFAULT 0" },
  { table: "accounts", column: "topup_balance", definition: "INTEGER NOT NULL DEFAULT 0" },
  { table: "accounts", column: "topup_total", definition: "INTEGER NOT NULL DEFAULT 0" },
];

function columnsOf(db: DatabaseSync, table: string): Set<string> {
  // `table` is one of this module's own names, never input.
  return new Set(db.prepare(`SELECT name FROM pragma_table_info('${table}')`).all().map((c) => text(c, "name")));
}

/** Facts about the store itself, one row a name (schema step 4). */
export const META_TABLE = "keygate_meta";
/** The row of META_TABLE that holds the pepper check (src/keys/pepper-check.ts). */
export const PEPPER_CHECK_NAME = "pepper_check";

export const SQLITE_MIGRATIONS: readonly SqliteMigration[] = [
  {
    version: 1,
    description:
      "baseline: create the accounts, keys, usage and audit tables and their indexes where missing, and add the columns " +
      "a file from an unversioned keygate lacks (keys.rate_limit; accounts.credit_period, monthly_used, topup_balance, topup_total)",
    apply(db) {
      db.exec(BASELINE_TABLES);
      for (const { table, column, definition } of UNVERSIONED_COLUMNS) {
        if (!columnsOf(db, table).has(column)) db.exec(`ALTER TABLE ${table} ADD COLUMN ${column} ${definition}`);
      }
    },
  },
  {
    version: 2,
    description: "add keys.disabled_at (a disabled key is refused with KEY_DISABLED until enabled); existing keys stay enabled",
    apply(db) {
      if (!columnsOf(db, "keys").has("disabled_at")) db.exec("ALTER TABLE keys ADD COLUMN disabled_at INTEGER");
    },
  },
  {
    version: 3,
    description:
      "add the credit_topups table: each AddCredits idempotency key with its amount and resulting top-up total, written with " +
      "the credits, so a repeat adds nothing after a restart or a lost answer; existing credits are unchanged",
    apply(db) {
      db.exec(`
        CREATE TABLE IF NOT EXISTS credit_topups (
          owner_id TEXT NOT NULL,
          idempotency_key TEXT NOT NULL,
          amount INTEGER NOT NULL,
          topup_total INTEGER NOT NULL,
          at INTEGER NOT NULL,
          PRIMARY KEY (owner_id, idempotency_key)
        );
        CREATE INDEX IF NOT EXISTS credit_topups_at ON credit_topups (at);
      `);
    },
  },
  {
    version: 4,
    description:
      "add the keygate_meta table (name, value): the store's pepper check, recorded by the first start on it, so a start " +
      "with another pepper is refused instead of answering every key as unknown; existing rows are unchanged",
    apply(db) {
      db.exec(`CREATE TABLE IF NOT EXISTS ${META_TABLE} (name TEXT PRIMARY KEY, value TEXT NOT NULL)`);
    },
  },
];

/** The schema version this keygate writes. */
export const SQLITE_SCHEMA_VERSION = SQLITE_MIGRATIONS.at(-1)?.version ?? 0;


/** The steps a database still needs, in order; throws NewerSchemaError for a newer one. */
export function pendingSqliteMigrations(db: DatabaseSync, migrations: readonly SqliteMigration[] = SQLITE_MIGRATIONS): SqliteMigration[] {
  const current = schemaVersion(db);
  const latest = migrations.at(-1)?.version ?? 0;
  if (current > latest) throw new NewerSchemaError("SQLite", current, latest);
  return migrations.filter((m) => m.version > current);
}

/**
 * Applies every pending step, each with its new user_version in one IMMEDIATE transaction. A step
 * another process applied meanwhile is skipped: the version is read again inside the transaction.
 * Returns the versions applied here.
 */
export function migrateSqlite(db: DatabaseSync, migrations: readonly SqliteMigration[] = SQLITE_MIGRATIONS): number[] {
  const applied: number[] = [];
  for (const step of pendingSqliteMigrations(db, migrations)) {
    immediateTransaction(db, () => {
      if (schemaVersion(db) >= step.version) return;
      step.apply(db);
      // PRAGMA takes no bound parameters; the version is this module's own integer.
      db.exec(`PRAGMA user_version = ${Math.trunc(step.version)}`);
      applied.push(step.version);
    });
  }
  return applied;
}
