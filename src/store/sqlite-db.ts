import type { DatabaseSync, SQLOutputValue } from "node:sqlite";

// The embedded store runs on Node's built-in node:sqlite (a release candidate, without the
// ExperimentalWarning, from Node 24.15 on; see package.json's engines). This module holds what
// better-sqlite3 gave the store and node:sqlite leaves out: transactions and typed column reads.

/** A row as node:sqlite returns it: column name to value. */
export type SqliteRow = Record<string, SQLOutputValue>;

/** SQLite's extended result codes for a violated UNIQUE or PRIMARY KEY constraint (node:sqlite's `errcode`). */
const SQLITE_CONSTRAINT_PRIMARYKEY = 1555;
const SQLITE_CONSTRAINT_UNIQUE = 2067;

/** Whether `error` is SQLite refusing a row whose primary key or unique column is taken. */
export function isUniqueViolation(error: unknown): boolean {
  return error instanceof Error && "errcode" in error && (error.errcode === SQLITE_CONSTRAINT_UNIQUE || error.errcode === SQLITE_CONSTRAINT_PRIMARYKEY);
}

/**
 * SQLite's primary result code for a lock another connection holds. Here rather than with the
 * other codes (sqlite-errors.ts, which re-exports it): the writing thread loads this module as it is.
 */
export const SQLITE_BUSY = 5;

/**
 * BEGIN IMMEDIATE met SQLITE_BUSY (another connection holds the write lock, and the connection's
 * busy timeout ran out): the transaction made nothing, so it may be run again whole.
 */
export class WriteLockBusyError extends Error {
  override readonly name = "WriteLockBusyError";
}

/** The result code of a node:sqlite error (`errcode`, extended), or null for any other error. */
function errcodeOf(error: unknown): number | null {
  return error instanceof Error && "errcode" in error && typeof error.errcode === "number" ? error.errcode : null;
}

/** Its primary result code (extended codes folded). */
function primaryCode(error: unknown): number | null {
  const errcode = errcodeOf(error);
  return errcode === null ? null : errcode & 0xff;
}

function isBusy(error: unknown): error is Error {
  return error instanceof Error && primaryCode(error) === SQLITE_BUSY;
}

/** SQLite's primary result codes for a file system that refused a write (node:sqlite's `errcode`, folded). */
const SQLITE_READONLY = 8;
const SQLITE_IOERR = 10;
const SQLITE_FULL = 13;
const SQLITE_CANTOPEN = 14;

/** What each of those codes says of the database file, for a message that names the cause. */
const REFUSED_BY_FILE_SYSTEM: ReadonlyMap<number, string> = new Map([
  [SQLITE_FULL, "its volume is full"],
  [SQLITE_IOERR, "a disk I/O error"],
  [SQLITE_READONLY, "the file or its volume is read-only"],
  [SQLITE_CANTOPEN, "the file or its -wal or -shm could not be opened"],
]);

/** What the file system did, when `error` is SQLite reporting one of those refusals; else null. */
export function fileSystemRefusal(error: unknown): string | null {
  const code = primaryCode(error);
  return (code === null ? undefined : REFUSED_BY_FILE_SYSTEM.get(code)) ?? null;
}

/**
 * A write transaction the file system refused (SQLITE_FULL, IOERR, READONLY, CANTOPEN) at a point
 * where none of it can have been committed: see immediateTransaction. It keeps SQLite's
 * message and the shape of node:sqlite's error (`code`, `errcode`), so a failed start still names
 * the file (namingFile); `reason` says what the file system did, without anything of the rows.
 */
export class NothingWrittenError extends Error {
  override readonly name = "NothingWrittenError";
  readonly code = "ERR_SQLITE_ERROR";
  readonly errcode: number;
  readonly reason: string;

  // No parameter properties in this module: node's type stripping runs it from src/ and refuses them.
  constructor(error: Error, errcode: number, reason: string) {
    super(error.message, { cause: error });
    this.errcode = errcode;
    this.reason = reason;
  }
}

/** `error` as NothingWrittenError when it is one of the file system's refusals, else as it is. */
function nothingWritten(error: unknown): unknown {
  const errcode = errcodeOf(error);
  const reason = fileSystemRefusal(error);
  return errcode === null || reason === null || !(error instanceof Error) ? error : new NothingWrittenError(error, errcode, reason);
}

