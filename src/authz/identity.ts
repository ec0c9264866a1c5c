import type { CheckSnapshot } from "../store/store.js";

/** Upstream identity headers; a client-sent header with this prefix never reaches upstream. */
export const IDENTITY_PREFIX = "x-keygate-";

/**
 * The identity an allow carries, in its fixed order: each value goes upstream as a header and,
 * in the gRPC answer, as a field of Envoy's dynamic metadata. The project header is left out for
 * a key without a project (its metadata field is then "").
 */
export const IDENTITY_FIELDS: ReadonlyArray<{ header: string; metadata: string }> = [
  { header: "x-keygate-key-id", metadata: "key_id" },
  { header: "x-keygate-owner-id", metadata: "owner_id" },
  { header: "x-keygate-project-id", metadata: "project_id" },
  { header: "x-keygate-scopes", metadata: "scopes" },
  { header: "x-keygate-plan", metadata: "plan" },
  { header: "x-keygate-role", metadata: "role" },
  { header: "x-keygate-mode", metadata: "mode" },
];
/** IDENTITY_FIELDS' index of the project, the one field a key may lack. */
export const PROJECT_FIELD = 2;

/** The identity values in IDENTITY_FIELDS' order (the project "" when the key has none). */
export function identityValues(snapshot: CheckSnapshot): string[] {
  const { key, account } = snapshot;
  const scopes = key.scopes.length === 1 ? (key.scopes[0] as string) : key.scopes.join(",");
  return [key.id, key.ownerId, key.projectId ?? "", scopes, account.plan, account.role, key.mode];
}

// The names an allow sets, which depend only on whether the key has a project: two fixed lists,
// so the removal step needs nothing kept per key.
const NAMES_WITH_PROJECT: readonly string[] = IDENTITY_FIELDS.map((field) => field.header);
const NAMES_WITHOUT_PROJECT: readonly string[] = NAMES_WITH_PROJECT.filter((_, i) => i !== PROJECT_FIELD);

/** The identity header names an allow for this key sets, in the order identityHeaders gives them. Shared: do not mutate. */
export function identityHeaderNames(snapshot: CheckSnapshot): readonly string[] {
  return snapshot.key.projectId === null ? NAMES_WITHOUT_PROJECT : NAMES_WITH_PROJECT;
}

/**
 * The names an allow sets: the identity headers, then any forwarded metadata's. Shared when
 * nothing is forwarded: do not mutate.
 */
export function grantedHeaderNames(snapshot: CheckSnapshot, forwarded: ReadonlyArray<readonly [string, string]>): readonly string[] {
  const names = identityHeaderNames(snapshot);
  return forwarded.length === 0 ? names : [...names, ...forwarded.map(([name]) => name)];
}

/**
 * The identity headers for a granted request, in IDENTITY_FIELDS' order. Built on each call: the
 * gRPC answer writes them from the values (to-envoy.ts), so nothing else is kept per key.
 */
export function identityHeaders(snapshot: CheckSnapshot): Array<[string, string]> {
  const values = identityValues(snapshot);
  const withProject = snapshot.key.projectId !== null;
  const headers: Array<[string, string]> = [];
  for (let i = 0; i < IDENTITY_FIELDS.length; i++) {
    if (i !== PROJECT_FIELD || withProject) headers.push([(IDENTITY_FIELDS[i] as (typeof IDENTITY_FIELDS)[number]).header, values[i] as string]);
  }
  return headers;
}

const PREFIX_LENGTH = IDENTITY_PREFIX.length;
const DASH = 0x2d;
const UNDERSCORE = 0x5f;

/**
 * True for a name an upstream could read as an x-keygate-* header: header names are
 * case-insensitive, and CGI-style servers (WSGI, PHP, Rack) read `_` as `-`, so
 * X_KEYGATE_OWNER_ID is x-keygate-owner-id to them. Compares in place, allocating nothing.
 */
export function isIdentitySpelling(name: string): boolean {
  if (name.length < PREFIX_LENGTH) return false;
  for (let i = 0; i < PREFIX_LENGTH; i++) {
    const expected = IDENTITY_PREFIX.charCodeAt(i);
    const got = name.charCodeAt(i);
    if (expected === DASH ? got !== DASH && got !== UNDERSCORE : (got | 0x20) !== expected) return false;
  }
  return true;
}

