import type { KeySnapshot } from "../store/store.js";

/** Upstream identity headers; a client-sent header with this prefix never reaches upstream. */
export const IDENTITY_PREFIX = "x-keygate-";

// A snapshot in L1 is the same object for every request of its key, so what is derived from it
// is built once and kept beside it; it goes when the snapshot is evicted or replaced.
const derived = new WeakMap<KeySnapshot, ReadonlyArray<[string, string]>>();

/** The identity headers for a granted request, in a fixed order. Shared: do not mutate. */
export function identityHeaders(snapshot: KeySnapshot): ReadonlyArray<[string, string]> {
  let headers = derived.get(snapshot);
  if (headers === undefined) {
    headers = buildIdentityHeaders(snapshot);
    derived.set(snapshot, headers);
  }
  return headers;
}

function buildIdentityHeaders(snapshot: KeySnapshot): Array<[string, string]> {
  const { key, account } = snapshot;
  const headers: Array<[string, string]> = [
    ["x-keygate-key-id", key.id],
    ["x-keygate-owner-id", key.ownerId],
  ];
  if (key.projectId !== null) headers.push(["x-keygate-project-id", key.projectId]);
  headers.push(["x-keygate-scopes", key.scopes.join(",")], ["x-keygate-plan", account.plan], ["x-keygate-mode", key.mode]);
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
 * The header names to remove before the request goes upstream: every configured credential
 * header present, then every client-sent spelling of an identity header that the allow does not
 * overwrite under that exact name. One pass over the names, each step constant time (a Set
 * removes repeats), so a request with 150,000 x-keygate-* headers costs 150,000 steps, not their
 * square. Names go out lowercase, as Envoy matches them.
 */
export function headersToRemove(
  clientHeaderNames: Iterable<string>,
  granted: ReadonlyArray<[string, string]>,
  credentialHeaders: readonly string[],
): string[] {
  const out = credentialHeaders.slice();
  let seen: Set<string> | undefined;
  for (const name of clientHeaderNames) {
    if (!isIdentitySpelling(name)) continue;
    const lower = name.toLowerCase();
    if (isGranted(granted, lower)) continue;
    seen ??= new Set(credentialHeaders);
    if (seen.has(lower)) continue;
    seen.add(lower);
    out.push(lower);
  }
  return out;
}

// The allow sets these names with OVERWRITE, which replaces a client-sent value: no removal needed.
function isGranted(granted: ReadonlyArray<[string, string]>, lower: string): boolean {
  for (const [grantedName] of granted) if (grantedName === lower) return true;
  return false;
}
