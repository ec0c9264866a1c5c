import { createHmac, createSecretKey, hash } from "node:crypto";
import type { KeyObject } from "node:crypto";
import { SHA256_IV, sha256Compress } from "./sha256.js";

/** SHA-256's block size: HMAC pads its key to this (RFC 2104). */
const BLOCK = 64;
/** Bytes kept after the inner pad for the key; a longer key takes createHmac instead. */
const KEY_ROOM = 512;
/** The longest key that fits one block with SHA-256's padding (0x80 and the 8-byte length). */
const ONE_BLOCK_KEY = BLOCK - 9;

declare global {
  interface Buffer {
    /** Node's own method under toString("hex"), without its argument checks; checked for once (HEX_SLICE). */
    hexSlice(start: number, end: number): string;
  }
}
const HEX_SLICE = typeof Buffer.prototype.hexSlice === "function";

/**
 * HMAC-SHA256 of a key under the pepper: the only form of a key that is stored.
 *
 * Computed as RFC 2104 spells it, SHA-256 of the outer pad and SHA-256 of the inner pad and the
 * key, with node:crypto's one-shot `hash` over two buffers made once. `createHmac` builds a native
 * Hmac object per call whose weak handle V8 clears only in a full mark-compact: with a busy
 * keygate that was 14 to 38 ms of each such pause (`--trace-gc-nvp`: clear.weak_global_handles,
 * 0.0 with this form), the pause that sets the p99 of the minute it falls in. A key of ASCII
 * that fits one SHA-256 block with its padding (every key keygate issues) is hashed in
 * JavaScript from the pad states SHA-256 reaches after the pepper's two blocks, computed once:
 * two blocks a key instead of four, and no call into native code (sha256.ts). The digest is the
 * same either way (test/unit/hasher.test.ts holds it to createHmac).
 */
export class KeyHasher {
  // For keys too long for the buffers: a KeyObject, made once (with a Buffer key, createHmac
  // builds a key object on every call on Node 24).
  readonly #pepper: KeyObject;
  /** The pepper XOR ipad, then room for the key, wiped after every use. */
  readonly #inner: Buffer;
  /** The pepper XOR opad, then the inner digest. */
  readonly #outer: Buffer;

  /** SHA-256's state after the inner pad's block, and after the outer pad's. */
  readonly #innerState = new Int32Array(8);
  readonly #outerState = new Int32Array(8);
  /** The block being hashed and its message schedule, wiped after every use. */
  readonly #schedule = new Int32Array(64);
  readonly #state = new Int32Array(8);
  readonly #digest = Buffer.alloc(32);

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
    this.#padState(this.#inner, this.#innerState);
    this.#padState(this.#outer, this.#outerState);
    bytes.fill(0);
    key.fill(0);
  }

  /** `state` becomes SHA-256's state after the first block of `padded` (the pepper XOR a pad). */
  #padState(padded: Buffer, state: Int32Array): void {
    const w = this.#schedule;
    for (let i = 0; i < 16; i++) w[i] = padded.readInt32BE(4 * i);
    state.set(SHA256_IV);
    sha256Compress(state, w);
    w.fill(0);
  }

  /** Hex digest used as the lookup index. */
  hash(key: string): string {
    if (key.length <= ONE_BLOCK_KEY) {
      const digest = this.#oneBlock(key);
      if (digest !== null) return digest;
    }
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

  /**
   * The digest of an ASCII key of at most ONE_BLOCK_KEY bytes, from the pad states: one block
   * for the inner hash and one for the outer; null for a key with any other character.
   */
  #oneBlock(key: string): string | null {
    const w = this.#schedule;
    const n = key.length;
    w.fill(0, 0, 16);
    for (let i = 0; i < n; i++) {
      const code = key.charCodeAt(i);
      if (code > 0x7f) {
        w.fill(0, 0, 16);
        return null;
      }
      w[i >> 2] = (w[i >> 2] as number) | (code << (24 - 8 * (i & 3)));
    }
    w[n >> 2] = (w[n >> 2] as number) | (0x80 << (24 - 8 * (n & 3)));
    w[15] = (BLOCK + n) * 8;
    const state = this.#state;
    state.set(this.#innerState);
    sha256Compress(state, w);
    // The outer hash's block: the inner digest, then padding for 64 + 32 bytes.
    for (let i = 0; i < 8; i++) w[i] = state[i] as number;
    w[8] = 0x80000000;
    w.fill(0, 9, 15);
    w[15] = (BLOCK + 32) * 8;
    state.set(this.#outerState);
    sha256Compress(state, w);
    w.fill(0);
    const digest = this.#digest;
    for (let i = 0; i < 8; i++) {
      const word = state[i] as number;
      digest[4 * i] = word >>> 24;
      digest[4 * i + 1] = word >>> 16;
      digest[4 * i + 2] = word >>> 8;
      digest[4 * i + 3] = word;
    }
    return HEX_SLICE ? digest.hexSlice(0, 32) : digest.toString("hex");
  }
}
