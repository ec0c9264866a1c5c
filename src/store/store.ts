/** "live" or "test": the middle part of a key. */
export type KeyMode = "live" | "test";
/** Only "active" passes the subscription step of the decision. */
export type SubscriptionStatus = "active" | "none" | "past_due" | "canceled";
/** Account role, used by role-based rate tiers. */
export type Role = "standard" | "premium" | "admin";

/** An account: the owner of keys. Times are epoch milliseconds. */
export interface AccountRecord {
  ownerId: string;
  plan: string;
  subscriptionStatus: SubscriptionStatus;
  role: Role;
  createdAtMs: number;
  updatedAtMs: number;
}

/** A stored key. `hash` is HMAC-SHA256(pepper, key); the key itself is never stored. */
export interface KeyRecord {
  id: string;
  hash: string;
  ownerId: string;
  projectId: string | null;
  name: string;
  mode: KeyMode;
  start: string;
  last4: string;
  scopes: string[];
  metadata: Record<string, string>;
  createdAtMs: number;
  lastUsedAtMs: number | null;
  expiresAtMs: number | null;
  revokedAtMs: number | null;
  revokeReason: string | null;
  /** Set on the old key of a rotation: it keeps working until this time. */
  graceEndsAtMs: number | null;
  rotatedToId: string | null;
  /** The key's own rate limit, replacing the plan's; it also gives the key its own bucket. */
  rateLimit: KeyRateLimit | null;
  /** Set while the key is disabled (refused, KEY_DISABLED); null once enabled again. */
  disabledAtMs: number | null;
}

// A key's `start` is its prefix, "_live_" or "_test_", and the first 4 body characters (KeyFormat.parse).
const START_SHAPE = /^(.+)_(?:live|test)_[0-9A-Za-z]{4}$/;

/** The prefix a key was issued with, read from its stored `start`; null when the start is not of that shape. */
export function keyPrefixOfStart(start: string): string | null {
  return START_SHAPE.exec(start)?.[1] ?? null;
}

/** What a new key record must be given; every other attribute starts unset. */
export type NewKeyFields = Pick<KeyRecord, "id" | "hash" | "ownerId" | "name" | "mode" | "start" | "last4" | "createdAtMs"> & Partial<KeyRecord>;

/**
 * A key record with every attribute not given unset. Code that makes records (KeyAdmin, the
 * bench's seeding, test fixtures) goes through here, so a new attribute gets its starting value
 * in one place.
 */
export function newKeyRecord(fields: NewKeyFields): KeyRecord {
  return {
    projectId: null,
    scopes: [],
    metadata: {},
    lastUsedAtMs: null,
    expiresAtMs: null,
    revokedAtMs: null,
    revokeReason: null,
    graceEndsAtMs: null,
    rotatedToId: null,
    rateLimit: null,
    disabledAtMs: null,
    ...fields,
  };
}

/** A per-key rate limit: `limit` requests per `windowSeconds`. */
export interface KeyRateLimit {
  limit: number;
  windowSeconds: number;
}

/** An account's credits: what it used of this month's allowance, and its top-up balance. */
export interface CreditState {
  /** "YYYY-MM" (UTC) of `monthlyUsed`; "" before the first charge. */
  period: string;
  monthlyUsed: number;
  topupBalance: number;
  /**
   * Every top-up ever added, summed; it only grows, and changes together with `topupBalance`.
   * Live counters remember the total they reflect, so telling them about a top-up twice, or
   * before they have loaded the balance, cannot count it twice or lose it.
   */
  topupTotal: number;
}

/**
 * How long a store keeps a top-up made with an idempotency key: a repeat within this time adds
 * nothing. Older records are treated as gone and pruned as later keyed top-ups are written.
 */
export const TOPUP_KEY_RETENTION_MS = 24 * 3_600_000;

/**
 * Keyed top-ups an account may have within TOPUP_KEY_RETENTION_MS. MongoDB keeps them in the
 * account's document, which every cold key lookup reads and which may not pass 16 MB, so they
 * are bounded: past this, a keyed top-up is refused (TopUpKeysExhaustedError) rather than one
 * of the keys forgotten early.
 */
export const MAX_KEYED_TOPUPS = 1000;

/** A top-up made with an idempotency key, as the store keeps it beside the credits it added. */
export interface TopUpRecord {
  ownerId: string;
  idempotencyKey: string;
  amount: number;
  /** The account's top-up total (CreditState.topupTotal) right after this top-up. */
  topupTotal: number;
  atMs: number;
}

