import { PROJECT_SEGMENT, QUOTA_NAME_PATTERN, ROLES, SCOPE_NAME_PATTERN } from "../config.js";
import type { Role } from "../store/store.js";
import type { Route, RouteMatching } from "../config.js";
import type { DenyReason } from "./reasons.js";

/** What a route demands of a key. */
export interface RouteRequirements {
  requiredScopes: readonly string[];
  projectId: string | null;
  cost: number;
  /** Counts toward the daily quota and spends `cost` credits; false: neither (rate limits still apply). */
  metered: boolean;
  /** The lowest account role allowed (ROLES order); null: every role is allowed. */
  minRole: Role | null;
  /** The named daily quota a metered request counts toward; null: the plan's dailyQuota. */
  quota: string | null;
}

/**
 * A request the routes step refuses: a path that servers could read differently (INVALID_PATH,
 * 400), or per-route settings from the proxy that keygate cannot use (ROUTE_MISCONFIGURED, 500).
 * It has the shape of the pipeline's Deny, so the pipeline answers it as it is.
 */
export class RouteRefusal {
  readonly allow = false;
  constructor(
    readonly reason: Extract<DenyReason, "INVALID_PATH" | "ROUTE_MISCONFIGURED">,
    readonly message: string,
  ) {}
}

const invalidPath = (problem: string): RouteRefusal =>
  new RouteRefusal("INVALID_PATH", `The request path ${problem}, which servers read differently, so it is refused. Send the path in canonical form.`);

/**
 * Every reason a path is refused, one message each (built once; the path itself is never echoed).
 * Exported so tests can name the class they expect.
 */
export const PATH_REFUSALS = {
  notOriginForm: invalidPath('does not start with "/"'),
  control: invalidPath("contains a control character, a space or a NUL"),
  notUtf8: invalidPath("is not valid UTF-8 (or holds U+FFFD)"),
  fragment: invalidPath('contains "#"'),
  backslash: invalidPath('contains a backslash ("\\")'),
  parameter: invalidPath('contains ";" (a path parameter, as in ";x=1" or "..;/")'),
  malformedEscape: invalidPath('has a malformed percent-escape ("%" not followed by two hex digits, or escapes that are not UTF-8)'),
  encodedSlash: invalidPath('contains an encoded "/" or "\\" (%2F or %5C)'),
  encodedDot: invalidPath('contains an encoded "." (%2E)'),
  encodedControl: invalidPath("contains an encoded control character or NUL (such as %00)"),
  encodedDelimiter: invalidPath('contains an encoded "%", ";", "?" or "#" (%25, %3B, %3F or %23)'),
  emptySegment: invalidPath('contains an empty segment ("//")'),
  dotSegment: invalidPath('contains a "." or ".." segment'),
  trailingDot: invalidPath('has a segment ending in "." or a space, which Windows servers strip'),
  letterCase: new RouteRefusal(
    "INVALID_PATH",
    "The request path matches another route when letter case is ignored, as case-insensitive servers do, so it is refused. Send it in the letter case of the route.",
  ),
  tooLong: new RouteRefusal("INVALID_PATH", "The request path is longer than 16384 characters before its query, so it is refused. Send a shorter path."),
  projectSuffix: new RouteRefusal(
    "INVALID_PATH",
    'The request path ends in its project segment, which has a format suffix (such as ".json") that servers such as Rails cut off to read another project, so it is refused. Send a segment after the project, or use a project id with no dot.',
  ),
  formatSuffix: new RouteRefusal(
    "INVALID_PATH",
    'The request path ends in a format suffix (such as ".json") that servers such as Rails read as the format of the path without it, and that path matches another route, so it is refused. Send the path without the suffix, or name the suffixed path in a route.',
  ),
  unicodeCase: new RouteRefusal(
    "INVALID_PATH",
    'The request path holds a character that servers ignoring letter case read as an ASCII letter (such as "ſ", "ı" or the Kelvin sign), and read that way it matches another route, so it is refused. Send those letters in ASCII.',
  ),
} as const;

/**
 * CONNECT asks a proxy for a tunnel, not for an API resource: its target is a host and port,
 * which a proxy may pass on as the path "/" (Caddy does), so no route keygate picked would be
 * what the request does. Refused in any letter case, before any lookup or charge.
 */
