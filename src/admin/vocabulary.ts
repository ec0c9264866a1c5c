import { z } from "zod";
import { REDACTED } from "../keys/redact.js";
import { isKeyId } from "../keys/ids.js";
import { KEY_CHECKSUM_LENGTH, KEY_RANDOM_LENGTH, KeyFormat } from "../keys/key-format.js";
import { splitsSurrogatePair } from "../surrogates.js";
import type { KeyRateLimit } from "../store/store.js";
import { InvalidArgumentError } from "./errors.js";

// KeyAdmin's input vocabulary: what each field may hold, the message that names a bad one, and
// page tokens. Every check throws InvalidArgumentError naming the field; nothing is written before.

export const DAY_PATTERN = /^\d{4}-\d{2}-\d{2}$/;
export const MAX_USAGE_DAYS = 366;
export const MAX_CREDITS_PER_TOPUP = 1_000_000_000;


export const DAY_MS = 86_400_000;
/** Default and bounds of a rotation's grace period. */
export const GRACE_DAYS = { default: 7, min: 0, max: 30 } as const;
export const DEFAULT_PAGE_SIZE = 50;
export const MAX_PAGE_SIZE = 100;
export const MAX_NAME_LENGTH = 100;
export const MAX_REASON_LENGTH = 200;

// Identifiers from callers' systems (user ids, emails, UUIDs): printable ASCII, no spaces.
export const externalId = z.string().regex(/^[\x21-\x7e]{1,128}$/, "must be 1-128 printable ASCII characters without spaces");

// Free text is printed to operators (`keygate keys get`, terminals, log viewers): a control
// character (newline, ESC, NUL), a format character (bidi override, zero-width space) or a line or
// paragraph separator there would forge lines, hide text or run terminal escapes. The format
// characters that writing needs stay: the zero-width joiner and non-joiner (emoji sequences,
// Persian and Indic text) and the tag characters of flag emoji.
const PLAIN_TEXT = /^(?:(?![\p{Cc}\p{Zl}\p{Zp}])(?:[\u200C\u200D\u{E0020}-\u{E007F}]|\P{Cf}))*$/u;

/**
 * Credentials in text keygate keeps (a name, a reason, metadata): those are recorded in the audit
 * trail, which every audit:read token and exporter reads, so a pasted key or token would outlive
 * its revocation there. Only whole credentials count, so that text naming one passes ("the
 * kg_live_ prefix", a key's start "kg_live_AbC1") and so do other systems' ids of a like shape
 * (Stripe's "cs_live_…", a suite's "e2e_test_<uuid>"):
 * - a key under any prefix keygate allows, found by its checksum (the 6 characters after the 32
 *   random ones), its underscores percent-encoded too, with any text before or after it;
 * - "kgadm_" and the 18 characters that make the shortest admin token (24);
 * - a Bearer or Basic credential: 16 characters or more, a digit among them ("Basic
 *   internationalization" is a name).
 * A 64-hex run is let through: the log redactor hides it as a key hash, but no API shows a key's
 * hash, and here it is far more often a SHA-256 digest (of an image or a file) kept as metadata.
 */
export function holdsCredential(text: string): boolean {
  return ADMIN_OR_SCHEME_CREDENTIAL.test(text) || holdsKey(text);
}

const ADMIN_OR_SCHEME_CREDENTIAL = /\bkgadm_[A-Za-z0-9_-]{18}|\b(?:Bearer|Basic)\s+(?=[A-Za-z0-9._~+/-]*[0-9])[A-Za-z0-9._~+/-]{16}/i;
// A key's mode between its underscores (either may be written %5F), then its random part and checksum.
const KEY_HEAD = /(?:_|%5[Ff])(live|test)(?:_|%5[Ff])(?=[0-9A-Za-z]{38})/g;
const KEY_PREFIX = /^[a-z][a-z0-9]{1,9}$/;
const MAX_PREFIX_LENGTH = 10;

/** Whether `text` holds a whole key: each head found is tried with every prefix it could follow. */
function holdsKey(text: string): boolean {
  for (const head of text.matchAll(KEY_HEAD)) {
    const bodyStart = head.index + head[0].length;
    const body = text.slice(bodyStart, bodyStart + KEY_RANDOM_LENGTH + KEY_CHECKSUM_LENGTH);
    for (let length = 2; length <= Math.min(MAX_PREFIX_LENGTH, head.index); length++) {
      const prefix = text.slice(head.index - length, head.index);
      if (!KEY_PREFIX.test(prefix)) continue;
      if (new KeyFormat(prefix).isWellFormed(`${prefix}_${head[1]}_${body}`)) return true;
    }
  }
  return false;
}

const NO_SECRET = "must not contain an API key, an admin token or another credential (it would be kept in the audit trail); name a key by its id or start…last4";

/** Refuses `value` when it holds a credential (holdsCredential), naming `field` and never quoting the value. */
export function checkNoSecret(field: string, value: string): string {
  if (holdsCredential(value)) throw new InvalidArgumentError(field, NO_SECRET);
  return value;
}

/** Free text an operator reads: at most `maxLength` characters, none of them control or format characters, and no credential. */
export function plainText(maxLength: number): z.ZodString {
  return z
    .string()
    .max(maxLength, `must be at most ${maxLength} characters`)
    .regex(PLAIN_TEXT, "must not contain control or format characters (such as a newline, ESC or a bidi override)")
    .refine((text) => !holdsCredential(text), NO_SECRET);
}

