import type { KeyMode } from "../store/store.js";

/**
 * What a ChargeUsage charged, kept with its answer under the idempotency key (by the admin ledger,
 * and by the Redis meter beside its charge): a call with the key is answered from it only when it
 * is for the same charge. `keyId` is "" for an owner's charge.
 */
export interface ChargeFingerprint {
  mode: KeyMode;
  cost: number;
  quota: string;
  keyId: string;
}

/**
 * The fingerprint as text, "mode:cost:quota:keyId", e.g. "live:5::key_…". Unambiguous: a mode is
 * live or test, a cost digits, and quota names and key ids have no colon (nor a comma, which
 * separates the Redis meter's kept reply's places). The Redis meter keeps it beside a charge and
 * gives it back when a reused idempotency key was for another charge: parseFingerprint reads it.
 */
export function fingerprintText(charge: ChargeFingerprint): string {
  return `${charge.mode}:${charge.cost}:${charge.quota}:${charge.keyId}`;
}

const FINGERPRINT = /^(live|test):(\d+):((?:[a-z][a-z0-9_-]*)?):((?:key_[0-9A-HJKMNP-TV-Z]{26})?)$/;

/**
 * The charge fingerprintText wrote, or null for any other text: a reply from Redis is read only
 * as far as this pattern matches, so nothing else it carried is ever repeated in an error.
 */
export function parseFingerprint(text: unknown): ChargeFingerprint | null {
  const [, mode, cost, quota, keyId] = (typeof text === "string" ? FINGERPRINT.exec(text) : null) ?? [];
  if ((mode !== "live" && mode !== "test") || cost === undefined || quota === undefined || keyId === undefined) return null;
  return { mode, cost: Number(cost), quota, keyId };
}

/** The charge in ChargeUsage's words, for the refusal of an idempotency key kept for another one. */
export function chargeText(charge: ChargeFingerprint): string {
  const by = charge.keyId === "" ? "the account" : `${charge.mode === "test" ? "test " : ""}key ${charge.keyId}`;
  return `a charge of ${charge.cost} credits by ${by}${charge.quota === "" ? "" : ` against quota "${charge.quota}"`}`;
}