export const CONNECT_REFUSAL = new RouteRefusal("INVALID_PATH", "The CONNECT method opens a tunnel, not an API request, so it is refused.");

/**
 * A method not in upper case whose upper-case spelling picks another route. HTTP methods are
 * case-sensitive, but servers differ: some read "post" as POST, others as a method of its own,
 * so whichever route keygate picked would be wrong for some upstream.
 */
export const METHOD_CASE_REFUSAL = new RouteRefusal(
  "INVALID_PATH",
  "The request method is not in upper case and matches another route when upper-cased, as some servers read it, so it is refused. Send the method in upper case.",
);

/** Proxy per-route settings keygate cannot use: a denial with status 500, never a guess. */
export const ROUTE_CONFIG_REFUSALS = {
  cost: new RouteRefusal("ROUTE_MISCONFIGURED", 'The gateway\'s per-route "cost" (context_extensions) is not a whole number. This is a gateway configuration error.'),
  minRole: new RouteRefusal("ROUTE_MISCONFIGURED", 'The gateway\'s per-route "min_role" (context_extensions) is not a role keygate knows. This is a gateway configuration error.'),
  metered: new RouteRefusal("ROUTE_MISCONFIGURED", 'The gateway\'s per-route "metered" (context_extensions) is neither "true" nor "false". This is a gateway configuration error.'),
  requiredScopes: new RouteRefusal(
    "ROUTE_MISCONFIGURED",
    'The gateway\'s per-route "required_scopes" (context_extensions) is not a comma-separated list of scope names. This is a gateway configuration error.',
  ),
  unknownScope: new RouteRefusal(
    "ROUTE_MISCONFIGURED",
    'The gateway\'s per-route "required_scopes" (context_extensions) names a scope that is not in the policy\'s scopes.catalog, so no key can hold it. This is a gateway configuration error.',
  ),
  quota: new RouteRefusal("ROUTE_MISCONFIGURED", 'The gateway\'s per-route "quota" (context_extensions) is not a quota name. This is a gateway configuration error.'),
  unknownQuota: new RouteRefusal("ROUTE_MISCONFIGURED", 'The gateway\'s per-route "quota" (context_extensions) names a quota no plan has. This is a gateway configuration error.'),
  projectId: new RouteRefusal(
    "ROUTE_MISCONFIGURED",
    'The gateway\'s per-route "project_id" (context_extensions) names another project than the request path does. This is a gateway configuration error.',
  ),
} as const;

const HAS_UPPER = /[A-Z]/;
const BLANK = /^\s*$/;
const WHOLE_NUMBER = /^\s*\d{1,9}\s*$/;

/** The longest path (before its query) a Check is judged for: nginx's default request line is 8 KiB. */
export const MAX_PATH_LENGTH = 16_384;

/** Where a path's query starts, or its length when it has none. */
function pathEnd(rawPath: string): number {
  const query = rawPath.indexOf("?");
  return query < 0 ? rawPath.length : query;
}

const SLASH = 0x2f;
const DOT = 0x2e;

/** U+FFFD, what invalid UTF-8 in a gRPC Check's path reads as. */
const REPLACEMENT = 0xfffd;

/**
 * False when the canonical form of a path that starts with "/" is the path itself: no query,
 * fragment, escape, ";", backslash, control character or space, no "//", and no segment ending
 * in "." (which covers "." and ".." segments). A loop: it runs on every Check, and measured
 * faster than a regular expression with these alternatives.
 */
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

/** RFC 3986 unreserved: ALPHA / DIGIT / "-" / "." / "_" / "~". */
function isUnreserved(byte: number): boolean {
  return (
    (byte >= 0x41 && byte <= 0x5a) || (byte >= 0x61 && byte <= 0x7a) || (byte >= 0x30 && byte <= 0x39) || byte === 0x2d || byte === DOT || byte === 0x5f || byte === 0x7e
  );
}

/** The refusal for an escaped byte that must never be decoded, or null if it is an ordinary one. */
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

