import type { DatabaseSync } from "node:sqlite";
import { describe, expect, it } from "vitest";
import { NothingWrittenError, immediateTransaction } from "../../src/store/sqlite-db.js";
import { namingFile } from "../../src/store/sqlite-errors.js";

// A write the file system refuses (a full volume, an I/O error, a read-only remount) is answered
// UNAVAILABLE, retryable, and when SQLite cannot have committed any of it the store says
// "nothing was written" (NothingWrittenError, then StoreBusyError), so KeyAdmin logs no audit
// record as of unknown outcome. That holds before COMMIT and for SQLITE_FULL at COMMIT; an I/O
// error at COMMIT may come after the commit frame was written, so it stays a failure whose outcome
// is unknown. A real volume gives SQLITE_FULL (test/integration/sqlite-full-disk-admin.test.ts);
// the other codes, and the point they come at, are given here by a connection that fails on cue.

/** An error as node:sqlite throws one. */
function sqliteError(message: string, errcode: number): Error {
  return Object.assign(new Error(message), { code: "ERR_SQLITE_ERROR", errcode, errstr: message });
}

const FULL = sqliteError("database or disk is full", 13);
const IOERR_FSYNC = sqliteError("disk I/O error", 1034);
const CANTOPEN = sqliteError("unable to open database file", 14);
const CONSTRAINT_UNIQUE = sqliteError("UNIQUE constraint failed: keys.hash", 2067);

/**
 * A connection whose `failing` statement throws `error`; SQLite's own rollback after such an error
 * (the transaction ends with it) is what a failed COMMIT does. `executed` lists what was run.
 */
function connection(failing: string | null, error: Error): { db: DatabaseSync; executed: string[] } {
  const executed: string[] = [];
  const fake = {
    isTransaction: false,
    exec(sql: string): void {
      executed.push(sql);
      if (sql === failing) {
        if (sql === "COMMIT") fake.isTransaction = false;
        throw error;
      }
      fake.isTransaction = sql === "BEGIN IMMEDIATE";
    },
  };
  // Only exec and isTransaction are used by immediateTransaction.
  return { db: fake as unknown as DatabaseSync, executed };
}

/** What immediateTransaction threw (or "returned"), and what it ran. */
function outcome(failing: string | null, error: Error, fn: () => void = () => undefined): { thrown: unknown; executed: string[] } {
  const { db, executed } = connection(failing, error);
  try {
    immediateTransaction(db, fn);
    return { thrown: "returned", executed };
  } catch (thrown) {
    return { thrown, executed };
  }
}

describe("immediateTransaction: the file system refusing a write: error", () => {
  it("SQLITE_FULL in a statement: rolled back, NothingWrittenError naming the cause, SQLite's message and code kept", () => {
    const { thrown, executed } = outcome(null, FULL, () => {
      throw FULL;
    });
    expect(executed).toEqual(["BEGIN IMMEDIATE", "ROLLBACK"]);
    expect(thrown).toBeInstanceOf(NothingWrittenError);
    expect(thrown).toMatchObject({ message: "database or disk is full", reason: "its volume is full", code: "ERR_SQLITE_ERROR", errcode: 13, cause: FULL });
  });

  it("SQLITE_FULL at COMMIT (the commit frame not written): NothingWrittenError", () => {
    const { thrown, executed } = outcome("COMMIT", FULL);
    expect(executed).toEqual(["BEGIN IMMEDIATE", "COMMIT"]);
    expect(thrown).toBeInstanceOf(NothingWrittenError);
  });

  it("an I/O error at COMMIT (its fsync, after the commit frame): thrown as it is, its outcome unknown", () => {
    expect(outcome("COMMIT", IOERR_FSYNC).thrown).toBe(IOERR_FSYNC);
  });

  it("an I/O error in a statement, before COMMIT: NothingWrittenError", () => {
    const { thrown } = outcome(null, IOERR_FSYNC, () => {
      throw IOERR_FSYNC;
    });
    expect(thrown).toMatchObject({ name: "NothingWrittenError", reason: "a disk I/O error", errcode: 1034 });
  });

  it("SQLITE_CANTOPEN at BEGIN: NothingWrittenError, nothing run", () => {
    const { thrown, executed } = outcome("BEGIN IMMEDIATE", CANTOPEN);
    expect(executed).toEqual(["BEGIN IMMEDIATE"]);
    expect(thrown).toMatchObject({ name: "NothingWrittenError", reason: "the file or its -wal or -shm could not be opened" });
  });

  it("a start that fails so still names the file", () => {
    const { thrown } = outcome(null, FULL, () => {
      throw FULL;
    });
    expect(namingFile("/data/keygate.db", thrown)).toMatchObject({ message: "/data/keygate.db: database or disk is full" });
  });
});

describe("immediateTransaction: failures that are not the file system's: error", () => {
  it("a constraint error and keygate's own errors are thrown as they are", () => {
    const refused = new Error("plan cap");
    expect(outcome(null, CONSTRAINT_UNIQUE, () => {
      throw CONSTRAINT_UNIQUE;
    }).thrown).toBe(CONSTRAINT_UNIQUE);
    expect(outcome(null, refused, () => {
      throw refused;
    }).thrown).toBe(refused);
  });
});
