import { crc32 } from "node:zlib";
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { CRC32_START, crc32Final, crc32Update } from "../../src/keys/crc32.js";

const crc32Ascii = (text: string, end: number): number => crc32Final(crc32Update(CRC32_START, text, end));

describe("crc32Update and crc32Final", () => {
  it("equals zlib's crc32 of the same ASCII text, for the whole text and any prefix of it", () => {
    fc.assert(
      fc.property(fc.string({ unit: fc.integer({ min: 0, max: 127 }).map((c) => String.fromCharCode(c)), maxLength: 120 }), fc.nat(), (text, cut) => {
        const end = text.length === 0 ? 0 : cut % (text.length + 1);
        expect(crc32Ascii(text, text.length)).toBe(crc32(text));
        expect(crc32Ascii(text, end)).toBe(crc32(text.slice(0, end)));
      }),
      { numRuns: 3000, seed: 32 },
    );
  });

  it("gives the standard check value and the empty text's", () => {
    expect(crc32Ascii("123456789", 9)).toBe(0xcbf43926);
    expect(crc32Ascii("", 0)).toBe(0);
    expect(crc32Ascii("kg_live_", 8)).toBe(crc32("kg_live_"));
  });
});
