import { existsSync, mkdtempSync, renameSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { DatabaseSync } from "node:sqlite";
import { afterAll, describe, expect, it } from "vitest";
import { SqliteKeyStore } from "../../src/store/sqlite.js";
import type { AuditRecord } from "../../src/store/store.js";

// README, Backups: a keygate.db replaced (`mv backup.db keygate.db`) while keygate runs, then a
// clean stop: the stop empties the WAL of the file keygate opened, which the next start would
// otherwise apply to the restored file. close() emptied it only when the move was already noticed
// (the once-a-second look, or a write); a stop within that second with no write in between (an
// idle keygate, `mv backup.db keygate.db && systemctl restart keygate`) left the old file's WAL at
// the path, and the next open read its pages over the restored backup (rows it never had, and a
// damaged b-tree). close() now looks once more.

const dirs: string[] = [];
afterAll(() => {
  for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
});

function audit(i: number): AuditRecord {
  return { id: `evt_${String(i).padStart(8, "0")}`, atMs: 1_700_000_000_000 + i, actor: "tok", action: "key.create", keyId: `key_${i}`, ownerId: `owner-${i % 7}`, changes: { pad: "x".repeat(200) }, source: "127.0.0.1" };
}

describe("SQLite store: keygate.db replaced, then closed before the move was noticed", () => {
  it("close() leaves no WAL of the file it opened at the path: the restored backup opens as it was backed up", async () => {
    const dir = mkdtempSync(join(tmpdir(), "keygate-close-after-move-"));
    dirs.push(dir);
    const dbPath = join(dir, "keygate.db");
    const store = new SqliteKeyStore(dbPath);
    for (let i = 0; i < 200; i++) await store.appendAudit(audit(i));
    const backup = join(dir, "backup.db");
    const reader = new DatabaseSync(dbPath, { readOnly: true });
    reader.exec(`VACUUM INTO '${backup}'`);
    reader.close();
    // Made after the backup: in the WAL of the file keygate opened, not in the backup.
    for (let i = 200; i < 400; i++) await store.appendAudit(audit(i));

    renameSync(backup, dbPath);
    await store.close();

    const walSize = existsSync(`${dbPath}-wal`) ? statSync(`${dbPath}-wal`).size : 0;
    const restored = new DatabaseSync(dbPath);
    let seen: { rows: unknown; integrity: unknown };
    try {
      seen = {
        rows: restored.prepare("SELECT count(*) AS n FROM audit").get()?.["n"],
        integrity: restored.prepare("PRAGMA integrity_check").get()?.["integrity_check"],
      };
    } catch (error) {
      seen = { rows: String(error), integrity: null };
    } finally {
      restored.close();
    }
    expect({ walSize, ...seen }).toEqual({ walSize: 0, rows: 200, integrity: "ok" });
  });
});
