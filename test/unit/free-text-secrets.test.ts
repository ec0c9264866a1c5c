import { randomBytes } from "node:crypto";
import { describe, expect, it } from "vitest";
import { InvalidArgumentError } from "../../src/admin/errors.js";
import { check, checkMetadata, checkNoSecret, holdsCredential, keyName, reasonText } from "../../src/admin/vocabulary.js";
import { KEY_RANDOM_LENGTH, KeyFormat } from "../../src/keys/key-format.js";
import { redactText } from "../../src/keys/redact.js";

// Free text KeyAdmin keeps (names, reasons, metadata) is recorded in the audit trail, so a key or
// an admin token in it is refused (holdsCredential). The matcher must find every whole
// credential, and let through text that only names one (a prefix, a key's start…last4).

const NO_SECRET = "must not contain an API key, an admin token or another credential (it would be kept in the audit trail); name a key by its id or start…last4";

const kg = new KeyFormat("kg");
const liveKey = kg.generate("live");
const testKey = new KeyFormat("acme").generate("test");
const longPrefixKey = new KeyFormat("a1b2c3d4e5").generate("live");
const generatedToken = `kgadm_${randomBytes(32).toString("base64url")}`;

/** Text holding a credential, by what it holds. */
const HOLDING: ReadonlyArray<readonly [string, string]> = [
  ["a live key", liveKey],
  ["a test key under another prefix", testKey],
  ["a key under a 10-character prefix", longPrefixKey],
  ["a key inside a sentence", `found in a public gist: ${liveKey}, revoke it`],
  ["a key in a URL", `https://example.com/cb?key=${liveKey}&x=1`],
  ["a key glued to more text", `${liveKey}abc`],
  ["a key percent-encoded", liveKey.replaceAll("_", "%5F")],
  ["a key percent-encoded in lower case", liveKey.replaceAll("_", "%5f")],
  ["a key glued to the word before it", `leaked${liveKey}`],
  ["a generated admin token", generatedToken],
  ["an admin token in a sentence", `paid by kgadm_test_token_0123456789abcdefghij today`],
  ["the shortest admin token with keygate's prefix (24 characters)", `kgadm_${"a".repeat(18)}`],
  ["a Bearer credential", "Authorization: Bearer ops-token-0123456789abcdef"],
  ["a Bearer JWT", "bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.sig"],
  ["a Basic credential", "Basic dXNlcjpwYXNzd29yZA=="],
];

/** Text that names credentials, or merely looks technical, without holding one. */
const NAMING: ReadonlyArray<readonly [string, string]> = [
  ["a key prefix", "kg_live_ prefix rotated"],
  ["a key's start and last4", `leaked: ${liveKey.slice(0, 12)}…${liveKey.slice(-4)}`],
  ["a key's head and one character short of its random part", liveKey.slice(0, kg.liveHead.length + KEY_RANDOM_LENGTH - 1)],
  // A key is found by its checksum: without it, a key's shape is other systems' ids' too.
  ["a key's random part without its checksum", liveKey.slice(0, kg.liveHead.length + KEY_RANDOM_LENGTH)],
  ["a key with a wrong checksum", `${liveKey.slice(0, -1)}${liveKey.endsWith("A") ? "B" : "A"}`],
  ["a Stripe Checkout Session id (an order id in a top-up's reason)", `stripe checkout cs_live_a1${"B2c3D4e5F6g7H8".repeat(4)}`],
  ["a CI key name: a suite name and a dashless UUID", "e2e_test_9f1c2b7e4a5d4c3b8e1f0a2b3c4d5e6f"],
  ["Basic and a long word", "Basic internationalization"],
  ["basic and a hyphenated word", "basic read-only-dashboard"],
  ["the admin token prefix", "kgadm_ tokens rotated"],
  ["keygate's prefix and 17 characters", `kgadm_${"a".repeat(17)}`],
  ["an identifier with _test_", "ci_test_runner01"],
  ["a longer identifier with _live_", "billing_live_reconciliationJob"],
  ["an authentication scheme named", "Bearer authentication moved to mTLS; Basic auth off"],
  ["a SHA-256 digest", `sha256:${"0123456789abcdef".repeat(4)}`],
  ["a UUID", "3f2b8c1e-9d4a-4b7e-8f1c-2a6d5e9b0c7f"],
  ["a key id", "key_01K0000000000000000000000A"],
  ["an email", "ops@example.com"],
  ["text in other scripts", "Clé de prod — 東京 🔑"],
  ["nothing", ""],
];

