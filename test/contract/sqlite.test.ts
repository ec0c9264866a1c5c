import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { DatabaseSync } from "node:sqlite";
import { describe, expect, it } from "vitest";
import { SqliteKeyStore } from "../../src/store/sqlite.js";
import { TOPUP_KEY_RETENTION_MS, newKeyRecord } from "../../src/store/store.js";
import { runKeyStoreContract } from "./key-store.contract.js";

runKeyStoreContract("sqlite", async () => {
  const dir = mkdtempSync(join(tmpdir(), "keygate-sqlite-"));
  const store = new SqliteKeyStore(join(dir, "keygate.db"));
  return {
    store,
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