/** What addCreditsOnce did. */
export interface KeyedTopUp {
  /** The top-up under the key: made by this call, or by an earlier one when `replayed`. */
  topUp: TopUpRecord;
  /** The key had been used within TOPUP_KEY_RETENTION_MS: nothing was added. */
  replayed: boolean;
  /** The credit state after this call: with the top-up added, or as it stands when replayed. */
  credits: CreditState;
}

/**
 * A usage outcome of an allowed request on a metered route: these, and only these, count toward
 * the daily quota (a restart reseeds the day's count from them).
 */
export const ALLOWED = "ALLOWED";
/** A usage outcome of an allowed request on an unmetered route: reported as allowed, never a quota use. */
export const ALLOWED_UNMETERED = "ALLOWED_UNMETERED";
/**
 * A usage outcome of an allowed request of a test-mode key on a metered route: reported as
 * allowed, and counted toward the test-mode daily quota only (a restart reseeds it from these).
 */
export const ALLOWED_TEST = "ALLOWED_TEST";

/**
 * The outcome of an allowed request that counts toward a daily quota: the meter's (live or test),
 * and for a named quota its name after a colon (ALLOWED:messages), so each quota reseeds from its
 * own requests.
 */
export function allowedOutcome(meter: KeyMode, quota: string | null = null): string {
  const base = meter === "test" ? ALLOWED_TEST : ALLOWED;
  return quota === null ? base : `${base}:${quota}`;
}

/** Whether a usage outcome is an allowed request (of any meter or quota), not a denial code. */
export function isAllowedOutcome(outcome: string): boolean {
  return outcome.startsWith(ALLOWED);
}

/** Counted requests of one key on one UTC day with one outcome (ALLOWED, ALLOWED_UNMETERED or a denial code). */
export interface UsageDelta {
  ownerId: string;
  keyId: string;
  /** "YYYY-MM-DD" (UTC). */
  day: string;
  outcome: string;
  count: number;
  credits: number;
}

/** Credits spent by one account since the last flush. */
export interface CreditDelta {
  ownerId: string;
  period: string;
  monthlyUsed: number;
  topupUsed: number;
}

/** A stored usage row. */
export type UsageRow = Omit<UsageDelta, "ownerId">;

/** A key's day of usage: where a page of a usage report ends. Reports go by day, then key id. */
export interface UsageKeyDay {
  day: string;
  keyId: string;
}

/** Requests and credits of one outcome, added up over a range of days. */
export type UsageTotal = Pick<UsageRow, "outcome" | "count" | "credits">;

/** What GetUsage reads of an owner's days in [fromDay, toDay] for one page. */
export interface UsagePageQuery {
  ownerId: string;
  fromDay: string;
  toDay: string;
  /** The previous page's last key-day; null for the first page. */
  after: UsageKeyDay | null;
  /** How many key-days (each one or more rows, one per outcome) at most. */
  keyDays: number;
}

/** One page of an owner's usage, and the totals of the whole range. */
export interface UsagePage {
  /** Every row of the range added up by outcome, whatever the page. */
  totals: UsageTotal[];
  /** The rows of the first `keyDays` key-days after `after`, by day, key id and outcome. */
  rows: UsageRow[];
}

/** One audited KeyAdmin change. `changes` maps field names to their new values; never a secret. */
export interface AuditRecord {
  id: string;
  atMs: number;
  actor: string;
  action: string;
  keyId: string | null;
  ownerId: string | null;
  changes: Record<string, unknown>;
  source: string;
}

/** A page of the audit trail, in id (time) order. */
export interface AuditQuery {
  ownerId?: string | undefined;
  keyId?: string | undefined;
  sinceMs?: number | undefined;
  afterId?: string | undefined;
  limit: number;
}

/** What the decision needs about one key: the key and its account, read together. */
export interface KeySnapshot {
  key: KeyRecord;
  account: AccountRecord;
}

/** The key fields a Check reads: its state, its identity, its limits. */
export type CheckedKey = Pick<KeyRecord, "id" | "ownerId" | "projectId" | "mode" | "expiresAtMs" | "revokedAtMs" | "graceEndsAtMs" | "rotatedToId" | "rateLimit" | "disabledAtMs"> & {
  /**
   * The last use on record when the snapshot was read, moved on by the Checks that record one
   * (DecisionPipeline): a Check records the use only when this is null or lastUsedResolutionSeconds old.
   */
  lastUsedAtMs: number | null;
  readonly scopes: readonly string[];
  /** In L1, only the entries the policy forwards (forwardMetadata). */
  readonly metadata: Readonly<Record<string, string>>;
};

