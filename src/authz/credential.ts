/** Request headers by lowercase name, as Node and Envoy deliver them. */
export type HeaderBag = Readonly<Record<string, string | string[] | undefined>>;

/** The credential found in a request, or why there is none. */
export type CredentialResult =
  | { ok: true; key: string; header: string }
  | { ok: false; reason: "MISSING_CREDENTIAL" | "MALFORMED_KEY" };

const MISSING: CredentialResult = { ok: false, reason: "MISSING_CREDENTIAL" };
const MALFORMED: CredentialResult = { ok: false, reason: "MALFORMED_KEY" };
// RFC 7235: the scheme is case-insensitive and separated by one or more spaces or tabs.
const BEARER = /^bearer[ \t]+([^ \t]+)[ \t]*$/i;

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
    const raw = headers[name];
    if (raw === undefined) continue;
    if (typeof raw !== "string") return MALFORMED;
    let key: string;
    if (name === "authorization") {
      const match = BEARER.exec(raw);
      if (match === null) {
        if (/^bearer\b/i.test(raw)) return MALFORMED;
        continue; // Another scheme (Basic, say) is not ours to judge.
      }
      key = match[1] ?? "";
    } else {
      key = raw.trim();
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
