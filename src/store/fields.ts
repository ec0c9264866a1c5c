import type { AccountRecord, AuditRecord, KeyRecord, TopUpRecord, UsageDelta } from "./store.js";

/**
 * Where one record field lives in each representation: its SQLite column, its MongoDB document
 * field, and its field in KeyAdmin's proto message (camelCase, as protobuf-es names it; null
 * where the API never shows it). The Redis snapshot holds the record's own field names.
 */
export interface FieldPlaces {
  sqlite: string;
  mongo: string;
  proto: string | null;
}

/**
 * The key record, field by field. `satisfies` makes the build fail when KeyRecord gains or loses
 * a field that is not mapped here; test/unit/record-fields.test.ts fails when a mapped field is
 * missing from the SQLite schema, the MongoDB schema, the Redis snapshot schema or the proto.
 */
export const KEY_FIELDS = {
  id: { sqlite: "id", mongo: "_id", proto: "id" },
  hash: { sqlite: "hash", mongo: "hash", proto: null },
  ownerId: { sqlite: "owner_id", mongo: "owner_id", proto: "ownerId" },
  projectId: { sqlite: "project_id", mongo: "project_id", proto: "projectId" },
  name: { sqlite: "name", mongo: "name", proto: "name" },
  mode: { sqlite: "mode", mongo: "mode", proto: "mode" },
  start: { sqlite: "start", mongo: "start", proto: "start" },
  last4: { sqlite: "last4", mongo: "last4", proto: "last4" },
  scopes: { sqlite: "scopes", mongo: "scopes", proto: "scopes" },
  metadata: { sqlite: "metadata", mongo: "metadata", proto: "metadata" },
  createdAtMs: { sqlite: "created_at", mongo: "created_at", proto: "createdAt" },
  lastUsedAtMs: { sqlite: "last_used_at", mongo: "last_used_at", proto: "lastUsedAt" },
  expiresAtMs: { sqlite: "expires_at", mongo: "expires_at", proto: "expiresAt" },
  revokedAtMs: { sqlite: "revoked_at", mongo: "revoked_at", proto: "revokedAt" },
  revokeReason: { sqlite: "revoke_reason", mongo: "revoke_reason", proto: "revokeReason" },
  graceEndsAtMs: { sqlite: "grace_ends_at", mongo: "grace_ends_at", proto: "graceEndsAt" },
  rotatedToId: { sqlite: "rotated_to_id", mongo: "rotated_to_id", proto: "rotatedToId" },
  rateLimit: { sqlite: "rate_limit", mongo: "rate_limit", proto: "rateLimit" },
  disabledAtMs: { sqlite: "disabled_at", mongo: "disabled_at", proto: "disabledAt" },
} as const satisfies Record<keyof KeyRecord, FieldPlaces>;

/**
 * Stored with a key, in no record field: MongoDB's count of the key against its plan's cap, in
 * which counter (live or test), and the nonce of its slot's release while one is in progress.
 */
export const KEY_STORE_ONLY = { sqlite: [] as readonly string[], mongo: ["counted", "test_slot", "slot_release"] as readonly string[] };
/** In KeyAdmin's ApiKey, derived rather than stored: the key's state at the time of the answer. */
export const KEY_PROTO_ONLY: readonly string[] = ["state"];

/** The account record, field by field (see KEY_FIELDS). */
export const ACCOUNT_FIELDS = {
  ownerId: { sqlite: "owner_id", mongo: "_id", proto: "ownerId" },
  plan: { sqlite: "plan", mongo: "plan", proto: "plan" },
  subscriptionStatus: { sqlite: "subscription_status", mongo: "subscription_status", proto: "subscriptionStatus" },
  role: { sqlite: "role", mongo: "role", proto: "role" },
  createdAtMs: { sqlite: "created_at", mongo: "created_at", proto: "createdAt" },
  updatedAtMs: { sqlite: "updated_at", mongo: "updated_at", proto: "updatedAt" },
} as const satisfies Record<keyof AccountRecord, FieldPlaces>;

/**
 * Stored with an account, in no AccountRecord field: the credit state (CreditState), and in
 * MongoDB the cap counts (live and test keys), the tokens of their changes (slot_claims) and the
 * keyed top-ups (TOPUP_FIELDS).
 */
export const ACCOUNT_STORE_ONLY = {
  sqlite: ["credit_period", "monthly_used", "topup_balance", "topup_total"] as readonly string[],
  mongo: ["credit_period", "monthly_used", "topup_balance", "topup_total", "active_key_count", "active_test_key_count", "credit_topups", "slot_claims"] as readonly string[],
};

/**
 * A keyed top-up (TopUpRecord), field by field: a row of SQLite's credit_topups table, and an
 * element of the account document's credit_topups array in MongoDB (whose owner is the
 * account's own _id). The API never shows one.
 */
export const TOPUP_FIELDS = {
  ownerId: { sqlite: "owner_id", mongo: "_id", proto: null },
  idempotencyKey: { sqlite: "idempotency_key", mongo: "idempotency_key", proto: null },
  amount: { sqlite: "amount", mongo: "amount", proto: null },
  topupTotal: { sqlite: "topup_total", mongo: "topup_total", proto: null },
  atMs: { sqlite: "at", mongo: "at", proto: null },
} as const satisfies Record<keyof TopUpRecord, FieldPlaces>;

/**
 * A usage counter (UsageDelta, UsageRow without the owner), field by field. In the API a row is
 * KeyDayUsage { key_id, day, usage: UsageCounts }, its outcome and count folded into the counts.
 */
export const USAGE_FIELDS = {
  ownerId: { sqlite: "owner_id", mongo: "owner_id", proto: null },
  keyId: { sqlite: "key_id", mongo: "key_id", proto: "keyId" },
  day: { sqlite: "day", mongo: "day", proto: "day" },
  outcome: { sqlite: "outcome", mongo: "outcome", proto: null },
  count: { sqlite: "count", mongo: "count", proto: null },
  credits: { sqlite: "credits", mongo: "credits", proto: null },
} as const satisfies Record<keyof UsageDelta, FieldPlaces>;

/** Stored with a usage counter, in no field: MongoDB's document id (owner, day, key and outcome). */
export const USAGE_STORE_ONLY = { sqlite: [] as readonly string[], mongo: ["_id"] as readonly string[] };

/** An audit event, field by field. */
export const AUDIT_FIELDS = {
  id: { sqlite: "id", mongo: "_id", proto: "id" },
  atMs: { sqlite: "at", mongo: "at", proto: "time" },
  actor: { sqlite: "actor", mongo: "actor", proto: "actor" },
  action: { sqlite: "action", mongo: "action", proto: "action" },
  keyId: { sqlite: "key_id", mongo: "key_id", proto: "keyId" },
  ownerId: { sqlite: "owner_id", mongo: "owner_id", proto: "ownerId" },
  changes: { sqlite: "changes", mongo: "changes", proto: "changes" },
  source: { sqlite: "source", mongo: "source", proto: "source" },
} as const satisfies Record<keyof AuditRecord, FieldPlaces>;
