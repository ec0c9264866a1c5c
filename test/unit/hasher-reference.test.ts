import { createHmac, createHash } from "node:crypto";
import { crc32 } from "node:zlib";
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { KeyHasher } from "../../src/keys/hasher.js";
import { SHA256_IV, sha256Compress } from "../../src/keys/sha256.js";
import { CRC32_START, crc32Final, crc32Update } from "../../src/keys/crc32.js";
import { KeyFormat, checksum } from "../../src/keys/key-format.js";
import { pepperCheck } from "../../src/keys/pepper-check.js";

const ref = (p: string, k: string) => createHmac("sha256", Buffer.from(p, "utf8")).update(k, "utf8").digest("hex");

function jsSha256(msg: Buffer): string {
  const len = msg.length;
  const total = Math.ceil((len + 9) / 64) * 64;
  const buf = Buffer.alloc(total);
  msg.copy(buf);
  buf[len] = 0x80;
  buf.writeUInt32BE(Math.floor((len * 8) / 2 ** 32), total - 8);
  buf.writeUInt32BE((len * 8) >>> 0, total - 4);
  const st = new Int32Array(SHA256_IV);
  const w = new Int32Array(64);
  for (let b = 0; b < total; b += 64) {
    for (let i = 0; i < 16; i++) w[i] = buf.readInt32BE(b + 4 * i);
    sha256Compress(st, w);
  }
  const out = Buffer.alloc(32);
  for (let i = 0; i < 8; i++) out.writeInt32BE(st[i] as number, 4 * i);
  return out.toString("hex");
}

describe("hand-written SHA-256 and HMAC against node:crypto", () => {
  it("sha256Compress gives SHA-256 for lengths 0..200 and random bytes", () => {
    for (let n = 0; n <= 200; n++) {
      const m = Buffer.alloc(n, 0).map((_, i) => (i * 37 + n) & 0xff) as Buffer;
      expect(jsSha256(Buffer.from(m))).toBe(createHash("sha256").update(m).digest("hex"));
    }
    fc.assert(fc.property(fc.uint8Array({ maxLength: 300 }), (u) => {
      const b = Buffer.from(u);
      expect(jsSha256(b)).toBe(createHash("sha256").update(b).digest("hex"));
    }), { numRuns: 2000 });
  });
  it("HMAC for peppers of every length 1..200 bytes and keys 0..200 (ASCII, non-ASCII, NUL, 0x7f)", () => {
    for (let pl = 1; pl <= 200; pl += 1) {
      const pepper = "p\u00e9x\u0000Z".repeat(60).slice(0, pl);
      const h = new KeyHasher(pepper);
      for (const n of [0, 1, 3, 4, 31, 32, 46, 47, 54, 55, 56, 57, 63, 64, 65, 119, 120, 128, 170, 171, 200]) {
        for (const key of ["a".repeat(n), "\u007f".repeat(n), "\u0000".repeat(n), "é".repeat(n), "\u{1F600}".repeat(n).slice(0, n), "\uD800".repeat(n)]) {
          expect(h.hash(key)).toBe(ref(pepper, key));
        }
      }
    }
  });
  it("HMAC, random peppers and keys, fullUnicode; reused hasher interleaving fast and slow paths", () => {
    fc.assert(fc.property(fc.string({ minLength: 0, maxLength: 150, unit: "binary" }), fc.array(fc.oneof(fc.string({ maxLength: 60, unit: "binary-ascii" }), fc.string({ maxLength: 250, unit: "binary" })), { maxLength: 12 }), (pepper, keys) => {
      const h = new KeyHasher(pepper);
      for (const k of keys) expect(h.hash(k)).toBe(ref(pepper, k));
      expect(pepperCheck(pepper)).toBe(createHmac("sha256", Buffer.from(pepper, "utf8")).update("keygate pepper check v1").digest("hex"));
    }), { numRuns: 1500 });
  });
  it("crc32 and checksum vs zlib", () => {
    fc.assert(fc.property(fc.string({ unit: "binary-ascii", maxLength: 200 }), (t) => {
      expect(crc32Final(crc32Update(CRC32_START, t, t.length))).toBe(crc32(t));
    }), { numRuns: 3000 });
    const f = new KeyFormat("kg");
    fc.assert(fc.property(fc.constantFrom("live", "test"), (m) => {
      const k = f.generate(m as "live" | "test");
      expect(f.isWellFormed(k)).toBe(true);
      expect(checksum(k.slice(0, -6))).toBe(k.slice(-6));
    }), { numRuns: 500 });
  });
});
