import { spawn } from "node:child_process";
import type { ChildProcess } from "node:child_process";
import { once } from "node:events";
import { readFileSync, renameSync, rmSync } from "node:fs";
import { join } from "node:path";
import { DatabaseSync } from "node:sqlite";
import { afterAll, afterEach, describe, expect, it } from "vitest";
import { checkInit, checkOutcome, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { until } from "../harness/poll.js";

// README, Backups: the restore (stop keygate with SIGTERM, `mv backup.db keygate.db`, start it)
// while another process still has keygate.db open (an operator's idle `sqlite3 data/keygate.db`
// session in another terminal, a metrics exporter). SQLite's close checkpoints the WAL and deletes
// it only as the file's last connection across all processes, and keygate emptied it itself only for a
// file it found moved: the stop's last frames (the keys made after the backup, or the final
// flush's usage) stayed in keygate.db-wal, and the next start applied them to the restored file.
// Keys made after the backup were accepted, and the restored file failed its integrity check. The
// stop now empties the WAL itself (a TRUNCATE checkpoint) whatever else has the file open.

const dirs: string[] = [];
let kg: TestKeygate | undefined;
const sessions: ChildProcess[] = [];
afterEach(async () => {
  for (const s of sessions.splice(0)) s.kill("SIGKILL");
  await kg?.stop().catch(() => undefined);
  kg = undefined;
});
afterAll(() => {
  for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
});

/** A session on the file as `sqlite3 data/keygate.db` leaves it after one SELECT: open, in no transaction. */
async function idleSession(dbPath: string): Promise<void> {
  const script = `
    const { DatabaseSync } = require("node:sqlite");
    const db = new DatabaseSync(${JSON.stringify(dbPath)}, { timeout: 5000 });
    db.exec("SELECT count(*) FROM keys");
    process.stdout.write("open\\n");
    process.stdin.once("data", () => { db.close(); process.exit(0); });
  `;
  const child = spawn(process.execPath, ["-e", script], { stdio: ["pipe", "pipe", "inherit"] });
  sessions.push(child);
  const [chunk] = (await once(child.stdout, "data")) as [Buffer];
  expect(chunk.toString()).toBe("open\n");
}

async function checkWith(k: TestKeygate, secret: string): Promise<unknown> {
  return k.check(checkInit({ "x-api-key": secret })).then(checkOutcome, (error: unknown) => ({ grpc: error instanceof Error && "code" in error ? error.code : String(error) }));
}

function integrity(db: string): unknown {
  const check = new DatabaseSync(db, { readOnly: true });
  try {
    return check.prepare("PRAGMA integrity_check").all();
  } finally {
    check.close();
  }
}

const LAST_LATE_NAME = "after the backup 19";

/**
 * The README's restore with an idle session open on keygate.db: a backup, 20 keys made after it,
 * a Check of each right before SIGTERM (the stop's final flush writes their usage and last-use
 * times), the backup moved in, and a start. `checkpointedFirst`: the writing thread's checkpoints
 * have copied the keys into keygate.db before the stop (else they are only in its WAL).
 */
async function restoreWithSessionOpen(checkpointedFirst: boolean): Promise<{ kept: string; late: string; db: string }> {
  kg = await startKeygate();
  const dir = kg.dataDir;
  dirs.push(dir);
  const db = join(dir, "keygate.db");
  const kept = await kg.admin.createKey({ ownerId: "kept", name: "in the backup" });
  const backup = new DatabaseSync(db, { readOnly: true });
  backup.exec(`VACUUM INTO '${join(dir, "backup.db")}'`);
  backup.close();
  const late: string[] = [];
  for (let i = 0; i < 20; i++) late.push((await kg.admin.createKey({ ownerId: `late${i}`, name: `after the backup ${i}` })).secret);
  await idleSession(db);
  if (checkpointedFirst) {
    await until(() => readFileSync(db).includes(Buffer.from(LAST_LATE_NAME)), 10_000, "the late keys were checkpointed into keygate.db", { intervalMs: 100 });
  }
  for (const secret of late) expect(await checkWith(kg, secret)).toEqual({ status: 200, code: null });
  await kg.stop({ keepData: true });
  renameSync(join(dir, "backup.db"), db);
  kg = await startKeygate({ dataDir: dir });
  return { kept: kept.secret, late: late[0] ?? "", db };
}

describe("embedded restore with another connection open on keygate.db", () => {
  it("keys made after the backup, still only in the WAL at the stop, are not accepted after the restore, and the file is undamaged", async () => {
    const { kept, late, db } = await restoreWithSessionOpen(false);
    const k = kg as TestKeygate;
    expect(await checkWith(k, late)).toEqual({ status: 401, code: "UNAUTHENTICATED" });
    expect(await checkWith(k, kept)).toEqual({ status: 200, code: null });
    await k.stop({ keepData: true });
    kg = undefined;
    expect(integrity(db)).toEqual([{ integrity_check: "ok" }]);
  }, 60_000);

  it("keys made after the backup and checkpointed before the stop are not accepted after the restore, and the file is undamaged", async () => {
    const { kept, late, db } = await restoreWithSessionOpen(true);
    const k = kg as TestKeygate;
    expect(await checkWith(k, kept)).toEqual({ status: 200, code: null });
    expect(await checkWith(k, late)).toEqual({ status: 401, code: "UNAUTHENTICATED" });
    await k.stop({ keepData: true });
    kg = undefined;
    expect(integrity(db)).toEqual([{ integrity_check: "ok" }]);
  }, 60_000);
});