describe("free-text secrets happy: text that names a credential passes", () => {
  it.each(NAMING)("%s", (_label, text) => {
    expect(holdsCredential(text)).toBe(false);
    expect(check(reasonText, "reason", text)).toBe(text);
    expect(checkNoSecret("metadata.note", text)).toBe(text);
  });

  it("names are trimmed and kept; metadata is kept as sent", () => {
    expect(check(keyName, "name", "  ci_test_runner01 ")).toBe("ci_test_runner01");
    expect(checkMetadata({ image: `sha256:${"ab".repeat(32)}`, "kg_live_note": "kg_live_ prefix" })).toEqual({ image: `sha256:${"ab".repeat(32)}`, "kg_live_note": "kg_live_ prefix" });
  });
});

describe("free-text secrets security: text holding a credential is refused", () => {
  it.each(HOLDING)("%s", (_label, text) => {
    // Twice: a stateful (global) regular expression would answer the second test from lastIndex.
    expect([holdsCredential(text), holdsCredential(text)]).toEqual([true, true]);
  });

  it("everything refused here is also what the log redactor hides: the shapes are its own, narrowed", () => {
    expect(HOLDING.filter(([, text]) => redactText(text) === text).map(([label]) => label)).toEqual([]);
  });
});

describe("free-text secrets error: the refusal names the field and never quotes the value", () => {
  it("reason, name and checkNoSecret: InvalidArgumentError with the field and the one message", () => {
    const refusals = [
      (text: string) => check(reasonText, "reason", `see ${text}`),
      (text: string) => check(keyName, "name", `copy of ${text}`),
      (text: string) => checkNoSecret("idempotency_key", text),
    ];
    for (const [, text] of HOLDING) {
      for (const refuse of refusals) {
        const error = catchError(() => refuse(text));
        expect(error).toBeInstanceOf(InvalidArgumentError);
        expect(error.message.endsWith(`: ${NO_SECRET}`)).toBe(true);
        expect(error.message.includes(text)).toBe(false);
      }
    }
    expect(catchError(() => check(reasonText, "reason", liveKey)).message).toBe(`reason: ${NO_SECRET}`);
    expect(catchError(() => check(keyName, "name", liveKey)).message).toBe(`name: ${NO_SECRET}`);
  });

  it("checkMetadata: a value names its key; a key holding a credential is named metadata.[redacted]", () => {
    expect(catchError(() => checkMetadata({ note: `leaked ${liveKey}` })).message).toBe(`metadata.note: ${NO_SECRET}`);
    for (const key of [liveKey, generatedToken.slice(0, 40), `x.${testKey}`]) {
      const error = catchError(() => checkMetadata({ [key]: "v" }));
      expect({ field: error instanceof InvalidArgumentError ? error.field : null, message: error.message }).toEqual({ field: "metadata.[redacted]", message: `metadata.[redacted]: ${NO_SECRET}` });
    }
  });

  it("a credential past the length limit is refused for its length first, still unquoted", () => {
    const text = `${"x".repeat(200)}${liveKey}`;
    expect(catchError(() => check(reasonText, "reason", text)).message).toBe("reason: must be at most 200 characters");
  });
});

function catchError(call: () => unknown): Error {
  try {
    call();
  } catch (error) {
    if (error instanceof Error) return error;
    throw error;
  }
  throw new Error("the call did not throw");
}
