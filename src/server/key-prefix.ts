import { ConfigError } from "../config.js";
import type { KeyStore } from "../store/store.js";

/**
 * Holds KEYGATE_KEY_PREFIX against the prefix the store recorded for its keys (recording it on a
 * store that has none). Another prefix is refused as a ConfigError: every stored key would fail
 * the shape test and be refused as malformed by a keygate that reports ready. Prefixes are not
 * secrets, so the line names both.
 */
export async function settleKeyPrefix(store: Pick<KeyStore, "claimKeyPrefix">, prefix: string): Promise<void> {
  const recorded = await store.claimKeyPrefix(prefix);
  if (recorded === prefix) return;
  throw new ConfigError(
    `KEYGATE_KEY_PREFIX is "${prefix}", but this store's keys were issued with "${recorded}": every key would be refused as malformed. Set KEYGATE_KEY_PREFIX to "${recorded}", the prefix the store was created with`,
  );
}