/**
 * What a Check reads of a snapshot, and all that the in-process cache keeps per key (names,
 * metadata and times a Check never reads stay in the store). A KeySnapshot is one.
 */
export interface CheckSnapshot {
  key: CheckedKey;
  account: Pick<AccountRecord, "ownerId" | "plan" | "subscriptionStatus" | "role">;
}

/** Fields of UpsertAccount; unset fields keep their value (or take the default on insert). */
export interface AccountUpsert {
  ownerId: string;
  plan?: string;
  subscriptionStatus?: SubscriptionStatus;
  role?: Role;
}

/** Defaults for an account created implicitly or by a partial upsert. */
export interface AccountDefaults {
  plan: string;
  subscriptionStatus: SubscriptionStatus;
  role: Role;
}

/** One page of ListKeys. Keys come in id (creation) order. */
export interface ListKeysQuery {
  ownerId: string;
  projectId?: string;
  includeRevoked: boolean;
  limit: number;
  afterId?: string;
  nowMs: number;
}

/** Rename and/or rescope. */
export interface KeyPatch {
  name?: string | undefined;
  scopes?: string[] | undefined;
  /** null removes the key's own limit. */
  rateLimit?: KeyRateLimit | null | undefined;
  /** A time disables the key, null enables it. */
  disabledAtMs?: number | null | undefined;
}

/**
 * What a key must still be for updateKey to write, checked in the same atomic write as the patch:
 * a change decided on an earlier read must not land on a key revoked or rotated since.
 */
export interface KeyUpdateGuard {
  /** Not revoked. */
  unrevoked?: boolean;
  /** Not rotated (no successor). */
  unrotated?: boolean;
}

/** The outcome of a rotation: the new key and the old one with its grace period set. */
export interface Rotation {
  next: KeyRecord;
  previous: KeyRecord;
  /**
   * Keys that were still in grace from rotating to the old key (an earlier link of the chain),
   * revoked by this rotation: by this call, or by an attempt of it that failed after the revoke
   * (MongoDB), so the call that makes the rotation tells the caches of them and audits them.
   */
  ended: KeyRecord[];
}

/** The revoke reason of a key whose grace a later rotation of the chain ended (Rotation.ended). */
export const CHAIN_GRACE_ENDED = "a later rotation ended its grace period";

/** The outcome of enableKey: the key, and the keys in grace for it that came back with it. */
export interface EnabledKey {
  key: KeyRecord;
  resumed: KeyRecord[];
  /** This call's write enabled the key: false when it was enabled already (by another call meanwhile, too). */
  changed: boolean;
}

/**
 * What upsertAccount did: the account after the write, and as the write found it (null: the write
 * created it), read in the same atomic write, so of two identical calls at once only one sees a change.
 */
export interface UpsertedAccount {
  account: AccountRecord;
  before: AccountRecord | null;
}

/** The hot path's read on a cache miss (SnapshotLookup). */
export interface SnapshotStore {
  /**
   * The key and its account by hash. A store that gives up on a read at a deadline while the read
   * goes on (MongoDB) tells `late` the read's answer when it comes after this call failed on that
   * deadline, so the caller can still cache it; one that never gives up (SQLite) never calls it.
   */
  findSnapshotByHash(hash: string, late?: (snapshot: KeySnapshot | null) => void): Promise<KeySnapshot | null>;
  /**
   * The same read answered in the caller's turn, by a store that reads without waiting on I/O
   * (embedded SQLite); absent on stores that must wait (MongoDB).
   */
  findSnapshotByHashNow?(hash: string): KeySnapshot | null;
}

