import mongoose from "mongoose";
import type { Connection, Model } from "mongoose";
import type { Logger } from "pino";
import { decodeTime, ulid } from "ulid";
import { eventIdFloor } from "../keys/ids.js";
import {
  CapExceededError,
  ConflictError,
  DuplicateError,
  IdempotencyKeyReusedError,
  MigrationsPendingError,
  NewerSchemaError,
  PartialWriteError,
  StoreUnavailableError,
  TopUpKeysExhaustedError,
  withCreatedAccount,
} from "./errors.js";
import type { SchemaStep } from "./errors.js";
import { LookupBatcher } from "./lookup-batch.js";
import { storedDate, storedRateLimit, storedRequiredDate, storedScopes } from "./stored-values.js";
import { CHAIN_GRACE_ENDED, MAX_KEYED_TOPUPS, TOPUP_KEY_RETENTION_MS, keyPrefixOfStart } from "./store.js";
import type {
  AccountDefaults,
  AccountRecord,
  AccountUpsert,
  CreateLimits,
  EnabledKey,
  KeyMode,
  KeyPatch,
  KeyUpdateGuard,
  KeyRecord,
  KeySnapshot,
  KeyStore,
  ListKeysQuery,
  Role,
  Rotation,
  SubscriptionStatus,
  CreditState,
  CreditDelta,
  KeyedTopUp,
  TopUpRecord,
  UsageDelta,
  UsagePage,
  UsagePageQuery,
  UsageRow,
  AuditRecord,
  AuditQuery,
  CreatedKey,
  UpsertedAccount,
} from "./store.js";

/**
 * An account document. `active_key_count` is the counter the cap of live keys is enforced on,
 * `active_test_key_count` that of test keys.
 */
export interface AccountDoc {
  _id: string;
  plan: string;
  subscription_status: SubscriptionStatus;
  role: Role;
  active_key_count: number;
  /** Absent on accounts written before test keys were counted apart: read as 0. */
  active_test_key_count?: number;
  created_at: Date;
  updated_at: Date;
  credit_period?: string;
  monthly_used?: number;
  topup_balance?: number;
  /** Absent on accounts written by versions before it existed: read as 0, and $inc starts it there. */
  topup_total?: number;
  /**
   * The account's top-ups made with an idempotency key (TopUpRecord), written in the same update
   * as the credits they added; those older than TOPUP_KEY_RETENTION_MS are dropped by the next
   * keyed top-up. Absent on accounts written before it existed, or never topped up with a key: none.
   */
  credit_topups?: TopUpDoc[];
  /**
   * The slot changes in progress (SlotClaim), each written in the same update as its change to a
   * counter, so a retried change is made once. Absent (on accounts written before it existed, and
   * by releases that know nothing of it): none.
   */
  slot_claims?: string[];
}

/** A keyed top-up in its account's credit_topups (the owner is the account's _id). */
export interface TopUpDoc {
  idempotency_key: string;
  amount: number;
  topup_total: number;
  at: Date;
}

export const topUpSchema = new mongoose.Schema<TopUpDoc>(
  {
    idempotency_key: { type: String, required: true },
    amount: { type: Number, required: true },
    topup_total: { type: Number, required: true },
    at: { type: Date, required: true },
  },
  { _id: false, versionKey: false, strict: "throw" },
);

/** upsertAccount's update: the fields given are set, the others take the defaults on an insert. */
function accountUpdate(input: AccountUpsert, defaults: AccountDefaults, nowMs: number): { $set: Partial<AccountDoc>; $setOnInsert: Partial<AccountDoc> } {
  const now = new Date(nowMs);
  const set: Partial<AccountDoc> = { updated_at: now };
  const onInsert: Partial<AccountDoc> = { created_at: now, active_key_count: 0, active_test_key_count: 0 };
  if (input.plan !== undefined) set.plan = input.plan;
  else onInsert.plan = defaults.plan;
  if (input.subscriptionStatus !== undefined) set.subscription_status = input.subscriptionStatus;
  else onInsert.subscription_status = defaults.subscriptionStatus;
  if (input.role !== undefined) set.role = input.role;
  else onInsert.role = defaults.role;
  return { $set: set, $setOnInsert: onInsert };
}

/** An audit document. */
interface AuditDoc {
  _id: string;
  at: Date;
  actor: string;
  action: string;
  key_id: string | null;
  owner_id: string | null;
  changes: Record<string, unknown>;
  source: string;
}

/** A usage document: one key, one UTC day, one outcome. */
interface UsageDoc {
  _id: string;
  owner_id: string;
  key_id: string;
  day: string;
  outcome: string;
  count: number;
  credits: number;
}

/** An owner's usage documents added up by outcome (MongoKeyStore.listUsagePage). */
interface UsageTotalDoc {
  _id: string;
  count: number;
  credits: number;
}

/** The usage documents of one key and day, one row per outcome (MongoKeyStore.listUsagePage). */
interface UsageKeyDayDoc {
  _id: { day: string; key_id: string };
  rows: Array<Pick<UsageDoc, "outcome" | "count" | "credits">>;
}

/** A key document. `counted` is true while the key holds one of the account's slots. */
export interface KeyDoc {
  _id: string;
  hash: string;
  owner_id: string;
  project_id: string | null;
  name: string;
  mode: KeyMode;
  start: string;
  last4: string;
  scopes: string[];
  metadata: Record<string, string>;
  created_at: Date;
  last_used_at: Date | null;
  expires_at: Date | null;
  revoked_at: Date | null;
  revoke_reason: string | null;
  grace_ends_at: Date | null;
  rotated_to_id: string | null;
  rate_limit: { limit: number; window_seconds: number } | null;
  /** Absent in documents written before keys could be disabled: read as null. */
  disabled_at?: Date | null;
  counted: boolean;
  /**
   * True when the key's slot is in the account's active_test_key_count; absent or false, in
   * active_key_count (every key written before test keys were counted apart; schema step 2
   * moves the test keys among them).
   */
  test_slot?: boolean;
  /**
   * Set with `counted: false` when the key's slot is released, to the release's nonce, until the
   * account's counter has given the slot back under "rel:<nonce>" (#releaseSlot); absent: none.
   */
  slot_release?: string | null;
}

export const accountSchema = new mongoose.Schema<AccountDoc>(
  {
    _id: { type: String, required: true },
    plan: { type: String, required: true },
    subscription_status: { type: String, required: true, enum: ["active", "none", "past_due", "canceled"] },
    role: { type: String, required: true, enum: ["standard", "premium", "admin"] },
    active_key_count: { type: Number, required: true, default: 0 },
    active_test_key_count: { type: Number, default: 0 },
    created_at: { type: Date, required: true },
    updated_at: { type: Date, required: true },
    credit_period: { type: String, default: "" },
    monthly_used: { type: Number, default: 0 },
    topup_balance: { type: Number, default: 0 },
    topup_total: { type: Number, default: 0 },
    // No default: an account never topped up with a key has no array, as before it existed.
    credit_topups: { type: [topUpSchema], default: undefined },
    // No default either: an account that never had a slot change in progress has no array.
    slot_claims: { type: [String], default: undefined },
  },
  { collection: "accounts", versionKey: false, strict: "throw" },
);

export const auditSchema = new mongoose.Schema<AuditDoc>(
  {
    _id: { type: String, required: true },
    at: { type: Date, required: true },
    actor: { type: String, required: true },
    action: { type: String, required: true },
    key_id: { type: String, default: null },
    owner_id: { type: String, default: null },
    changes: { type: mongoose.Schema.Types.Mixed, required: true },
    // Not `required`: mongoose's refuses "", and a record must never be lost for its source (SQLite
    // takes "", as this does).
    source: { type: String, default: "" },
  },
  { collection: "audit", versionKey: false, strict: "throw", minimize: false },
);
auditSchema.index({ owner_id: 1, _id: 1 }, { name: "owner" });
auditSchema.index({ key_id: 1, _id: 1 }, { name: "key" });

export const usageSchema = new mongoose.Schema<UsageDoc>(
  {
    _id: { type: String, required: true },
    owner_id: { type: String, required: true },
    key_id: { type: String, required: true },
    day: { type: String, required: true },
    outcome: { type: String, required: true },
    count: { type: Number, required: true },
    credits: { type: Number, required: true },
  },
  { collection: "usage", versionKey: false, strict: "throw" },
);
usageSchema.index({ owner_id: 1, day: 1 }, { name: "owner_day" });

export const keySchema = new mongoose.Schema<KeyDoc>(
  {
    _id: { type: String, required: true },
    hash: { type: String, required: true },
    owner_id: { type: String, required: true },
    project_id: { type: String, default: null },
    name: { type: String, required: true },
    mode: { type: String, required: true, enum: ["live", "test"] },
    start: { type: String, required: true },
    last4: { type: String, required: true },
    scopes: { type: [String], required: true },
    // A plain subdocument, the shape mongoose's Map of String stored: a Map refuses a key with "."
    // (KeyAdmin's metadata keys may hold one), a Mixed field stores each key as it is.
    metadata: { type: mongoose.Schema.Types.Mixed, default: () => ({}) },
    created_at: { type: Date, required: true },
    last_used_at: { type: Date, default: null },
    expires_at: { type: Date, default: null },
    revoked_at: { type: Date, default: null },
    revoke_reason: { type: String, default: null },
    grace_ends_at: { type: Date, default: null },
    rotated_to_id: { type: String, default: null },
    rate_limit: { type: new mongoose.Schema({ limit: Number, window_seconds: Number }, { _id: false }), default: null },
    disabled_at: { type: Date, default: null },
    counted: { type: Boolean, required: true },
    test_slot: { type: Boolean, default: false },
    slot_release: { type: String, default: undefined },
  },
  // minimize: false keeps an empty metadata as {}, as the Map wrote it, rather than leaving it out.
  { collection: "keys", versionKey: false, strict: "throw", minimize: false },
);
keySchema.index({ hash: 1 }, { unique: true, name: "hash_unique" });
keySchema.index({ owner_id: 1, revoked_at: 1, _id: 1 }, { name: "owner_state" });
keySchema.index({ project_id: 1 }, { name: "project" });

/** The fields of an account that toAccount reads: a Check needs no counters or credits. */
type AccountSnapshotDoc = Pick<AccountDoc, "_id" | "plan" | "subscription_status" | "role" | "created_at" | "updated_at">;
/** The fields of a key that toKey reads: all but the slot flags. */
type KeySnapshotDoc = Omit<KeyDoc, "counted" | "test_slot" | "slot_release">;

/** The account counter a key's slot is held in. */
type SlotCounter = "active_key_count" | "active_test_key_count";
/** The fields of a key that #settleSlots reads. */
type SlotWorkKey = Pick<KeyDoc, "_id" | "counted" | "expires_at" | "revoked_at" | "test_slot" | "slot_release">;

function slotCounter(key: Pick<KeyDoc, "test_slot">): SlotCounter {
  return key.test_slot === true ? "active_test_key_count" : "active_key_count";
}

/**
 * How long a slot change may take, from the time its token carries (a key id's ULID, a release
 * nonce's): past it, the operation that began the change writes nothing more for it (#within),
 * and the next CreateKey of the owner finishes or undoes it (#settleSlots).
 */
export const SLOT_LEASE_MS = 30_000;

/**
 * A token in accounts.slot_claims, written in the same update as the counter change it names:
 * "add:<mode>:<keyId>", a slot taken for a key being inserted; "rel:<nonce>", the slot of a key
 * whose slot_release is that nonce, given back; "mv:<keyId>", schema step 2's move of a legacy
 * test key's slot to the test counter. An update that adds one filters on its absence, one that
 * undoes or consumes one on its presence, so each change is made once however often it is sent.
 */
type SlotClaim = { kind: "add"; mode: KeyMode; keyId: string } | { kind: "rel"; nonce: string } | { kind: "mv"; keyId: string };

const addClaim = (mode: KeyMode, keyId: string): string => `add:${mode}:${keyId}`;
const releaseClaim = (nonce: string): string => `rel:${nonce}`;
const moveClaim = (keyId: string): string => `mv:${keyId}`;

