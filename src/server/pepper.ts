import type { Logger } from "pino";
import { ConfigError } from "../config.js";
import { pepperCheck } from "../keys/pepper-check.js";
import type { KeyStore } from "../store/store.js";

/** Where the pepper of a start came from: its file (embedded mode), or KEYGATE_PEPPER. */
export interface PepperSource {
  /** The data directory's pepper file when it came from there; null for KEYGATE_PEPPER. */
  file: string | null;
  /** The data directory's pepper file, named as a place to restore from (embedded mode); null with MongoDB. */
  dataDirFile: string | null;
}

/**
 * The pepper this start hashes keys with, held against the check the store recorded (recording
 * it on a store that has none: its first start, or one written by a release without the check).
 * A pepper the store's keys were not hashed with is refused as a ConfigError, since it would
 * answer every key as unknown. One exception: KEYGATE_PEPPER with a trailing line break or space
 * (a Secret made with `kubectl create secret --from-file` keeps the file's newline) whose trimmed
 * form is the store's pepper is used trimmed, with a warning naming the variable.
 */
export async function settlePepper(store: Pick<KeyStore, "claimPepperCheck">, pepper: string, source: PepperSource, logger: Pick<Logger, "warn">): Promise<string> {
  const check = pepperCheck(pepper);
  const recorded = await store.claimPepperCheck(check);
  if (recorded === check) return pepper;
  const trimmed = pepper.trimEnd();
  if (source.file === null && trimmed !== pepper && pepperCheck(trimmed) === recorded) {
    logger.warn(
      { variable: "KEYGATE_PEPPER" },
      "KEYGATE_PEPPER ends with a line break or space that this store's keys were not hashed with; keygate uses it without them. Remove them from the secret",
    );
    return trimmed;
  }
  throw new ConfigError(mismatch(source));
}

/** The one line a start with the wrong pepper exits with: what is wrong, and where the right one is. */
function mismatch(source: PepperSource): string {
  const consequence = "is not the pepper this store's keys were hashed with: every key would be unknown.";
  if (source.file !== null) return `${source.file} ${consequence} Restore the ${source.file} the store was created with, or set KEYGATE_PEPPER to that pepper`;
  const where = source.dataDirFile === null ? "the keygate-secrets Secret; every replica needs the same one" : `${source.dataDirFile}, or the keygate-secrets Secret`;
  return `KEYGATE_PEPPER ${consequence} Restore the pepper the store was created with (${where})`;
}
