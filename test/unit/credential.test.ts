import { describe, expect, it } from "vitest";
import { extractCredential } from "../../src/authz/credential.js";

const names = ["authorization", "x-api-key"];

describe("credential extraction", () => {
  it("reads Bearer in any case and spacing, and X-API-Key", () => {
    expect(extractCredential({ authorization: "Bearer abc" }, names)).toEqual({ ok: true, key: "abc", header: "authorization" });
    expect(extractCredential({ authorization: "bearer\t abc \t" }, names)).toEqual({ ok: true, key: "abc", header: "authorization" });
    expect(extractCredential({ "x-api-key": "  abc " }, names)).toEqual({ ok: true, key: "abc", header: "x-api-key" });
  });

  it("accepts the same key in both headers", () => {
    expect(extractCredential({ authorization: "Bearer abc", "x-api-key": "abc" }, names)).toMatchObject({ ok: true, key: "abc" });
  });

  it("skips other authorization schemes", () => {
    expect(extractCredential({ authorization: "Basic dXNlcjpwYXNz" }, names)).toEqual({ ok: false, reason: "MISSING_CREDENTIAL" });
    expect(extractCredential({ authorization: "Basic dXNlcjpwYXNz", "x-api-key": "abc" }, names)).toMatchObject({ ok: true, header: "x-api-key" });
  });

  it("refuses conflicting, repeated and broken Bearer values", () => {
    expect(extractCredential({ authorization: "Bearer abc", "x-api-key": "xyz" }, names)).toEqual({ ok: false, reason: "MALFORMED_KEY" });
    expect(extractCredential({ "x-api-key": ["abc", "abc"] }, names)).toEqual({ ok: false, reason: "MALFORMED_KEY" });
    // HTTP mode hands repeats over as arrays: Node itself would keep only the first Authorization.
    expect(extractCredential({ authorization: ["Bearer abc", "Bearer xyz"] }, names)).toEqual({ ok: false, reason: "MALFORMED_KEY" });
    expect(extractCredential({ authorization: ["Bearer abc", "Bearer abc"] }, names)).toEqual({ ok: false, reason: "MALFORMED_KEY" });
    expect(extractCredential({ authorization: ["Basic dXNlcjpwYXNz", "Bearer abc"], "x-api-key": "abc" }, names)).toEqual({ ok: false, reason: "MALFORMED_KEY" });
    expect(extractCredential({ authorization: "Bearer" }, names)).toEqual({ ok: false, reason: "MALFORMED_KEY" });
    expect(extractCredential({ authorization: "Bearer a b" }, names)).toEqual({ ok: false, reason: "MALFORMED_KEY" });
  });

  it("reports a missing credential", () => {
    expect(extractCredential({}, names)).toEqual({ ok: false, reason: "MISSING_CREDENTIAL" });
    expect(extractCredential({ "x-api-key": "   " }, names)).toEqual({ ok: false, reason: "MISSING_CREDENTIAL" });
  });
});
