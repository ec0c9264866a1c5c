import { ulid } from "ulid";

const KEY_ID = /^key_[0-9A-HJKMNP-TV-Z]{26}$/;

/** A new key id: "key_" followed by a ULID, so ids sort by creation time. */
export function newKeyId(): string {
  return `key_${ulid()}`;
}

/** True when the text has the shape of a key id. */
export function isKeyId(text: string): boolean {
  return KEY_ID.test(text);
}