/**
 * Headers that name another method or path than the request's own: the original-request headers
 * proxies send to an authorizer, the URL-rewrite header and the method-override headers, which
 * frameworks (Symfony, Laravel, Rails' Rack middleware) and servers obey. The API must serve what
 * keygate judged, so a client's copy of any of them never goes upstream (the shipped proxy
 * configs drop them too, where the proxy can).
 */
export const OTHER_REQUEST_HEADERS: readonly string[] = [
  "x-original-uri",
  "x-original-method",
  "x-original-url",
  "x-rewrite-url",
  "x-forwarded-uri",
  "x-forwarded-method",
  "x-http-method-override",
  "x-http-method",
  "x-method-override",
];

/**
 * True when `name` is `target` (lowercase, dashes) as an upstream may read it: in any letter case,
 * and with "_" for "-" (CGI-style servers read X_Api_Key as X-Api-Key). Compares in place.
 */
function spells(name: string, target: string): boolean {
  if (name.length !== target.length) return false;
  for (let i = 0; i < target.length; i++) {
    const expected = target.charCodeAt(i);
    const got = name.charCodeAt(i);
    if (expected === DASH ? got !== DASH && got !== UNDERSCORE : (got | 0x20) !== expected) return false;
  }
  return true;
}

function spellsAny(name: string, targets: readonly string[]): boolean {
  for (let i = 0; i < targets.length; i++) if (spells(name, targets[i] as string)) return true;
  return false;
}

// OTHER_REQUEST_HEADERS by length: a name of no such length (most of a request's) is passed over
// with one lookup, not a comparison with each.
const NO_NAMES: readonly string[] = [];
const OTHER_BY_LENGTH: ReadonlyArray<readonly string[]> = (() => {
  const table: Array<readonly string[]> = Array.from({ length: 32 }, () => NO_NAMES);
  for (const name of OTHER_REQUEST_HEADERS) table[name.length] = [...(table[name.length] ?? NO_NAMES), name];
  return table;
})();

const LOWER_X = 0x78;

/**
 * True for a spelling of one of OTHER_REQUEST_HEADERS, or of a credential header other than its
 * own name (which headersToRemove lists anyway). Most of a request's names are passed over by
 * their first letter and length alone: every check runs for each name of every allowed request.
 */
function isOtherOrCredentialSpelling(name: string, credentialHeaders: readonly string[]): boolean {
  const first = name.charCodeAt(0) | 0x20;
  const length = name.length;
  if (first === LOWER_X && length < OTHER_BY_LENGTH.length && spellsAny(name, OTHER_BY_LENGTH[length] as readonly string[])) return true;
  for (let i = 0; i < credentialHeaders.length; i++) {
    const credential = credentialHeaders[i] as string;
    if (credential.length === length && credential.charCodeAt(0) === first && credential !== name && spells(name, credential)) return true;
  }
  return false;
}

/**
 * The header names to remove before the request goes upstream: every configured credential
 * header, then every name the client sent that an upstream could read as a credential header,
 * as one of OTHER_REQUEST_HEADERS or as an identity header the allow does not overwrite under
 * that exact name (in any letter case, "_" for "-"). One pass over the names, each step constant
 * time (a Set removes repeats), so a request with 150,000 x-keygate-* headers costs 150,000 steps,
 * not their square. Names go out lowercase, as Envoy matches them.
 */
export function headersToRemove(
  clientHeaderNames: Iterable<string>,
  granted: readonly string[],
  credentialHeaders: readonly string[],
): string[] {
  const out = credentialHeaders.slice();
  let seen: Set<string> | undefined;
  for (const name of clientHeaderNames) {
    const identity = isIdentitySpelling(name);
    if (!identity && !isOtherOrCredentialSpelling(name, credentialHeaders)) continue;
    const lower = name.toLowerCase();
    if (identity && isGranted(granted, lower)) continue;
    seen ??= new Set(credentialHeaders);
    if (seen.has(lower)) continue;
    seen.add(lower);
    out.push(lower);
  }
  return out;
}

// The allow sets these names with OVERWRITE, which replaces a client-sent value: no removal needed.
function isGranted(granted: readonly string[], lower: string): boolean {
  for (const name of granted) if (name === lower) return true;
  return false;
}