/**
 * Runs `fn` in one IMMEDIATE transaction (the write lock is taken at BEGIN, so a read-then-write
 * inside cannot lose to another process): committed when it returns, rolled back when it throws.
 * A write lock held elsewhere fails it before `fn` runs, with WriteLockBusyError.
 *
 * The file system refusing a write (a full volume, an I/O error, a read-only remount) fails it
 * with NothingWrittenError where nothing can have been committed: at BEGIN; in `fn`, since a WAL
 * transaction commits only when COMMIT writes the frame that carries its commit mark (pages
 * spilled before carry none, and the rollback drops them); and SQLITE_FULL at COMMIT, a frame
 * write refused for space: the commit frame is the last one written, and with powersafe
 * overwrite (SQLite's default on Unix, kept by node's build) no padding frame follows it. Any
 * other failure of COMMIT is thrown as it is: an I/O error there may come after the commit frame
 * was written (its fsync, the wal-index after it), and a restart may then find the change.
 */
export function immediateTransaction<T>(db: DatabaseSync, fn: () => T): T {
  // Nesting would need savepoints; no caller nests, so one would be a bug.
  if (db.isTransaction) throw new Error("SQLite: a transaction is already open on this connection");
  try {
    db.exec("BEGIN IMMEDIATE");
  } catch (error) {
    if (isBusy(error) && !db.isTransaction) throw new WriteLockBusyError(error.message, { cause: error });
    if (!db.isTransaction) throw nothingWritten(error);
    throw error;
  }
  let result: T;
  try {
    result = fn();
  } catch (error) {
    // SQLite has already rolled back after some errors (SQLITE_FULL, SQLITE_IOERR, ...).
    if (db.isTransaction) db.exec("ROLLBACK");
    throw nothingWritten(error);
  }
  try {
    db.exec("COMMIT");
  } catch (error) {
    if (db.isTransaction) db.exec("ROLLBACK");
    throw primaryCode(error) === SQLITE_FULL ? nothingWritten(error) : error;
  }
  return result;
}

/** The schema version a database records (PRAGMA user_version). */
export function schemaVersion(db: DatabaseSync): number {
  return integer(db.prepare("PRAGMA user_version").get() ?? {}, "user_version");
}

function wrongType(column: string, expected: string, value: SQLOutputValue | undefined): Error {
  return new Error(`SQLite column ${column}: expected ${expected}, found ${value === null ? "NULL" : typeof value}`);
}

/** A row read as an array (StatementSync.setReturnArrays): the values in the statement's column order. */
export type SqliteArrayRow = readonly SQLOutputValue[];

/** A TEXT value that is never NULL; `column` names it in the error. */
export function asText(value: SQLOutputValue | undefined, column: string): string {
  if (typeof value !== "string") throw wrongType(column, "text", value);
  return value;
}

/** A TEXT value that may be NULL. */
export function asTextOrNull(value: SQLOutputValue | undefined, column: string): string | null {
  if (value === null) return null;
  if (typeof value !== "string") throw wrongType(column, "text or NULL", value);
  return value;
}

/** An INTEGER value that is never NULL (node:sqlite throws for one beyond Number.MAX_SAFE_INTEGER). */
export function asInteger(value: SQLOutputValue | undefined, column: string): number {
  if (typeof value !== "number") throw wrongType(column, "integer", value);
  return value;
}

/** An INTEGER value that may be NULL. */
export function asIntegerOrNull(value: SQLOutputValue | undefined, column: string): number | null {
  if (value === null) return null;
  if (typeof value !== "number") throw wrongType(column, "integer or NULL", value);
  return value;
}

/** A TEXT column that is never NULL. */
export function text(row: SqliteRow, column: string): string {
  return asText(row[column], column);
}

/** A TEXT column that may be NULL. */
export function textOrNull(row: SqliteRow, column: string): string | null {
  return asTextOrNull(row[column], column);
}

/** An INTEGER column that is never NULL. */
export function integer(row: SqliteRow, column: string): number {
  return asInteger(row[column], column);
}

/** An INTEGER column that may be NULL. */
export function integerOrNull(row: SqliteRow, column: string): number | null {
  return asIntegerOrNull(row[column], column);
}