/** A token of slot_claims read back; null for one this release does not know (a newer one's). */
function parseClaim(token: string): SlotClaim | null {
  const [kind, first, second, ...rest] = token.split(":");
  if (rest.length > 0 || first === undefined || first === "") return null;
  if (kind === "add" && (first === "live" || first === "test") && second !== undefined && second !== "") return { kind, mode: first, keyId: second };
  if (kind === "rel" && second === undefined) return { kind, nonce: first };
  if (kind === "mv" && second === undefined) return { kind, keyId: first };
  return null;
}

/** The time of a ULID, bare (a nonce) or after a prefix ("key_…"); null when `text` holds none. */
function ulidTimeMs(text: string): number | null {
  try {
    return decodeTime(text.slice(text.lastIndexOf("_") + 1));
  } catch {
    return null;
  }
}

/** The hash of a placeholder: never a key's (HMAC-SHA256 in hex), so no Check finds it, and unique as the id is. */
const placeholderHash = (id: string): string => `never-issued:${id}`;

/**
 * A revoked document that takes `id`, the id of a key that was never issued, so an insert of it
 * still on its way fails on _id instead of landing. It holds no slot.
 */
function placeholderDocument(id: string, like: Pick<KeyDoc, "owner_id" | "project_id" | "name" | "mode" | "start" | "scopes" | "expires_at" | "rate_limit" | "test_slot">, now: Date, reason: string): KeyDoc {
  return {
    _id: id,
    hash: placeholderHash(id),
    owner_id: like.owner_id,
    project_id: like.project_id,
    name: like.name,
    mode: like.mode,
    start: like.start,
    last4: "",
    scopes: like.scopes,
    metadata: {},
    created_at: now,
    last_used_at: null,
    expires_at: like.expires_at,
    revoked_at: now,
    revoke_reason: reason,
    grace_ends_at: null,
    rotated_to_id: null,
    rate_limit: like.rate_limit,
    disabled_at: null,
    counted: false,
    test_slot: like.test_slot === true,
  };
}

/** Whether a driver error is E11000 (a unique index refused the write). */
const duplicate = (error: unknown): boolean => error instanceof Error && "code" in error && error.code === 11000;

/**
 * Sends an idempotent write (one a slot token makes happen once) a second time when the first
 * fails: its answer may only have been lost. `before` runs first (#within).
 */
async function resend<T>(write: () => Promise<T>, before: () => void): Promise<T> {
  try {
    return await write();
  } catch {
    before();
    return await write();
  }
}
/**
 * The account as the cold lookup joins it: without its keyed top-ups and slot claims, which a
 * Check never reads (snapshotPipeline).
 */
export type JoinedAccountDoc = Omit<AccountDoc, "credit_topups" | "slot_claims">;
/** One document of the cold lookup's answer: a hash asked for, its key and the key's account, each absent when not found. */
export interface AnchoredSnapshotDoc {
  hash: string;
  key?: KeyDoc;
  account?: JoinedAccountDoc;
}
/**
 * The documents of an `aggregate` command's first batch, each checked: a hash, a key (when one
 * was found) whose own hash is that hash, and an account (when one was found) that is that key's
 * owner, so a wrong join can never hand one key's record, or another account's plan, to a lookup.
 */
export function firstBatch(reply: mongoose.mongo.Document): AnchoredSnapshotDoc[] {
  const cursor: unknown = reply["cursor"];
  const batch: unknown = typeof cursor === "object" && cursor !== null && "firstBatch" in cursor ? cursor.firstBatch : undefined;
  if (!Array.isArray(batch)) throw new StoreUnavailableError("MongoDB answered the key lookup without a first batch");
  for (const doc of batch) {
    if (!isAnchoredSnapshot(doc)) throw new StoreUnavailableError("MongoDB answered the key lookup with something other than its documents");
  }
  return batch as AnchoredSnapshotDoc[];
}

/**
 * The cold lookup's answer from its `aggregate` reply: the first batch, when the reply leaves no
 * cursor open. MongoDB ends a batch at 16 MiB of documents whatever batchSize asked, and keeps a
 * cursor for the rest; a getMore would have to carry the session the aggregate ran in (the
 * driver's implicit one). So a reply in more than one batch fails the lookup, and its cursor is
 * killed with `run` (not waited for), rather than left open on the server until its idle timeout.
 */
export function lookupAnswer(reply: mongoose.mongo.Document, run: (command: mongoose.mongo.Document) => Promise<unknown>): AnchoredSnapshotDoc[] {
  const cursorId = openCursorId(reply);
  if (cursorId !== null) {
    void run({ killCursors: ANCHOR_COLLECTION, cursors: [cursorId] }).catch(() => undefined);
    throw new StoreUnavailableError("MongoDB answered the key lookup in more than one batch");
  }
  return firstBatch(reply);
}

/**
 * The id of the cursor a reply leaves open; null when it leaves none (id 0). The driver reads an
 * id that fits a double as a number; the server wants it back as a 64-bit integer
 * (mongo-java-server refuses a killCursors of an int32).
 */
function openCursorId(reply: mongoose.mongo.Document): mongoose.mongo.Long | null {
  const cursor: unknown = reply["cursor"];
  const id: unknown = typeof cursor === "object" && cursor !== null && "id" in cursor ? cursor.id : undefined;
  if (mongoose.mongo.Long.isLong(id)) return id.isZero() ? null : id;
  return typeof id === "number" && Number.isSafeInteger(id) && id !== 0 ? mongoose.mongo.Long.fromNumber(id) : null;
}

function isAnchoredSnapshot(value: unknown): value is AnchoredSnapshotDoc {
  if (typeof value !== "object" || value === null || Array.isArray(value)) return false;
  const { hash, key, account } = value as { hash?: unknown; key?: unknown; account?: unknown };
  if (typeof hash !== "string") return false;
  if (key === undefined) return account === undefined;
  if (typeof key !== "object" || key === null) return false;
  const { hash: keyHash, owner_id: ownerId } = key as { hash?: unknown; owner_id?: unknown };
  if (keyHash !== hash) return false;
  return account === undefined || (typeof account === "object" && account !== null && (account as { _id?: unknown })._id === ownerId);
}

/** The anchor collection's document (see snapshotPipeline). */
interface AnchorDoc {
  _id: string;
  note: string;
}
const ANCHOR_COLLECTION = "lookup_anchor";
/**
 * Where the schema version is kept: one document, { _id: "schema", version, pepper_check,
 * key_prefix }. A release that knows neither of the last two reads only `version` (1dffb08 reads
 * nothing here).
 */
const SCHEMA_COLLECTION = "keygate_schema";
const SCHEMA_ID = "schema";
/** The schema version this keygate writes: the last step of MongoKeyStore's migrations. */
export const MONGO_SCHEMA_VERSION = 2;
interface SchemaDoc {
  _id: string;
  version: number;
  /** The check of the pepper this database's keys are hashed with (src/keys/pepper-check.ts). */
  pepper_check?: string;
  /** The prefix this database's keys are issued with (KEYGATE_KEY_PREFIX; claimKeyPrefix). */
  key_prefix?: string;
}
const ANCHOR_ID = "anchor";

/**
 * The cold lookup: one aggregation, so a Check on a key no cache holds costs one round trip, not
 * two (key, then account). It runs on a one-document anchor collection and joins the key in by
 * hash and the account by owner with `$lookup`, which reads both through their indexes (the
 * unique hash index, the accounts' _id). Why not `$match` on the keys collection first: the
 * MongoDB-wire test server (mongo-java-server 1.46) runs every aggregation over a full scan of
 * its collection, which cost it 38 ms of CPU per lookup at 100,000 keys; MongoDB itself uses
 * indexes either way. `$unwind` turns each joined array into a subdocument (absent when nothing
 * matched, and the document kept, so "no such key" still comes back as a document) before the
 * next path reads it, because that server resolves neither a dotted `localField` nor a dotted
 * projection through an array; its `$arrayElemAt` evaluates the elements' strings as
 * expressions, so a name starting with "$" would break it. The key and the account come back
 * whole, as every other query reads them (toKey and toAccount read what they need): a final
 * `$project` of their fields saved about 100 bytes a lookup, and cost that server more than the
 * rest of the lookup, resolving each dotted path anew (a third of its CPU at 1,000 cold Checks/s).
 * Whole but for the account's two arrays, which a Check never reads and which grow: its keyed
 * top-ups (up to MAX_KEYED_TOPUPS records of a key of up to 200 characters, about 267 KB) and its
 * slot claims. Joined onto each of 64 keys, the top-ups came to more than the 16 MiB MongoDB puts
 * in one reply batch. A final exclusion `$project` of those two paths leaves them out (that
 * server's `$lookup` takes no sub-pipeline beside `localField`).
 */
function snapshotPipeline(keys: string, accounts: string): (hashes: readonly string[]) => mongoose.mongo.Document[] {
  const limit = { $limit: 1 };
  const joins = [
    { $lookup: { from: keys, localField: "hash", foreignField: "hash", as: "key" } },
    { $unwind: { path: "$key", preserveNullAndEmptyArrays: true } },
    { $lookup: { from: accounts, localField: "key.owner_id", foreignField: "_id", as: "account" } },
    { $unwind: { path: "$account", preserveNullAndEmptyArrays: true } },
    { $project: { "account.credit_topups": 0, "account.slot_claims": 0 } },
  ];
  const unwindHashes = { $unwind: { path: "$hash" } };
  // $literal: the hashes are data, never read as field paths or operators. $unwind makes one
  // document of each hash, which the joins then complete.
  return (hashes) => [limit, { $project: { _id: 0, hash: { $literal: hashes } } }, unwindHashes, ...joins];
}

// A concurrent period change makes an attempt miss; more than a few in a row means the account is gone.
const SPEND_ATTEMPTS = 4;
/**
 * A keyed top-up misses only when another top-up of the account was written between its read
 * and its update, and then that one was made: each attempt lets at least one of them through.
 */
const TOPUP_ATTEMPTS = 32;
/**
 * An enable misses only when the key's disabled time changed between its read and its write
 * (disabled again after another enable, moved apart by a DisableKey): each attempt reads it again.
 */
const ENABLE_ATTEMPTS = 8;
/** The credit fields of an account (CreditState). */
const CREDIT_PROJECTION = { credit_period: 1, monthly_used: 1, topup_balance: 1, topup_total: 1 } as const;

const date = (value: number | null): Date | null => (value === null ? null : new Date(value));

function toAccount(doc: AccountSnapshotDoc): AccountRecord {
  const at = { store: "MongoDB", ownerId: doc._id };
  return {
    ownerId: doc._id,
    plan: doc.plan,
    subscriptionStatus: doc.subscription_status,
    role: doc.role,
    createdAtMs: storedRequiredDate(doc.created_at, "created_at", at),
    updatedAtMs: storedRequiredDate(doc.updated_at, "updated_at", at),
  };
}

function toCredits(doc: AccountDoc | null): CreditState {
  return { period: doc?.credit_period ?? "", monthlyUsed: doc?.monthly_used ?? 0, topupBalance: doc?.topup_balance ?? 0, topupTotal: doc?.topup_total ?? 0 };
}

function toTopUp(ownerId: string, doc: TopUpDoc): TopUpRecord {
  return { ownerId, idempotencyKey: doc.idempotency_key, amount: doc.amount, topupTotal: doc.topup_total, atMs: doc.at.getTime() };
}

// The fields a Check decides by are checked (stored-values.ts): a document edited by hand (a
// $push without $each, a camelCase rate_limit, a date out of a JS Date's range) fails the read
// instead of reaching L1.
function toKey(doc: KeySnapshotDoc): KeyRecord {
  const at = { store: "MongoDB", keyId: doc._id };
  return {
    id: doc._id,
    hash: doc.hash,
    ownerId: doc.owner_id,
    projectId: doc.project_id,
    name: doc.name,
    mode: doc.mode,
    start: doc.start,
    last4: doc.last4,
    scopes: [...storedScopes(doc.scopes, at)],
    metadata: { ...doc.metadata },
    createdAtMs: storedRequiredDate(doc.created_at, "created_at", at),
    lastUsedAtMs: storedDate(doc.last_used_at, "last_used_at", at),
    expiresAtMs: storedDate(doc.expires_at, "expires_at", at),
    revokedAtMs: storedDate(doc.revoked_at, "revoked_at", at),
    revokeReason: doc.revoke_reason,
    graceEndsAtMs: storedDate(doc.grace_ends_at, "grace_ends_at", at),
    rotatedToId: doc.rotated_to_id,
    rateLimit: storedRateLimit(doc.rate_limit, "window_seconds", at),
    disabledAtMs: storedDate(doc.disabled_at ?? null, "disabled_at", at),
  };
}

