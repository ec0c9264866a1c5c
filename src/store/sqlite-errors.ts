export { SQLITE_BUSY } from "./sqlite-db.js";

/** SQLite's primary result codes that keygate tells apart (node:sqlite's `errcode`), with SQLITE_BUSY. */
export const SQLITE_LOCKED = 6;
export const SQLITE_CORRUPT = 11;
export const SQLITE_NOTADB = 26;

/** The primary result code of a node:sqlite error (extended codes folded), or null for any other error. */
export function sqliteErrorCode(error: unknown): number | null {
  if (!(error instanceof Error) || !("code" in error) || error.code !== "ERR_SQLITE_ERROR") return null;
  return "errcode" in error && typeof error.errcode === "number" ? error.errcode & 0xff : null;
}

/**
 * A node:sqlite error as `<path>: <message>`, so a start that fails on a damaged file ("file is
 * not a database") says which file; any other error as it is (keygate's own, such as
 * NewerSchemaError, already say what to do, and file system errors name their path).
 */
export function namingFile(path: string, error: unknown): unknown {
  if (sqliteErrorCode(error) === null || !(error instanceof Error) || error.message.startsWith(`${path}: `)) return error;
  return new Error(`${path}: ${error.message}`, { cause: error });
}
