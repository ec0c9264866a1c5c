import { randomBytes } from "node:crypto";
import { crc32 } from "node:zlib";
import type { KeyMode } from "../store/store.js";
import { CRC32_START, crc32Final, crc32Step, crc32Update } from "./crc32.js";

const BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/** Random body characters; 32 base62 characters carry about 190 bits. */
export const KEY_RANDOM_LENGTH = 32;
/** Checksum characters: CRC32 of everything before them, fixed-width base62. */
export const KEY_CHECKSUM_LENGTH = 6;
const BODY_LENGTH = KEY_RANDOM_LENGTH + KEY_CHECKSUM_LENGTH;
// 248 = 4 * 62: bytes at or above it are rejected so that every character is equally likely.
const UNBIASED_BYTE_LIMIT = 248;

// Lookup table: char code -> true when the character is base62. Built once per process.
const IS_BASE62 = new Uint8Array(128);
for (const ch of BASE62) IS_BASE62[ch.charCodeAt(0)] = 1;

/** A key that passed the shape and checksum test. */
export interface ParsedKey {
  mode: KeyMode;
  /** Display preview: prefix, mode and the first four body characters. */
  start: string;
  last4: string;
}

/** Key shape for one product prefix: generation, parsing and the documented regular expression. */
export class KeyFormat {
  readonly liveHead: string;
  readonly testHead: string;
  readonly length: number;
  /**
   * The CRC register after each head, when the prefix is ASCII (configuration allows nothing
   * else): a key's checksum then continues from it over the random part. null otherwise.
   */
  readonly #liveHeadCrc: number | null;
  readonly #testHeadCrc: number | null;

  constructor(readonly prefix: string) {
    this.liveHead = `${prefix}_live_`;
    this.testHead = `${prefix}_test_`;
    // Both heads have the same length, so every valid key has this exact length.
    this.length = this.liveHead.length + BODY_LENGTH;
    const ascii = /^[\x00-\x7f]*$/.test(prefix);
    this.#liveHeadCrc = ascii ? crc32Update(CRC32_START, this.liveHead, this.liveHead.length) : null;
    this.#testHeadCrc = ascii ? crc32Update(CRC32_START, this.testHead, this.testHead.length) : null;
  }

  /**
   * The regular expression secret scanners can use to find leaked keys: anywhere, joined to other
   * text too ("slack_kg_live_…", "Bearer%20kg_live_…"), and not followed by another letter or digit.
   */
  get pattern(): RegExp {
    return new RegExp(`${this.prefix}_(live|test)_[0-9A-Za-z]{${BODY_LENGTH}}(?![0-9A-Za-z])`);
  }

  /** Issues a new key from the CSPRNG. */
  generate(mode: KeyMode): string {
    const head = mode === "live" ? this.liveHead : this.testHead;
    const withoutChecksum = head + randomBase62(KEY_RANDOM_LENGTH);
    return withoutChecksum + checksum(withoutChecksum);
  }

  /** Shape and checksum test, with no I/O. Returns null for anything that is not a key. */
  parse(candidate: string): ParsedKey | null {
    if (!this.isWellFormed(candidate)) return null;
    const mode: KeyMode = candidate.startsWith(this.liveHead) ? "live" : "test";
    return { mode, start: candidate.slice(0, this.liveHead.length + 4), last4: candidate.slice(-4) };
  }

  /**
   * parse's test alone, for the Check path: the checksum is compared character by character,
   * without building its text or the parsed key.
   */
  isWellFormed(candidate: string): boolean {
    if (candidate.length !== this.length) return false;
    const live = candidate.startsWith(this.liveHead);
    if (!live && !candidate.startsWith(this.testHead)) return false;
    const checksumStart = candidate.length - KEY_CHECKSUM_LENGTH;
    let crc = live ? this.#liveHeadCrc : this.#testHeadCrc;
    // One pass over the random part: base62, and the checksum's CRC from the head's register.
    for (let i = this.liveHead.length; i < checksumStart; i++) {
      const code = candidate.charCodeAt(i);
      if (code >= 128 || IS_BASE62[code] === 0) return false;
      if (crc !== null) crc = crc32Step(crc, code);
    }
    let value = crc !== null ? crc32Final(crc) : crc32(candidate.slice(0, checksumStart));
    // checksum() writes the CRC's base62 digits most significant first: read them from the end.
    // A character that is not the expected base62 digit, base62 or not, fails here.
    for (let i = candidate.length - 1; i >= checksumStart; i--) {
      if (candidate.charCodeAt(i) !== BASE62.charCodeAt(value % 62)) return false;
      value = Math.floor(value / 62);
    }
    return true;
  }
}

function randomBase62(length: number): string {
  let out = "";
  while (out.length < length) {
    const bytes = randomBytes(length * 2);
    for (let i = 0; i < bytes.length && out.length < length; i++) {
      const byte = bytes[i] ?? UNBIASED_BYTE_LIMIT;
      if (byte < UNBIASED_BYTE_LIMIT) out += BASE62[byte % 62];
    }
  }
  return out;
}

/** CRC32 of the text, as 6 base62 characters (62^6 > 2^32, so it is lossless). */
export function checksum(text: string): string {
  let value = crc32(text);
  let out = "";
  for (let i = 0; i < KEY_CHECKSUM_LENGTH; i++) {
    out = BASE62.charAt(value % 62) + out;
    value = Math.floor(value / 62);
  }
  return out;
}