/** How many continuation bytes a UTF-8 lead byte announces, or -1 for a byte that cannot lead. */
function utf8Continuations(lead: number): number {
  if (lead >= 0xc2 && lead <= 0xdf) return 1;
  if (lead >= 0xe0 && lead <= 0xef) return 2;
  if (lead >= 0xf0 && lead <= 0xf4) return 3;
  return -1;
}

/** The allowed range of the first continuation byte after `lead` (no overlongs, surrogates or > U+10FFFF). */
function firstContinuationOk(lead: number, byte: number): boolean {
  if (lead === 0xe0) return byte >= 0xa0 && byte <= 0xbf;
  if (lead === 0xed) return byte >= 0x80 && byte <= 0x9f;
  if (lead === 0xf0) return byte >= 0x90 && byte <= 0xbf;
  if (lead === 0xf4) return byte >= 0x80 && byte <= 0x8f;
  return byte >= 0x80 && byte <= 0xbf;
}

/** The decoded byte of the escape at `i` ("%XY"), or -1 when it is malformed. */
function escapeAt(path: string, i: number, end: number): number {
  if (i + 2 >= end) return -1;
  const high = hexValue(path.charCodeAt(i + 1));
  const low = hexValue(path.charCodeAt(i + 2));
  return high < 0 || low < 0 ? -1 : high * 16 + low;
}

/**
 * The canonical form of a request path, or the refusal that names why it has none.
 *
 * Canonical is what Envoy's `normalize_path` and `merge_slashes` give for a path that needs no
 * guessing: the query is cut off, escapes of unreserved characters are decoded (%64 is "d"), and
 * every other escape is kept with upper-case hex. Anything that servers could read differently is
 * refused instead of normalized: "." and ".." segments and "//" (servers that do not normalize
 * route them elsewhere), encoded "/", "\", ".", "%", ";", "?", "#" and control characters, raw
 * backslashes, ";" path parameters, control characters and spaces, "#", segments ending in "." or
 * a space (Windows strips them), malformed escapes and escapes that are not UTF-8. A path that is
 * already canonical is returned as it is, without allocating.
 */
export function canonicalPath(rawPath: string): string | RouteRefusal {
  if (rawPath.charCodeAt(0) !== SLASH) return PATH_REFUSALS.notOriginForm;
  // A gRPC Check's path may be megabytes long (the message limit, not the proxy's header limit,
  // bounds it), and the work below is per character: longer than any server serves, refused.
  if (rawPath.length > MAX_PATH_LENGTH && pathEnd(rawPath) > MAX_PATH_LENGTH) return PATH_REFUSALS.tooLong;
  if (!needsWork(rawPath)) return rawPath;
  let end = rawPath.indexOf("?");
  if (end < 0) end = rawPath.length;
  // The canonical path is rawPath's runs between the escapes it rewrites, joined once each, and
  // never read while it grows: a string built by += is a rope that every read copies whole, which
  // at each "/" of a long path was quadratic. Segments are judged on rawPath (segmentProblem).
  let out = "";
  // rawPath before `copied` is in `out`; from it up to `i`, it is canonical as it is.
  let copied = 0;
  // Start of the current segment within rawPath.
  let segmentStart = 1;
  for (let i = 1; i < end; i++) {
    const code = rawPath.charCodeAt(i);
    if (code <= 0x20 || code === 0x7f) return PATH_REFUSALS.control;
    // Bytes that were not UTF-8 (check-request.ts LENIENT_UTF8): no server reads them alike.
    if (code === REPLACEMENT) return PATH_REFUSALS.notUtf8;
    switch (code) {
      case SLASH: {
        const problem = segmentProblem(rawPath, segmentStart, i);
        if (problem !== null) return problem;
        segmentStart = i + 1;
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
        let next = i + 3;
        if (byte >= 0x80) {
          next = utf8Sequence(rawPath, i, end, byte);
          if (next < 0) return PATH_REFUSALS.malformedEscape;
        }
        out += rawPath.slice(copied, i) + (isUnreserved(byte) ? String.fromCharCode(byte) : rawPath.slice(i, next).toUpperCase());
        copied = next;
        i = next - 1;
        continue;
      }
    }
  }
  // The last segment: an empty one is a trailing slash, which every server reads alike.
  if (end > segmentStart) {
    const problem = segmentProblem(rawPath, segmentStart, end);
    if (problem !== null) return problem;
  }
  return out + rawPath.slice(copied, end);
}

