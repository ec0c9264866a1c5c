import { createHmac } from "node:crypto";
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { KeyHasher } from "../../src/keys/hasher.js";

// Every stored hash depends on this digest: it must stay HMAC-SHA256(pepper as UTF-8, key as
// UTF-8) in hex, whatever form the pepper is held in.
describe("KeyHasher", () => {
  it("equals HMAC-SHA256 under the pepper's UTF-8 bytes, for any pepper and key", () => {
    fc.assert(
      fc.property(fc.string({ minLength: 32, maxLength: 96, unit: "grapheme" }), fc.string({ maxLength: 120, unit: "grapheme" }), (pepper, key) => {
        const reference = createHmac("sha256", Buffer.from(pepper, "utf8")).update(key, "utf8").digest("hex");
        expect(new KeyHasher(pepper).hash(key)).toBe(reference);
      }),
      { numRuns: 500 },
    );
  });

  it("equals HMAC-SHA256 with one hasher reused across keys, peppers past SHA-256's block and keys past its buffer", () => {
    fc.assert(
      fc.property(fc.string({ minLength: 1, maxLength: 200, unit: "grapheme" }), fc.array(fc.string({ maxLength: 400, unit: "grapheme" }), { minLength: 1, maxLength: 8 }), (pepper, keys) => {
        const hasher = new KeyHasher(pepper);
        for (const key of keys) {
          const reference = createHmac("sha256", Buffer.from(pepper, "utf8")).update(key, "utf8").digest("hex");
          expect(hasher.hash(key)).toBe(reference);
        }
      }),
      { numRuns: 300 },
    );
  });

  it("equals HMAC-SHA256 at the edges of the buffers: a key of exactly the room it has, one past it, multi-byte keys and lone surrogates", () => {
    const hasher = new KeyHasher("edge-pepper-0123456789abcdef0123456789");
    const reference = (key: string) => createHmac("sha256", Buffer.from("edge-pepper-0123456789abcdef0123456789", "utf8")).update(key, "utf8").digest("hex");
    for (const key of ["", "a".repeat(170), "a".repeat(171), "a".repeat(512), "\u20ac".repeat(170), "\u20ac".repeat(171), "\u{1F600}".repeat(85), "\uD800abc", "abc\uDC00", "\uD800".repeat(170), "x\u0000y", "kg_live_x"]) {
      expect(hasher.hash(key)).toBe(reference(key));
    }
  });

  it("equals HMAC-SHA256 for ASCII keys around one SHA-256 block (the JavaScript path) and non-ASCII ones beside them", () => {
    const ascii = fc.string({ unit: fc.integer({ min: 0, max: 127 }).map((c) => String.fromCharCode(c)), maxLength: 70 });
    const near = fc.oneof(ascii, fc.string({ maxLength: 60, unit: "grapheme" }), fc.integer({ min: 50, max: 60 }).map((n) => "k".repeat(n)));
    fc.assert(
      fc.property(fc.string({ minLength: 1, maxLength: 100, unit: "grapheme" }), fc.array(near, { minLength: 1, maxLength: 10 }), (pepper, keys) => {
        const hasher = new KeyHasher(pepper);
        for (const key of keys) expect(hasher.hash(key)).toBe(createHmac("sha256", Buffer.from(pepper, "utf8")).update(key, "utf8").digest("hex"));
      }),
      { numRuns: 600, seed: 55 },
    );
    const hasher = new KeyHasher("edge-pepper-0123456789abcdef0123456789");
    for (let n = 0; n <= 64; n++) {
      const key = "abcdefghij".repeat(7).slice(0, n);
      expect(hasher.hash(key)).toBe(createHmac("sha256", "edge-pepper-0123456789abcdef0123456789").update(key).digest("hex"));
      // A key's last character outside ASCII takes the native path, after the JavaScript one began.
      expect(hasher.hash(`${key}é`)).toBe(createHmac("sha256", "edge-pepper-0123456789abcdef0123456789").update(`${key}é`).digest("hex"));
    }
  });

  it("gives the digest the released keygate stored for a known pepper and key", () => {
    const hasher = new KeyHasher("frozen-redis-test-pepper-0123456789abcdef");
    expect(hasher.hash("kg_live_0123456789abcdefghijklmnopqrstuvwxyzAB")).toBe("342b45b3e4b7d02818dde39a3999ab74d5ddcb8f53fd914fcdccb01ba6512bdc");
  });
});
