import { readFileSync } from "node:fs";
import { z } from "zod";
import { describeYamlProblem, parseYamlText } from "../config.js";

/** What an admin token may do. A token from KEYGATE_ADMIN_TOKENS may do everything. */
export const PERMISSIONS = ["keys:read", "keys:write", "accounts:read", "accounts:write", "usage:read", "usage:write", "verify", "audit:read"] as const;
/** One of PERMISSIONS. */
export type Permission = (typeof PERMISSIONS)[number];

/** The shortest admin token keygate accepts, from any source. */
export const ADMIN_TOKEN_MIN_LENGTH = 24;

/** Every permission: the grant of an unscoped token. */
export const ALL_PERMISSIONS: ReadonlySet<Permission> = new Set(PERMISSIONS);

/**
 * The permission each KeyAdmin method needs. VerifyKey with a cost also needs usage:write (its
 * handler checks that, since it depends on the request). A Map, since it is looked up by the
 * request's path: an object would answer "constructor" or "__proto__" with what it inherits.
 */
export const METHOD_PERMISSIONS: ReadonlyMap<string, Permission> = new Map<string, Permission>([
  ["UpsertAccount", "accounts:write"],
  ["GetAccount", "accounts:read"],
  ["AddCredits", "accounts:write"],
  ["CreateKey", "keys:write"],
  ["UpdateKey", "keys:write"],
  ["RevokeKey", "keys:write"],
  ["RotateKey", "keys:write"],
  ["DisableKey", "keys:write"],
  ["EnableKey", "keys:write"],
  ["GetKey", "keys:read"],
  ["ListKeys", "keys:read"],
  ["VerifyKey", "verify"],
  ["ChargeUsage", "usage:write"],
  ["GetUsage", "usage:read"],
  ["ListAuditEvents", "audit:read"],
]);

/** An admin token with a name and the permissions it grants. */
export interface ScopedToken {
  name: string;
  token: string;
  permissions: ReadonlySet<Permission>;
  /** The owners whose accounts and keys it may touch; null: every owner. */
  owners: ReadonlySet<string> | null;
}

// Strict: a misspelled field ("owner" for "owners") would otherwise be dropped, and a token meant
// for some owners would hold every owner's keys.
const tokensFileSchema = z.strictObject({
  // An empty list is a file whose tokens have all been removed: each removal revokes its token.
  tokens: z.array(
    z.strictObject({
      /** Shown in logs and the audit trail instead of the token. */
      name: z.string().regex(/^[a-z0-9][a-z0-9_.-]{0,63}$/, 'a token name is 1-64 lowercase letters, digits, "_", "." and "-"'),
      token: z.string().min(ADMIN_TOKEN_MIN_LENGTH, `must be at least ${ADMIN_TOKEN_MIN_LENGTH} characters`),
      permissions: z.array(z.enum(PERMISSIONS)).min(1, "must list at least one permission"),
      /** Optional: only these owners' accounts, keys, usage and audit events. */
      owners: z.array(z.string().regex(/^[\x21-\x7e]{1,128}$/, "an owner id is 1-128 printable ASCII characters without spaces")).min(1, "must list at least one owner").optional(),
    }),
  ),
});

/**
 * One schema problem, told by its code and place only: zod's own message for an unknown field
 * quotes the field's name, and a typo (`token; "…"`) makes the token part of that name.
 */
function schemaProblem(issue: z.core.$ZodIssue): string {
  const place = issue.path.length === 0 ? "the file" : issue.path.map(String).join(".");
  switch (issue.code) {
    case "unrecognized_keys": {
      const allowed = Object.keys(issue.path.length === 0 ? tokensFileSchema.shape : tokensFileSchema.shape.tokens.element.shape);
      return `${place}: unknown field (allowed: ${allowed.join(", ")})`;
    }
    case "invalid_type":
      return `${place}: expected ${issue.expected}`;
    case "invalid_value":
      // The schema's options, never the value found.
      return `${place}: expected one of ${issue.values.map(String).join(", ")}`;
    case "too_small":
    case "invalid_format":
      // Every such check above has a message written here, which names the rule only.
      return `${place}: ${issue.message}`;
    default:
      return `${place}: invalid (${issue.code})`;
  }
}

/** Reads KEYGATE_ADMIN_TOKENS_FILE; an error names the file and the problem, never a token. */
export function loadTokensFile(path: string): ScopedToken[] {
  let text: string;
  try {
    text = readFileSync(path, "utf8");
  } catch (cause) {
    throw new Error(`KEYGATE_ADMIN_TOKENS_FILE: cannot read ${path}: ${cause instanceof Error ? cause.message.split("\n")[0] : String(cause)}`);
  }
  // The problem by its code and line and column only: a field path or the library's message can
  // hold a token written where YAML reads something else.
  const parsed = parseYamlText(text);
  if (!parsed.ok) throw new Error(`KEYGATE_ADMIN_TOKENS_FILE: cannot read ${path} as YAML: ${describeYamlProblem(parsed.problem)}`);
  const result = tokensFileSchema.safeParse(parsed.value);
  if (!result.success) {
    const issues = result.error.issues.map(schemaProblem).join("; ");
    throw new Error(`KEYGATE_ADMIN_TOKENS_FILE (${path}): ${issues}`);
  }
  const names = new Set<string>();
  const tokens = new Set<string>();
  for (const entry of result.data.tokens) {
    if (names.has(entry.name)) throw new Error(`KEYGATE_ADMIN_TOKENS_FILE (${path}): the name "${entry.name}" is used twice`);
    if (tokens.has(entry.token)) throw new Error(`KEYGATE_ADMIN_TOKENS_FILE (${path}): two entries (one is "${entry.name}") have the same token`);
    names.add(entry.name);
    tokens.add(entry.token);
  }
  return result.data.tokens.map((entry) => ({
    name: entry.name,
    token: entry.token,
    permissions: new Set(entry.permissions),
    owners: entry.owners === undefined ? null : new Set(entry.owners),
  }));
}

/** The refusal of a call whose token lacks `needed`. */
export function missingPermission(tokenId: string, needed: Permission, what: string): string {
  return `the admin token "${tokenId}" lacks the "${needed}" permission, which ${what} needs`;
}