export const keyName = z
  .string()
  .transform((s) => s.trim())
  .pipe(plainText(MAX_NAME_LENGTH).min(1, "must not be empty"));
/** Why a key was revoked or disabled, or credits added: optional ("" is none), kept and shown as sent. */
export const reasonText = plainText(MAX_REASON_LENGTH);
export const METADATA_KEY = /^[A-Za-z0-9_.-]{1,64}$/;
export const MAX_METADATA_ENTRIES = 16;
export const MAX_METADATA_VALUE_LENGTH = 512;

export function checkMetadata(metadata: Record<string, string>): Record<string, string> {
  const entries = Object.entries(metadata);
  if (entries.length > MAX_METADATA_ENTRIES) throw new InvalidArgumentError("metadata", `at most ${MAX_METADATA_ENTRIES} entries`);
  for (const [key, value] of entries) {
    if (!METADATA_KEY.test(key)) throw new InvalidArgumentError(`metadata.${echo(key)}`, "keys are 1-64 letters, digits, _ . -");
    checkNoSecret(`metadata.${REDACTED}`, key);
    if (value.length > MAX_METADATA_VALUE_LENGTH) throw new InvalidArgumentError(`metadata.${key}`, `values are at most ${MAX_METADATA_VALUE_LENGTH} characters`);
    checkNoSecret(`metadata.${key}`, value);
  }
  return Object.fromEntries(entries);
}

export function check<T>(schema: z.ZodType<T>, field: string, value: unknown): T {
  const result = schema.safeParse(value);
  if (result.success) return result.data;
  const issue = result.error.issues[0];
  const sub = issue !== undefined && issue.path.length > 0 ? `.${issue.path.map(String).join(".")}` : "";
  throw new InvalidArgumentError(field + sub, issue?.message ?? "is invalid");
}

// Anything that looks like a key or a token is not repeated back, even in an error.
export const SECRET_LIKE = /[A-Za-z0-9]{2,10}_(live|test)_[0-9A-Za-z]{8,}|kgadm_|[A-Za-z0-9_-]{32,}/;

/** Characters of a bad value echo() quotes. */
const MAX_ECHO = 64;

/** A bad value, quoted back to the caller: short, and never something that looks like a secret. */
export function echo(value: string): string {
  if (SECRET_LIKE.test(value)) return REDACTED;
  // Never half an emoji: a lone surrogate breaks the gRPC and gRPC-Web status (src/surrogates.ts).
  return value.slice(0, splitsSurrogatePair(value, MAX_ECHO) ? MAX_ECHO - 1 : MAX_ECHO);
}

export function checkKeyId(field: string, id: string): string {
  if (!isKeyId(id)) throw new InvalidArgumentError(field, 'must be a key id ("key_" followed by 26 ULID characters)');
  return id;
}

export function checkOneOf<T extends string>(field: string, value: string, allowed: readonly T[]): T {
  const found = allowed.find((a) => a === value);
  if (found === undefined) throw new InvalidArgumentError(field, `must be one of ${allowed.join(", ")}; got "${echo(value)}"`);
  return found;
}

export function checkRateLimit(rule: { limit: number; windowSeconds: number }): KeyRateLimit {
  if (!Number.isInteger(rule.limit) || rule.limit < 1 || rule.limit > 1_000_000) {
    throw new InvalidArgumentError("rate_limit.limit", "must be a whole number from 1 to 1000000");
  }
  if (!Number.isInteger(rule.windowSeconds) || rule.windowSeconds < 1 || rule.windowSeconds > 86_400) {
    throw new InvalidArgumentError("rate_limit.window_seconds", "must be a whole number of seconds from 1 to 86400");
  }
  return { limit: rule.limit, windowSeconds: rule.windowSeconds };
}

export function checkDay(field: string, day: string): string {
  if (!DAY_PATTERN.test(day) || Number.isNaN(Date.parse(`${day}T00:00:00Z`)) || new Date(`${day}T00:00:00Z`).toISOString().slice(0, 10) !== day) {
    throw new InvalidArgumentError(field, 'must be a UTC day "YYYY-MM-DD"');
  }
  return day;
}

/** Encodes the position after `lastId` as an opaque page token. */
export function encodePageToken(lastId: string): string {
  return Buffer.from(`after:${lastId}`, "utf8").toString("base64url");
}

export const AUDIT_ID = /^evt_[0-9A-HJKMNP-TV-Z]{26}$/;

export function decodeToken(token: string, shape: RegExp | ((id: string) => boolean)): string {
  const text = Buffer.from(token, "base64url").toString("utf8");
  const id = text.startsWith("after:") ? text.slice(6) : "";
  const ok = typeof shape === "function" ? shape(id) : shape.test(id);
  if (!ok) throw new InvalidArgumentError("page_token", "is not a token from a previous response");
  return id;
}

export function decodePageToken(token: string): string {
  return decodeToken(token, isKeyId);
}

export function checkPageSize(pageSize: number): number {
  if (!Number.isInteger(pageSize) || pageSize < 0 || pageSize > MAX_PAGE_SIZE) {
    throw new InvalidArgumentError("page_size", `must be between 0 and ${MAX_PAGE_SIZE}`);
  }
  return pageSize === 0 ? DEFAULT_PAGE_SIZE : pageSize;
}