/** A key record as MongoKeyStore stores it; `counted` says whether it holds a slot under the plan cap. */
export function keyDocument(key: KeyRecord, counted: boolean): KeyDoc {
  return {
    _id: key.id,
    hash: key.hash,
    owner_id: key.ownerId,
    project_id: key.projectId,
    name: key.name,
    mode: key.mode,
    start: key.start,
    last4: key.last4,
    scopes: key.scopes,
    metadata: key.metadata,
    created_at: new Date(key.createdAtMs),
    last_used_at: date(key.lastUsedAtMs),
    expires_at: date(key.expiresAtMs),
    revoked_at: date(key.revokedAtMs),
    revoke_reason: key.revokeReason,
    grace_ends_at: date(key.graceEndsAtMs),
    rotated_to_id: key.rotatedToId,
    rate_limit: key.rateLimit === null ? null : { limit: key.rateLimit.limit, window_seconds: key.rateLimit.windowSeconds },
    disabled_at: date(key.disabledAtMs),
    counted,
    test_slot: key.mode === "test",
  };
}

const NETWORK_ERRORS = new Set(["MongoNetworkError", "MongoServerSelectionError", "MongoNotConnectedError", "MongoNetworkTimeoutError", "MongoTopologyClosedError"]);

/**
 * Whether a failed write surely made no change: it never reached a server (none selected, the
 * client closed, no connection made or handed out), or the server refused it. Any other failure
 * (a connection lost or timed out, which may be while the write was out) may come after the change.
 */
function neverWritten(error: unknown): boolean {
  if (!(error instanceof mongoose.mongo.MongoError)) return false;
  if (error instanceof mongoose.mongo.MongoWriteConcernError || error instanceof mongoose.mongo.MongoBulkWriteError) return false;
  return (
    error instanceof mongoose.mongo.MongoServerSelectionError ||
    error instanceof mongoose.mongo.MongoNotConnectedError ||
    error instanceof mongoose.mongo.MongoTopologyClosedError ||
    error instanceof mongoose.mongo.MongoServerError ||
    noConnection(error)
  );
}

/** The pool's refusals to hand out a connection (cleared, closed, its wait queue timed out). */
const CHECKOUT_ERRORS = new Set(["MongoPoolClearedError", "MongoPoolClosedError", "MongoWaitQueueTimeoutError"]);
/** The system calls of making a socket: an error in one means no socket was ever there. */
const CONNECT_SYSCALLS = new Set(["connect", "getaddrinfo"]);

/**
 * Whether a driver error came before any connection carried the command: the pool handed none
 * out, or the new connection failed while it was made (refused, unresolved, in its handshake).
 * MongoPoolClearedError only: the pool interrupts a connection in use with PoolClearedOnNetworkError.
 */
function noConnection(error: mongoose.mongo.MongoError): boolean {
  if (CHECKOUT_ERRORS.has(error.name)) return true;
  if (!(error instanceof mongoose.mongo.MongoNetworkError)) return false;
  if (error.hasErrorLabel(mongoose.mongo.MongoErrorLabel.HandshakeError)) return true;
  const cause: unknown = error.cause;
  return typeof cause === "object" && cause !== null && "syscall" in cause && CONNECT_SYSCALLS.has(String(cause.syscall));
}

/**
 * What a failed bulk write made: `refused` names the operations the server answered with an
 * error (the others were made); "none" when it surely made nothing; "unknown" when any of them
 * may be made.
 */
type BulkOutcome = { refused: ReadonlySet<number> } | "none" | "unknown";

function bulkOutcome(error: unknown): BulkOutcome {
  if (!(error instanceof mongoose.mongo.MongoBulkWriteError)) return neverWritten(error) ? "none" : "unknown";
  // Made, but maybe not as durably as asked: a failover may still undo them.
  if (error.result.getWriteConcernError() !== undefined) return "unknown";
  const writeErrors = Array.isArray(error.writeErrors) ? error.writeErrors : [error.writeErrors];
  if (writeErrors.length > 0) return { refused: new Set(writeErrors.map((e) => e.index)) };
  // No answer naming rows: the driver wraps a failure of its own (a server not selected, a
  // connection refused or dropped) with no write errors, and keeps it as errorResponse. It made
  // nothing only when that failure is sure to have, and no earlier batch of the write was made.
  const failure: unknown = error.errorResponse;
  const { insertedCount, matchedCount, modifiedCount, upsertedCount, deletedCount } = error.result;
  const nothingMade = insertedCount + matchedCount + modifiedCount + upsertedCount + deletedCount === 0;
  return failure instanceof Error && neverWritten(failure) && nothingMade ? "none" : "unknown";
}

/**
 * Maps driver errors: E11000 to DuplicateError; lost connections, and a pool that handed out none
 * (its wait queue timed out, it was cleared or closed: CHECKOUT_ERRORS, and PoolClearedOnNetworkError,
 * a cleared pool interrupting a connection in use) to StoreUnavailableError. Not StoreBusyError,
 * though a call the pool refused surely sent nothing: a store method is often several calls
 * (guarded as one), and one refused after another was made leaves a change made in part.
 */
function translate(error: unknown): unknown {
  if (error instanceof Error) {
    if ("code" in error && error.code === 11000) return new DuplicateError("a key with this id or hash already exists", { cause: error });
    if (CHECKOUT_ERRORS.has(error.name)) return new StoreUnavailableError("MongoDB's connection pool handed out no connection", { cause: error });
    if (
      NETWORK_ERRORS.has(error.name) ||
      error instanceof mongoose.mongo.MongoNetworkError ||
      /buffering timed out|connection .* closed|Client must be connected/i.test(error.message)
    ) {
      return new StoreUnavailableError("MongoDB is unreachable", { cause: error });
    }
  }
  return error;
}

/**
 * How long a key lookup waits for MongoDB unless told otherwise (keygate serve passes the Check
 * budget, KEYGATE_CHECK_BUDGET_MS): below the seconds a caller would otherwise wait for server
 * selection to give up.
 */
const LOOKUP_TIMEOUT_MS = 1000;
/**
 * Cold lookups read together (LookupBatcher): at most this many keys a command, and this many
 * commands outstanding; lookups that come while they are out go together in the next.
 */
const LOOKUP_BATCH_MAX = 64;
const LOOKUPS_IN_FLIGHT = 2;

/** The snapshot in a cold lookup's document; a key whose account is gone reads as unknown, as it always has. */
function snapshotOfDoc(doc: AnchoredSnapshotDoc): KeySnapshot | null {
  return doc.key === undefined || doc.account === undefined ? null : { key: toKey(doc.key), account: toAccount(doc.account) };
}

async function guarded<T>(operation: () => Promise<T>): Promise<T> {
  try {
    return await operation();
  } catch (error) {
    throw translate(error);
  }
}

/** A schema index's fields, in order, as the driver takes them: keygate's indexes are all ascending or descending. */
function indexSpec(fields: mongoose.IndexDefinition): Array<[string, 1 | -1]> {
  return Object.entries(fields).map(([field, direction]) => {
    if (direction !== 1 && direction !== -1) throw new Error(`keygate creates no index of direction ${String(direction)} (on ${field})`);
    return [field, direction];
  });
}

/** Filter for keys that hold a slot: not revoked, not rotated away, not expired. */
function activeFilter(ownerId: string, nowMs: number): mongoose.QueryFilter<KeyDoc> {
  return { owner_id: ownerId, revoked_at: null, rotated_to_id: null, $or: [{ expires_at: null }, { expires_at: { $gt: new Date(nowMs) } }] };
}

/**
 * Every read goes to the primary, whatever KEYGATE_MONGODB_URI asks (the driver takes an option
 * given here over the URI's): a key looked up on a lagging secondary after its revocation would
 * be cached, unrevoked, for the whole TTL. The URI's readPreferenceTags are then ignored, and a
 * maxStalenessSeconds fails the connect (the driver refuses it with primary).
 */
const PRIMARY_READS = { readPreference: "primary" } as const;

/** Options of MongoKeyStore.connect. */
export interface MongoConnectOptions {
  serverSelectionTimeoutMs?: number;
  /**
   * Sees every command the driver sends (the driver's command monitoring, off unless this is
   * set): tests and measurements count the round trips of an operation with it. Heartbeats and
   * connection handshakes are not commands and are not seen.
   */
  onCommandStarted?: (event: mongoose.mongo.CommandStartedEvent) => void;
  /** Apply pending schema steps (the default); false refuses a database that needs any. */
  migrate?: boolean;
  /** How long a Check's key lookup waits before it fails as unavailable (default 1000 ms). */
  lookupTimeoutMs?: number;
  /** Where a key insert whose outcome could not be settled is reported, at error level, by ids. */
  logger?: Pick<Logger, "error">;
  /**
   * The wall clock slot changes are timed on against SLOT_LEASE_MS (default Date.now, the clock
   * key ids are made on): tests move it past a lease instead of waiting for one.
   */
  clock?: () => number;
}

/**
 * The production store: MongoDB through mongoose. The active-key cap holds across replicas
 * without transactions: one conditional increment on the account admits a key, the insert
 * follows, and an insert sure to have made nothing gives the slot back (one whose answer was
 * lost is settled first: #insertMade). Each key's `counted` flag makes the release on revoke or
 * expiry happen exactly once. Every change to a counter carries a token (SlotClaim) in the same
 * update, so one retried after a lost answer is made once, and one left unfinished (its answer
 * and the read that would settle it both lost, or the process gone) is finished or undone by the
 * owner's next CreateKey once its lease is over (#settleSlots).
 */
export class MongoKeyStore implements KeyStore {
  readonly kind = "mongodb";
  readonly #connection: Connection;
  readonly #accounts: Model<AccountDoc>;
  readonly #keys: Model<KeyDoc>;
  readonly #usage: Model<UsageDoc>;
  readonly #audit: Model<AuditDoc>;
  /** The cold lookup's anchor collection, where its one document is placed. */
  readonly #anchor: mongoose.mongo.Collection<AnchorDoc>;
  /**
   * The database on the MongoDB driver itself, for the cold lookup's `aggregate` command: a Check
   * on a key no cache holds skips mongoose's query building, casting and hooks.
   */
  readonly #db: mongoose.mongo.Db;
  readonly #schema: mongoose.mongo.Collection<SchemaDoc>;
  /**
   * Write-behind's collections on the driver: its rows already hold the schema's types, and
   * mongoose's casting of each operation cost about 20 µs a row, on the event loop.
   */
  readonly #usageRows: mongoose.mongo.Collection<UsageDoc>;
  readonly #keyRows: mongoose.mongo.Collection<KeyDoc>;
  /**
   * The Key model's own collection (mongoose keeps one a name), typed: key inserts go through it
   * rather than the model, whose document building drops a metadata key "prototype" (#insertKey).
   */
  readonly #keyDocs: mongoose.Collection<KeyDoc>;
  readonly #snapshotPipeline: (hashes: readonly string[]) => mongoose.mongo.Document[];
  /** Cold lookups, read together when they come together (LookupBatcher). */
  readonly #lookups: LookupBatcher<AnchoredSnapshotDoc>;
  readonly #logger: Pick<Logger, "error"> | undefined;
  readonly #clock: () => number;

