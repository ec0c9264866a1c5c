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

/** Client-sent x-keygate-* header names that the allow does not overwrite, so they must go. */
export function spoofedIdentityHeaders(clientHeaderNames: Iterable<string>, granted: ReadonlyArray<[string, string]>): string[] {
  const out: string[] = [];
  for (const name of clientHeaderNames) {
    // Envoy and Node deliver lowercase names; the cheap test first, the exact one after.
    if (name.length < IDENTITY_PREFIX.length || (name.charCodeAt(0) | 0x20) !== 0x78) continue;
    const lower = name.toLowerCase();
    if (!lower.startsWith(IDENTITY_PREFIX)) continue;
    if (granted.some(([grantedName]) => grantedName === lower)) continue;
    if (!out.includes(lower)) out.push(lower);
  }
  return out;
}
