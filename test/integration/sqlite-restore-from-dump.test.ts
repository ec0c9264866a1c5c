import { execFileSync, spawnSync } from "node:child_process";
import { renameSync, rmSync } from "node:fs";
import { join } from "node:path";
import { DatabaseSync } from "node:sqlite";
import { afterAll, afterEach, describe, expect, it } from "vitest";
import { checkInit, checkOutcome, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

// A backup kept as SQL text (`sqlite3 data/keygate.db .dump > backup.sql`, a common way to back
// up SQLite) and restored with `sqlite3 keygate.db < backup.sql`, keygate stopped. .dump does not
// carry PRAGMA user_version (the schema version keygate records), so the restored file says 0
// while it holds every table and column; the start applied step 2 again (ALTER TABLE keys ADD
// COLUMN disabled_at) and failed: "data/keygate.db: duplicate column name: disabled_at". Every
// schema step is now idempotent (test/unit/sqlite-migrations.test.ts covers the steps alone).

const SQLITE3_SHELL = spawnSync("sqlite3", ["-version"]).status === 0;

const dirs: string[] = [];
let kg: TestKeygate | undefined;
afterEach(async () => {
  await kg?.stop().catch(() => undefined);
  kg = undefined;
});
afterAll(() => {
  for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
});

/** What `sqlite3 source .dump > dump.sql` then `sqlite3 target < dump.sql` make. */
function dumpAndRestore(source: string, target: string): void {
  const sql = execFileSync("sqlite3", [source, ".dump"]).toString();
  const restored = new DatabaseSync(target);
  try {
    restored.exec(sql);
    expect(restored.prepare("PRAGMA user_version").get()).toEqual({ user_version: 0 });
  } finally {
    restored.close();
  }
}

describe("embedded restore from an SQL dump", () => {
  // Needs the sqlite3 shell, whose .dump is what operators run.
  it.skipIf(!SQLITE3_SHELL)("a keygate.db restored from sqlite3 .dump starts and serves its keys", async () => {
    kg = await startKeygate();
    const dir = kg.dataDir;
    dirs.push(dir);
    const key = await kg.admin.createKey({ ownerId: "acme", name: "k" });
    const disabled = await kg.admin.createKey({ ownerId: "globex", name: "disabled" });
    await kg.admin.disableKey({ id: disabled.key?.id ?? "", reason: "unpaid" });
    await kg.stop({ keepData: true });
    kg = undefined;
    const db = join(dir, "keygate.db");
    dumpAndRestore(db, join(dir, "restored.db"));
    renameSync(join(dir, "restored.db"), db);
    kg = await startKeygate({ dataDir: dir });
    expect(checkOutcome(await kg.check(checkInit({ "x-api-key": key.secret })))).toEqual({ status: 200, code: null });
    expect(checkOutcome(await kg.check(checkInit({ "x-api-key": disabled.secret })))).toEqual({ status: 401, code: "KEY_DISABLED" });
  }, 60_000);
});
