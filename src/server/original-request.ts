import type { IncomingMessage } from "node:http";
import type { Deny } from "../authz/pipeline.js";
import type { DenyReason } from "../authz/reasons.js";
import type { HttpAuthzProxy } from "../config.js";

/** The path every HTTP-mode Check is sent to; Envoy's HTTP service appends the original path. */
export const CHECK_PREFIX = "/check";

/** A pair of headers that carries the original request's path and method. */
interface HeaderPair {
  uri: string;
  method: string;
  /** The names as the proxies' documentation spells them, for messages. */
  uriLabel: string;
  methodLabel: string;
}

const ORIGINAL: HeaderPair = { uri: "x-original-uri", method: "x-original-method", uriLabel: "X-Original-URI", methodLabel: "X-Original-Method" };
const FORWARDED: HeaderPair = { uri: "x-forwarded-uri", method: "x-forwarded-method", uriLabel: "X-Forwarded-Uri", methodLabel: "X-Forwarded-Method" };
const PAIRS: readonly HeaderPair[] = [ORIGINAL, FORWARDED];

/** Where each proxy puts the original request: its header pair, or null for the /check suffix. */
const TRUSTED: Readonly<Record<HttpAuthzProxy, HeaderPair | null>> = { envoy: null, nginx: ORIGINAL, caddy: FORWARDED, traefik: FORWARDED };

/** The headers keygate reads the judged request from for a setting (null: the /check suffix). */
export function judgedHeaders(proxy: HttpAuthzProxy): { uri: string; method: string } | null {
  const pair = TRUSTED[proxy];
  return pair === null ? null : { uri: pair.uriLabel, method: pair.methodLabel };
}

/** The proxies that send each pair, for the advice in a misconfiguration message. */
const SENDERS = new Map<HeaderPair, string>([
  [ORIGINAL, "nginx"],
  [FORWARDED, "caddy or traefik"],
]);

/** The request to judge, or the refusal of a request that does not say it in one way. */
export type OriginalRequest = { ok: true; method: string; path: string } | Refused;

/** A refusal of the request's source, before any key is looked at. */
export interface Refused {
  ok: false;
  refusal: Deny;
}

// A header that came more than once with different values.
const CONFLICT = Symbol("conflict");

/**
 * An upgrade to cleartext HTTP/2 ("Upgrade: h2c"). Caddy and Traefik pass it on to the upstream,
 * and an upstream that accepts it turns the connection into HTTP/2 that the proxy only relays:
 * every later request on it would reach the upstream without a check (h2c smuggling). A
 * WebSocket upgrade is judged like any request, for the one resource it names.
 */
const H2C_UPGRADE: Refused = refusal(
  "INVALID_PATH",
  "The request asks to upgrade its connection to h2c, which would carry later requests to the upstream unchecked, so it is refused.",
);

/**
 * A path as Node hands it over (the request target or a header value: one character a byte)
 * read as the UTF-8 its bytes are, which is how the API reads them: raw "ſ" (C5 BF) must reach
 * the routes step as "ſ", not as "Å¿". Bytes that are not UTF-8 read as U+FFFD, which the routes
 * step refuses. An ASCII path, nearly every one, is returned as it is.
 */
function asUtf8(path: string): string {
  for (let i = 0; i < path.length; i++) if (path.charCodeAt(i) >= 0x80) return Buffer.from(path, "latin1").toString("utf8");
  return path;
}

/** Whether an Upgrade header value (a comma-separated list, repeats joined) names h2c. */
function namesH2c(upgrade: string): boolean {
  for (const token of upgrade.split(",")) {
    const protocol = token.trim().toLowerCase();
    if (protocol === "h2c" || protocol.startsWith("h2c/")) return true;
  }
  return false;
}

/**
 * One header's value: undefined when absent or empty, CONFLICT when repeated with different
 * values. `repeats` says whether any header name came twice: only then is headersDistinct
 * (which allocates) read, because Node joins repeats of an X- header with ", ".
 */
function single(req: IncomingMessage, name: string, repeats: boolean): string | undefined | typeof CONFLICT {
  if (!repeats) {
    const value = req.headers[name];
    return typeof value === "string" && value !== "" ? value : undefined;
  }
  const values = req.headersDistinct[name];
  if (values === undefined) return undefined;
  const first = values[0];
  for (const value of values) if (value !== first) return CONFLICT;
  return first === "" ? undefined : first;
}

/**
 * Reads the original method and path of an HTTP-mode Check from the one place the configured
 * proxy puts them (KEYGATE_HTTP_AUTHZ_PROXY), never from "the first header present":
 * - envoy: the path below /check and the request's own method (Envoy's HTTP service);
 * - nginx: X-Original-URI and X-Original-Method; caddy, traefik: X-Forwarded-Uri and -Method.
 * Any other copy of them that disagrees (the trusted header repeated with another value, the
 * other proxies' headers, a /check suffix) is refused with 400: an upstream or a later proxy
 * could read that copy instead. A bare /check without the configured headers, or with only
 * another proxy's, is refused with 500 naming the variable; Envoy never sends a bare /check.
 */
