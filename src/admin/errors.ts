/** Bad input. The message names the field; nothing was written. */
export class InvalidArgumentError extends Error {
  override readonly name = "InvalidArgumentError";
  constructor(
    readonly field: string,
    problem: string,
  ) {
    super(`${field}: ${problem}`);
  }
}

/** The named record does not exist. */
export class NotFoundError extends Error {
  override readonly name = "NotFoundError";
}

/** The request is valid but the record's state forbids it (for example, rotating a revoked key). */
export class FailedPreconditionError extends Error {
  override readonly name = "FailedPreconditionError";
}
