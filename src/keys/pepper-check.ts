import { createHmac } from "node:crypto";

/** The fixed text the check is made of; a new version of the check would change it. */
const PEPPER_CHECK_TEXT = "keygate pepper check v1";

/**
 * A value a store keeps to tell which pepper its key hashes were made with: HMAC-SHA256 of a
 * fixed text under the pepper, in hex. It tells peppers apart and reveals nothing of them, but,
 * like the pepper, it is never logged.
 */
export function pepperCheck(pepper: string): string {
  return createHmac("sha256", pepper).update(PEPPER_CHECK_TEXT, "utf8").digest("hex");
}
