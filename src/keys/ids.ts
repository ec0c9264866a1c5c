import { monotonicFactory } from "ulid";

const KEY_ID = /^key_[0-9A-HJKMNP-TV-Z]{26}$/;
// Monotonic: ids made in the same millisecond still sort in the order they were made.
const nextUlid = monotonicFactory();

/** A new key id: "key_" followed by a ULID, so ids sort by creation time. */
export function newKeyId(): string {
  return `key_${nextUlid()}`;
}

/** A new audit event id: "evt_" followed by a ULID. */
export function newEventId(): string {
  return `evt_${nextUlid()}`;
}

/** True when the text has the shape of a key id. */
export function isKeyId(text: string): boolean {
  return KEY_ID.test(text);
}
