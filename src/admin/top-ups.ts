import { IdempotencyKeyReusedError, TopUpKeysExhaustedError } from "../store/errors.js";
import { TOPUP_KEY_RETENTION_MS } from "../store/store.js";
import { FailedPreconditionError, InvalidArgumentError } from "./errors.js";
import type { AccountView } from "./lifecycle.js";

// AddCredits with an idempotency key: what the idempotency ledger keeps of one, and the store's
// refusals as KeyAdmin errors. The store records the key with the credits and is the authority;
// the ledger in front answers a repeat without a store write and refuses one still running.

/**
 * What the ledger keeps of a keyed top-up: the answer's account view, as earlier releases kept
 * it under the same ledger key (a replica of one reads it back as the view, so what is added
 * here stays extra fields of it), with the amount the top-up was for and whether the store had
 * seen the key already. null when the view could not be read.
 */
export type LedgeredTopUp = (AccountView & { topUpAmount?: number; storeReplayed?: boolean }) | null;

/** The ledger's value for a top-up of `amount`: its answer's view, or null when it could not be read. */
export function ledgered(view: AccountView | null, amount: number, storeReplayed: boolean): LedgeredTopUp {
  return view === null ? null : { ...view, topUpAmount: amount, storeReplayed };
}

/**
 * The answer a ledgered top-up gives a call for `amount`: its view (null: read it again) and
 * whether the store had replayed it. A repeat for another amount is refused, as the store
 * refuses it; a value without an amount (an earlier release's, or one without a view) is not
 * checked.
 */
export function ledgeredAnswer(value: LedgeredTopUp, amount: number): { view: AccountView | null; storeReplayed: boolean } {
  if (value === null) return { view: null, storeReplayed: false };
  const { topUpAmount, storeReplayed, ...view } = value;
  if (topUpAmount !== undefined && topUpAmount !== amount) throw reusedKey(topUpAmount, amount);
  return { view, storeReplayed: storeReplayed === true };
}

/** A store refusal of a keyed top-up as the KeyAdmin error it answers; any other error as it is. */
export function topUpRefusal(error: unknown, ownerId: string): unknown {
  if (error instanceof IdempotencyKeyReusedError) return reusedKey(error.firstAmount, error.amount);
  if (error instanceof TopUpKeysExhaustedError) {
    return new FailedPreconditionError(
      `account "${ownerId}" has had ${error.maxKeyedTopUps} top-ups with an idempotency_key in ${TOPUP_KEY_RETENTION_MS / 3_600_000} hours, ` +
        `as many as keygate keeps; nothing was added: retry after ${new Date(error.freeAtMs).toISOString()}`,
    );
  }
  return error;
}

function reusedKey(firstAmount: number, amount: number): InvalidArgumentError {
  return new InvalidArgumentError(
    "idempotency_key",
    `was used for a top-up of ${firstAmount} credits, and this one is for ${amount}; nothing was added: a different top-up needs a key of its own`,
  );
}
