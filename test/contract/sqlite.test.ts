import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { DatabaseSync } from "node:sqlite";
import { describe, expect, it } from "vitest";
import { SqliteKeyStore } from "../../src/store/sqlite.js";
import { newKeyRecord } from "../../src/store/store.js";
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
