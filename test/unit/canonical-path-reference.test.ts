import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { MAX_PATH_LENGTH, PATH_REFUSALS, RouteRefusal, RouteTable, canonicalPath } from "../../src/authz/routes.js";

// canonicalPath once built its result with += and read the end of it at every "/", which was
// quadratic in a long path's segments (test/security/canonical-path-linear.security.test.ts). The
// rewrite must give, for every input, exactly what that version gave: the same canonical string,
// or the same refusal (the first problem found, scanning from the left). That version is kept
// below, as it was in src/authz/routes.ts, as the reference.

// ---- Reference: canonicalPath and its helpers as they were (doc comments left out). ----

function pathEnd(rawPath: string): number {
  const query = rawPath.indexOf("?");
  return query < 0 ? rawPath.length : query;
}

const SLASH = 0x2f;
const DOT = 0x2e;

const REPLACEMENT = 0xfffd;

function needsWork(path: string): boolean {
  let previous = 0;
  for (let i = 0; i < path.length; i++) {
    const code = path.charCodeAt(i);
    if (code <= 0x20 || code === 0x7f || code === 0x3f || code === 0x23 || code === 0x25 || code === 0x3b || code === 0x5c || code === REPLACEMENT) return true;
    if (code === SLASH && (previous === SLASH || previous === DOT)) return true;
    previous = code;
  }
  return previous === DOT;
}

function hexValue(code: number): number {
  if (code >= 0x30 && code <= 0x39) return code - 0x30;
  if (code >= 0x41 && code <= 0x46) return code - 0x37;
  if (code >= 0x61 && code <= 0x66) return code - 0x57;
  return -1;
}

function isUnreserved(byte: number): boolean {
  return (
    (byte >= 0x41 && byte <= 0x5a) || (byte >= 0x61 && byte <= 0x7a) || (byte >= 0x30 && byte <= 0x39) || byte === 0x2d || byte === DOT || byte === 0x5f || byte === 0x7e
  );
}

function escapedRefusal(byte: number): RouteRefusal | null {
  if (byte < 0x20 || byte === 0x7f) return PATH_REFUSALS.encodedControl;
  switch (byte) {
    case 0x2f: // "/"
    case 0x5c: // "\"
      return PATH_REFUSALS.encodedSlash;
    case DOT:
      return PATH_REFUSALS.encodedDot;
    case 0x25: // "%": a double-encoded escape, which a server that decodes twice reads as the escaped character
    case 0x3b: // ";"
    case 0x3f: // "?"
    case 0x23: // "#"
      return PATH_REFUSALS.encodedDelimiter;
    default:
      return null;
  }
}

function utf8Continuations(lead: number): number {
  if (lead >= 0xc2 && lead <= 0xdf) return 1;
  if (lead >= 0xe0 && lead <= 0xef) return 2;
  if (lead >= 0xf0 && lead <= 0xf4) return 3;
  return -1;
}

function firstContinuationOk(lead: number, byte: number): boolean {
  if (lead === 0xe0) return byte >= 0xa0 && byte <= 0xbf;
  if (lead === 0xed) return byte >= 0x80 && byte <= 0x9f;
  if (lead === 0xf0) return byte >= 0x90 && byte <= 0xbf;
  if (lead === 0xf4) return byte >= 0x80 && byte <= 0x8f;
  return byte >= 0x80 && byte <= 0xbf;
}

function escapeAt(path: string, i: number, end: number): number {
  if (i + 2 >= end) return -1;
  const high = hexValue(path.charCodeAt(i + 1));
  const low = hexValue(path.charCodeAt(i + 2));
  return high < 0 || low < 0 ? -1 : high * 16 + low;
}

