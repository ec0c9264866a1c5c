import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { DatabaseSync } from "node:sqlite";
import { describe, expect, it } from "vitest";
import { pepperCheck } from "../../src/keys/pepper-check.js";
import { SqliteKeyStore, openStoreDatabase, sqliteFileHoldsKeys } from "../../src/store/sqlite.js";
import { TOPUP_KEY_RETENTION_MS, newKeyRecord } from "../../src/store/store.js";
import { SQLITE_SCHEMA_VERSION } from "../../src/store/sqlite-migrations.js";
import { openWriterDatabase } from "../../src/store/sqlite-writer.js";
import { testKeyRecord } from "../harness/records.js";
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

describe("SqliteKeyStore's connections: a KeyAdmin change answered OK is on disk", () => {
  // The value of a PRAGMA's one column (busy_timeout's is named timeout).
  const pragma = (db: DatabaseSync, name: string): unknown => Object.values(db.prepare(`PRAGMA ${name}`).get() ?? {})[0];

  it("happy: the store's connection (every KeyAdmin write) syncs each commit; the writing thread's does not", async () => {
    await withDatabaseFile("keygate-sqlite-sync-", async (path) => {
      // In WAL mode, NORMAL (1) writes a commit to the WAL without fsync: after a power loss or an
      // OS crash a revoke answered OK could be undone (the leaked key works again), a keyed top-up
      // lost with its idempotency record. FULL (2) syncs the WAL before COMMIT returns. The writing
      // thread keeps NORMAL: it may lose the last moments of counts and last-use times (README).
      const store = openStoreDatabase(path, true);
      const writer = openWriterDatabase(path, 5000);
      try {
        expect(pragma(store, "journal_mode")).toBe("wal");
        expect(pragma(store, "synchronous")).toBe(2);
        // A lock held elsewhere fails a statement at once: waiting in SQLite would hold the event loop.
        expect(pragma(store, "busy_timeout")).toBe(0);
        expect(pragma(writer, "synchronous")).toBe(1);
        expect(pragma(writer, "busy_timeout")).toBe(5000);
      } finally {
        writer.close();
        store.close();
      }
    });
  });
});

describe("SqliteKeyStore's writes while another connection holds the write lock", () => {
  const NOW = 1_800_000_000_000;
  const DEFAULTS = { plan: "basic", subscriptionStatus: "active", role: "standard" } as const;
  const caps = { nowMs: NOW, maxActiveKeysFor: () => 10, accountDefaults: DEFAULTS };

  it("happy: every write waits off the event loop and is made once, after the release", async () => {
    await withDatabaseFile("keygate-sqlite-locked-", async (path) => {
      // No writing thread: write-behind batches are written on the store's connection too.
      const store = new SqliteKeyStore(path);
      const holder = new DatabaseSync(path, { timeout: 0 });
      try {
        await store.upsertAccount({ ownerId: "payer" }, DEFAULTS, NOW);
        const [renamed, revoked, rotated] = [testKeyRecord("payer", NOW), testKeyRecord("payer", NOW), testKeyRecord("payer", NOW)];
        for (const key of [renamed, revoked, rotated]) await store.createKey(key, caps);
        const added = testKeyRecord("other", NOW);
        const next = testKeyRecord("payer", NOW);
        const audit = { id: "aud_locked", atMs: NOW, actor: "test", action: "test", keyId: null, ownerId: "payer", changes: {}, source: "test" };

        holder.exec("BEGIN IMMEDIATE");
        let settled = 0;
        const writes = [
          store.upsertAccount({ ownerId: "other", plan: "pro" }, DEFAULTS, NOW),
          store.createKey(added, caps),
          store.updateKey(renamed.id, { name: "renamed" }),
          store.redisableKey(renamed.id, NOW),
          store.revokeKey(revoked.id, NOW, "leaked"),
          store.rotateKey(rotated.id, next, NOW + 60_000, NOW),
          store.addCredits("payer", 100),
          store.addCreditsOnce("payer", 50, "order-1", NOW),
          store.appendAudit(audit),
          store.touchLastUsed(new Map([[renamed.id, NOW + 5]])),
          store.applyUsage([{ ownerId: "payer", keyId: renamed.id, day: "2027-01-15", outcome: "ALLOWED", count: 3, credits: 0 }], []),
          store.claimKeyPrefix("kg"),
        ].map((write) => write.finally(() => (settled += 1)));
        // The event loop goes on (this timer fires) while every write waits for the lock.
        await new Promise((resolve) => setTimeout(resolve, 30));
        expect(settled).toBe(0);
        holder.exec("COMMIT");
        await Promise.all(writes);

        expect((await store.getAccount("other"))?.plan).toBe("pro");
        expect((await store.getKey(added.id))?.ownerId).toBe("other");
        expect(await store.getKey(renamed.id)).toMatchObject({ name: "renamed", disabledAtMs: NOW, lastUsedAtMs: NOW + 5 });
        expect(await store.getKey(revoked.id)).toMatchObject({ revokedAtMs: NOW, revokeReason: "leaked" });
        expect(await store.getKey(rotated.id)).toMatchObject({ rotatedToId: next.id, graceEndsAtMs: NOW + 60_000 });
        // Each transaction ran once: a top-up run twice would show here.
        expect(await store.getCredits("payer")).toMatchObject({ topupBalance: 150, topupTotal: 150 });
        expect(await store.listAudit({ limit: 10 })).toEqual([audit]);
        expect(await store.listUsage("payer", "2027-01-15", "2027-01-15")).toEqual([{ keyId: renamed.id, day: "2027-01-15", outcome: "ALLOWED", count: 3, credits: 0 }]);
        expect(await store.claimKeyPrefix("other")).toBe("kg");
      } finally {
        holder.close();
        await store.close();
      }
    });
  });

  it("happy: a key lookup and the store's reads are answered while the lock is held", async () => {
    await withDatabaseFile("keygate-sqlite-locked-read-", async (path) => {
      const store = new SqliteKeyStore(path);
      const holder = new DatabaseSync(path, { timeout: 0 });
      try {
        const key = testKeyRecord("reader", NOW);
        await store.createKey(key, caps);
        holder.exec("BEGIN IMMEDIATE");
        holder.prepare("UPDATE accounts SET plan = 'uncommitted' WHERE owner_id = ?").run("reader");
        // WAL readers take no lock a writer holds: the Check's cold read does not wait, nor fail.
        expect(store.findSnapshotByHashNow(key.hash)?.account.plan).toBe("basic");
        expect((await store.listKeys({ ownerId: "reader", includeRevoked: false, nowMs: NOW, limit: 10 })).map((k) => k.id)).toEqual([key.id]);
        await store.ping();
        holder.exec("ROLLBACK");
      } finally {
        holder.close();
        await store.close();
      }
    });
  });
});
