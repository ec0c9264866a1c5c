import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { DatabaseSync } from "node:sqlite";
import { describe, expect, it } from "vitest";
import { pepperCheck } from "../../src/keys/pepper-check.js";
import { SqliteKeyStore, sqliteFileHoldsKeys } from "../../src/store/sqlite.js";
import { TOPUP_KEY_RETENTION_MS, newKeyRecord } from "../../src/store/store.js";
import { SQLITE_SCHEMA_VERSION } from "../../src/store/sqlite-migrations.js";
import { runKeyStoreContract } from "./key-store.contract.js";

runKeyStoreContract("sqlite", async () => {
  const dir = mkdtempSync(join(tmpdir(), "keygate-sqlite-"));
  const store = new SqliteKeyStore(join(dir, "keygate.db"));
  let databases = 0;
  const openAt = async (path: string) => {
    const opened = new SqliteKeyStore(path);
    return { store: opened, close: () => opened.close() };
  };
  return {
    store,
    twin: () => openAt(join(dir, "keygate.db")),
    empty() {
      const path = join(dir, `empty-${++databases}.db`);
      return () => openAt(path);
    },
    async close() {
      await store.close();
      rmSync(dir, { recursive: true, force: true });
    },
  };
});

/** Runs `fn` with the path of a database file in a fresh directory, removed afterwards. */
async function withDatabaseFile(prefix: string, fn: (path: string) => Promise<void>): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  try {
    await fn(join(dir, "keygate.db"));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

describe("SqliteKeyStore on a file from an earlier version", () => {
  it("adds the top-up total to an accounts table that lacks it, keeping the credits already there", async () => {
    await withDatabaseFile("keygate-sqlite-upgrade-", async (path) => {
      // The accounts table as the first release wrote it: no topup_total column.
      const old = new DatabaseSync(path);
      old.exec(`CREATE TABLE accounts (
        owner_id TEXT PRIMARY KEY, plan TEXT NOT NULL, subscription_status TEXT NOT NULL, role TEXT NOT NULL,
        created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL,
        credit_period TEXT NOT NULL DEFAULT '', monthly_used INTEGER NOT NULL DEFAULT 0, topup_balance INTEGER NOT NULL DEFAULT 0)`);
      old.prepare("INSERT INTO accounts VALUES ('legacy', 'pro', 'active', 'standard', 1, 2, '2026-10', 4, 70)").run();
      old.close();

      // Two opens at once, as two processes upgrading the same file would.
      const first = new SqliteKeyStore(path);
      const second = new SqliteKeyStore(path);
      expect(await first.getCredits("legacy")).toEqual({ period: "2026-10", monthlyUsed: 4, topupBalance: 70, topupTotal: 0 });
      expect(await second.addCredits("legacy", 30)).toEqual({ period: "2026-10", monthlyUsed: 4, topupBalance: 100, topupTotal: 30 });
      expect((await first.getAccount("legacy"))?.plan).toBe("pro");
      await first.close();
      await second.close();

      // Opening again finds the column and changes nothing.
      const again = new SqliteKeyStore(path);
      expect(await again.getCredits("legacy")).toEqual({ period: "2026-10", monthlyUsed: 4, topupBalance: 100, topupTotal: 30 });
      await again.close();
    });
  });
});

describe("SqliteKeyStore's key prefix, a row of keygate_meta beside the pepper check", () => {
  it("needs no schema step: a store at this version records it, and a store that may not migrate opens the file after", async () => {
    await withDatabaseFile("keygate-sqlite-prefix-", async (path) => {
      const store = new SqliteKeyStore(path);
      const check = pepperCheck("pepper-of-at-least-32-characters-0123456");
      expect(await store.claimPepperCheck(check)).toBe(check);
      expect(await store.claimKeyPrefix("acme")).toBe("acme");
      await store.close();
      const db = new DatabaseSync(path, { readOnly: true });
      try {
        expect(db.prepare("SELECT name, value FROM keygate_meta ORDER BY name").all()).toEqual([
          { name: "key_prefix", value: "acme" },
          { name: "pepper_check", value: check },
        ]);
        expect(db.prepare("PRAGMA user_version").get()?.["user_version"]).toBe(SQLITE_SCHEMA_VERSION);
      } finally {
        db.close();
      }
      const unmigrated = new SqliteKeyStore(path, { migrate: false });
      expect(await unmigrated.claimKeyPrefix("kg")).toBe("acme");
      await unmigrated.close();
    });
  });
});

describe("SqliteKeyStore's keyed top-ups", () => {
  const NOW = 1_800_000_000_000;
  const DEFAULTS = { plan: "basic", subscriptionStatus: "active", role: "standard" } as const;
  const rows = (path: string): number => {
    const db = new DatabaseSync(path, { readOnly: true });
    try {
      return Number(db.prepare("SELECT COUNT(*) AS n FROM credit_topups").get()?.["n"]);
    } finally {
      db.close();
    }
  };

  it("happy: a second process with the same key finds the first one's record and adds nothing", async () => {
    await withDatabaseFile("keygate-sqlite-topup-", async (path) => {
      const first = new SqliteKeyStore(path);
      const second = new SqliteKeyStore(path);
      try {
        await first.upsertAccount({ ownerId: "payer" }, DEFAULTS, NOW);
        expect(await first.addCreditsOnce("payer", 100, "order-1", NOW)).toMatchObject({ replayed: false, credits: { topupBalance: 100, topupTotal: 100 } });
        expect(await second.addCreditsOnce("payer", 100, "order-1", NOW + 1)).toMatchObject({ replayed: true, credits: { topupBalance: 100, topupTotal: 100 } });
      } finally {
        await first.close();
        await second.close();
      }
    });
  });

  it("error: the key's record and the credits are one transaction: a record that cannot be written adds no credits", async () => {
    await withDatabaseFile("keygate-sqlite-topup-", async (path) => {
      const store = new SqliteKeyStore(path);
      try {
        await store.upsertAccount({ ownerId: "payer" }, DEFAULTS, NOW);
        const other = new DatabaseSync(path);
        other.exec("CREATE TRIGGER refuse_topup BEFORE INSERT ON credit_topups BEGIN SELECT RAISE(ABORT, 'injected: the record cannot be written'); END");
        await expect(store.addCreditsOnce("payer", 100, "order-1", NOW)).rejects.toThrow("injected: the record cannot be written");
        expect(await store.getCredits("payer")).toEqual({ period: "", monthlyUsed: 0, topupBalance: 0, topupTotal: 0 });
        other.exec("DROP TRIGGER refuse_topup");
        other.close();
        expect(await store.addCreditsOnce("payer", 100, "order-1", NOW + 1)).toMatchObject({ replayed: false, credits: { topupBalance: 100, topupTotal: 100 } });
      } finally {
        await store.close();
      }
    });
  });

  it("happy: records 24 hours old are deleted by later keyed top-ups, at most 64 a call", async () => {
    await withDatabaseFile("keygate-sqlite-topup-", async (path) => {
      const store = new SqliteKeyStore(path);
      try {
        for (let i = 0; i < 100; i++) {
          await store.upsertAccount({ ownerId: `payer-${i}` }, DEFAULTS, NOW);
          await store.addCreditsOnce(`payer-${i}`, 1, "order", NOW);
        }
        expect(rows(path)).toBe(100);
        await store.upsertAccount({ ownerId: "later" }, DEFAULTS, NOW);
        await store.addCreditsOnce("later", 1, "order-a", NOW + TOPUP_KEY_RETENTION_MS);
        expect(rows(path)).toBe(100 - 64 + 1);
        await store.addCreditsOnce("later", 1, "order-b", NOW + TOPUP_KEY_RETENTION_MS);
        expect(rows(path)).toBe(2);
        // A deleted record's key adds again, as an expired one not yet deleted would.
        expect(await store.addCreditsOnce("payer-0", 1, "order", NOW + TOPUP_KEY_RETENTION_MS)).toMatchObject({ replayed: false, credits: { topupTotal: 2 } });
      } finally {
        await store.close();
      }
    });
  });
});

describe("SqliteKeyStore's cold lookup reads its columns checked", () => {
  it("refuses a row keygate did not write (a text created_at), naming the column, and reads a written one whole", async () => {
    await withDatabaseFile("keygate-sqlite-typed-", async (path) => {
      const store = new SqliteKeyStore(path);
      const key = newKeyRecord({ id: "key_01TYPED", hash: "h-typed", ownerId: "typed", name: "typed", mode: "live", start: "kg_live_abcd", last4: "wxyz", createdAtMs: 5 });
      await store.createKey(
        { ...key, scopes: ["read"], metadata: { team: "a" }, rateLimit: { limit: 7, windowSeconds: 30 } },
        { nowMs: 10, maxActiveKeysFor: () => 10, accountDefaults: { plan: "basic", subscriptionStatus: "active", role: "standard" } },
      );
      const found = await store.findSnapshotByHash("h-typed");
      expect(found).toEqual({ key: await store.getKey("key_01TYPED"), account: await store.getAccount("typed") });
      expect(found?.key).toMatchObject({ scopes: ["read"], metadata: { team: "a" }, rateLimit: { limit: 7, windowSeconds: 30 }, createdAtMs: 5, lastUsedAtMs: null });
      expect(found?.account).toMatchObject({ ownerId: "typed", plan: "basic", createdAtMs: 10 });
      expect(await store.findSnapshotByHash("h-none")).toBeNull();

      const other = new DatabaseSync(path);
      other.prepare("UPDATE keys SET created_at = 'soon' WHERE id = 'key_01TYPED'").run();
      other.close();
      await expect(store.findSnapshotByHash("h-typed")).rejects.toThrow("SQLite column created_at: expected integer, found string");
      await store.close();
    });
  });
});

describe("sqliteFileHoldsKeys: whether a data directory that lost its pepper file may be given a new one", () => {
  const schemas = join(import.meta.dirname, "../fixtures/sqlite-schemas");
  const caps = { nowMs: 10, maxActiveKeysFor: () => 10, accountDefaults: { plan: "basic", subscriptionStatus: "active", role: "standard" } } as const;

  it("happy: no file, or a migrated file with no key and no check, holds none (a new pepper is safe), and is not written", async () => {
    await withDatabaseFile("keygate-sqlite-holds-", async (path) => {
      expect(sqliteFileHoldsKeys(path)).toBe(false);
      expect(existsSync(path)).toBe(false);
      await new SqliteKeyStore(path).close();
      expect(sqliteFileHoldsKeys(path)).toBe(false);
    });
  });

  it("error: a file with a key, or with a recorded pepper check, holds keys", async () => {
    await withDatabaseFile("keygate-sqlite-holds-key-", async (path) => {
      const store = new SqliteKeyStore(path);
      await store.createKey(newKeyRecord({ id: "key_01HOLDS", hash: "h-holds", ownerId: "holds", name: "k", mode: "live", start: "kg_live_abcd", last4: "wxyz", createdAtMs: 5 }), caps);
      await store.close();
      expect(sqliteFileHoldsKeys(path)).toBe(true);
    });
    await withDatabaseFile("keygate-sqlite-holds-check-", async (path) => {
      const store = new SqliteKeyStore(path);
      await store.claimPepperCheck(pepperCheck("pepper-of-at-least-32-characters-0123456"));
      await store.close();
      expect(sqliteFileHoldsKeys(path)).toBe(true);
    });
  });

  it("error: a file of an unversioned release with a key holds keys, read as it is (no schema step applied)", async () => {
    await withDatabaseFile("keygate-sqlite-holds-old-", async (path) => {
      const old = new DatabaseSync(path);
      old.exec(readFileSync(join(schemas, "1dffb08.sql"), "utf8"));
      old.prepare("INSERT INTO accounts (owner_id, plan, subscription_status, role, created_at, updated_at) VALUES ('acct_1', 'pro', 'active', 'standard', 1, 2)").run();
      old.close();
      expect(sqliteFileHoldsKeys(path)).toBe(false);
      const again = new DatabaseSync(path);
      again
        .prepare(
          `INSERT INTO keys (id, hash, owner_id, project_id, name, mode, start, last4, scopes, metadata, created_at)
           VALUES ('key_1', 'hash_1', 'acct_1', NULL, 'old key', 'live', 'kg_live_abcd', 'wxyz', '[]', '{}', 3)`,
        )
        .run();
      again.close();
      expect(sqliteFileHoldsKeys(path)).toBe(true);
      const after = new DatabaseSync(path, { readOnly: true });
      try {
        expect(after.prepare("PRAGMA user_version").get()?.["user_version"]).toBe(0);
      } finally {
        after.close();
      }
    });
  });
});