function referenceCanonicalPath(rawPath: string): string | RouteRefusal {
  if (rawPath.charCodeAt(0) !== SLASH) return PATH_REFUSALS.notOriginForm;
  // A gRPC Check's path may be megabytes long (the message limit, not the proxy's header limit,
  // bounds it), and the work below is per character: longer than servers serve, refused.
  if (rawPath.length > MAX_PATH_LENGTH && pathEnd(rawPath) > MAX_PATH_LENGTH) return PATH_REFUSALS.tooLong;
  if (!needsWork(rawPath)) return rawPath;
  let end = rawPath.indexOf("?");
  if (end < 0) end = rawPath.length;
  let out = "/";
  // Start of the current segment within `out`.
  let segmentStart = 1;
  for (let i = 1; i < end; i++) {
    const code = rawPath.charCodeAt(i);
    if (code <= 0x20 || code === 0x7f) return PATH_REFUSALS.control;
    // Bytes that were not UTF-8 (check-request.ts LENIENT_UTF8): no server reads them alike.
    if (code === REPLACEMENT) return PATH_REFUSALS.notUtf8;
    switch (code) {
      case SLASH: {
        const problem = segmentProblem(out, segmentStart);
        if (problem !== null) return problem;
        out += "/";
        segmentStart = out.length;
        continue;
      }
      case 0x23: // "#"
        return PATH_REFUSALS.fragment;
      case 0x5c: // "\"
        return PATH_REFUSALS.backslash;
      case 0x3b: // ";"
        return PATH_REFUSALS.parameter;
      case 0x25: {
        const byte = escapeAt(rawPath, i, end);
        if (byte < 0) return PATH_REFUSALS.malformedEscape;
        const refused = escapedRefusal(byte);
        if (refused !== null) return refused;
        if (isUnreserved(byte)) {
          out += String.fromCharCode(byte);
          i += 2;
          continue;
        }
        if (byte >= 0x80) {
          const next = utf8Sequence(rawPath, i, end, byte);
          if (next < 0) return PATH_REFUSALS.malformedEscape;
          out += rawPath.slice(i, next).toUpperCase();
          i = next - 1;
          continue;
        }
        out += rawPath.slice(i, i + 3).toUpperCase();
        i += 2;
        continue;
      }
      default:
        out += rawPath[i] ?? "";
    }
  }
  // The last segment: an empty one is a trailing slash, which every server reads alike.
  if (out.length > segmentStart) {
    const problem = segmentProblem(out, segmentStart);
    if (problem !== null) return problem;
  }
  return out;
}

function utf8Sequence(path: string, i: number, end: number, lead: number): number {
  const continuations = utf8Continuations(lead);
  if (continuations < 0) return -1;
  let at = i + 3;
  for (let k = 0; k < continuations; k++, at += 3) {
    if (path.charCodeAt(at) !== 0x25) return -1;
    const byte = escapeAt(path, at, end);
    if (byte < 0) return -1;
    if (k === 0 ? !firstContinuationOk(lead, byte) : byte < 0x80 || byte > 0xbf) return -1;
  }
  return at;
}

function segmentProblem(out: string, start: number): RouteRefusal | null {
  const length = out.length - start;
  if (length === 0) return PATH_REFUSALS.emptySegment;
  if (out.charCodeAt(out.length - 1) === DOT) {
    const dotSegment = length === 1 || (length === 2 && out.charCodeAt(start) === DOT);
    return dotSegment ? PATH_REFUSALS.dotSegment : PATH_REFUSALS.trailingDot;
  }
  if (length >= 3 && out.endsWith("%20")) return PATH_REFUSALS.trailingDot;
  return null;
}

// ---- End of the reference. ----

const HEX = [..."0123456789abcdefABCDEF"];
/** Pieces a path is built from: every character and escape class canonicalPath treats apart. */
const piece = fc.oneof(
  { weight: 6, arbitrary: fc.constantFrom("/", "/", "/", ".", "..", "%", "a", "Z", "v1", "decks", "x", "-", "_", "~") },
  { weight: 2, arbitrary: fc.constantFrom(...HEX) },
  {
    weight: 4,
    arbitrary: fc.constantFrom("%2F", "%2f", "%5C", "%20", "%78", "%41", "%7e", "%2E", "%2e", "%25", "%3B", "%3F", "%23", "%00", "%1F", "%7F", "%3a", "%40", "%c3%a9", "%C3%A9", "%e2%82%ac", "%F0%9F%94%91", "%C0%AE", "%ED%A0%80", "%C3", "%C3%41", "%F4%90%80%80", "%E0%80%AF", "%80", "%zz", "%4", "%%41"),
  },
  { weight: 2, arbitrary: fc.constantFrom("é", "ſ", "K", "İ", "\u{1F511}", "\uD800", "\uFFFD", " ", "\t", "\u0000", "\u007F", "#", "?", ";", "\\", "?q=/../%2F", "&") },
  { weight: 1, arbitrary: fc.string({ unit: "binary", maxLength: 3 }) },
);
const shortPath = fc.oneof(
  { weight: 9, arbitrary: fc.array(piece, { maxLength: 24 }).map((pieces) => `/${pieces.join("")}`) },
  { weight: 1, arbitrary: fc.array(piece, { maxLength: 8 }).map((pieces) => pieces.join("")) },
);

