import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { KeyFormat, checksum } from "../../src/keys/key-format.js";

const format = new KeyFormat("kg");

describe("key format happy", () => {
  it("generates keys that match the documented pattern and parse back", () => {
    for (let i = 0; i < 200; i++) {
      const mode = i % 2 === 0 ? "live" : "test";
      const key = format.generate(mode);
      expect(key).toMatch(/^kg_(live|test)_[0-9A-Za-z]{38}$/);
      expect(format.pattern.test(`leaked in a log: ${key} here`)).toBe(true);
      expect(format.parse(key)).toEqual({ mode, start: key.slice(0, 12), last4: key.slice(-4) });
    }
  });

  it("the scanner pattern finds a key joined to the text around it, and nothing longer", () => {
    const key = format.generate("live");
    for (const text of [`GET /hooks/slack_${key} 200`, `curl 'https://gw/x?auth=Bearer%20${key}'`, `https://gw/v1/notes?q=api_key%3D${key}`, `{"log":"token:\\n${key}"}`, `${key}_suffix`]) {
      expect(format.pattern.test(text), text).toBe(true);
    }
    expect(format.pattern.test(`${key}X`)).toBe(false);
    expect(format.pattern.test(key.slice(0, -1))).toBe(false);
  });

  it("the checksum is 6 base62 characters of CRC32", () => {
    expect(checksum("")).toBe("000000");
    expect(checksum("kg_live_")).toMatch(/^[0-9A-Za-z]{6}$/);
  });

  it("uses every base62 character about equally (no modulo bias)", () => {
    const counts = new Map<string, number>();
    for (let i = 0; i < 2000; i++) {
      for (const ch of format.generate("live").slice(8, 40)) counts.set(ch, (counts.get(ch) ?? 0) + 1);
    }
    expect(counts.size).toBe(62);
    const expected = (2000 * 32) / 62;
    for (const count of counts.values()) {
      expect(count).toBeGreaterThan(expected * 0.8);
      expect(count).toBeLessThan(expected * 1.2);
    }
  });
});

/** The shape and checksum test spelled out: the documented pattern, and the checksum's text. */
function wellFormedReference(candidate: string): boolean {
  return /^kg_(live|test)_[0-9A-Za-z]{38}$/.test(candidate) && checksum(candidate.slice(0, -6)) === candidate.slice(-6);
}

describe("key format: the Check path's test", () => {
  it("isWellFormed agrees with the pattern and checksum text for keys, altered keys and any text", () => {
    const keys = Array.from({ length: 20 }, (_, i) => format.generate(i % 2 === 0 ? "live" : "test"));
    const alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_é";
    const altered = fc
      .tuple(fc.constantFrom(...keys), fc.nat(), fc.constantFrom(...alphabet))
      .map(([key, at, ch]) => key.slice(0, at % key.length) + ch + key.slice((at % key.length) + 1));
    const candidates = fc.oneof(fc.constantFrom(...keys), altered, fc.string({ maxLength: 60 }), fc.string({ unit: "binary", minLength: 46, maxLength: 46 }));
    fc.assert(
      fc.property(candidates, (candidate) => {
        expect(format.isWellFormed(candidate)).toBe(wellFormedReference(candidate));
        expect(format.parse(candidate) !== null).toBe(wellFormedReference(candidate));
      }),
      { numRuns: 3000, seed: 77 },
    );
    for (const key of keys) expect(format.isWellFormed(key)).toBe(true);
  });

  it("checks the checksum over UTF-8 bytes for a prefix outside ASCII too", () => {
    const wide = new KeyFormat("ké");
    const key = wide.generate("live");
    expect(wide.isWellFormed(key)).toBe(true);
    expect(wide.isWellFormed(key.slice(0, -1) + (key.endsWith("A") ? "B" : "A"))).toBe(false);
  });
});

describe("key format error", () => {
  it("rejects a key with any single character changed", () => {
    const key = format.generate("live");
    const alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_";
    fc.assert(
      fc.property(fc.integer({ min: 0, max: key.length - 1 }), fc.constantFrom(...alphabet), (index, ch) => {
        fc.pre(key[index] !== ch);
        const mutated = key.slice(0, index) + ch + key.slice(index + 1);
        expect(format.parse(mutated)).toBeNull();
      }),
      { numRuns: 500 },
    );
  });

  it("rejects keys one character too short or too long, other prefixes and arbitrary text", () => {
    const key = format.generate("test");
    expect(format.parse(key.slice(0, -1))).toBeNull();
    expect(format.parse(`${key}A`)).toBeNull();
    expect(format.parse(key.replace("kg_", "xx_"))).toBeNull();
    expect(new KeyFormat("acme").parse(key)).toBeNull();
    fc.assert(
      fc.property(fc.string({ maxLength: 100 }), (text) => {
        expect(format.parse(text)).toBeNull();
      }),
    );
  });
});