/** Accounts and the key lifecycle (KeyAdmin). */
export interface LifecycleStore {
  upsertAccount(input: AccountUpsert, defaults: AccountDefaults, nowMs: number): Promise<UpsertedAccount>;
  getAccount(ownerId: string): Promise<AccountRecord | null>;
  /** Keys that count against the plan cap: not revoked, not rotated away, not expired. */
  /** Keys of an owner that hold a slot under the cap of `mode` (live by default). */
  countActiveKeys(ownerId: string, nowMs: number, mode?: KeyMode): Promise<number>;
  /**
   * Inserts a key if the owner has fewer than `maxActiveKeys` active keys, creating the
   * account with `defaults` when it does not exist. Throws CapExceededError otherwise.
   */
  createKey(record: KeyRecord, limits: CreateLimits): Promise<CreatedKey>;
  getKey(id: string): Promise<KeyRecord | null>;
  listKeys(query: ListKeysQuery): Promise<KeyRecord[]>;
  /**
   * Applies `patch`, and returns the key as it is after; with `guard`, only while the key is still
   * what it asks (otherwise the key is returned as it is, unchanged). Null when there is no key.
   */
  updateKey(id: string, patch: KeyPatch, guard?: KeyUpdateGuard): Promise<KeyRecord | null>;
  /**
   * Disables a key that is not revoked since `disabledAtMs`, replacing the time of an earlier
   * disable (which updateKey keeps); a revoked key is left as it is. With `whileAtMs`, only while
   * the key's time is still that one (null: while it is enabled), in one atomic write. Returns the
   * key as it stands after, changed or not; null when there is no such key.
   */
  redisableKey(id: string, disabledAtMs: number, whileAtMs?: number | null): Promise<KeyRecord | null>;
  /**
   * Enables a key and, before it (in the same transaction where the store has them), each of
   * `inGraceIds` (keys in grace from rotating to it) that is paused with it: rotated to it, not
   * revoked, and disabled since the key's own time, which is after the key's issue. A key disabled
   * on its own stays disabled. Where the two writes are apart (MongoDB), the key is enabled only
   * while its time is still the one read, so a failure between leaves it disabled and a retry
   * finds the same keys. A revoked key is left as it is. null when there is no such key.
   */
  enableKey(id: string, inGraceIds: readonly string[]): Promise<EnabledKey | null>;
  /**
   * Pauses with a disabled key each of `inGraceIds` (keys in grace from rotating to it) that is
   * rotated to it, enabled and not revoked: disabled since the key's time as it stands (read in
   * the same transaction as the writes; on MongoDB just before them), so a key enabled since the
   * caller's change pauses nothing. The keys it changed.
   */
  pauseKeysInGrace(id: string, inGraceIds: readonly string[]): Promise<KeyRecord[]>;
  /** Idempotent: a revoked key keeps its first revocation time and reason. */
  revokeKey(id: string, nowMs: number, reason: string | null): Promise<KeyRecord | null>;
  /**
   * Inserts `next` and marks `previousId` rotated to it, with its grace period ending at
   * `graceEndsAtMs` (revoked at once when that is now). Throws ConflictError if the old key
   * is no longer active. The old key's slot passes to the new one, so the count is unchanged.
   * A key still in grace from rotating to the old key is revoked (CHAIN_GRACE_ENDED), so a chain
   * keeps one key in grace: in the same transaction, or, where there is none (MongoDB), before the
   * new key is inserted, the old key's mark undone when that revoke fails, so no rotation is made
   * without it and the caller's retry finishes it (Rotation.ended: the keys it revoked, that retry's included).
   * Keys are judged by `nowMs`, the clock's time; such a revoke is recorded at `revokedAtMs` (its
   * audit record's time, never before the trail's newest: later than `nowMs` after the clock went back).
   */
  rotateKey(previousId: string, next: KeyRecord, graceEndsAtMs: number, nowMs: number, revokedAtMs?: number): Promise<Rotation>;
}

/** Credits and counted usage (the meters, the usage recorder, KeyAdmin's credit calls). */
export interface MeteringStore {
  /** The account's credit state; zeros for an account that never had any. */
  getCredits(ownerId: string): Promise<CreditState>;
  /** Adds to the top-up balance and to the top-up total, atomically (never replaces either). */
  addCredits(ownerId: string, amount: number): Promise<CreditState>;
  /**
   * addCredits once per idempotency key and owner: the key is recorded (TopUpRecord) in the
   * same atomic write as the credits, so a repeat within TOPUP_KEY_RETENTION_MS, on any replica
   * and after any restart or lost answer, adds nothing and gets the first top-up back
   * (`replayed`). A repeat for another amount throws IdempotencyKeyReusedError and an account
   * at MAX_KEYED_TOPUPS throws TopUpKeysExhaustedError, both having written nothing. null when
   * the account does not exist (nothing written). Records expire by `nowMs`, the clock's time;
   * the top-up is recorded at `atMs` (its audit record's time, which never runs before the trail's
   * newest: later than `nowMs` after the clock went back).
   */
  addCreditsOnce(ownerId: string, amount: number, idempotencyKey: string, nowMs: number, atMs?: number): Promise<KeyedTopUp | null>;
  /**
   * Write-behind of counted usage and spent credits; deltas are added, so replicas can each flush.
   * A store whose call is one transaction writes all of it or none; one that is not (MongoDB)
   * rejects with PartialWriteError, naming what is sure not to have been written.
   */
  applyUsage(usage: readonly UsageDelta[], credits: readonly CreditDelta[]): Promise<void>;
  /** Usage rows of an owner for days in [fromDay, toDay] ("YYYY-MM-DD", inclusive). */
  listUsage(ownerId: string, fromDay: string, toDay: string): Promise<UsageRow[]>;
  /**
   * A page of an owner's usage report: the rows of at most `keyDays` key-days and the range's
   * totals by outcome, added up by the store, so that neither grows with the range.
   */
  listUsagePage(query: UsagePageQuery): Promise<UsagePage>;
}

