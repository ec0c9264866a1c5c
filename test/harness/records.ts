import { newKeyId } from "../../src/keys/ids.js";
import { newKeyRecord } from "../../src/store/store.js";
import type { KeyRecord } from "../../src/store/store.js";

let seq = 0;

/** A live key record of `ownerId` made at `createdAtMs`, with a hash no other test key has. */
export function testKeyRecord(ownerId: string, createdAtMs: number, overrides: Partial<KeyRecord> = {}): KeyRecord {
  seq += 1;
  return newKeyRecord({
    id: newKeyId(),
    hash: `test-${ownerId}-${seq}-${Math.random().toString(36).slice(2)}`,
    ownerId,
    name: `key ${seq}`,
    mode: "live",
    start: "kg_live_abcd",
    last4: "wxyz",
    scopes: ["read"],
    metadata: { team: "core" },
    createdAtMs,
    ...overrides,
  });
}
