import type { HeaderBag } from "./headers.js";

/** The credential found in a request, or why there is none. */
export type CredentialResult =
  | { ok: true; key: string; header: string }
  | { ok: false; reason: "MISSING_CREDENTIAL" | "MALFORMED_KEY" };

const MISSING: CredentialResult = { ok: false, reason: "MISSING_CREDENTIAL" };
const MALFORMED: CredentialResult = { ok: false, reason: "MALFORMED_KEY" };
const BEARER = "bearer";
const SPACE = 0x20;
const TAB = 0x09;

/** What an Authorization value holds: a Bearer key, a Bearer scheme without one usable key, or another scheme. */
const BROKEN_BEARER = 0;
/** A Bearer credential after a comma: an Authorization repeated and joined into one value. */
const JOINED_BEARER = /,[ \t]*bearer(?:[ \t]|$)/i;
const OTHER_SCHEME = 1;

function isWordChar(c: number): boolean {
  return (c >= 0x30 && c <= 0x39) || (c >= 0x41 && c <= 0x5a) || (c >= 0x61 && c <= 0x7a) || c === 0x5f;
}

/**
 * The key of an Authorization value `Bearer <key>` (RFC 7235: the scheme in any case, then one or
 * more spaces or tabs, the key, and only spaces or tabs after it), as /^bearer[ \t]+([^ \t]+)[ \t]*$/i
 * reads it. A value that starts with the word "bearer" but is not that is BROKEN_BEARER; any other,
 * OTHER_SCHEME. Read in place, where the regular expression built a match array a request
 * (test/unit/credential.test.ts holds the two to the same answers).
 */
export function bearerKey(value: string): string | typeof BROKEN_BEARER | typeof OTHER_SCHEME {
  const n = value.length;
  if (n < BEARER.length) return OTHER_SCHEME;
  for (let i = 0; i < BEARER.length; i++) if ((value.charCodeAt(i) | 0x20) !== BEARER.charCodeAt(i)) return OTHER_SCHEME;
  if (n === BEARER.length) return BROKEN_BEARER;
  let i = BEARER.length;
  const after = value.charCodeAt(i);
  if (after !== SPACE && after !== TAB) return isWordChar(after) ? OTHER_SCHEME : BROKEN_BEARER;
  while (i < n && (value.charCodeAt(i) === SPACE || value.charCodeAt(i) === TAB)) i++;
  const from = i;
  while (i < n && value.charCodeAt(i) !== SPACE && value.charCodeAt(i) !== TAB) i++;
  const to = i;
  while (i < n && (value.charCodeAt(i) === SPACE || value.charCodeAt(i) === TAB)) i++;
  return from === to || i !== n ? BROKEN_BEARER : value.slice(from, to);
}

/**
 * `value` without the spaces and tabs around it (HTTP's optional white space), and nothing else:
 * String.prototype.trim also strips Unicode white space (no-break space, byte-order mark,
 * U+2028), which a gRPC Check reads from UTF-8 and the HTTP mode from Latin-1, so the same bytes
 * trimmed to the key on one and to a malformed credential on the other.
 */
function trimOws(value: string): string {
  let from = 0;
  let to = value.length;
  while (from < to && (value.charCodeAt(from) === SPACE || value.charCodeAt(from) === TAB)) from++;
  while (to > from && (value.charCodeAt(to - 1) === SPACE || value.charCodeAt(to - 1) === TAB)) to--;
  return from === 0 && to === value.length ? value : value.slice(from, to);
}

/**
 * Reads the API key from the configured headers. `authorization` counts only with the Bearer
 * scheme. Two headers carrying different keys, or a repeated header, are refused as malformed:
 * a proxy and an upstream could disagree about which one wins. A repeat must arrive as an array:
 * Node's req.headers keeps only the first Authorization, so HTTP mode passes distinct values.
 */