/** The audit trail of KeyAdmin changes. */
export interface AuditStore {
  /** Appends a record; one whose id is already in (the same change, recorded again) is not written and is no error. */
  appendAudit(record: AuditRecord): Promise<void>;
  listAudit(query: AuditQuery): Promise<AuditRecord[]>;
  /** The greatest audit id in the trail (ids sort as written), or null when the trail is empty. */
  lastAuditId(): Promise<string | null>;
}

/** Write-behind of last-use times; later times win. */
export interface LastUsedStore {
  touchLastUsed(lastUsed: ReadonlyMap<string, number>): Promise<void>;
}

/**
 * Durable state for accounts and keys: every part above. SQLite and MongoDB implement it; the
 * shared contract tests run against both. Methods that can violate a plan cap take the cap and
 * enforce it atomically, so the cap holds across replicas. Each consumer takes only the part it
 * uses, so a test double implements only that.
 */
export interface KeyStore extends SnapshotStore, LifecycleStore, MeteringStore, AuditStore, LastUsedStore {
  readonly kind: string;
  /**
   * Records `check` (pepperCheck of the pepper in force) as the check of the pepper this store's
   * keys are hashed with, unless one is recorded already, in one atomic write; then returns the
   * one recorded: `check`, or another when the store was first used with another pepper. Of
   * two starts at once, only one records.
   */
  claimPepperCheck(check: string): Promise<string>;
  /**
   * Records `prefix` as the prefix this store's keys are issued with, unless one is recorded
   * already, in one atomic write; then returns the one recorded. A store that holds keys but no
   * prefix (written by a release without the record) records the prefix of its newest key's
   * `start` instead (keyPrefixOfStart), the prefix that release was issuing with; `prefix` only
   * when that start has none. Of two starts at once, only one records.
   */
  claimKeyPrefix(prefix: string): Promise<string>;
  /** Throws when the store cannot serve requests. */
  ping(): Promise<void>;
  close(): Promise<void>;
}

/** What createKey made: the key, and the account when this call created it (else null). */
export interface CreatedKey {
  key: KeyRecord;
  createdAccount: AccountRecord | null;
}

/** Cap and account defaults for CreateKey. */
export interface CreateLimits {
  /** The cap of a plan's keys of one mode: test keys are counted apart from live keys. */
  maxActiveKeysFor(plan: string, mode: KeyMode): number;
  accountDefaults: AccountDefaults;
  nowMs: number;
}

/** The lifecycle state of a key at a moment, derived from its times. */
export type KeyState = "active" | "disabled" | "grace" | "rotated" | "revoked" | "expired";

/** Derives a key's state at `nowMs`. */
export function keyState(key: Pick<KeyRecord, "revokedAtMs" | "expiresAtMs" | "disabledAtMs" | "rotatedToId" | "graceEndsAtMs">, nowMs: number): KeyState {
  if (key.revokedAtMs !== null) return "revoked";
  if (key.expiresAtMs !== null && nowMs >= key.expiresAtMs) return "expired";
  // A rotation's grace over is as final as a revoke, disabled or not (a paused key is told it may
  // come back).
  const inGrace = key.graceEndsAtMs !== null && nowMs < key.graceEndsAtMs;
  if (key.rotatedToId !== null && !inGrace) return "rotated";
  if (key.disabledAtMs !== null) return "disabled";
  if (key.rotatedToId !== null) return "grace";
  return "active";
}
