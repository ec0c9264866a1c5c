import { SCOPE_NAME_PATTERN } from "../config.js";
import type { KeyRateLimit } from "./store.js";

// Key and account fields a Check decides by, checked as each store reads them. A value keygate
// never writes (a manual edit, another tool, a MongoDB $push of an array without $each) fails the
// read, so the Check answers UNAVAILABLE instead of deciding by it. The error names the store, the
// key (or account) and the field, never the value: a stored value may be anything, a secret included.

/** A stored key or account field holds a value keygate never writes. */
export class StoredValueError extends Error {
  override readonly name = "StoredValueError";
}

/** Where a value was read, for the error: the store ("SQLite", "MongoDB") and the key's id, or the account's owner id. */
export type StoredAt = { store: string; keyId: string } | { store: string; ownerId: string };

function invalid(at: StoredAt, field: string, expected: string): StoredValueError {
  const record = "keyId" in at ? `key ${at.keyId}` : `account ${at.ownerId}`;
  return new StoredValueError(`${at.store} ${record}: the stored ${field} field is not ${expected}`);
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

// A time that is not a finite number is neither null nor a time: a NaN or Infinity revoked_at
// reads as revoked on the replica that read it (it is not null), then JSON writes it into L2 as
// null, not revoked, for every other replica; a NaN expires_at never expires (nowMs >= NaN).

const JS_DATE = "a date within 100,000,000 days of 1970";

/**
 * A time column (SQLite, milliseconds since 1970), null where the column allows it. A REAL in an
 * INTEGER column (9e999 in an operator's UPDATE) reads as Infinity.
 */
export function storedMs<T extends number | null>(value: T, field: string, at: StoredAt): T {
  if (value !== null && !Number.isFinite(value)) throw invalid(at, field, "a finite number of milliseconds");
  return value;
}

/**
 * A date field (MongoDB's BSON datetime) as milliseconds since 1970: null for none, else a Date a
 * JS Date holds. A BSON datetime is a whole int64 of milliseconds (another tool's "max date"
 * sentinel); past ±8.64e15 the driver's Date reads NaN.
 */
export function storedDate(value: unknown, field: string, at: StoredAt): number | null {
  if (value === null) return null;
  const ms = value instanceof Date ? value.getTime() : Number.NaN;
  if (!Number.isFinite(ms)) throw invalid(at, field, `null or ${JS_DATE}`);
  return ms;
}

/** A date field every record has (created_at): as storedDate, never null. */
export function storedRequiredDate(value: unknown, field: string, at: StoredAt): number {
  const ms = value instanceof Date ? value.getTime() : Number.NaN;
  if (!Number.isFinite(ms)) throw invalid(at, field, JS_DATE);
  return ms;
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