/**
 * Checks the escaped UTF-8 sequence starting with the escape at `i` (whose byte is `lead`) and
 * returns the index just past it, or -1 when it is not well-formed UTF-8 (overlong forms such as
 * %C0%AE, which old servers decoded to ".", included).
 */
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

/** A character's ASCII letters when case-mapped, or null; see asciiCaseReading. */
const asciiReadings = new Map<number, string | null>();
const ASCII_LETTERS = /[A-Za-z]/g;

/**
 * What servers that ignore letter case may read a non-ASCII character as: the ASCII letters of
 * its upper- or lower-case mapping ("ſ" upper-cases to "S", "ı" to "I", the Kelvin sign and "İ"
 * lower-case to "k" and "i", "ß" upper-cases to "SS"), lower-cased; null when neither holds one.
 * Java's equalsIgnoreCase and .NET's OrdinalIgnoreCase match "ſecret" to "/secret" this way.
 */
function asciiReading(codePoint: number): string | null {
  let reading = asciiReadings.get(codePoint);
  if (reading !== undefined) return reading;
  const char = String.fromCodePoint(codePoint);
  const letters = (char.toUpperCase().match(ASCII_LETTERS) ?? char.toLowerCase().match(ASCII_LETTERS))?.join("") ?? "";
  reading = letters === "" ? null : letters.toLowerCase();
  if (asciiReadings.size < 4096) asciiReadings.set(codePoint, reading);
  return reading;
}

/**
 * A canonical path with every character that case-insensitive servers may read as ASCII letters
 * (raw, or escaped as UTF-8: the upstream decodes it) replaced by those letters; null when the
 * path has none, which is every ASCII path. Only called for a path holding "%" or a non-ASCII
 * character.
 */
export function asciiCaseReading(path: string): string | null {
  let out: string | null = null;
  let copied = 0;
  for (let i = 0; i < path.length; i++) {
    const code = path.charCodeAt(i);
    let codePoint = -1;
    let next = i + 1;
    if (code >= 0x80) {
      codePoint = path.codePointAt(i) ?? code;
      if (codePoint > 0xffff) next = i + 2;
    } else if (code === 0x25) {
      const byte = escapeAt(path, i, path.length);
      if (byte < 0x80) continue;
      // Canonical, so the escapes from here are well-formed UTF-8 (canonicalPath checked them).
      next = utf8Sequence(path, i, path.length, byte);
      if (next < 0) return null;
      codePoint = decodeURIComponent(path.slice(i, next)).codePointAt(0) ?? -1;
    }
    if (codePoint < 0) continue;
    const reading = asciiReading(codePoint);
    if (reading !== null) {
      out = `${out ?? ""}${path.slice(copied, i)}${reading}`;
      copied = next;
    }
    i = next - 1;
  }
  return out === null ? null : out + path.slice(copied);
}

/** Whether a path holds "%" or a non-ASCII character: only then can asciiCaseReading find one. */
function mayReadAsAscii(path: string): boolean {
  for (let i = 0; i < path.length; i++) {
    const code = path.charCodeAt(i);
    if (code >= 0x80 || code === 0x25) return true;
  }
  return false;
}

/**
 * Why the segment of rawPath from `start` to `end` is refused, or null. Judged on rawPath, which
 * tells what its canonical form would: an escape never decodes to "." (%2E is refused) and a kept
 * escape keeps its digits, so the canonical segment is empty, ".", "..", ends in "." or ends in
 * "%20" exactly when the raw one is or does.
 */
function segmentProblem(rawPath: string, start: number, end: number): RouteRefusal | null {
  const length = end - start;
  if (length === 0) return PATH_REFUSALS.emptySegment;
  if (rawPath.charCodeAt(end - 1) === DOT) {
    const dotSegment = length === 1 || (length === 2 && rawPath.charCodeAt(start) === DOT);
    return dotSegment ? PATH_REFUSALS.dotSegment : PATH_REFUSALS.trailingDot;
  }
  if (length >= 3 && rawPath.startsWith("%20", end - 3)) return PATH_REFUSALS.trailingDot;
  return null;
}

