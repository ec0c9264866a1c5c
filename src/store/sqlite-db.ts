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

function isBusy(error: unknown): error is Error {
  return error instanceof Error && "errcode" in error && typeof error.errcode === "number" && (error.errcode & 0xff) === SQLITE_BUSY;
}

/**
 * Runs `fn` in one IMMEDIATE transaction (the write lock is taken at BEGIN, so a read-then-write
 * inside cannot lose to another process): committed when it returns, rolled back when it throws.
 * A write lock held elsewhere fails it before `fn` runs, with WriteLockBusyError; an error from
 * `fn` or COMMIT (the lock held, neither waits for one) is thrown as it is.
 */
export function immediateTransaction<T>(db: DatabaseSync, fn: () => T): T {
  // Nesting would need savepoints; no caller nests, so one would be a bug.
  if (db.isTransaction) throw new Error("SQLite: a transaction is already open on this connection");
  try {
    db.exec("BEGIN IMMEDIATE");
  } catch (error) {
    if (isBusy(error) && !db.isTransaction) throw new WriteLockBusyError(error.message, { cause: error });
    throw error;
  }
  try {
    const result = fn();
    db.exec("COMMIT");
    return result;
  } catch (error) {
    // SQLite has already rolled back after some errors (SQLITE_FULL, SQLITE_IOERR, ...).
    if (db.isTransaction) db.exec("ROLLBACK");
    throw error;
  }
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
