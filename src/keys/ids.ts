import { createHash, randomBytes } from "node:crypto";
import { decodeTime, encodeTime, incrementBase32, monotonicFactory } from "ulid";

const KEY_ID = /^key_[0-9A-HJKMNP-TV-Z]{26}$/;
const EVENT_ID = /^evt_[0-7][0-9A-HJKMNP-TV-Z]{25}$/;
const CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ";
// Monotonic: ids made in the same millisecond still sort in the order they were made.
const nextUlid = monotonicFactory();

/** A new key id: "key_" followed by a ULID, so ids sort by creation time. */
export function newKeyId(): string {
  return `key_${nextUlid()}`;
}

/** 80 bits as the 16 Crockford base32 characters of a ULID's random part. */
function randomPart(bits: Uint8Array): string {
  let text = "";
  for (let bit = 0; bit < 80; bit += 5) {
    const byte = bit >> 3;
    const word = ((bits[byte] ?? 0) << 8) | (bits[byte + 1] ?? 0);
    text += CROCKFORD.charAt((word >> (11 - (bit & 7))) & 31);
  }
  return text;
}

/**
 * Audit event ids: "evt_" and a ULID whose time is the record's, so they sort by the time
 * ListAuditEvents pages by. The random part of a new id starts below "G" and that of a derived one
 * at "G" or above, so within one millisecond a derived id sorts after the new ids made before it,
 * and the new ids made after it count on from it: the trail keeps the order it was written in.
 * One instance a clock (a LifecycleService): ids are monotonic along it.
 */
export class EventIds {
  #lastMs = -1;
  #lastRandom = "";

  /** The time the last id made carries (later than the clock's when the clock went back). */
  get lastMs(): number {
    return this.#lastMs;
  }

  /**
   * Continues after `lastId`, the newest id in the trail (written by an earlier process or another
   * replica): without it, a process started after the clock went back would name its records
   * before the ones already in the trail. An id not of this shape (or older) changes nothing, and
   * so does one whose time is after `latestMs` (false): a replica's clock far ahead, or a damaged
   * record, would otherwise carry every later record's time with it.
   */
  seed(lastId: string, latestMs = Number.POSITIVE_INFINITY): boolean {
    if (!EVENT_ID.test(lastId)) return true;
    const atMs = decodeTime(lastId.slice(4));
    if (atMs > latestMs) return false;
    const random = lastId.slice(14);
    if (atMs > this.#lastMs || (atMs === this.#lastMs && random > this.#lastRandom)) {
      this.#lastMs = atMs;
      this.#lastRandom = random;
    }
    return true;
  }

  /** A new id for a record at `atMs`; monotonic, so at the last id's time when the clock went back. */
  next(atMs: number): string {
    if (atMs > this.#lastMs) {
      const bits = randomBytes(10);
      bits[0] = (bits[0] ?? 0) & 0x7f;
      this.#lastMs = atMs;
      this.#lastRandom = randomPart(bits);
    } else {
      this.#lastRandom = incrementBase32(this.#lastRandom);
    }
    return `evt_${encodeTime(this.#lastMs)}${this.#lastRandom}`;
  }

  /**
   * The id of one change, the same on every call that records it: the ULID of the change's own
   * time with a random part taken from the SHA-256 of `identity` (what names the change: its
   * action and key id, or owner and idempotency key). A retry appends the same id, and the store
   * keeps the first record with it.
   */
  derived(atMs: number, identity: readonly string[]): string {
    const bits = createHash("sha256").update(identity.join("\0")).digest().subarray(0, 10);
    bits[0] = (bits[0] ?? 0) | 0x80;
    const random = randomPart(bits);
    if (atMs > this.#lastMs) {
      this.#lastMs = atMs;
      this.#lastRandom = random;
    } else if (atMs === this.#lastMs && random > this.#lastRandom) {
      this.#lastRandom = random;
    }
    return `evt_${encodeTime(atMs)}${random}`;
  }
}

const eventIds = new EventIds();

/** A new audit event id at `atMs` (now by default), from this module's own EventIds. */
export function newEventId(atMs: number = Date.now()): string {
  return eventIds.next(atMs);
}

/**
 * How far an id's time may be before its record's: the release that first kept the trail took the
 * id's time from Date.now and then, separately, the record's from the service clock (a
 * millisecond apart at most in practice); later releases name a record no earlier than its time
 * (EventIds). The margin keeps such records found by `since`.
 */
const EVENT_ID_EARLY_MS = 60_000;

/**
 * The least id a record at `sinceMs` or later can have: a lower bound on the id that lets the
 * stores search the trail from `since` by its id index instead of reading it from its start.
 */
export function eventIdFloor(sinceMs: number): string {
  return `evt_${encodeTime(Math.max(0, sinceMs - EVENT_ID_EARLY_MS))}`;
}

/** True when the text has the shape of a key id. */
export function isKeyId(text: string): boolean {
  return KEY_ID.test(text);
}