export class OriginalRequestReader {
  readonly #trusted: HeaderPair | null;
  // Every refusal is built once, here: a flood of them allocates nothing per request.
  readonly #repeated = new Map<string, Refused>();
  readonly #disagrees = new Map<string, Refused>();
  readonly #suffixDisagrees: Refused;
  readonly #missing: Refused;
  readonly #misdirected = new Map<HeaderPair, Refused>();

  constructor(readonly proxy: HttpAuthzProxy) {
    const trusted = TRUSTED[proxy];
    this.#trusted = trusted;
    const setting = `KEYGATE_HTTP_AUTHZ_PROXY=${proxy}`;
    const source = trusted === null ? "the path below /check and the request's own method" : `${trusted.uriLabel} and ${trusted.methodLabel}`;
    for (const pair of PAIRS) {
      for (const [name, label] of [
        [pair.uri, pair.uriLabel],
        [pair.method, pair.methodLabel],
      ] as const) {
        this.#repeated.set(name, refusal("CONFLICTING_REQUEST", `The request carries ${label} more than once, with different values.`));
        this.#disagrees.set(name, refusal("CONFLICTING_REQUEST", `The request carries ${label}, which disagrees with ${source}, where keygate reads the request (${setting}).`));
      }
      this.#misdirected.set(
        pair,
        refusal(
          "PROXY_MISCONFIGURED",
          `${setting} reads ${source}, but this request came to a bare /check with ${pair.uriLabel}: set KEYGATE_HTTP_AUTHZ_PROXY to the proxy in front of keygate (${SENDERS.get(pair) ?? ""}).`,
        ),
      );
    }
    this.#suffixDisagrees = refusal("CONFLICTING_REQUEST", `The path below /check disagrees with ${source}, where keygate reads the request (${setting}).`);
    this.#missing = refusal(
      "PROXY_MISCONFIGURED",
      `${setting} reads ${source}, but this request has no ${trusted === null ? "path below /check" : `${trusted.uriLabel} or ${trusted.methodLabel}`}: the proxy in front of keygate must set them, or KEYGATE_HTTP_AUTHZ_PROXY must name that proxy.`,
    );
  }

  /** The request to judge; null when the URL is not /check or below it. */
  read(req: IncomingMessage, repeats: boolean): OriginalRequest | null {
    const url = req.url ?? "/";
    if (url !== CHECK_PREFIX && !url.startsWith(`${CHECK_PREFIX}/`) && !url.startsWith(`${CHECK_PREFIX}?`)) return null;
    const suffix = url.startsWith(`${CHECK_PREFIX}/`) ? url.slice(CHECK_PREFIX.length) : "";
    const upgrade = req.headers.upgrade;
    if (upgrade !== undefined && namesH2c(upgrade)) return H2C_UPGRADE;
    return this.#trusted === null ? this.#fromSuffix(req, suffix, repeats) : this.#fromHeaders(req, this.#trusted, suffix, repeats);
  }

  #fromSuffix(req: IncomingMessage, suffix: string, repeats: boolean): OriginalRequest {
    const method = req.method ?? "GET";
    // A bare /check is the path "/" when nothing else names a path: a hand-run curl, a probe.
    const path = suffix === "" ? "/" : suffix;
    for (const pair of PAIRS) {
      const uri = single(req, pair.uri, repeats);
      const claimed = single(req, pair.method, repeats);
      if (uri === CONFLICT) return this.#deny(this.#repeated, pair.uri);
      if (claimed === CONFLICT) return this.#deny(this.#repeated, pair.method);
      if (suffix === "" && (uri !== undefined || claimed !== undefined)) return this.#misdirected.get(pair) ?? this.#missing;
      if (uri !== undefined && uri !== path) return this.#deny(this.#disagrees, pair.uri);
      if (claimed !== undefined && claimed !== method) return this.#deny(this.#disagrees, pair.method);
    }
    return { ok: true, method, path: asUtf8(path) };
  }

  #fromHeaders(req: IncomingMessage, trusted: HeaderPair, suffix: string, repeats: boolean): OriginalRequest {
    const path = single(req, trusted.uri, repeats);
    const method = single(req, trusted.method, repeats);
    if (path === CONFLICT) return this.#deny(this.#repeated, trusted.uri);
    if (method === CONFLICT) return this.#deny(this.#repeated, trusted.method);
    // A path below /check is Envoy's shape: refused as a conflict (400), never as a 500 that
    // Envoy's failure_mode_allow would turn into an allow.
    if (suffix !== "" && suffix !== path) return this.#suffixDisagrees;
    if (path === undefined || method === undefined) return this.#missing;
    for (const pair of PAIRS) {
      if (pair === trusted) continue;
      const uri = single(req, pair.uri, repeats);
      const claimed = single(req, pair.method, repeats);
      if (uri === CONFLICT) return this.#deny(this.#repeated, pair.uri);
      if (claimed === CONFLICT) return this.#deny(this.#repeated, pair.method);
      if (uri !== undefined && uri !== path) return this.#deny(this.#disagrees, pair.uri);
      if (claimed !== undefined && claimed !== method) return this.#deny(this.#disagrees, pair.method);
    }
    return { ok: true, method, path: asUtf8(path) };
  }

  #deny(table: ReadonlyMap<string, Refused>, header: string): Refused {
    return table.get(header) ?? this.#missing;
  }
}

function refusal(reason: DenyReason, message: string): Refused {
  return { ok: false, refusal: { allow: false, reason, message } };
}
