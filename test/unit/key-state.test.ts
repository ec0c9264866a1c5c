import { describe, expect, it } from "vitest";
import { keyState } from "../../src/store/store.js";
import type { KeyRecord } from "../../src/store/store.js";
import { newKeyRecord } from "../../src/store/store.js";

const base: KeyRecord = newKeyRecord({
  id: "key_01ARZ3NDEKTSV4RRFFQ69G5FAV",
  hash: "h",
  ownerId: "o",
  name: "n",
  mode: "live",
  start: "kg_live_abcd",
  last4: "wxyz",
  createdAtMs: 0,
});

describe("key state", () => {
  it("derives every state from the key's times", () => {
    expect(keyState(base, 100)).toBe("active");
    expect(keyState({ ...base, expiresAtMs: 100 }, 99)).toBe("active");
    expect(keyState({ ...base, expiresAtMs: 100 }, 100)).toBe("expired");
    expect(keyState({ ...base, rotatedToId: "key_x", graceEndsAtMs: 100 }, 99)).toBe("grace");
    expect(keyState({ ...base, rotatedToId: "key_x", graceEndsAtMs: 100 }, 100)).toBe("rotated");
    expect(keyState({ ...base, rotatedToId: "key_x", graceEndsAtMs: 100, revokedAtMs: 50 }, 60)).toBe("revoked");
    expect(keyState({ ...base, revokedAtMs: 1, expiresAtMs: 0 }, 5)).toBe("revoked");
  });
});
