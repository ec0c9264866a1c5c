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

/** CRC-32 of `text`'s first `end` characters, each under 128, as an unsigned 32-bit number. */
export function crc32Ascii(text: string, end: number): number {
  let crc = -1;
  for (let i = 0; i < end; i++) crc = (TABLE[(crc ^ text.charCodeAt(i)) & 0xff] as number) ^ (crc >>> 8);
  return (crc ^ -1) >>> 0;
}
