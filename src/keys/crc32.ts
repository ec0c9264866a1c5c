/**
 * CRC-32 (IEEE 802.3, zlib's) over character codes, for the Check path's checksum test: the key's
 * text is ASCII by then, so its codes are its UTF-8 bytes. zlib's crc32 takes the string into
 * native code, which for a key's 40-odd characters cost about 0.4 µs a Check under load against
 * tens of nanoseconds here (test/unit/crc32.test.ts holds this to zlib's result).
 */
const TABLE = new Int32Array(256);
for (let n = 0; n < 256; n++) {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  TABLE[n] = c;
}

/** The CRC register before any byte. */
export const CRC32_START = -1;

/** The register after one more byte (a character code under 128). */
export function crc32Step(crc: number, byte: number): number {
  return (TABLE[(crc ^ byte) & 0xff] as number) ^ (crc >>> 8);
}

/** The CRC-32 of the bytes a register has taken, as an unsigned 32-bit number. */
export function crc32Final(crc: number): number {
  return (crc ^ -1) >>> 0;
}

/** The register after `text`'s first `end` characters (each under 128), from `crc`. */
export function crc32Update(crc: number, text: string, end: number): number {
  let register = crc;
  for (let i = 0; i < end; i++) register = crc32Step(register, text.charCodeAt(i));
  return register;
}