  /** Called once the connection is open, so its driver database exists. */
  private constructor(connection: Connection, options: Pick<MongoConnectOptions, "lookupTimeoutMs" | "logger" | "clock"> = {}) {
    const lookupTimeoutMs = options.lookupTimeoutMs ?? LOOKUP_TIMEOUT_MS;
    this.#connection = connection;
    this.#logger = options.logger;
    this.#clock = options.clock ?? Date.now;
    this.#accounts = connection.model<AccountDoc>("Account", accountSchema);
    this.#keys = connection.model<KeyDoc>("Key", keySchema);
    this.#usage = connection.model<UsageDoc>("Usage", usageSchema);
    this.#audit = connection.model<AuditDoc>("Audit", auditSchema);
    const db = connection.db;
    if (db === undefined) throw new StoreUnavailableError("MongoDB is not connected");
    this.#anchor = db.collection<AnchorDoc>(ANCHOR_COLLECTION);
    this.#db = db;
    this.#schema = db.collection<SchemaDoc>(SCHEMA_COLLECTION);
    this.#usageRows = db.collection<UsageDoc>(this.#usage.collection.collectionName);
    this.#keyRows = db.collection<KeyDoc>(this.#keys.collection.collectionName);
    this.#keyDocs = connection.collection<KeyDoc>(this.#keys.collection.collectionName);
    this.#snapshotPipeline = snapshotPipeline(this.#keys.collection.collectionName, this.#accounts.collection.collectionName);
    // A server that stops answering (paused, partitioned) is not seen as disconnected until the
    // driver's heartbeat gives up, so each lookup has a deadline: the Check answers UNAVAILABLE /
    // 503 then, while the proxy is still waiting, instead of after server selection.
    this.#lookups = new LookupBatcher((hashes) => guarded(() => this.#readSnapshots(hashes)), {
      maxBatch: LOOKUP_BATCH_MAX,
      maxInFlight: LOOKUPS_IN_FLIGHT,
      timeoutMs: lookupTimeoutMs,
      timeoutError: () => new StoreUnavailableError(`MongoDB did not answer a key lookup within ${lookupTimeoutMs} ms`),
    });
  }

  /** Connects and creates the indexes. Fails fast (not buffered) when MongoDB is down. */
  static async connect(uri: string, options: MongoConnectOptions = {}): Promise<MongoKeyStore> {
    const onCommandStarted = options.onCommandStarted;
    const connection = mongoose.createConnection(uri, {
      bufferCommands: false,
      serverSelectionTimeoutMS: options.serverSelectionTimeoutMs ?? 3000,
      heartbeatFrequencyMS: 2000,
      socketTimeoutMS: 10_000,
      // The driver's defaults wait 30 s for a new connection's handshake (and the heartbeat's
      // answer, which says the server is gone) and for ever for a connection from the pool: with
      // a server that takes connections and never answers, one call outlived the shutdown grace.
      connectTimeoutMS: 3000,
      waitQueueTimeoutMS: 3000,
      autoIndex: false,
      // Collections are made by #createIndexes and the first insert; mongoose's background
      // createCollection per model would race them, and write on a dry run.
      autoCreate: false,
      monitorCommands: onCommandStarted !== undefined,
      ...PRIMARY_READS,
    });
    if (onCommandStarted !== undefined) connection.getClient().on("commandStarted", onCommandStarted);
    try {
      await guarded(() => connection.asPromise());
    } catch (error) {
      // The driver's monitors would go on trying a server that never answered, for the life of
      // the process: a start that tries again (untilAnswered) would add another set each time.
      await connection.close().catch(() => undefined);
      throw error;
    }
    const store = new MongoKeyStore(connection, options);
    try {
      const pending = await guarded(() => store.pendingMigrations());
      if (options.migrate === false && pending.length > 0) throw new MigrationsPendingError("MongoDB", pending);
      await guarded(() => store.#migrate(pending));
      // Every start, not only a migration: a database restored without the anchor, or without an
      // index (dropped by hand, mongorestore --noIndexRestore), gets it back.
      await guarded(() => store.#createIndexes());
      await guarded(() => store.#placeAnchor());
    } catch (error) {
      await connection.close().catch(() => undefined);
      throw error;
    }
    return store;
  }

  /** The steps `uri`'s database still needs, read without writing anything (`keygate migrate --dry-run`). */
  static async pendingAt(uri: string, options: Pick<MongoConnectOptions, "serverSelectionTimeoutMs"> = {}): Promise<SchemaStep[]> {
    const connection = mongoose.createConnection(uri, {
      bufferCommands: false,
      serverSelectionTimeoutMS: options.serverSelectionTimeoutMs ?? 3000,
      autoIndex: false,
      autoCreate: false,
      ...PRIMARY_READS,
    });
    try {
      await guarded(() => connection.asPromise());
      return await guarded(() => new MongoKeyStore(connection).pendingMigrations());
    } finally {
      await connection.close().catch(() => undefined);
    }
  }

  /**
   * The schema steps this database still needs, in order (NewerSchemaError for a database written
   * by a newer keygate). The version is one document in SCHEMA_COLLECTION; a database written
   * before versions were recorded has none and reads as version 0.
   */
  async pendingMigrations(): Promise<SchemaStep[]> {
    const doc = await this.#schema.findOne({ _id: SCHEMA_ID });
    const current = doc?.version ?? 0;
    if (current > MONGO_SCHEMA_VERSION) throw new NewerSchemaError("MongoDB", current, MONGO_SCHEMA_VERSION);
    return this.#migrations().filter((m) => m.version > current);
  }

  /**
   * Applies the steps. Each is idempotent, so two replicas starting at once may both run one:
   * the version only moves forward ($max), and a step that ran twice changed nothing the second time.
   */
  async #migrate(steps: readonly SchemaStep[]): Promise<void> {
    const byVersion = new Map(this.#migrations().map((m) => [m.version, m]));
    for (const { version } of steps) {
      await byVersion.get(version)?.apply();
      try {
        await this.#schema.updateOne({ _id: SCHEMA_ID }, { $max: { version } }, { upsert: true });
      } catch (error) {
        // Two upserts at once: one inserted, the other hit the _id index; apply $max again.
        if (!(error instanceof Error && "code" in error && error.code === 11000)) throw error;
        await this.#schema.updateOne({ _id: SCHEMA_ID }, { $max: { version } });
      }
    }
  }

  /** The MongoDB schema's history. Never edit a released step: add the next one. */
  #migrations(): Array<SchemaStep & { apply(): Promise<unknown> }> {
    return [
      {
        version: 1,
        description:
          "baseline: indexes keys.hash_unique, keys.owner_state, keys.project, usage.owner_day, audit.owner and audit.key " +
          "(created where missing; documents from earlier versions need no change: absent credit fields read as 0)",
        apply: async () => {
          await this.#keys.createIndexes();
          await this.#usage.createIndexes();
          await this.#audit.createIndexes();
        },
      },
      {
        version: 2,
        description:
          "test-mode keys hold slots of their own: each counted test key moves from accounts.active_key_count to " +
          "accounts.active_test_key_count (once per key: keys.test_slot)",
        // Released as the key's mark, then the move: a start stopped between them left the move
        // undone for good. The move now goes first, with its token; a database the step
        // completed on is the same either way, and the step never runs on it again.
        apply: () => this.#moveLegacyTestSlots(),
      },
    ];
  }

  /**
   * Schema step 2: each legacy test key (test_slot not true) is marked, and a counted one's slot
   * first moved from active_key_count to active_test_key_count with its token (mv:<keyId>) in
   * the same update. The token stays: a start stopped between the move and the mark is finished
   * by the next (the key is still legacy, its move is not made again), and of two replicas
   * running the step at once, one that read the key before the other marked it cannot move it
   * again however late its move comes (pulling the token after the mark would allow that).
   */
  async #moveLegacyTestSlots(): Promise<void> {
    const legacy = await this.#keys.find({ mode: "test", test_slot: { $ne: true } }, { _id: 1, owner_id: 1, counted: 1 }).lean<Array<Pick<KeyDoc, "_id" | "owner_id" | "counted">>>();
    for (const key of legacy) {
      if (key.counted) {
        const token = moveClaim(key._id);
        await this.#accounts.updateOne(
          { _id: key.owner_id, slot_claims: { $ne: token } },
          { $inc: { active_key_count: -1, active_test_key_count: 1 }, $push: { slot_claims: token } },
        );
      }
      await this.#keys.updateOne({ _id: key._id, test_slot: { $ne: true } }, { $set: { test_slot: true } });
    }
  }

  /** Whether the lease of the change named by a ULID (a key id's, a nonce) is over; false when it holds none. */
  #leaseOver(ulidText: string): boolean {
    const atMs = ulidTimeMs(ulidText);
    return atMs !== null && this.#clock() - atMs >= SLOT_LEASE_MS;
  }

  /**
   * Throws once the wall clock reaches `deadlineMs`, the end of a slot change's lease: after it
   * the repair may be making the same change (#settleSlots), and a write of ours could then be
   * made twice. It is checked before each write, not during one: a write sent just before the
   * deadline and made after it (a process frozen with the write out, a server that runs it late)
   * is the residual risk, which the lease's length makes small.
   */
  #within(deadlineMs: number): void {
    if (this.#clock() >= deadlineMs) {
      throw new StoreUnavailableError(`a change to an account's key slots took longer than ${SLOT_LEASE_MS} ms; the owner's next CreateKey settles it`);
    }
  }

  /**
   * Creates the indexes the schemas declare (keySchema, usageSchema, auditSchema), one command
   * each; the server makes one only where it is missing, so this costs a round trip an index at
   * start. An index in the way of one (that name on other fields or options, or those fields
   * under another name) fails the start, naming both.
   */
  async #createIndexes(): Promise<void> {
    for (const model of [this.#keys, this.#usage, this.#audit]) {
      const collection = this.#db.collection(model.collection.collectionName);
      for (const [fields, options] of model.schema.indexes()) {
        const unique = options.unique === true;
        try {
          await collection.createIndex(indexSpec(fields), { name: options.name, ...(unique ? { unique } : {}) });
        } catch (error) {
          if (!(error instanceof mongoose.mongo.MongoServerError)) throw error;
          throw new Error(
            `MongoDB could not create keygate's ${unique ? "unique " : ""}index ${collection.collectionName}.${String(options.name)} on ${JSON.stringify(fields)}: ` +
              `${error.message}; drop the index in its way and start keygate again`,
            { cause: error },
          );
        }
      }
    }
  }

  /**
   * Puts the cold lookup's anchor document in place; idempotent. Lookups that all find the anchor
   * gone (a database restored without it, or emptied) place it at once, and every upsert but one
   * can then fail on the _id index: the anchor is there, which is all that was asked.
   */
  async #placeAnchor(): Promise<void> {
    const note = "keygate's cold key lookup starts its aggregation from this document (MongoKeyStore.findSnapshotByHash)";
    try {
      await this.#anchor.updateOne({ _id: ANCHOR_ID }, { $setOnInsert: { note } }, { upsert: true });
    } catch (error) {
      if (!(error instanceof Error && "code" in error && error.code === 11000)) throw error;
    }
  }

  /**
   * The cold lookup of `hashes`: one `aggregate` command, read from its reply (the driver's cursor
   * around it, its options, session and cleanup, cost about a fifth of a cold lookup's CPU). The
   * anchor gives one document a hash, so the first batch holds the whole answer (lookupAnswer).
   * An empty answer means the anchor is gone, so nothing was asked: never read as "no such key",
   * it is put back and the lookup asked again.
   */
  async #readSnapshots(hashes: readonly string[]): Promise<Map<string, AnchoredSnapshotDoc>> {
    let docs = await this.#readBatch(hashes);
    if (docs.length === 0) {
      await this.#placeAnchor();
      docs = await this.#readBatch(hashes);
      if (docs.length === 0) throw new StoreUnavailableError("MongoDB's lookup anchor could not be placed");
    }
    const found = new Map<string, AnchoredSnapshotDoc>();
    for (const doc of docs) {
      // The hash index is unique, so this never happens; if it did, neither key may be chosen.
      if (found.has(doc.hash)) throw new StoreUnavailableError("MongoDB answered a key lookup with two keys for one hash");
      found.set(doc.hash, doc);
    }
    for (const hash of hashes) {
      if (!found.has(hash)) throw new StoreUnavailableError("MongoDB answered a key lookup without one of the keys it was asked for");
    }
    return found;
  }

  async #readBatch(hashes: readonly string[]): Promise<AnchoredSnapshotDoc[]> {
    // One more than the answer holds: MongoDB closes the cursor only once it has read past the
    // last document, and a batch of exactly batchSize documents leaves it open.
    const batchSize = hashes.length + 1;
    const reply = await this.#db.command({ aggregate: ANCHOR_COLLECTION, pipeline: this.#snapshotPipeline(hashes), cursor: { batchSize } });
    return lookupAnswer(reply, (command) => this.#db.command(command));
  }

  async upsertAccount(input: AccountUpsert, defaults: AccountDefaults, nowMs: number): Promise<UpsertedAccount> {
    // The document as the write found it, so the caller sees whether this write changed it; the
    // account after is what the write made of it: the fields given, the others as they were (or
    // the defaults on an insert).
    const { $set, $setOnInsert } = accountUpdate(input, defaults, nowMs);
    const found = await guarded(() =>
      this.#accounts.findOneAndUpdate({ _id: input.ownerId }, { $set, $setOnInsert }, { upsert: true, returnDocument: "before" }).lean<AccountDoc>(),
    );
    const before = found === null ? null : toAccount(found);
    const account: AccountRecord = {
      ownerId: input.ownerId,
      plan: input.plan ?? before?.plan ?? defaults.plan,
      subscriptionStatus: input.subscriptionStatus ?? before?.subscriptionStatus ?? defaults.subscriptionStatus,
      role: input.role ?? before?.role ?? defaults.role,
      createdAtMs: before?.createdAtMs ?? nowMs,
      updatedAtMs: nowMs,
    };
    return { account, before };
  }

  /**
   * upsertAccount's one write, answering the whole document (createKey reads its slot claims) and
   * whether it inserted it.
   */
  async #upsertAccountDoc(input: AccountUpsert, defaults: AccountDefaults, nowMs: number): Promise<{ doc: AccountDoc; created: boolean }> {
    const { $set, $setOnInsert } = accountUpdate(input, defaults, nowMs);
    const result = await this.#accounts
      .findOneAndUpdate({ _id: input.ownerId }, { $set, $setOnInsert }, { upsert: true, returnDocument: "after", includeResultMetadata: true })
      .lean<mongoose.mongo.ModifyResult<AccountDoc>>();
    const doc = result.value;
    if (doc === null) throw new Error(`upsert of account ${input.ownerId} returned nothing`);
    // MongoDB reports updatedExisting; a wire server that leaves it out (mongo-java-server, on an
    // insert) is read by the creation time this write would have set.
    const updatedExisting = result.lastErrorObject?.["updatedExisting"];
    const created = typeof updatedExisting === "boolean" ? !updatedExisting : doc.created_at.getTime() === nowMs;
    return { doc, created };
  }

  async getAccount(ownerId: string): Promise<AccountRecord | null> {
    const doc = await guarded(() => this.#accounts.findById(ownerId).lean<AccountDoc>());
    return doc === null ? null : toAccount(doc);
  }

  async countActiveKeys(ownerId: string, nowMs: number, mode: KeyMode = "live"): Promise<number> {
    return guarded(() => this.#keys.countDocuments({ ...activeFilter(ownerId, nowMs), mode }));
  }

  /**
   * The owner's keys with slot work to do, in one query on the owner index: counted keys that
   * expired, or were revoked (a revoke, or an undone rotation, stopped before its release);
   * keys whose release is unfinished (slot_release); legacy test keys (schema step 2 may have
   * moved one's slot and not marked it).
   */
  async #keysWithSlotWork(ownerId: string, nowMs: number): Promise<SlotWorkKey[]> {
    return this.#keys
      .find(
        {
          owner_id: ownerId,
          $or: [
            { counted: true, expires_at: { $ne: null, $lte: new Date(nowMs) } },
            { counted: true, revoked_at: { $ne: null } },
            { slot_release: { $ne: null } },
            { mode: "test", test_slot: { $ne: true } },
          ],
        },
        { _id: 1, counted: 1, expires_at: 1, revoked_at: 1, test_slot: 1, slot_release: 1 },
      )
      .lean<SlotWorkKey[]>();
  }

  /**
   * Run by createKey before its admission: gives back the slots of counted keys that expired or
   * were revoked, and finishes or undoes the owner's slot changes left unfinished whose lease is
   * over (SLOT_LEASE_MS; one still in it is left to its own operation). `account` was read before
   * the keys are: a rel: token seen then, with no key holding its nonce now, is surely finished.
   * Nothing but that one query when there is nothing to do.
   */
  async #settleSlots(account: AccountDoc, nowMs: number): Promise<void> {
    const claims = account.slot_claims ?? [];
    const keys = await this.#keysWithSlotWork(account._id, nowMs);
    // mv: tokens stay for good (#moveLegacyTestSlots); only a legacy key read above needs one.
    if (keys.length === 0 && claims.every((token) => parseClaim(token)?.kind === "mv")) return;
    const releasing = new Set(keys.flatMap((key) => (typeof key.slot_release === "string" ? [key.slot_release] : [])));
    for (const token of claims) {
      const claim = parseClaim(token);
      if (claim?.kind === "add" && this.#leaseOver(claim.keyId)) await this.#settleAdmission(account._id, claim.mode, claim.keyId, new Date(nowMs));
      if (claim?.kind === "rel" && !releasing.has(claim.nonce)) await this.#accounts.updateOne({ _id: account._id }, { $pull: { slot_claims: token } });
    }
    for (const key of keys) {
      let testSlot = key.test_slot === true;
      if (!testSlot && claims.includes(moveClaim(key._id))) {
        await this.#keys.updateOne({ _id: key._id, test_slot: { $ne: true } }, { $set: { test_slot: true } });
        testSlot = true;
      }
      if (typeof key.slot_release === "string") {
        if (this.#leaseOver(key.slot_release)) await this.#resumeRelease(key._id, account._id, key.slot_release, slotCounter({ test_slot: testSlot }), claims);
      } else if (key.counted && (key.revoked_at !== null || (key.expires_at !== null && key.expires_at.getTime() <= nowMs))) {
        await this.#releaseSlot(key._id, account._id);
      }
    }
  }

  /**
   * An admission whose lease is over: its key is in (the token is pulled; the slot stays the
   * key's, revoked or not: a revoke gives it back under a release of its own), or it never
   * will be: its id is taken by a revoked placeholder first, so an insert still on its way fails,
   * and the slot goes back with the token. Either write is decided by the token or the _id
   * index, so it is made once whatever the admission's own operation is still doing.
   */
  async #settleAdmission(ownerId: string, mode: KeyMode, keyId: string, now: Date): Promise<void> {
    const like = { owner_id: ownerId, project_id: null, name: "never issued", mode, start: "", scopes: [], expires_at: null, rate_limit: null, test_slot: mode === "test" };
    const placed = await this.#placePlaceholder(placeholderDocument(keyId, like, now, "never issued: the admission that named it was not finished"));
    const found = placed ? null : await this.#keys.findById(keyId, { hash: 1 }).lean<Pick<KeyDoc, "hash">>();
    const token = addClaim(mode, keyId);
    if (placed || found?.hash === placeholderHash(keyId)) {
      const undone = await this.#consumeAdmission(ownerId, mode, token);
      if (undone) this.#logger?.error({ keyId, ownerId }, "a key admission whose key never went in was undone, its slot given back");
    } else if (found !== null) {
      await this.#accounts.updateOne({ _id: ownerId }, { $pull: { slot_claims: token } });
    }
  }

  /** Gives back the slot of an admission whose key is not in, once: true when this call did. */
  async #consumeAdmission(ownerId: string, mode: KeyMode, token: string): Promise<boolean> {
    const counter = slotCounter({ test_slot: mode === "test" });
    const consumed = await resend(
      () => this.#accounts.updateOne({ _id: ownerId, slot_claims: token }, { $inc: { [counter]: -1 }, $pull: { slot_claims: token } }),
      () => undefined,
    );
    return consumed.modifiedCount > 0;
  }

  /**
   * Releases a key's slot: the flip of `counted` (only the call that makes it gives the slot
   * back) carries a nonce, so a flip whose answer was lost is read back as made or not, and the
   * release is finished by the steps of #finishRelease. A flip still unknown after that read is
   * found by #settleSlots once its lease is over.
   */
  async #releaseSlot(keyId: string, ownerId: string): Promise<void> {
    const nonce = ulid(this.#clock());
    let released: Pick<KeyDoc, "test_slot"> | null;
    try {
      released = await this.#keys
        .findOneAndUpdate({ _id: keyId, counted: true }, { $set: { counted: false, slot_release: nonce } }, { projection: { test_slot: 1 } })
        .lean<Pick<KeyDoc, "test_slot">>();
    } catch (error) {
      if (neverWritten(error)) throw error;
      const now = await this.#keys.findById(keyId, { test_slot: 1, slot_release: 1 }).lean<Pick<KeyDoc, "test_slot" | "slot_release">>();
      if (now?.slot_release !== nonce) throw error;
      released = now;
    }
    if (released !== null) await this.#finishRelease(keyId, ownerId, nonce, slotCounter(released));
  }

  /**
   * The account's side of a release under `nonce`, in three steps, each made once however often
   * it is sent: the counter gives the slot back with the token rel:<nonce>; the key's nonce is
   * cleared; the token is pulled (only then: while the key holds the nonce, the token must stay,
   * or the first step would be made again). None is sent once the nonce's lease is over, when
   * #resumeRelease may be finishing the release.
   */
  async #finishRelease(keyId: string, ownerId: string, nonce: string, counter: SlotCounter): Promise<void> {
    const token = releaseClaim(nonce);
    const within = (): void => this.#within((ulidTimeMs(nonce) ?? 0) + SLOT_LEASE_MS);
    within();
    await resend(() => this.#accounts.updateOne({ _id: ownerId, slot_claims: { $ne: token } }, { $inc: { [counter]: -1 }, $push: { slot_claims: token } }), within);
    await this.#clearRelease(keyId, ownerId, nonce, within);
  }

  /** The last two steps of #finishRelease. */
  async #clearRelease(keyId: string, ownerId: string, nonce: string, within: () => void): Promise<void> {
    within();
    await resend(() => this.#keys.updateOne({ _id: keyId, slot_release: nonce }, { $unset: { slot_release: 1 } }), within);
    await resend(() => this.#accounts.updateOne({ _id: ownerId }, { $pull: { slot_claims: releaseClaim(nonce) } }), () => undefined);
  }

  /**
   * A release whose lease is over (its operation sends nothing more). When the account held
   * rel:<nonce> (`claims`, read before the key), the slot was given back, and only its nonce and
   * token are cleared. Otherwise the release is taken over under a nonce of its own, which one
   * repair alone can do (the key's nonce is the filter), and made anew.
   */
  async #resumeRelease(keyId: string, ownerId: string, nonce: string, counter: SlotCounter, claims: readonly string[]): Promise<void> {
    if (claims.includes(releaseClaim(nonce))) {
      await this.#clearRelease(keyId, ownerId, nonce, () => undefined);
      return;
    }
    const next = ulid(this.#clock());
    const taken = await this.#keys.updateOne({ _id: keyId, slot_release: nonce }, { $set: { slot_release: next } });
    if (taken.modifiedCount === 0) return;
    this.#logger?.error({ keyId, ownerId }, "a key release left unfinished was finished");
    await this.#finishRelease(keyId, ownerId, next, counter);
  }

  async createKey(record: KeyRecord, limits: CreateLimits): Promise<CreatedKey> {
    const upserted = await guarded(async () => {
      // An owner with no account would be on the default plan: at a cap of 0 it is refused before
      // the account is made, so a refused CreateKey writes nothing (as SQLite's transaction).
      const defaultCap = limits.maxActiveKeysFor(limits.accountDefaults.plan, record.mode);
      if (defaultCap <= 0 && (await this.#accounts.exists({ _id: record.ownerId })) === null) {
        throw new CapExceededError(limits.accountDefaults.plan, defaultCap, record.mode);
      }
      return this.#upsertAccountDoc({ ownerId: record.ownerId }, limits.accountDefaults, limits.nowMs);
    });
    const createdAccount = upserted.created ? toAccount(upserted.doc) : null;
    try {
      await guarded(() => this.#issueKey(record, upserted.doc, limits));
    } catch (error) {
      // The account stays made whatever fails or refuses after its write. A retry, or a CreateKey
      // for the same owner on another replica, finds it made and records only its key: the error
      // carries it, so that this call records it and an account is never made without its
      // account.upsert record.
      throw createdAccount === null ? error : withCreatedAccount(error, createdAccount);
    }
    return { key: record, createdAccount };
  }

  /** createKey after the account's upsert, which answered `upserted`: the owner's slot work, the admission, the insert. */
  async #issueKey(record: KeyRecord, upserted: AccountDoc, limits: CreateLimits): Promise<void> {
    await this.#settleSlots(upserted, limits.nowMs);
    const token = addClaim(record.mode, record.id);
    let rotationsUndone = false;
    // The plan is part of the filter, so a concurrent plan change makes this retry, not miscount.
    for (let attempt = 0; attempt < 3; attempt++) {
      const account = await this.#accounts.findById(record.ownerId).lean<AccountDoc>();
      if (account === null) throw new Error(`account ${record.ownerId} vanished`);
      const cap = limits.maxActiveKeysFor(account.plan, record.mode);
      if (cap <= 0) throw new CapExceededError(account.plan, cap, record.mode);
      if (!(await this.#admit(record, account.plan, cap, token))) {
        const now = await this.#accounts.findById(record.ownerId).lean<AccountDoc>();
        if (now !== null && now.plan !== account.plan) continue;
        // Taken by an earlier send of this same admission (the driver's retry of a write).
        if (now?.slot_claims?.includes(token) !== true) {
          if (!rotationsUndone && (await this.#undoRevokedRotations(record.ownerId, limits.nowMs))) {
            rotationsUndone = true;
            continue;
          }
          throw new CapExceededError(account.plan, cap, record.mode);
        }
      }
      try {
        await this.#insertKey(keyDocument(record, true));
      } catch (error) {
        return this.#failCreate(record, token, limits.nowMs, error);
      }
      // The key holds the slot now. A token this fails to pull is pulled by #settleAdmission.
      await this.#accounts.updateOne({ _id: record.ownerId }, { $pull: { slot_claims: token } }).catch(() => undefined);
      return;
    }
    throw new ConflictError(`the plan of ${record.ownerId} kept changing; retry`);
  }

  /**
   * At the cap: undoes the rotations of the owner's revoked keys whose new key never went in and
   * whose lease is over (a revoke that came while such a rotation could still be finishing left
   * it), which gives their slots back; true when one was undone. Only a revoked key's: undoing
   * the rotation of one that is not would make a key its operator rotated away work again (its
   * caller's retry of the rotation undoes that). Read only when a CreateKey is refused.
   */
  async #undoRevokedRotations(ownerId: string, nowMs: number): Promise<boolean> {
    const rotated = await this.#keys
      .find({ owner_id: ownerId, revoked_at: { $ne: null }, counted: false, rotated_to_id: { $ne: null } })
      .lean<KeyDoc[]>();
    const stale = rotated.filter((key) => key.rotated_to_id !== null && this.#leaseOver(key.rotated_to_id));
    if (stale.length === 0) return false;
    const nextIds = stale.flatMap((key) => (key.rotated_to_id === null ? [] : [key.rotated_to_id]));
    const issued = await this.#keys.find({ _id: { $in: nextIds } }, { hash: 1 }).lean<Array<Pick<KeyDoc, "_id" | "hash">>>();
    const made = new Set(issued.filter((key) => key.hash !== placeholderHash(key._id)).map((key) => key._id));
    let undone = false;
    for (const key of stale) {
      if (key.rotated_to_id !== null && !made.has(key.rotated_to_id)) undone = (await this.#undoUnfinishedRotation(key, new Date(nowMs))) || undone;
    }
    return undone;
  }

  /**
   * Takes a slot for `record` while its counter is below the cap, with the admission's token:
   * true when taken. A lost answer is settled by reading the token: an admission made is undone
   * and the call fails as unavailable (the caller retries); when that read fails too, the token
   * stays for #settleSlots.
   */
  async #admit(record: KeyRecord, plan: string, cap: number, token: string): Promise<boolean> {
    const counter = slotCounter({ test_slot: record.mode === "test" });
    // An account written before test keys were counted apart has no test counter: 0.
    const free = counter === "active_test_key_count" ? { $or: [{ [counter]: { $lt: cap } }, { [counter]: { $exists: false } }] } : { [counter]: { $lt: cap } };
    try {
      const admitted = await this.#accounts.updateOne(
        { _id: record.ownerId, plan, slot_claims: { $ne: token }, ...free },
        { $inc: { [counter]: 1 }, $push: { slot_claims: token } },
      );
      return admitted.modifiedCount > 0;
    } catch (error) {
      if (neverWritten(error)) throw error;
      if ((await this.#accounts.exists({ _id: record.ownerId, slot_claims: token })) !== null) await this.#consumeAdmission(record.ownerId, record.mode, token);
      throw error;
    }
  }

  /**
   * After a failed insert of a key whose slot was taken: the slot goes back with the admission's
   * token when the insert surely made nothing. When it made the key, the key holds the slot but
   * its secret never reaches the caller, so no one can ever present it: it is revoked and its slot
   * released, rather than kept active and holding the cap until someone notices (a retry of the
   * create then fits under the cap). The call still fails, as unavailable.
   */
  async #failCreate(record: KeyRecord, token: string, nowMs: number, error: unknown): Promise<never> {
    if (!(await this.#insertMade(keyDocument(record, true), error))) {
      await this.#consumeAdmission(record.ownerId, record.mode, token);
      throw error;
    }
    try {
      await this.#keys.updateOne({ _id: record.id, revoked_at: null }, { $set: { revoked_at: new Date(nowMs), revoke_reason: "never issued: the answer to its creation was lost" } });
      await this.#releaseSlot(record.id, record.ownerId);
      await this.#accounts.updateOne({ _id: record.ownerId }, { $pull: { slot_claims: token } });
    } catch {
      // The counter stays right: the key holds the slot it took until it is released, by the
      // owner's next CreateKey if not here (#settleSlots).
      this.#logger?.error({ keyId: record.id, ownerId: record.ownerId }, "a key whose secret was never returned could not be revoked and its slot given back");
    }
    throw new StoreUnavailableError("MongoDB lost the answer to the key's insert; the key was not issued", { cause: error });
  }

  /**
   * After an insert of `doc` failed: whether the key is in. false only when the insert surely
   * made nothing: never sent or refused by the server (neverWritten), or failed before the
   * driver had it (mongoose refused the document) with no such key found. Any other driver
   * error may come after the insert was made, or while it is still on its way, so a read that
   * finds nothing would prove nothing: an upsert on _id of the same document settles it, finding
   * the key or making it, and an insert still on its way then fails on _id. When that fails too,
   * the outcome is unknown: StoreUnavailableError, with nothing given back (a slot held by no key
   * refuses one key too many; a slot given back twice would admit one). A document found at that
   * _id is this insert only with its hash: a revoked placeholder (#placePlaceholder) takes the id
   * of a rotation's new key that was not in, or of an admission's, and that change was undone.
   */
  /**
   * Inserts a key document as keyDocument built it (every field set, so nothing for the schema's
   * defaults to add), through the model's driver collection: mongoose's document building skips
   * its "special properties", so a metadata key "prototype" or "__proto__", which KeyAdmin
   * accepts, was dropped.
   */
  async #insertKey(doc: KeyDoc): Promise<void> {
    await this.#keyDocs.insertOne(doc);
  }

  async #insertMade(doc: KeyDoc, error: unknown): Promise<boolean> {
    if (neverWritten(error)) return false;
    const { _id, ...fields } = doc;
    const stored = async (): Promise<boolean> => (await this.#keys.exists({ _id, hash: doc.hash })) !== null;
    try {
      if (!(error instanceof mongoose.mongo.MongoError)) return await stored();
      try {
        // Through the collection, as #insertKey: mongoose's casting would drop a "prototype" metadata key.
        const upserted = await this.#keyDocs.updateOne({ _id }, { $setOnInsert: fields }, { upsert: true });
        return upserted.upsertedCount > 0 || (await stored());
      } catch (upsertError) {
        // E11000: the lost insert landed meanwhile (on _id), or the hash is another key's, which
        // the lost insert would have hit too.
        if (!(upsertError instanceof Error && "code" in upsertError && upsertError.code === 11000)) throw upsertError;
        return await stored();
      }
    } catch (settleError) {
      this.#logger?.error({ keyId: doc._id, ownerId: doc.owner_id }, "a key insert failed and whether it was made could not be read; its slot is kept");
      throw new StoreUnavailableError("MongoDB lost the answer to a key insert and could not be asked whether it was made", { cause: settleError });
    }
  }

  async getKey(id: string): Promise<KeyRecord | null> {
    const doc = await guarded(() => this.#keys.findById(id).lean<KeyDoc>());
    return doc === null ? null : toKey(doc);
  }

  async findSnapshotByHash(hash: string, late?: (snapshot: KeySnapshot | null) => void): Promise<KeySnapshot | null> {
    // On the Check path a known-dead connection answers at once instead of waiting for server selection.
    if (this.#connection.readyState !== mongoose.ConnectionStates.connected) throw new StoreUnavailableError("MongoDB is not connected");
    // A late answer read from a document that does not convert (toKey throws) is dropped by the batcher, as the read would have failed.
    const doc = await this.#lookups.get(hash, late === undefined ? undefined : (answer) => late(snapshotOfDoc(answer)));
    return snapshotOfDoc(doc);
  }

  async listKeys(query: ListKeysQuery): Promise<KeyRecord[]> {
    const filter: mongoose.QueryFilter<KeyDoc> = { owner_id: query.ownerId };
    if (query.projectId !== undefined) filter.project_id = query.projectId;
    if (!query.includeRevoked) {
      filter.revoked_at = null;
      filter.$or = [{ rotated_to_id: null }, { grace_ends_at: { $gt: new Date(query.nowMs) } }];
    }
    if (query.afterId !== undefined) filter._id = { $gt: query.afterId };
    const docs = await guarded(() => this.#keys.find(filter).sort({ _id: 1 }).limit(query.limit).lean<KeyDoc[]>());
    return docs.map(toKey);
  }

  async updateKey(id: string, patch: KeyPatch, guard?: KeyUpdateGuard): Promise<KeyRecord | null> {
    const set: Partial<KeyDoc> = {};
    if (patch.name !== undefined) set.name = patch.name;
    if (patch.scopes !== undefined) set.scopes = patch.scopes;
    if (patch.rateLimit !== undefined) {
      set.rate_limit = patch.rateLimit === null ? null : { limit: patch.rateLimit.limit, window_seconds: patch.rateLimit.windowSeconds };
    }
    if (patch.disabledAtMs === null) set.disabled_at = null;
    const doc = await guarded(async () => {
      // Disabling a disabled key keeps the time it was first disabled.
      const filter = { _id: id, ...(guard?.unrevoked === true ? { revoked_at: null } : {}), ...(guard?.unrotated === true ? { rotated_to_id: null } : {}) };
      if (patch.disabledAtMs !== null && patch.disabledAtMs !== undefined) {
        await this.#keys.updateOne({ ...filter, disabled_at: null }, { $set: { disabled_at: new Date(patch.disabledAtMs) } });
      }
      if (guard === undefined) return this.#keys.findByIdAndUpdate(id, { $set: set }, { returnDocument: "after" }).lean<KeyDoc>();
      // A key no longer what the guard asks is answered as it is, unchanged.
      return (await this.#keys.findOneAndUpdate(filter, { $set: set }, { returnDocument: "after" }).lean<KeyDoc>()) ?? (await this.#keys.findById(id).lean<KeyDoc>());
    });
    return doc === null ? null : toKey(doc);
  }

  async redisableKey(id: string, disabledAtMs: number, whileAtMs?: number | null): Promise<KeyRecord | null> {
    // disabled_at: null also matches a key written before keys could be disabled (no such field).
    const filter: mongoose.QueryFilter<KeyDoc> = whileAtMs === undefined ? { _id: id, revoked_at: null } : { _id: id, revoked_at: null, disabled_at: date(whileAtMs) };
    return guarded(async () => {
      await this.#keys.updateOne(filter, { $set: { disabled_at: new Date(disabledAtMs) } });
      const doc = await this.#keys.findById(id).lean<KeyDoc>();
      return doc === null ? null : toKey(doc);
    });
  }

  async enableKey(id: string, inGraceIds: readonly string[]): Promise<EnabledKey | null> {
    return guarded(async () => {
      const resumed: KeyRecord[] = [];
      for (let attempt = 0; attempt < ENABLE_ATTEMPTS; attempt += 1) {
        const doc = await this.#keys.findById(id).lean<KeyDoc>();
        if (doc === null) return null;
        const since = doc.disabled_at ?? null;
        // Enabled already, or by another call between this one's read and its write: not this call's change.
        if (doc.revoked_at !== null || since === null) return { key: toKey(doc), resumed, changed: false };
        // No transaction: the keys paused with it come back first, so a failure before the key's
        // own write leaves it disabled, with its time, for a retry to find them by.
        if (since.getTime() > doc.created_at.getTime()) {
          for (const keyId of inGraceIds) {
            const follower = await this.#keys
              .findOneAndUpdate({ _id: keyId, rotated_to_id: id, disabled_at: since, revoked_at: null }, { $set: { disabled_at: null } }, { returnDocument: "after" })
              .lean<KeyDoc>();
            if (follower !== null) resumed.push(toKey(follower));
          }
        }
        // Only while its time is still the one read: one that changed meanwhile paused the keys in
        // grace with the new time, so they are read and brought back again first.
        const enabled = await this.#keys.findOneAndUpdate({ _id: id, disabled_at: since }, { $set: { disabled_at: null } }, { returnDocument: "after" }).lean<KeyDoc>();
        if (enabled !== null) return { key: toKey(enabled), resumed, changed: true };
      }
      throw new StoreUnavailableError(`key ${id}: its disabled time kept changing while it was being enabled; retry`);
    });
  }

  async pauseKeysInGrace(id: string, inGraceIds: readonly string[]): Promise<KeyRecord[]> {
    return guarded(async () => {
      // Read just before the writes: a key enabled since the caller's change pauses nothing.
      const successor = await this.#keys.findById(id, { disabled_at: 1 }).lean<Pick<KeyDoc, "disabled_at">>();
      const pausedAt = successor?.disabled_at ?? null;
      if (pausedAt === null) return [];
      const paused: KeyRecord[] = [];
      for (const keyId of inGraceIds) {
        const follower = await this.#keys
          .findOneAndUpdate({ _id: keyId, rotated_to_id: id, disabled_at: null, revoked_at: null }, { $set: { disabled_at: pausedAt } }, { returnDocument: "after" })
          .lean<KeyDoc>();
        if (follower !== null) paused.push(toKey(follower));
      }
      return paused;
    });
  }

  async revokeKey(id: string, nowMs: number, reason: string | null): Promise<KeyRecord | null> {
    return guarded(async () => {
      await this.#keys.updateOne({ _id: id, revoked_at: null }, { $set: { revoked_at: new Date(nowMs), revoke_reason: reason } });
      let doc = await this.#keys.findById(id).lean<KeyDoc>();
      if (doc === null) return null;
      // A rotation of this key whose new key never went in passed the slot to no key: it is
      // undone, which gives the slot back to this key and releases it (#undoRotation). Only once
      // its lease is over: a rotation still between its two writes must be left to finish (its
      // new key then holds the slot); the next CreateKey refused at the cap undoes it later.
      if (!doc.counted && doc.rotated_to_id !== null && this.#leaseOver(doc.rotated_to_id) && (await this.#undoUnfinishedRotation(doc, new Date(nowMs)))) {
        doc = (await this.#keys.findById(id).lean<KeyDoc>()) ?? doc;
      }
      await this.#releaseSlot(doc._id, doc.owner_id);
      return toKey(doc);
    });
  }

  async rotateKey(previousId: string, next: KeyRecord, graceEndsAtMs: number, nowMs: number, revokedAtMs = nowMs): Promise<Rotation> {
    return guarded(async () => {
      const now = new Date(nowMs);
      // The slot passes from the old key to the new one: the old key stops counting, the new one
      // counts. With no grace the old key is refused from here on (its grace is over), and is
      // marked revoked only once the new key is in: a revoke that comes in between is never undone.
      const mark = (): Promise<KeyDoc | null> =>
        this.#keys
          .findOneAndUpdate(
            { _id: previousId, revoked_at: null, rotated_to_id: null, $or: [{ expires_at: null }, { expires_at: { $gt: now } }] },
            { $set: { rotated_to_id: next.id, grace_ends_at: new Date(graceEndsAtMs), counted: false } },
            { returnDocument: "after" },
          )
          .lean<KeyDoc>();
      let previous = await mark();
      if (previous === null) {
        // A rotation of this key whose new key never went in (its answer lost, the caller now
        // retrying; the process gone between the two writes) is undone, and this one made instead.
        // One still between its two writes cannot be told apart: it then fails on its new key's
        // _id, and this one is the rotation made (never both, never neither). Only a rotation
        // settles this; a revoke in between must leave a live rotation to finish.
        const current = await this.#keys.findById(previousId).lean<KeyDoc>();
        if (current !== null && current.rotated_to_id !== null && (await this.#undoUnfinishedRotation(current, now))) previous = await mark();
      }
      if (previous === null) throw new ConflictError(`key ${previousId} is not active, so it cannot be rotated`);
      // A chain keeps one key in grace. Before the new key goes in: a failure here undoes the mark,
      // so the rotation is not made and the caller's retry ends the grace too (the earlier key,
      // revoked already, stays revoked, as that retry would leave it, and is in that retry's `ended`).
      let ended: KeyRecord[];
      try {
        ended = await this.#endGraceFor(previous, nowMs, revokedAtMs);
      } catch (error) {
        await this.#undoRotation(previous, next.id).catch(() => undefined);
        throw error;
      }
      const successor = keyDocument(next, true);
      try {
        await this.#insertKey(successor);
      } catch (error) {
        // Once the new key is in, the rotation is made whatever the insert answered, and goes on
        // as a successful one: undoing it would leave two keys holding one slot.
        if (!(await this.#insertMade(successor, error))) {
          await this.#undoRotation(previous, next.id);
          throw error;
        }
      }
      if (graceEndsAtMs > nowMs) return { next, previous: toKey(previous), ended };
      // The mark is for the record: the old key is refused already (its grace is over), and the
      // new secret must still be returned, so a failure here is not the rotation's.
      try {
        await this.#keys.updateOne({ _id: previousId, revoked_at: null }, { $set: { revoked_at: now, revoke_reason: "rotated" } });
        const revoked = await this.#keys.findById(previousId).lean<KeyDoc>();
        return { next, previous: toKey(revoked ?? previous), ended };
      } catch {
        return { next, previous: toKey(previous), ended };
      }
    });
  }

  /**
   * Revokes the keys still in grace from rotating to `rotated` (an earlier link of its chain), each
   * as revokeKey does. Answers every key a rotation of `rotated` revoked so (Rotation.ended): this
   * call's, and those of an attempt that failed after its revoke (its answer lost, its new key
   * refused), which find no key in grace now. A key is rotated once, so they are all this
   * rotation's, and each answer tells the caches of them.
   */
  async #endGraceFor(rotated: KeyDoc, nowMs: number, revokedAtMs: number): Promise<KeyRecord[]> {
    const now = new Date(nowMs);
    // By owner, so the owner_state index finds them.
    const inGrace = await this.#keys
      .find({ owner_id: rotated.owner_id, revoked_at: null, rotated_to_id: rotated._id, grace_ends_at: { $gt: now }, $or: [{ expires_at: null }, { expires_at: { $gt: now } }] }, { _id: 1 })
      .lean<Array<Pick<KeyDoc, "_id">>>();
    for (const { _id } of inGrace) await this.revokeKey(_id, revokedAtMs, CHAIN_GRACE_ENDED);
    // Revoked, in the index's range, and by no clock: the rotated key's issue time came from
    // another replica's clock, and a revoke from a replica running behind it would be left out.
    const ended = await this.#keys
      .find({ owner_id: rotated.owner_id, revoked_at: { $ne: null }, rotated_to_id: rotated._id, revoke_reason: CHAIN_GRACE_ENDED })
      .sort({ _id: 1 })
      .lean<KeyDoc[]>();
    return ended.map(toKey);
  }

  /**
   * Undoes `key`'s rotation when its new key is not in (#undoRotation); false when it is, so the
   * rotation was made. The new key's id is taken first by a revoked placeholder, so an insert of
   * it still on its way (one whose answer was lost, unsettled) fails on _id instead of landing
   * as a second key for one slot. Its secret was never returned, so no one can miss the key. A
   * placeholder found there already (an undo stopped after placing it) is undone the same way.
   */
  async #undoUnfinishedRotation(key: KeyDoc, now: Date): Promise<boolean> {
    const nextId = key.rotated_to_id;
    if (nextId === null) return false;
    const placeholder = placeholderDocument(nextId, key, now, "never issued: the rotation that named it was not finished");
    if (!(await this.#placePlaceholder(placeholder))) {
      const found = await this.#keys.findById(nextId, { hash: 1 }).lean<Pick<KeyDoc, "hash">>();
      if (found?.hash !== placeholder.hash) return false;
    }
    this.#logger?.error({ keyId: key._id, ownerId: key.owner_id, nextId }, "a rotation whose new key never went in was undone");
    await this.#undoRotation(key, nextId);
    return true;
  }

  /** Inserts `placeholder` unless a document holds its _id: true when this call placed it. */
  async #placePlaceholder(placeholder: KeyDoc): Promise<boolean> {
    const { _id, ...fields } = placeholder;
    try {
      const placed = await this.#keys.updateOne({ _id }, { $setOnInsert: fields }, { upsert: true });
      return placed.upsertedCount > 0;
    } catch (error) {
      // E11000: the key landed meanwhile, on _id.
      if (duplicate(error)) return false;
      throw error;
    }
  }

  /**
   * Puts back a key whose rotation's new key could not be inserted: it holds its slot again (the
   * rotation had passed it to the new key), once, whoever undoes the rotation. When it was
   * revoked meanwhile, that slot is then released, as a revoke releases one.
   */
  async #undoRotation(previous: KeyDoc, nextId: string): Promise<void> {
    const restored = await this.#keys
      .findOneAndUpdate({ _id: previous._id, rotated_to_id: nextId }, { $set: { rotated_to_id: null, grace_ends_at: null, counted: true } }, { returnDocument: "after", projection: { revoked_at: 1 } })
      .lean<Pick<KeyDoc, "revoked_at">>();
    if (restored !== null && restored.revoked_at !== null) await this.#releaseSlot(previous._id, previous.owner_id);
  }

  async getCredits(ownerId: string): Promise<CreditState> {
    const doc = await guarded(() =>
      this.#accounts.findById(ownerId, CREDIT_PROJECTION).lean<AccountDoc>(),
    );
    return toCredits(doc);
  }

  async addCredits(ownerId: string, amount: number): Promise<CreditState> {
    // One update: the balance and the total move together.
    const doc = await guarded(() =>
      this.#accounts.findByIdAndUpdate(ownerId, { $inc: { topup_balance: amount, topup_total: amount } }, { returnDocument: "after" }).lean<AccountDoc>(),
    );
    return toCredits(doc);
  }

  /**
   * One update of the account document adds the credits and records the key, so no answer lost
   * between them can leave one without the other (MongoDB has no transaction without a replica
   * set, and a record in a collection of its own would be a second write). That update is
   * conditional on the top-up total read with the key's absence: every top-up moves the total,
   * so a match means no top-up, with this key or any other, came in between. Expired records are
   * pulled first, in an update of their own (it adds nothing, so it needs no such condition).
   */
  async addCreditsOnce(ownerId: string, amount: number, idempotencyKey: string, nowMs: number, atMs = nowMs): Promise<KeyedTopUp | null> {
    const expired = new Date(nowMs - TOPUP_KEY_RETENTION_MS);
    return guarded(async () => {
      for (let attempt = 0; attempt < TOPUP_ATTEMPTS; attempt++) {
        // Only this key's record comes back, never the account's whole array; an expired one of
        // the same key, not yet pulled, is not it.
        const projection = { ...CREDIT_PROJECTION, credit_topups: { $elemMatch: { idempotency_key: idempotencyKey, at: { $gt: expired } } } };
        const doc = await this.#accounts.findById(ownerId, projection).lean<AccountDoc>();
        if (doc === null) return null;
        const first = doc.credit_topups?.[0];
        if (first !== undefined) {
          if (first.amount !== amount) throw new IdempotencyKeyReusedError(first.amount, amount);
          return { topUp: toTopUp(ownerId, first), replayed: true, credits: toCredits(doc) };
        }
        await this.#accounts.updateOne({ _id: ownerId, "credit_topups.at": { $lte: expired } }, { $pull: { credit_topups: { at: { $lte: expired } } } });
        const entry: TopUpDoc = { idempotency_key: idempotencyKey, amount, topup_total: (doc.topup_total ?? 0) + amount, at: new Date(atMs) };
        const updated = await this.#accounts
          .findOneAndUpdate(
            // null matches an account written before topup_total existed, which has none.
            { _id: ownerId, topup_total: doc.topup_total ?? null, [`credit_topups.${MAX_KEYED_TOPUPS - 1}`]: { $exists: false } },
            { $set: { topup_total: entry.topup_total }, $inc: { topup_balance: amount }, $push: { credit_topups: entry } },
            { returnDocument: "after", projection: CREDIT_PROJECTION },
          )
          .lean<AccountDoc>();
        if (updated !== null) return { topUp: toTopUp(ownerId, entry), replayed: false, credits: toCredits(updated) };
        await this.#refuseWhenFull(ownerId, doc.topup_total, expired);
      }
      throw new ConflictError(`the top-up total of account ${ownerId} changed under each of ${TOPUP_ATTEMPTS} attempts to top it up; nothing was added`);
    });
  }

  /**
   * After a keyed top-up's update missed: throws TopUpKeysExhaustedError when the account still
   * has the total read and MAX_KEYED_TOPUPS records that have not expired. Otherwise another
   * top-up came in between (or records expired meanwhile), and the caller tries again.
   */
  async #refuseWhenFull(ownerId: string, totalRead: number | undefined, expired: Date): Promise<void> {
    const now = await this.#accounts.findById(ownerId, { topup_total: 1, credit_topups: 1 }).lean<AccountDoc>();
    if (now === null || now.topup_total !== totalRead) return;
    const kept = (now.credit_topups ?? []).filter((t) => t.at > expired);
    if (kept.length < MAX_KEYED_TOPUPS) return;
    throw new TopUpKeysExhaustedError(MAX_KEYED_TOPUPS, Math.min(...kept.map((t) => t.at.getTime())) + TOPUP_KEY_RETENTION_MS);
  }

  /**
   * Usage rows in one unordered bulk write, then each account's credits. Not one transaction: on
   * a failure, PartialWriteError names the deltas sure not to be written (never sent, or refused
   * by the server), and counts those whose answer was lost, which may have been made.
   */
  async applyUsage(usage: readonly UsageDelta[], credits: readonly CreditDelta[]): Promise<void> {
    if (usage.length > 0) {
      try {
        await this.#usageRows.bulkWrite(
          usage.map((u) => ({
            updateOne: {
              filter: { _id: `${u.ownerId}|${u.day}|${u.keyId}|${u.outcome}` },
              update: {
                $inc: { count: u.count, credits: u.credits },
                $setOnInsert: { owner_id: u.ownerId, key_id: u.keyId, day: u.day, outcome: u.outcome },
              },
              upsert: true,
            },
          })),
          { ordered: false },
        );
      } catch (error) {
        // The server's answer names the rows it refused (the others are written); without one,
        // either none was sent, or the answer was lost and any of them may be written.
        const outcome = bulkOutcome(error);
        const unapplied = outcome === "unknown" ? [] : outcome === "none" ? [...usage] : usage.filter((_, i) => outcome.refused.has(i));
        const unsure = outcome === "unknown" ? usage.length : 0;
        throw new PartialWriteError("MongoDB did not take every usage row", { usage: unapplied, credits: [...credits] }, unsure, { cause: translate(error) });
      }
    }
    for (let i = 0; i < credits.length; i++) {
      const delta = credits[i];
      if (delta === undefined) continue;
      try {
        await this.#spendCredits(delta);
      } catch (error) {
        const sure = neverWritten(error);
        throw new PartialWriteError("MongoDB did not take every credit delta", { usage: [], credits: credits.slice(sure ? i : i + 1) }, sure ? 0 : 1, {
          cause: translate(error),
        });
      }
    }
  }

  /**
   * Same rule as SQLite: the stored period adds, a later period starts over, an older one spends
   * top-up only. Each update is conditional on the period it read, so when another replica moves
   * the period between two of them, nothing matches and the delta is tried again from the top.
   */
  async #spendCredits(c: CreditDelta): Promise<void> {
    for (let attempt = 0; attempt < SPEND_ATTEMPTS; attempt++) {
      const same = await this.#accounts.updateOne({ _id: c.ownerId, credit_period: c.period }, { $inc: { monthly_used: c.monthlyUsed, topup_balance: -c.topupUsed } });
      if (same.matchedCount === 1) return;
      const later = await this.#accounts.updateOne(
        { _id: c.ownerId, $or: [{ credit_period: { $lt: c.period } }, { credit_period: { $exists: false } }] },
        { $set: { credit_period: c.period, monthly_used: c.monthlyUsed }, $inc: { topup_balance: -c.topupUsed } },
      );
      if (later.matchedCount === 1) return;
      const older = await this.#accounts.updateOne({ _id: c.ownerId, credit_period: { $gt: c.period } }, { $inc: { topup_balance: -c.topupUsed } });
      if (older.matchedCount === 1) return;
    }
    // Three misses in a row on every attempt: the account no longer exists.
  }

  async listUsage(ownerId: string, fromDay: string, toDay: string): Promise<UsageRow[]> {
    const docs = await guarded(() =>
      this.#usage.find({ owner_id: ownerId, day: { $gte: fromDay, $lte: toDay } }).sort({ day: 1, key_id: 1, outcome: 1 }).lean<UsageDoc[]>(),
    );
    return docs.map((d) => ({ keyId: d.key_id, day: d.day, outcome: d.outcome, count: d.count, credits: d.credits }));
  }

  async listUsagePage(query: UsagePageQuery): Promise<UsagePage> {
    const { ownerId, fromDay, toDay, after, keyDays } = query;
    const range = { owner_id: ownerId, day: { $gte: fromDay, $lte: toDay } };
    // A later page starts at its day on the index, then skips that day's keys up to the last one.
    const rest =
      after === null
        ? range
        : { owner_id: ownerId, day: { $gte: after.day > fromDay ? after.day : fromDay, $lte: toDay }, $or: [{ day: { $gt: after.day } }, { key_id: { $gt: after.keyId } }] };
    // Both are added up by the server (on the owner_day index): keygate receives one row per
    // outcome and the documents of one page of key-days, however long the range.
    const [totals, keyDayDocs] = await guarded(() =>
      Promise.all([
        this.#usage.aggregate<UsageTotalDoc>([{ $match: range }, { $group: { _id: "$outcome", count: { $sum: "$count" }, credits: { $sum: "$credits" } } }, { $sort: { _id: 1 } }]),
        this.#usage.aggregate<UsageKeyDayDoc>([
          { $match: rest },
          { $group: { _id: { day: "$day", key_id: "$key_id" }, rows: { $push: { outcome: "$outcome", count: "$count", credits: "$credits" } } } },
          { $sort: { "_id.day": 1, "_id.key_id": 1 } },
          { $limit: keyDays },
        ]),
      ]),
    );
    const rows = keyDayDocs.flatMap((d) =>
      d.rows.map((r) => ({ keyId: d._id.key_id, day: d._id.day, outcome: r.outcome, count: r.count, credits: r.credits })).sort((a, b) => (a.outcome < b.outcome ? -1 : a.outcome > b.outcome ? 1 : 0)),
    );
    return { totals: totals.map((t) => ({ outcome: t._id, count: t.count, credits: t.credits })), rows };
  }

  async appendAudit(record: AuditRecord): Promise<void> {
    try {
      await guarded(() =>
        this.#audit.create({
          _id: record.id,
          at: new Date(record.atMs),
          actor: record.actor,
          action: record.action,
          key_id: record.keyId,
          owner_id: record.ownerId,
          changes: record.changes,
          source: record.source,
        }),
      );
    } catch (error) {
      // E11000 on _id (the collection's one unique index): the same change, recorded by an
      // earlier call (EventIds.derived) or by the driver's retry of this insert. The first stands.
      if (!(error instanceof DuplicateError)) throw error;
    }
  }

  async listAudit(query: AuditQuery): Promise<AuditRecord[]> {
    const filter: mongoose.QueryFilter<AuditDoc> = {};
    if (query.ownerId !== undefined) filter.owner_id = query.ownerId;
    if (query.keyId !== undefined) filter.key_id = query.keyId;
    // The _id bound lets the server search from `since` by the _id (or owner, key) index; `at` decides.
    const ids: { $gte?: string; $gt?: string } = {};
    if (query.sinceMs !== undefined) {
      filter.at = { $gte: new Date(query.sinceMs) };
      ids.$gte = eventIdFloor(query.sinceMs);
    }
    if (query.afterId !== undefined) ids.$gt = query.afterId;
    if (ids.$gte !== undefined || ids.$gt !== undefined) filter._id = ids;
    const docs = await guarded(() => this.#audit.find(filter).sort({ _id: 1 }).limit(query.limit).lean<AuditDoc[]>());
    return docs.map((d) => ({
      id: d._id,
      atMs: d.at.getTime(),
      actor: d.actor,
      action: d.action,
      keyId: d.key_id,
      ownerId: d.owner_id,
      changes: d.changes,
      source: d.source,
    }));
  }

  async lastAuditId(): Promise<string | null> {
    const docs = await guarded(() => this.#audit.find({}, { _id: 1 }).sort({ _id: -1 }).limit(1).lean<Array<Pick<AuditDoc, "_id">>>());
    return docs[0]?._id ?? null;
  }

  async touchLastUsed(lastUsed: ReadonlyMap<string, number>): Promise<void> {
    if (lastUsed.size === 0) return;
    const operations = [...lastUsed].map(([id, atMs]) => ({
      // $max keeps the later time (null and a missing field sort below any date) behind a plain
      // _id filter, which every server answers from the _id index.
      updateOne: { filter: { _id: id }, update: { $max: { last_used_at: new Date(atMs) } } },
    }));
    await guarded(() => this.#keyRows.bulkWrite(operations, { ordered: false }));
  }

  async claimPepperCheck(check: string): Promise<string> {
    return guarded(async () => {
      try {
        // Matches only while no check is recorded, so of replicas starting at once one records.
        await this.#schema.updateOne({ _id: SCHEMA_ID, pepper_check: { $exists: false } }, { $set: { pepper_check: check } }, { upsert: true });
      } catch (error) {
        // A check is recorded: the upsert's insert hit the _id index.
        if (!(error instanceof Error && "code" in error && error.code === 11000)) throw error;
      }
      const doc = await this.#schema.findOne({ _id: SCHEMA_ID });
      if (typeof doc?.pepper_check !== "string") throw new StoreUnavailableError(`MongoDB did not keep the pepper check in ${SCHEMA_COLLECTION}`);
      return doc.pepper_check;
    });
  }

  async claimKeyPrefix(prefix: string): Promise<string> {
    return guarded(async () => {
      const recorded = await this.#schema.findOne({ _id: SCHEMA_ID });
      if (typeof recorded?.key_prefix === "string") return recorded.key_prefix;
      // Ids are key_ + ULID: the _id index gives the newest key.
      const newest = await this.#keyRows.find({}, { projection: { start: 1 } }).sort({ _id: -1 }).limit(1).next();
      const claimed = (newest === null ? null : keyPrefixOfStart(newest.start)) ?? prefix;
      try {
        // Matches only while no prefix is recorded, so of replicas starting at once one records.
        await this.#schema.updateOne({ _id: SCHEMA_ID, key_prefix: { $exists: false } }, { $set: { key_prefix: claimed } }, { upsert: true });
      } catch (error) {
        // A prefix is recorded: the upsert's insert hit the _id index.
        if (!(error instanceof Error && "code" in error && error.code === 11000)) throw error;
      }
      const doc = await this.#schema.findOne({ _id: SCHEMA_ID });
      if (typeof doc?.key_prefix !== "string") throw new StoreUnavailableError(`MongoDB did not keep the key prefix in ${SCHEMA_COLLECTION}`);
      return doc.key_prefix;
    });
  }

  async ping(): Promise<void> {
    await guarded(async () => {
      const db = this.#connection.db;
      if (db === undefined) throw new StoreUnavailableError("MongoDB is not connected");
      await db.admin().ping();
    });
  }

  async close(): Promise<void> {
    await this.#connection.close();
  }
}