export function extractCredential(headers: HeaderBag, headerNames: readonly string[]): CredentialResult {
  let found: string | undefined;
  let foundHeader = "";
  for (const name of headerNames) {
    const raw = headers.get(name);
    if (raw === undefined) continue;
    if (typeof raw !== "string") return MALFORMED;
    let key: string;
    if (name === "authorization") {
      const bearer = bearerKey(raw);
      if (bearer === BROKEN_BEARER) return MALFORMED;
      // A Bearer after a comma is a repeated Authorization that Envoy joined ("Basic …,Bearer
      // <key>"): refused like every other repeat, not judged as another scheme.
      if (bearer === OTHER_SCHEME) {
        if (JOINED_BEARER.test(raw)) return MALFORMED;
        continue; // Another scheme (Basic, say) is not ours to judge.
      }
      key = bearer;
    } else {
      key = trimOws(raw);
      if (key.length === 0) continue;
    }
    if (found !== undefined && found !== key) return MALFORMED;
    if (found === undefined) {
      found = key;
      foundHeader = name;
    }
  }
  return found === undefined ? MISSING : { ok: true, key: found, header: foundHeader };
}

// With more configured headers than this, the present ones are listed per request instead.
const MAX_TABLED_HEADERS = 10;
// Names with more dashes than this have too many spellings to list (2^dashes).
const MAX_SPELLED_DASHES = 3;

/**
 * `name` and its spellings with `_` for any `-`: CGI-style servers (WSGI, PHP, Rack) read every
 * one of them as `name` (x_api_key is X-Api-Key to them). Every combination for up to three
 * dashes, else the all-dash and all-underscore spellings (PresentCredentialHeaders finds the mixed
 * ones of such a name in the request's names).
 */
function separatorSpellings(name: string): string[] {
  const dashes: number[] = [];
  for (let i = 0; i < name.length; i++) if (name[i] === "-") dashes.push(i);
  if (dashes.length > MAX_SPELLED_DASHES) return [name, name.replaceAll("-", "_")];
  const spellings: string[] = [];
  for (let mask = 0; mask < 1 << dashes.length; mask++) {
    const chars = [...name];
    dashes.forEach((at, bit) => {
      if ((mask & (1 << bit)) !== 0) chars[at] = "_";
    });
    spellings.push(chars.join(""));
  }
  return spellings;
}

/**
 * Which configured credential headers a request carries, in any spelling an upstream reads as
 * one of them. Every one present is removed upstream, not only the one the key came in: a second
 * copy of the key must not reach the API either, nor one under `_` spelling (a proxy that lets
 * underscores through passes x_api_key on). The answer comes from a table of every subset, built
 * once, so the Check path allocates nothing.
 */
export class PresentCredentialHeaders {
  readonly #names: readonly string[];
  readonly #subsets: ReadonlyArray<readonly string[]>;
  /**
   * Configured names with more dashes than separatorSpellings lists every spelling of: their
   * mixed spellings (x_acme-org-api-key) are found by reading the request's names. Empty for the
   * usual names, so the Check path reads no more than the table.
   */
  readonly #scanned: ReadonlySet<string>;

  constructor(names: readonly string[]) {
    this.#scanned = new Set(names.filter((name) => name.split("-").length - 1 > MAX_SPELLED_DASHES));
    this.#names = [...new Set(names.flatMap(separatorSpellings))];
    const count = this.#names.length;
    this.#subsets =
      count > MAX_TABLED_HEADERS ? [] : Array.from({ length: 1 << count }, (_, mask) => this.#names.filter((_name, i) => (mask & (1 << i)) !== 0));
  }

  /** The configured names (and spellings) present in `headers`, in configured order. Shared: do not mutate. */
  of(headers: HeaderBag): readonly string[] {
    const found = this.#listed(headers);
    if (this.#scanned.size === 0) return found;
    const mixed = headers.names().filter((name) => name.includes("_") && !found.includes(name) && this.#scanned.has(name.replaceAll("_", "-")));
    return mixed.length === 0 ? found : [...found, ...mixed];
  }

  /** The listed names and spellings present in `headers`, in configured order. */
  #listed(headers: HeaderBag): readonly string[] {
    const names = this.#names;
    if (names.length > MAX_TABLED_HEADERS) return names.filter((name) => headers.get(name) !== undefined);
    let mask = 0;
    for (let i = 0; i < names.length; i++) {
      const name = names[i];
      if (name !== undefined && headers.get(name) !== undefined) mask |= 1 << i;
    }
    // Every mask is in the table; all names is the safe answer should that ever not hold.
    return this.#subsets[mask] ?? names;
  }
}
