import { describe, expect, it } from "vitest";
import { redactText } from "../../src/keys/redact.js";

// A shape that starts with \b (a 64-hex key hash, a kgadm_ admin token, a Bearer/Basic credential)
// is still redacted when a configured literal sits right against it with no separator, and
// overlapping occurrences of one literal are covered whole.
const HASH = "0123456789abcdef".repeat(4);
const TOKEN = "kgadm_AbCdEfGh12345678";

describe("redactText where literals touch or overlap shapes", () => {
  it("a literal directly before a key hash: the hash stays out", () => {
    const out = redactText(`lookup pw${HASH} failed`, ["pw"]);
    expect(out).not.toContain(HASH.slice(0, 32));
  });

  it("a literal directly after a key hash: the hash stays out", () => {
    const out = redactText(`lookup ${HASH}pw failed`, ["pw"]);
    expect(out).not.toContain(HASH.slice(0, 32));
  });

  it("a literal directly before an admin token: the token stays out", () => {
    const out = redactText(`got pw${TOKEN}`, ["pw"]);
    expect(out).not.toContain(TOKEN.slice(6));
  });

  it("overlapping occurrences of one literal are all covered", () => {
    // "abab" occurs at 1 and 3 of "xababab": the second, overlapping one is printed in part.
    expect(redactText("xababab y", ["abab"])).toBe("x[redacted] y");
  });
});

describe("redactText: a literal that is a scheme's credential", () => {
  it("redacts the credential and leaves the next word", () => {
    expect(redactText("called with Bearer s3cr3t-value and more", ["s3cr3t-value"])).toBe("called with Bearer [redacted] and more");
  });

  it("a scheme right after a literal still hides its credential", () => {
    expect(redactText("pwBearer abcdefgh", ["pw"])).toBe("[redacted]Bearer [redacted]");
  });
});
