import { createHash, timingSafeEqual } from "node:crypto";
import { createContextKey } from "@connectrpc/connect";
import { LRUCache } from "lru-cache";
import { gcra, msUntil } from "../limits/limits.js";
import type { Tat } from "../limits/limits.js";
import type { KeyFormat } from "../keys/key-format.js";
import { ALL_PERMISSIONS } from "./permissions.js";
import type { Permission, ScopedToken } from "./permissions.js";

/** The outcome of checking an admin bearer token: who it is and what it may do, or why not. */
export type AdminAuthResult = { ok: true; tokenId: string; permissions: ReadonlySet<Permission>; owners: ReadonlySet<string> | null } | { ok: false; message: string };

function digest(text: string): Buffer {
  return createHash("sha256").update(text, "utf8").digest();
}

/** A configured token: its id (for logs and audit), digest and permissions. */
interface KnownToken {
  id: string;
  digest: Buffer;
  permissions: ReadonlySet<Permission>;
  owners: ReadonlySet<string> | null;
}

/**
 * Admin bearer-token check. Tokens are compared as SHA-256 digests with timingSafeEqual,
 * against every configured token without stopping early, so timing reveals neither the
 * token nor which one matched. A token is identified in logs and audit only by its id.
 */
export class AdminAuth {
  #tokens: KnownToken[];
  readonly #unscoped: KnownToken[];
  #generation = 0;

  /** `tokens` may do everything (named by a digest prefix); `scoped` what each lists (named by its name). */
  constructor(
    tokens: readonly string[],
    private readonly format: KeyFormat,
    scoped: readonly ScopedToken[] = [],
  ) {
    if (tokens.length + scoped.length === 0) throw new Error("at least one admin token is required");
    this.#unscoped = tokens.map((token) => {
      const d = digest(token);
      return { id: `tok_${d.subarray(0, 4).toString("hex")}`, digest: d, permissions: ALL_PERMISSIONS, owners: null };
    });
    this.#tokens = [...this.#unscoped, ...AdminAuth.#known(scoped)];
  }

  static #known(scoped: readonly ScopedToken[]): KnownToken[] {
    return scoped.map((entry) => ({ id: entry.name, digest: digest(entry.token), permissions: entry.permissions, owners: entry.owners }));
  }

  /** Puts a new set of named tokens in force (a reload of KEYGATE_ADMIN_TOKENS_FILE); the others stay. */
  replaceScoped(scoped: readonly ScopedToken[]): void {
    if (this.#unscoped.length + scoped.length === 0) throw new Error("at least one admin token is required");
    this.#tokens = [...this.#unscoped, ...AdminAuth.#known(scoped)];
    this.#generation += 1;
  }

  /** Which set of tokens is in force: it changes with every {@link replaceScoped}. */
  get generation(): number {
    return this.#generation;
  }

  /** Checks an Authorization header value. */
  authenticate(authorization: string | null): AdminAuthResult {
    if (authorization === null || authorization.trim() === "") {
      return { ok: false, message: 'an admin token is required: send "Authorization: Bearer <admin token>"' };
    }
    const match = /^bearer[ \t]+([^ \t]+)[ \t]*$/i.exec(authorization);
    const token = match?.[1];
    if (token === undefined) return { ok: false, message: 'the Authorization header must be "Bearer <admin token>"' };
    const candidate = digest(token);
    let matched: KnownToken | null = null;
    for (const known of this.#tokens) {
      if (timingSafeEqual(candidate, known.digest)) matched = known;
    }
    if (matched !== null) return { ok: true, tokenId: matched.id, permissions: matched.permissions, owners: matched.owners };
    if (this.format.parse(token) !== null) return { ok: false, message: "API keys cannot manage keys; use an admin token" };
    return { ok: false, message: "the admin token is not valid" };
  }
}

/** Failed admin logins allowed per source address: a burst of 10, then one every 6 s. */
export const AUTH_FAILURE_LIMIT = { limit: 10, windowSeconds: 60 } as const;

/**
 * Counts failed admin authentications per source address and refuses that address for a while
 * once it has failed too often, so tokens cannot be guessed at network speed. Successful calls
 * are not counted.
 */
export class AuthFailureLimiter {
  readonly #buckets = new LRUCache<string, Tat>({ max: 100_000 });

  constructor(private readonly nowMs: () => number = Date.now) {}

  /** Seconds until `source` may try again, or 0 when it may try now. */
  blockedForSeconds(source: string): number {
    const step = gcra(this.#buckets.get(source), AUTH_FAILURE_LIMIT, this.nowMs());
    return step.allowed ? 0 : step.retryAfterSeconds;
  }

  /** Records one failure from `source`. */
  fail(source: string): void {
    const nowMs = this.nowMs();
    const step = gcra(this.#buckets.get(source), AUTH_FAILURE_LIMIT, nowMs);
    if (!step.allowed) return;
    const tat: Tat = { ms: step.tatMs, frac: step.tatFrac };
    this.#buckets.set(source, tat, { ttl: msUntil(tat, nowMs) + 1000 });
  }
}

/** Whether a caller may use KeyAdmin: its token id and the tokens' generation it was checked against, or why not. */
export type AdminAdmission =
  | { ok: true; tokenId: string; permissions: ReadonlySet<Permission>; owners: ReadonlySet<string> | null; generation: number }
  | { ok: false; refusal: "unauthenticated" | "blocked"; message: string };

/** The tokens' generation a call was admitted under, set by the admin server; -1: not admitted yet. */
export const admittedGenerationKey = createContextKey<number>(-1, { description: "admin tokens generation at admission" });

/**
 * The admin API's door: the failed-login limiter first (a blocked address costs one map
 * lookup), then the bearer token. It needs only the source address and the Authorization
 * header, so the admin server asks it before reading a byte of the body.
 */
export class AdminGate {
  constructor(
    private readonly auth: AdminAuth,
    private readonly failures: AuthFailureLimiter = new AuthFailureLimiter(),
  ) {}

  /** The generation of the admin tokens in force. */
  get generation(): number {
    return this.auth.generation;
  }

  admit(source: string, authorization: string | null): AdminAdmission {
    const waitSeconds = this.failures.blockedForSeconds(source);
    if (waitSeconds > 0) {
      return { ok: false, refusal: "blocked", message: `too many failed admin authentications from this address; retry in ${waitSeconds} s` };
    }
    const admission = this.#check(authorization);
    if (!admission.ok) this.failures.fail(source);
    return admission;
  }

  /**
   * Checks an admitted call's token again, against tokens a reload put in force since. A refusal
   * is not counted as a failed login: the token was good when the call was admitted, so it is no
   * guess, and a reload must not lock out an address that only had calls in flight.
   */
  readmit(authorization: string | null): AdminAdmission {
    return this.#check(authorization);
  }

  #check(authorization: string | null): AdminAdmission {
    const generation = this.auth.generation;
    const result = this.auth.authenticate(authorization);
    return result.ok ? { ...result, generation } : { ok: false, refusal: "unauthenticated", message: result.message };
  }
}
