import type { AccountRecord, CreditDelta, UsageDelta } from "./store.js";

/** The plan's cap on active keys (of one mode: test keys are counted apart) is reached. */
export class CapExceededError extends Error {
  override readonly name = "CapExceededError";
  constructor(
    readonly plan: string,
    readonly maxActiveKeys: number,
    readonly mode: "live" | "test" = "live",
  ) {
    super(`plan "${plan}" allows at most ${maxActiveKeys} active ${mode === "test" ? "test-mode " : ""}key${maxActiveKeys === 1 ? "" : "s"}`);
  }
}

/**
 * The accounts that failed createKey calls made, by their errors: on MongoDB the account is a write
 * of its own, before the key's slot and insert, and stays made when they fail or are refused.
 */
const createdAccounts = new WeakMap<Error, AccountRecord>();

/** Marks the error of a createKey that made `account` before it failed; the error's class (and so its status) is unchanged. */
export function withCreatedAccount(error: unknown, account: AccountRecord): Error {
  const marked = error instanceof Error ? error : new Error(String(error), { cause: error });
  createdAccounts.set(marked, account);
  return marked;
}

/** The account a failed createKey made before failing (withCreatedAccount), else null. */
export function createdAccountOf(error: unknown): AccountRecord | null {
  return error instanceof Error ? (createdAccounts.get(error) ?? null) : null;
}

/** The record changed under the caller (for example, a key already rotated). */
export class ConflictError extends Error {
  override readonly name = "ConflictError";
}

/** A uniqueness violation (duplicate key hash or id). */
export class DuplicateError extends Error {
  override readonly name = "DuplicateError";
}

/**
 * A write-behind call (applyUsage) that failed after some of it may have been made: a store
 * whose call is not one transaction (MongoDB). `unapplied` holds the deltas sure not to be in
 * the store, which the caller writes again; `unsure` counts those that may be, which it must
 * not write again: a write whose answer was lost may have been made, and writing it again would
 * count usage and spend credits twice.
 */
export class PartialWriteError extends Error {
  override readonly name = "PartialWriteError";
  constructor(
    message: string,
    readonly unapplied: { usage: UsageDelta[]; credits: CreditDelta[] },
    readonly unsure: number,
    options?: ErrorOptions,
  ) {
    super(message, options);
  }
}

/** A top-up's idempotency key was used for a top-up of another amount: nothing was added. */
export class IdempotencyKeyReusedError extends Error {
  override readonly name = "IdempotencyKeyReusedError";
  constructor(
    readonly firstAmount: number,
    readonly amount: number,
  ) {
    super(`the idempotency key was used for a top-up of ${firstAmount}, not ${amount}`);
  }
}

/** The account has as many keyed top-ups within their retention as a store keeps: nothing was added. */
export class TopUpKeysExhaustedError extends Error {
  override readonly name = "TopUpKeysExhaustedError";
  constructor(
    readonly maxKeyedTopUps: number,
    /** When the oldest of them is forgotten, freeing a place. */
    readonly freeAtMs: number,
  ) {
    super(`the account has ${maxKeyedTopUps} top-ups with an idempotency key kept; one is freed at ${new Date(freeAtMs).toISOString()}`);
  }
}

/** The store cannot be reached; the caller answers UNAVAILABLE. */
export class StoreUnavailableError extends Error {
  override readonly name: string = "StoreUnavailableError";
}

/** The store could not take the change (SQLite's write lock held past the wait): surely nothing was written. */
export class StoreBusyError extends StoreUnavailableError {
  override readonly name = "StoreBusyError";
}

/** A schema step as `keygate migrate --dry-run` lists it. */
export interface SchemaStep {
  version: number;
  description: string;
}

/** A database written by a newer keygate than this one: this one would not know its fields. */
export class NewerSchemaError extends Error {
  override readonly name = "NewerSchemaError";
  constructor(
    readonly store: string,
    readonly found: number,
    readonly known: number,
  ) {
    super(
      `the ${store} database is at schema version ${found}, newer than this keygate knows (${known}): ` +
        "it was written by a newer keygate; run that version (or restore a backup made before the upgrade)",
    );
  }
}

/** A database that needs schema steps, opened with migration turned off. */
export class MigrationsPendingError extends Error {
  override readonly name = "MigrationsPendingError";
  constructor(
    readonly store: string,
    readonly pending: readonly SchemaStep[],
  ) {
    super(
      `the ${store} database needs schema step${pending.length === 1 ? "" : "s"} ${pending.map((m) => m.version).join(", ")}: ` +
        "run `keygate migrate`, or start without --no-migrate",
    );
  }
}
