import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { KeyFormat, checksum } from "../../src/keys/key-format.js";

describe("isWellFormed equals the documented regex and checksum", () => {
  it("for mutated keys and random strings, several prefixes", () => {
    for (const prefix of ["kg", "acme", "a1", "abcdefghij"]) {
      const f = new KeyFormat(prefix);
      const doc = new RegExp(`^${prefix}_(live|test)_[0-9A-Za-z]{38}$`);
      const reference = (s: string) => doc.test(s) && checksum(s.slice(0, -6)) === s.slice(-6);
      const mutated = fc.tuple(fc.constantFrom("live", "test"), fc.nat(), fc.string({ unit: "binary", maxLength: 3 }), fc.nat(), fc.constantFrom("ins", "rep", "del", "none", "upper")).map(([m, at, s, n, op]) => {
        const k = f.generate(m as "live" | "test");
        const i = at % (k.length + 1);
        if (op === "ins") return k.slice(0, i) + s + k.slice(i);
        if (op === "rep") return k.slice(0, i) + s + k.slice(i + s.length);
        if (op === "del") return k.slice(0, i) + k.slice(i + (n % 3) + 1);
        if (op === "upper") return k.slice(0, i) + k.slice(i).toUpperCase();
        return k;
      });
      fc.assert(fc.property(fc.oneof(mutated, fc.string({ unit: "binary", maxLength: 60 })), (s) => {
        expect(f.isWellFormed(s)).toBe(reference(s));
        expect(f.parse(s) !== null).toBe(reference(s));
      }), { numRuns: 20000 });
    }
  });
});
