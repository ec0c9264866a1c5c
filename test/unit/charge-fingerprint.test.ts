import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { QUOTA_NAME_PATTERN } from "../../src/config.js";
import { newKeyId } from "../../src/keys/ids.js";
import { chargeText, fingerprintText, parseFingerprint } from "../../src/limits/charge-fingerprint.js";
import type { ChargeFingerprint } from "../../src/limits/charge-fingerprint.js";

// The admin ledger writes a ChargeUsage's fingerprint and the Redis meter keeps it beside the charge;
// when an idempotency key is reused for another charge, the meter's refusal names the kept charge by
// reading that text back. These guard that every charge ChargeUsage can ask reads back as itself.

const quota = fc.stringMatching(QUOTA_NAME_PATTERN);
const keyId = fc.constantFrom("", newKeyId(), newKeyId());
const charge: fc.Arbitrary<ChargeFingerprint> = fc.record({
  mode: fc.constantFrom("live" as const, "test" as const),
  cost: fc.integer({ min: 0, max: 1_000_000_000 }),
  quota: fc.oneof(fc.constant(""), quota),
  keyId,
});

describe("charge fingerprints", () => {
  it("read back as the charge they were written from", () => {
    fc.assert(
      fc.property(charge, (c) => {
        const text = fingerprintText(c);
        expect(text).not.toContain(",");
        expect(parseFingerprint(text)).toEqual(c);
      }),
    );
  });

  it("writes the documented shape", () => {
    expect(fingerprintText({ mode: "live", cost: 5, quota: "", keyId: "" })).toBe("live:5::");
    expect(fingerprintText({ mode: "test", cost: 0, quota: "images", keyId: "key_01J00000000000000000000000" })).toBe("test:0:images:key_01J00000000000000000000000");
  });

  it("names nothing from text it did not write", () => {
    for (const text of [undefined, 7, "", "live:5:", "prod:5::", "live:-1::", "live:5:Images:", "live:5::key_short", "live:5::key_01J00000000000000000000000:extra", "live:5:: ", "sk_live_secret"]) {
      expect(parseFingerprint(text)).toBeNull();
    }
  });

  it("says who was charged and against what", () => {
    expect(chargeText({ mode: "live", cost: 5, quota: "", keyId: "" })).toBe("a charge of 5 credits by the account");
    expect(chargeText({ mode: "test", cost: 2, quota: "images", keyId: "key_01J00000000000000000000000" })).toBe('a charge of 2 credits by test key key_01J00000000000000000000000 against quota "images"');
    expect(chargeText({ mode: "live", cost: 2, quota: "", keyId: "key_01J00000000000000000000000" })).toBe("a charge of 2 credits by key key_01J00000000000000000000000");
  });
});
