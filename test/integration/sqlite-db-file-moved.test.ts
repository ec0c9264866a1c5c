import { mkdirSync, mkdtempSync, readdirSync, readlinkSync, realpathSync, renameSync, rmSync, symlinkSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { DatabaseSync } from "node:sqlite";
import { Code } from "@connectrpc/connect";
import { status as GrpcStatus } from "@grpc/grpc-js";
import { afterAll, afterEach, describe, expect, it } from "vitest";
import { adminRefusal, checkInit, checkOutcome, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { until } from "../harness/poll.js";

// keygate.db deleted (or renamed away, or replaced: an operator restoring a backup with `mv`)
// while keygate serves from it: SQLite holds the file it opened, not its name, and goes on
// writing into a file that no name leads to and the next start does not open. KeyAdmin answered
// OK for those writes (a new key's secret, a revoke) and they vanished with the process; /readyz
// stayed 200 and nothing was logged. keygate now looks that the path still names the file it
// opened (as it does for keygate.lock): once it does not, writes are refused UNAVAILABLE with
// nothing written, /readyz answers 503, one error line tells the operator to restart, and a Check
// of a key not cached fails closed (one cached keeps passing).

const dirs: string[] = [];
let kg: TestKeygate | undefined;
afterEach(async () => {
  await kg?.stop().catch(() => null);
  kg = undefined;
});
afterAll(() => {
  for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
});

function tempDir(): string {
  const dir = mkdtempSync(join(tmpdir(), "keygate-db-moved-"));
  dirs.push(dir);
  return dir;
}

const MOVED = "the SQLite database file was deleted or replaced while keygate served from it";

/** The error-level lines that tell of the moved file, as { file, found }. */
function movedLines(k: TestKeygate): Array<{ file?: string; found?: string }> {
  return k.logLines
    .map((line) => JSON.parse(line) as { level?: number; msg?: string; file?: string; found?: string })
    .filter((line) => line.level === 50 && line.msg?.startsWith(MOVED) === true)
    .map(({ file, found }) => ({ file, found }));
}

async function readyz(k: TestKeygate): Promise<number> {
  return (await fetch(`http://127.0.0.1:${k.ports.admin}/readyz`)).status;
}

/** A Check's outcome, or the gRPC status it failed with (a store failure fails closed: UNAVAILABLE). */
async function checkWith(k: TestKeygate, secret: string): Promise<{ status: number; code: string | null } | { grpc: unknown }> {
  return k.check(checkInit({ "x-api-key": secret })).then(checkOutcome, (error: unknown) => ({ grpc: error instanceof Error && "code" in error ? error.code : error }));
}

/**
 * Waits until the store's writing thread has opened the database too (a second descriptor on it
 * in this process): it opens the path on its own, moments after the start, and a file moved
 * before then would be the one it opened. Called before the test opens the file itself: SQLite
 * keeps a closed connection's descriptor open while the process holds locks on the file.
 */
async function writerOpened(dbPath: string): Promise<void> {
  const file = realpathSync(dbPath);
  // The listing's own descriptor is gone by the time it is read: one that cannot be read is not the file.
  const leadsTo = (fd: string): string | null => {
    try {
      return readlinkSync(`/proc/self/fd/${fd}`, { encoding: "utf8" });
    } catch {
      return null;
    }
  };
  await until(() => readdirSync("/proc/self/fd").filter((fd) => leadsTo(fd) === file).length >= 2, 10_000, "the writing thread has opened keygate.db", { intervalMs: 20 });
}

/** A copy of the database as `sqlite3 .backup` or VACUUM INTO makes one, taken while keygate serves. */
function backUp(dbPath: string, to: string): void {
  const db = new DatabaseSync(dbPath, { readOnly: true });
  try {
    db.exec(`VACUUM INTO '${to}'`);
  } finally {
    db.close();
  }
}

describe("embedded keygate: keygate.db deleted or replaced while serving: error", () => {
  it("deleted: writes answer UNAVAILABLE with nothing written, /readyz 503, one error line; a cached key passes, an uncached one fails closed", async () => {
    const dataDir = tempDir();
    const dbPath = join(dataDir, "keygate.db");
    kg = await startKeygate({ dataDir });
    const cached = await kg.admin.createKey({ ownerId: "cached-owner", name: "cached" });
    const cold = await kg.admin.createKey({ ownerId: "cold-owner", name: "cold" });
    expect(await checkWith(kg, cached.secret)).toEqual({ status: 200, code: null });
    expect(await readyz(kg)).toBe(200);
    await writerOpened(dbPath);

    rmSync(dbPath);
    // Before the once-a-second look has run: the write's own look after BEGIN finds it.
    const create = await adminRefusal(kg.admin.createKey({ ownerId: "after", name: "k" }));
    const revoke = await adminRefusal(kg.admin.revokeKey({ id: cached.key?.id ?? "" }));
    expect({ create: create.code, revoke: revoke.code }).toEqual({ create: Code.Unavailable, revoke: Code.Unavailable });
    // The readiness ping's answer stands for a second: wait for the next one.
    await until(async () => (await readyz(kg as TestKeygate)) === 503, 5000, "/readyz 503 after keygate.db was deleted", { intervalMs: 100 });
    expect(await checkWith(kg, cached.secret)).toEqual({ status: 200, code: null });
    expect(await checkWith(kg, cold.secret)).toEqual({ grpc: GrpcStatus.UNAVAILABLE });
    expect(movedLines(kg)).toEqual([{ file: dbPath, found: "nothing" }]);

    // A restart serves from the file now at the path (a new, empty one): ready again.
    await kg.stop({ keepData: true });
    kg = await startKeygate({ dataDir });
    expect(await readyz(kg)).toBe(200);
    expect(await checkWith(kg, cached.secret)).toEqual({ status: 401, code: "UNAUTHENTICATED" });
  }, 60_000);

  it("replaced by a restored backup: a revoke is refused, not made in the file no name leads to; the restart serves the restored file", async () => {
    const dataDir = tempDir();
    const dbPath = join(dataDir, "keygate.db");
    kg = await startKeygate({ dataDir });
    await writerOpened(dbPath);
    const kept = await kg.admin.createKey({ ownerId: "kept-owner", name: "kept" });
    const backup = join(dataDir, "keygate.db.backup");
    backUp(dbPath, backup);
    const later = await kg.admin.createKey({ ownerId: "later-owner", name: "made after the backup" });

    renameSync(backup, dbPath);
    expect((await adminRefusal(kg.admin.revokeKey({ id: kept.key?.id ?? "" }))).code).toBe(Code.Unavailable);
    expect(movedLines(kg)).toEqual([{ file: dbPath, found: "another file" }]);

    await kg.stop({ keepData: true });
    kg = await startKeygate({ dataDir });
    // The revoke was refused, so the key is as the restored file has it: active. The key made
    // after the backup is not in it; keygate never said otherwise of a key it served.
    expect(await checkWith(kg, kept.secret)).toEqual({ status: 200, code: null });
    expect(await checkWith(kg, later.secret)).toEqual({ status: 401, code: "UNAUTHENTICATED" });
  }, 60_000);
});

describe("embedded keygate: keygate's own link at keygate.db", () => {
  it("the file the link leads to is the one compared (followed, as SQLite does): writes go on; that file replaced is found", async () => {
    const dir = tempDir();
    const dataDir = join(dir, "data");
    const volume = join(dir, "volume");
    mkdirSync(dataDir);
    mkdirSync(volume);
    const target = join(volume, "keygate.db");
    symlinkSync(target, join(dataDir, "keygate.db"));
    kg = await startKeygate({ dataDir });
    await writerOpened(target);
    const first = await kg.admin.createKey({ ownerId: "linked-1", name: "one" });
    await kg.admin.createKey({ ownerId: "linked-2", name: "two" });
    expect(await readyz(kg)).toBe(200);
    expect(await checkWith(kg, first.secret)).toEqual({ status: 200, code: null });
    expect(movedLines(kg)).toEqual([]);

    const backup = join(volume, "restored.db");
    backUp(target, backup);
    renameSync(backup, target);
    expect((await adminRefusal(kg.admin.createKey({ ownerId: "linked-3", name: "three" }))).code).toBe(Code.Unavailable);
    expect(movedLines(kg)).toEqual([{ file: join(dataDir, "keygate.db"), found: "another file" }]);
  }, 60_000);
});