/** The security test's shape: one escape, then thousands of one-character segments, then an ending. */
const longPath = fc
  .tuple(
    fc.constantFrom("/v1/decks/", "/v1/teams/", "/"),
    fc.constantFrom("%78", "x", "%c3%a9", "%20x", ""),
    fc.constantFrom("/a", "/a", "/a", "/a", "/a", "/%41", "/ab", "/x%7e", "/a.", "/."),
    fc.oneof(fc.integer({ min: 2, max: 200 }), fc.integer({ min: MAX_PATH_LENGTH - 400, max: MAX_PATH_LENGTH + 4 })),
    fc.oneof(fc.constantFrom("", "", "", "/", "/.", "/..", "/%20", "/a%20", "//", "/%2F", "/a.", "?q"), fc.array(piece, { maxLength: 4 }).map((pieces) => pieces.join(""))),
  )
  .map(([prefix, escape, segment, length, ending]) => `${prefix}${escape}${segment.repeat(Math.floor(length / segment.length))}${ending}`);

const table = new RouteTable([
  { method: "*", pathPrefix: "/v1/decks", requiredScopes: ["decks"], cost: 1, metered: true },
  { method: "GET", pathPrefix: "/v1/decks/export", requiredScopes: ["decks", "export"], cost: 5, metered: true },
  { method: "*", pathPrefix: "/v1/teams/{project}", requiredScopes: ["decks"], cost: 1, metered: true },
  { method: "*", pathPrefix: "/v1/teams/{project}/x", requiredScopes: ["export"], cost: 2, metered: false },
]);

/** canonicalPath equals the reference, and requirements follows from the reference's answer. */
function agrees(path: string): void {
  const expected = referenceCanonicalPath(path);
  expect(canonicalPath(path)).toBe(expected);
  const requirements = table.requirements("GET", path, undefined);
  if (expected instanceof RouteRefusal) {
    expect(requirements).toBe(expected);
    return;
  }
  // A canonical path is its own canonical form, so the raw path asks exactly what it asks.
  expect(canonicalPath(expected)).toBe(expected);
  expect(requirements).toEqual(table.requirements("GET", expected, undefined));
}

describe("canonicalPath equals the reference it replaced", () => {
  it("for short paths of slashes, dots, escapes, letters, non-ASCII and characters refused raw", () => {
    fc.assert(fc.property(shortPath, agrees), { numRuns: 30_000, seed: 3986 });
  });

  it("for long paths of one-character segments with an escape, up to and past MAX_PATH_LENGTH", () => {
    fc.assert(fc.property(longPath, fc.constantFrom("", "?q=1"), (path, query) => agrees(path + query)), { numRuns: 300, seed: 16_384 });
  }, 60_000);

  it("for the paths written out in the routes tests", () => {
    for (const path of [
      "/v1/decks?x=/../%2F;#",
      "/v1/%64ecks",
      "/v1/%7Euser%2D%5F%41",
      "/v1/a%3ab%40c%20d",
      "/v1/caf%c3%a9",
      "/v1/decks/?q",
      "/v1/a%20/b",
      "/v1/%41./b",
      "/v1/.%41/b",
      "/v1/%41%41",
      "/v1//x",
      "/v1/./x",
      "/v1/../x",
      "/v1/x/..",
      "/v1/x/.",
      "/v1/x/",
      "/?",
      "/%20",
      "/a%20?b",
      `/v1/decks/x%78${"/a".repeat(7_990)}`,
    ]) {
      agrees(path);
    }
    expect(canonicalPath("/v1/%41./b")).toBe(PATH_REFUSALS.trailingDot);
  });
});
