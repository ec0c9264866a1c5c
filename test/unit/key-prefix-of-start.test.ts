import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { KeyFormat } from "../../src/keys/key-format.js";
import { keyPrefixOfStart } from "../../src/store/store.js";

// A store that holds keys but records no prefix (written by a release before the record) takes
// the prefix from a stored key's `start`; it must read back exactly what KeyFormat wrote there.

/** Prefixes KEYGATE_KEY_PREFIX accepts: 2-10 lowercase letters or digits, starting with a letter. */
const prefixes = fc.stringMatching(/^[a-z][a-z0-9]{1,9}$/);

describe("keyPrefixOfStart.happy", () => {
  it("reads back the prefix of the start KeyFormat.parse gives every key it issues, live and test", () => {
    fc.assert(
      fc.property(prefixes, fc.constantFrom("live" as const, "test" as const), (prefix, mode) => {
        const format = new KeyFormat(prefix);
        const parsed = format.parse(format.generate(mode));
        expect(parsed === null ? null : keyPrefixOfStart(parsed.start)).toBe(prefix);
      }),
      { numRuns: 500, seed: 7 },
    );
  });
});

describe("keyPrefixOfStart.error", () => {
  it.each(["", "kg", "kg_live_", "kg_live_abc", "kg_live_abcde", "kg_prod_abcd", "_live_abcd", "kg_live_ab-d"])("%j is not a start: null", (start) => {
    expect(keyPrefixOfStart(start)).toBeNull();
  });
});