interface Entry {
  route: Route;
  /**
   * The prefix before its {project} segment (all of it when it has none), less any trailing
   * slash; lower-cased when matching ignores case.
   */
  head: string;
  /** The prefix after its {project} segment ("" when nothing follows); null when it has none. */
  tail: string | null;
  /** head and tail lower-cased: for the letter-case check. */
  foldedHead: string;
  foldedTail: string | null;
  /** What the route asks when the proxy sends no per-route settings. */
  requirements: RouteRequirements;
}

const PROJECT_PART = `/${PROJECT_SEGMENT}`;

/** Whether a canonical path falls under a prefix split at its {project} segment (see Entry). */
function under(path: string, head: string, tail: string | null): boolean {
  if (tail === null) return head === "" || (path.startsWith(head) && (path.length === head.length || path.charCodeAt(head.length) === SLASH));
  if (!path.startsWith(head) || path.charCodeAt(head.length) !== SLASH) return false;
  const end = projectEnd(path, head.length);
  if (end === head.length + 1) return false;
  if (tail === "") return true;
  return path.startsWith(tail, end) && (path.length === end + tail.length || path.charCodeAt(end + tail.length) === SLASH);
}

/** Where the segment after `path[slashAt]` ends. */
function projectEnd(path: string, slashAt: number): number {
  const end = path.indexOf("/", slashAt + 1);
  return end === -1 ? path.length : end;
}

/** What a request that no route names must satisfy: nothing beyond a valid key; metered, cost 1. */
export const NO_REQUIREMENTS: RouteRequirements = { requiredScopes: [], projectId: null, cost: 1, metered: true, minRole: null, quota: null };

// Distinct context_extensions values are few (one per proxy route), so their judgments are kept.
// A Check on the gRPC port may send a value of up to the 4 MiB message limit: only values as short
// as a proxy route's are kept, so made-up ones pin a few MiB at most, never gigabytes.
const MAX_PARSED_SCOPES = 1024;
const MAX_KEPT_SCOPES_LENGTH = 1024;

/** The routes table from config, matched by method and longest path prefix on canonical paths. */
export class RouteTable {
  /** Longest prefix first. */
  readonly #entries: Entry[];
  readonly #caseInsensitive: boolean;
  /** Some prefix has an upper-case letter: then even a lower-case path may match differently folded. */
  readonly #upperInPrefixes: boolean;
  /** Letters past this many characters never decide a match (the longest prefix, and its "/"). */
  readonly #decidingLength: number;
  readonly #parsedScopes = new Map<string, readonly string[] | RouteRefusal>();
  /** The scope catalog #parsedScopes was judged against. */
  #parsedCatalog: ReadonlySet<string> | undefined;

  constructor(routes: readonly Route[], matching: RouteMatching = { caseInsensitive: false }) {
    this.#caseInsensitive = matching.caseInsensitive;
    this.#entries = routes
      .map((route) => {
        const bare = route.pathPrefix.endsWith("/") ? route.pathPrefix.slice(0, -1) : route.pathPrefix;
        const at = bare.indexOf(PROJECT_PART);
        const head = at === -1 ? bare : bare.slice(0, at);
        const tail = at === -1 ? null : bare.slice(at + PROJECT_PART.length);
        const foldedHead = head.toLowerCase();
        const foldedTail = tail === null ? null : tail.toLowerCase();
        const entry: Entry = {
          route,
          head: matching.caseInsensitive ? foldedHead : head,
          tail: matching.caseInsensitive ? foldedTail : tail,
          foldedHead,
          foldedTail,
          requirements: {
            requiredScopes: route.requiredScopes,
            projectId: route.projectId ?? null,
            cost: route.cost,
            metered: route.metered,
            minRole: route.minRole ?? null,
            quota: route.quota ?? null,
          },
        };
        return { entry, segments: bare.split("/").length - 1 };
      })
      // Most segments first (for literal prefixes, the longest); at equal depth a literal segment
      // before {project}, so "/projects/shared" wins over "/projects/{project}".
      .sort((a, b) => b.segments - a.segments || Number(a.entry.tail !== null) - Number(b.entry.tail !== null) || b.entry.head.length - a.entry.head.length)
      .map(({ entry }) => entry);
    this.#upperInPrefixes = this.#entries.some((entry) => HAS_UPPER.test(entry.head) || HAS_UPPER.test(entry.tail ?? ""));
    // Past a {project} segment, of any length, letters may still decide a match; else up to the
    // longest prefix, which need not be the first entry's (the deepest: "/v1/me/keys" comes
    // before the longer "/v1/administration").
    this.#decidingLength = this.#entries.some((entry) => entry.tail !== null)
      ? Number.POSITIVE_INFINITY
      : this.#entries.reduce((longest, entry) => Math.max(longest, entry.head.length), 0) + 1;
  }

