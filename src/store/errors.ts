/** The plan's cap on active keys is reached. */
export class CapExceededError extends Error {
  override readonly name = "CapExceededError";
  constructor(
    readonly plan: string,
    readonly maxActiveKeys: number,
  ) {
    super(`plan "${plan}" allows at most ${maxActiveKeys} active key${maxActiveKeys === 1 ? "" : "s"}`);
  }
}

/** The record changed under the caller (for example, a key already rotated). */
export class ConflictError extends Error {
  override readonly name = "ConflictError";
}

/** A uniqueness violation (duplicate key hash or id). */
export class DuplicateError extends Error {
  override readonly name = "DuplicateError";
}

/** The store cannot be reached; the caller answers UNAVAILABLE. */
export class StoreUnavailableError extends Error {
  override readonly name = "StoreUnavailableError";
}
