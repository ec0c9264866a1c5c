import { createHmac, createSecretKey, hash } from "node:crypto";
import type { KeyObject } from "node:crypto";

/** SHA-256's block size: HMAC pads its key to this (RFC 2104). */
const BLOCK = 64;
/** Bytes kept after the inner pad for the key; a longer key takes createHmac instead. */
const KEY_ROOM = 512;

/**
 * HMAC-SHA256 of a key under the pepper: the only form of a key that is stored.
 *
 * Computed as RFC 2104 spells it, SHA-256 of the outer pad and SHA-256 of the inner pad and the
 * key, with node:crypto's one-shot `hash` over two buffers made once. `createHmac` builds a native
 * Hmac object per call whose weak handle V8 clears only in a full mark-compact: with a busy
 * keygate that was 14 to 38 ms of each such pause (`--trace-gc-nvp`: clear.weak_global_handles,
 * 0.0 with this form), the pause that sets the p99 of the minute it falls in. The digest is the
 * same (test/unit/hasher.test.ts holds it to createHmac).
 */
export class KeyHasher {
  // For keys too long for the buffers: a KeyObject, made once (with a Buffer key, createHmac
  // builds a key object on every call on Node 24).
  readonly #pepper: KeyObject;
  /** The pepper XOR ipad, then room for the key, wiped after every use. */
  readonly #inner: Buffer;
  /** The pepper XOR opad, then the inner digest. */
  readonly #outer: Buffer;

  constructor(pepper: string) {
    const bytes = Buffer.from(pepper, "utf8");
    this.#pepper = createSecretKey(bytes);
    const key = bytes.length > BLOCK ? hash("sha256", bytes, "buffer") : bytes;
    this.#inner = Buffer.alloc(BLOCK + KEY_ROOM, 0x36);
    this.#outer = Buffer.alloc(BLOCK + 32, 0x5c);
    for (let i = 0; i < key.length; i++) {
      const b = key.readUInt8(i);
      this.#inner.writeUInt8(0x36 ^ b, i);
      this.#outer.writeUInt8(0x5c ^ b, i);
    }
    bytes.fill(0);
    key.fill(0);
  }

  /** Hex digest used as the lookup index. */
  hash(key: string): string {
    // At most three UTF-8 bytes a UTF-16 unit: a key that may not fit goes the general way.
    if (key.length * 3 > KEY_ROOM) return createHmac("sha256", this.#pepper).update(key, "utf8").digest("hex");
    const padded = this.#inner;
    const end = BLOCK + padded.write(key, BLOCK, "utf8");
    const inner = hash("sha256", padded.subarray(0, end), "buffer");
    // The key's bytes wiped in a loop: for a key's few dozen bytes, cheaper than a call into fill.
    for (let i = BLOCK; i < end; i++) padded[i] = 0x36;
    this.#outer.set(inner, BLOCK);
    return hash("sha256", this.#outer, "hex");
  }
}
