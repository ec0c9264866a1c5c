import { SCOPE_NAME_PATTERN } from "../config.js";
import type { KeyRateLimit } from "./store.js";

// Key fields a Check decides by, checked as each store reads them. A value keygate never writes
// (a manual edit, another tool, a MongoDB $push of an array without $each) fails the read, so the
// Check answers UNAVAILABLE instead of deciding by it. The error names the store, the key and the
// field, never the value: a stored value may be anything, a secret included.

/** A stored key field holds a value keygate never writes. */
export class StoredValueError extends Error {
  override readonly name = "StoredValueError";
}

/** Where a value was read, for the error: the store ("SQLite", "MongoDB") and the key's id. */
export interface StoredAt {
  store: string;
  keyId: string;
}

function invalid(at: StoredAt, field: string, expected: string): StoredValueError {
  return new StoredValueError(`${at.store} key ${at.keyId}: the stored ${field} field is not ${expected}`);
}

const isScopeName = (value: unknown): value is string => typeof value === "string" && SCOPE_NAME_PATTERN.test(value);

/**
 * A key's scopes: a list of scope names, as config.ts names them (never a comma, never a list
 * inside the list), so no stored list can read as another key's.
 */
export function storedScopes(value: unknown, at: StoredAt): string[] {
  if (!Array.isArray(value) || !value.every(isScopeName)) throw invalid(at, "scopes", "a list of scope names");
  return value;
}

const isCount = (value: unknown): value is number => typeof value === "number" && Number.isSafeInteger(value) && value > 0;

/**
 * A key's own rate limit: null (or absent) for none, else an object with a whole number above 0
 * in `limit` and in the window's field, spelled as the store writes it (SQLite's JSON
 * `windowSeconds`, MongoDB's `window_seconds`). A window under another name would otherwise read
 * as no window, and a limiter with no window lets everything through.
 */
export function storedRateLimit(value: unknown, windowField: "windowSeconds" | "window_seconds", at: StoredAt): KeyRateLimit | null {
  if (value === null || value === undefined) return null;
  if (typeof value === "object" && !Array.isArray(value)) {
    const limit: unknown = Reflect.get(value, "limit");
    const windowSeconds: unknown = Reflect.get(value, windowField);
    if (isCount(limit) && isCount(windowSeconds)) return { limit, windowSeconds };
  }
  throw invalid(at, "rate_limit", `null or { limit, ${windowField} } in whole numbers above 0`);
}

/**
 * A JSON column (SQLite) parsed. The parser's own error is left out: it quotes the text it
 * stopped at.
 */
export function storedJson(text: string, field: string, at: StoredAt): unknown {
  try {
    return JSON.parse(text);
  } catch {
    throw invalid(at, field, "JSON");
  }
}