  get isEmpty(): boolean {
    return this.#entries.length === 0;
  }

  /** The most specific route for the request, null when none matches, or why the path is refused. */
  match(method: string, rawPath: string): Route | null | RouteRefusal {
    const entry = this.#resolve(method, rawPath);
    return entry === null || entry instanceof RouteRefusal ? entry : entry.route;
  }

  /**
   * What the request must satisfy. Envoy's per-route context_extensions win field by field and
   * the routes table fills the rest; a blank value means "not set". A path that has no canonical
   * form, or a per-route value that keygate cannot use (a required scope outside `scopeCatalog`,
   * when given, included), is a refusal: never an exception, which Envoy's failure_mode_allow
   * could turn into an allow, and never a guess.
   */
  requirements(
    method: string,
    rawPath: string,
    extensions: Readonly<Record<string, string>> | undefined,
    scopeCatalog?: ReadonlySet<string>,
  ): RouteRequirements | RouteRefusal {
    const entry = this.#resolve(method, rawPath);
    if (entry instanceof RouteRefusal) return entry;
    let base = entry === null ? NO_REQUIREMENTS : entry.requirements;
    if (entry !== null && entry.tail !== null) {
      const project = this.#pathProject(entry, rawPath);
      if (project instanceof RouteRefusal) return project;
      base = { ...base, projectId: project };
    }
    if (extensions === undefined) return base;
    const scopesText = extensions["required_scopes"];
    const projectText = extensions["project_id"];
    const costText = extensions["cost"];
    const meteredText = extensions["metered"];
    const roleText = extensions["min_role"];
    const quotaText = extensions["quota"];
    const scopesSet = scopesText !== undefined && !BLANK.test(scopesText);
    const projectSet = projectText !== undefined && !BLANK.test(projectText);
    const costSet = costText !== undefined && !BLANK.test(costText);
    const meteredSet = meteredText !== undefined && !BLANK.test(meteredText);
    const roleSet = roleText !== undefined && !BLANK.test(roleText);
    const quotaSet = quotaText !== undefined && !BLANK.test(quotaText);
    if (!scopesSet && !projectSet && !costSet && !meteredSet && !roleSet && !quotaSet) return base;
    let requiredScopes = base.requiredScopes;
    if (scopesSet) {
      const parsed = this.#scopes(scopesText, scopeCatalog);
      if (parsed instanceof RouteRefusal) return parsed;
      requiredScopes = parsed;
    }
    let cost = base.cost;
    if (costSet) {
      if (!WHOLE_NUMBER.test(costText)) return ROUTE_CONFIG_REFUSALS.cost;
      cost = Number(costText);
    }
    let metered = base.metered;
    if (meteredSet) {
      const flag = meteredText.trim();
      if (flag !== "true" && flag !== "false") return ROUTE_CONFIG_REFUSALS.metered;
      metered = flag === "true";
    }
    let minRole = base.minRole;
    if (roleSet) {
      const role = ROLES.find((r) => r === roleText.trim());
      if (role === undefined) return ROUTE_CONFIG_REFUSALS.minRole;
      minRole = role;
    }
    let quota = base.quota;
    if (quotaSet) {
      const name = quotaText.trim();
      if (!QUOTA_NAME_PATTERN.test(name)) return ROUTE_CONFIG_REFUSALS.quota;
      quota = name;
    }
    let projectId = base.projectId;
    if (projectSet) {
      // A route whose path names the project: a per-route project may only agree with it.
      if (entry !== null && entry.tail !== null && projectText.trim() !== projectId) return ROUTE_CONFIG_REFUSALS.projectId;
      projectId = projectText.trim();
    }
    return { requiredScopes, projectId, cost, metered, minRole, quota };
  }

