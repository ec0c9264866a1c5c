import { describe, expect, it } from "vitest";
import fc from "fast-check";
import { bearerKey, extractCredential as extractFrom } from "../../src/authz/credential.js";
import { HeaderList, RecordHeaders } from "../../src/authz/headers.js";

// Headers as the HTTP mode hands them over: an object of names, repeats as arrays.
const extractCredential = (headers: Record<string, string | string[]>, names: readonly string[]) => extractFrom(new RecordHeaders(headers), names);

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

describe("header lists", () => {
  it("keeps a name once with its last value, in first-seen order, scanned or indexed", () => {
    for (const count of [3, 40]) {
      const list = new HeaderList();
      for (let i = 0; i < count; i++) list.set(`x-h${i}`, `v${i}`);
      list.set("x-h1", "again");
      list.set("authorization", "Bearer abc");
      expect(list.size).toBe(count + 1);
      expect(list.names()).toEqual([...Array.from({ length: count }, (_, i) => `x-h${i}`), "authorization"]);
      expect(list.get("x-h1")).toBe("again");
      expect(list.get("x-h0")).toBe("v0");
      expect(list.get(`x-h${count - 1}`)).toBe(`v${count - 1}`);
      expect(list.get("x-api-key")).toBeUndefined();
      expect(list.get("constructor")).toBeUndefined();
      expect(extractFrom(list, names)).toEqual({ ok: true, key: "abc", header: "authorization" });
    }
  });

  it("reads only own names of a record", () => {
    const headers = new RecordHeaders({ "x-api-key": "abc" });
    expect(headers.get("constructor")).toBeUndefined();
    expect(headers.get("toString")).toBeUndefined();
    expect(headers.names()).toEqual(["x-api-key"]);
  });
});

describe("reading a Bearer value", () => {
  // The reference: the regular expressions extractCredential used before bearerKey.
  const BEARER = /^bearer[ \t]+([^ \t]+)[ \t]*$/i;
  const reference = (value: string): string | "broken" | "other" => {
    const match = BEARER.exec(value);
    if (match !== null) return match[1] ?? "";
    return /^bearer\b/i.test(value) ? "broken" : "other";
  };
  const read = (value: string): string | "broken" | "other" => {
    const key = bearerKey(value);
    return key === 0 ? "broken" : key === 1 ? "other" : key;
  };

  it("answers as the regular expressions do, for values built from the scheme's pieces and any text", () => {
    const piece = fc.oneof(
      fc.constantFrom("bearer", "Bearer", "BEARER", "bEaReR", "bearer_", "bearerx", "basic", "b", "bear", " ", "\t", "  \t", "\n", "\u00a0", ":", "=", "kg_live_abc", "a b", "ſ", "\u212a", "\u0130"),
      fc.string({ maxLength: 6 }),
      fc.string({ unit: "binary", maxLength: 4 }),
    );
    fc.assert(
      fc.property(fc.array(piece, { maxLength: 6 }), (pieces) => {
        const value = pieces.join("");
        expect(read(value)).toBe(reference(value));
      }),
      { numRuns: 20_000 },
    );
  });

  it("reads the usual shapes", () => {
    expect(read("Bearer abc")).toBe("abc");
    expect(read("bearer \t abc\t ")).toBe("abc");
    expect(read("Bearer")).toBe("broken");
    expect(read("Bearer ")).toBe("broken");
    expect(read("Bearer a b")).toBe("broken");
    expect(read("Bearer:abc")).toBe("broken");
    expect(read("Bearerabc")).toBe("other");
    expect(read("Basic dXNlcjpwYXNz")).toBe("other");
    expect(read("")).toBe("other");
  });
});