  /**
   * The project a matched {project} route's path names, as the upstream reads it: the canonical
   * segment (no escape in it stands for "/", "\\", "." or "%", and its UTF-8 is well formed)
   * percent-decoded, as every router decodes a path parameter ("team%3Aa" is project "team:a").
   * Compared with the key's project exactly, even when matching ignores case: a differently cased
   * project is refused, never guessed equal.
   */
  #pathProject(entry: Entry, rawPath: string): string | RouteRefusal {
    const path = canonicalPath(rawPath);
    if (path instanceof RouteRefusal) return path;
    const segment = path.slice(entry.head.length + 1, projectEnd(path, entry.head.length));
    if (!segment.includes("%")) return segment;
    try {
      return decodeURIComponent(segment);
    } catch {
      return PATH_REFUSALS.malformedEscape;
    }
  }

  /**
   * A non-blank required_scopes value as scope names, or the refusal when one is not a scope name
   * or not in the catalog. Judged once per value (of up to MAX_KEPT_SCOPES_LENGTH characters; a
   * longer one, which no proxy route needs, each time), so the catalog costs a Check nothing.
   */
  #scopes(text: string, catalog: ReadonlySet<string> | undefined): readonly string[] | RouteRefusal {
    if (catalog !== this.#parsedCatalog) {
      this.#parsedScopes.clear();
      this.#parsedCatalog = catalog;
    }
    let parsed = this.#parsedScopes.get(text);
    if (parsed !== undefined) return parsed;
    const names = text.split(",").map((s) => s.trim()).filter((s) => s.length > 0);
    // A value that is not blank but names no scope (",") is a mistake, not "no scope needed". A
    // scope outside the catalog (a typo such as "deck") is one no key can hold: every caller
    // would get 403 for the proxy's mistake.
    if (names.length === 0 || !names.every((name) => SCOPE_NAME_PATTERN.test(name))) parsed = ROUTE_CONFIG_REFUSALS.requiredScopes;
    else if (catalog !== undefined && !names.every((name) => catalog.has(name))) parsed = ROUTE_CONFIG_REFUSALS.unknownScope;
    else parsed = names;
    if (text.length > MAX_KEPT_SCOPES_LENGTH) return parsed;
    if (this.#parsedScopes.size >= MAX_PARSED_SCOPES) this.#parsedScopes.clear();
    this.#parsedScopes.set(text, parsed);
    return parsed;
  }

  #resolve(method: string, rawPath: string): Entry | null | RouteRefusal {
    const path = canonicalPath(rawPath);
    if (path instanceof RouteRefusal) return path;
    const upperMethod = method.toUpperCase();
    if (upperMethod === "CONNECT") return CONNECT_REFUSAL;
    if (this.#entries.length === 0) return null;
    if (upperMethod !== method) {
      const judged = this.#caseInsensitive ? path.toLowerCase() : path;
      if (this.#find(method, judged, false) !== this.#find(upperMethod, judged, false)) return METHOD_CASE_REFUSAL;
    }
    let chosen: Entry | null;
    if (this.#caseInsensitive) {
      chosen = this.#find(upperMethod, path.toLowerCase(), false);
    } else {
      chosen = this.#find(upperMethod, path, false);
      // A case-insensitive upstream serves "/V1/Decks" as "/v1/decks": if that is another route,
      // whichever keygate picked would be wrong for some upstream, so the path is refused.
      if ((this.#upperInPrefixes || this.#upperWhereItMatters(path)) && this.#find(upperMethod, path.toLowerCase(), true) !== chosen) return PATH_REFUSALS.letterCase;
    }
    // The same for characters such servers read as ASCII letters: "/v1/ſecret" is "/v1/secret"
    // to Java's equalsIgnoreCase and .NET's OrdinalIgnoreCase.
    if (mayReadAsAscii(path)) {
      const reading = asciiCaseReading(path);
      if (reading !== null && this.#find(upperMethod, reading.toLowerCase(), !this.#caseInsensitive) !== chosen) return PATH_REFUSALS.unicodeCase;
    }
    // Rails (every route's optional "(.:format)"), Grape, Django REST framework's format suffixes
    // and Spring MVC before 5.3 serve "/v1/chat.json" as "/v1/chat": if that is another route
    // (or none), whichever keygate picked would be wrong for such an upstream, so the path is
    // refused, unless the chosen route names the suffixed segment itself.
    // Cut at the last segment's first dot and at its last ("/v1/export.csv.json" is
    // "/v1/export.csv" as JSON to a route that names "/v1/export.csv"); a trailing slash, which
    // such servers drop, does not end the segment.
    const end = path.length > 1 && path.charCodeAt(path.length - 1) === SLASH ? path.length - 1 : path.length;
    const first = path.indexOf(".", path.lastIndexOf("/", end - 1) + 2);
    if (first !== -1 && first < end) {
      const last = path.lastIndexOf(".", end - 1);
      const refusal = this.#suffixRefusal(upperMethod, path, first, chosen) ?? (last !== first ? this.#suffixRefusal(upperMethod, path, last, chosen) : null);
      if (refusal !== null) return refusal;
    }
    return chosen;
  }

  /**
   * The refusal when `path` cut at `dot` is another route's (or none's), read as the checks above read the
   * whole path too (letter case ignored; characters read as ASCII letters), since a server may do
   * both (Spring's case-insensitive matcher with suffix patterns). A chosen route whose match runs
   * past the dot names the suffixed segment itself (pathPrefix /v1/export.csv) and is judged, unless
   * the dot is in its {project} segment: a format-suffix server reads the project without it.
   */
  #suffixRefusal(upperMethod: string, path: string, dot: number, chosen: Entry | null): RouteRefusal | null {
    if (chosen !== null) {
      const projectAt = chosen.head.length;
      const matchEnd = chosen.tail === null ? projectAt : projectEnd(path, projectAt) + chosen.tail.length;
      if (matchEnd > dot) return chosen.tail !== null && dot > projectAt && dot < projectEnd(path, projectAt) ? PATH_REFUSALS.projectSuffix : null;
    }
    const bare = path.slice(0, dot);
    if (this.#caseInsensitive) {
      if (this.#find(upperMethod, bare.toLowerCase(), false) !== chosen) return PATH_REFUSALS.formatSuffix;
    } else if (this.#find(upperMethod, bare, false) !== chosen || this.#find(upperMethod, bare.toLowerCase(), true) !== chosen) {
      return PATH_REFUSALS.formatSuffix;
    }
    if (!mayReadAsAscii(bare)) return null;
    const reading = asciiCaseReading(bare);
    return reading !== null && this.#find(upperMethod, reading.toLowerCase(), !this.#caseInsensitive) !== chosen ? PATH_REFUSALS.formatSuffix : null;
  }

  /** Whether an upper-case ASCII letter sits where a prefix could meet it (ids further on do not). */
  #upperWhereItMatters(path: string): boolean {
    const end = Math.min(path.length, this.#decidingLength);
    for (let i = 1; i < end; i++) {
      const code = path.charCodeAt(i);
      if (code >= 0x41 && code <= 0x5a) return true;
    }
    return false;
  }

  #find(upperMethod: string, path: string, folded: boolean): Entry | null {
    if (upperMethod === "HEAD") return this.#findHead(path, folded);
    for (const entry of this.#entries) {
      if (entry.route.method !== "*" && entry.route.method !== upperMethod) continue;
      if (folded ? under(path, entry.foldedHead, entry.foldedTail) : under(path, entry.head, entry.tail)) return entry;
    }
    return null;
  }

  /**
   * HEAD's route. Servers answer HEAD with the GET handler, so GET's routes match HEAD too: the
   * first route, most specific first, for HEAD, GET or every method. Where GET's route for a path
   * comes first, HEAD is judged exactly as that GET (scopes, role, project, quota and cost), so a
   * shorter HEAD or catch-all route can never ask less of HEAD than GET's route asks of GET.
   */
  #findHead(path: string, folded: boolean): Entry | null {
    for (const entry of this.#entries) {
      const method = entry.route.method;
      if (method !== "*" && method !== "HEAD" && method !== "GET") continue;
      if (folded ? under(path, entry.foldedHead, entry.foldedTail) : under(path, entry.head, entry.tail)) return entry;
    }
    return null;
  }
}
