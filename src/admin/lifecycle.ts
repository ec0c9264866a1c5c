import type { Logger } from "pino";
import { KEY_MODES, ROLES, SUBSCRIPTION_STATUSES } from "../config.js";
import type { Policy } from "../config.js";
import { CacheUnavailableError } from "../cache/cache.js";
import type { Invalidation } from "../cache/cache.js";
import type { SnapshotLookup } from "../cache/lookup.js";
import { keptUnderIdempotencyKey } from "../authz/pipeline.js";
import type { DecisionPipeline, Decision, UsageCharge } from "../authz/pipeline.js";
import { IdempotencyKeyMismatchError } from "../limits/idempotency.js";
import type { IdempotencyLedger } from "../limits/idempotency.js";
import { chargeText, fingerprintText } from "../limits/charge-fingerprint.js";
import type { ChargeFingerprint } from "../limits/charge-fingerprint.js";
import { DENIALS } from "../authz/reasons.js";
import { EventIds, newKeyId } from "../keys/ids.js";
import type { KeyFormat } from "../keys/key-format.js";
import type { KeyHasher } from "../keys/hasher.js";
import { ConflictError, DuplicateError, StoreBusyError, StoreUnavailableError, createdAccountOf } from "../store/errors.js";
import { applyCreditDelta } from "../limits/limits.js";
import type { Meter } from "../limits/limits.js";
import type { UsageRecorder } from "../limits/usage.js";
import { CHAIN_GRACE_ENDED, keyState, newKeyRecord } from "../store/store.js";
import type {
  AccountDefaults,
  AccountRecord,
  AuditRecord,
  KeyMode,
  KeyRateLimit,
  KeyRecord,
  LifecycleStore,
  Rotation,
  MeteringStore,
  AuditStore,
  Role,
  SubscriptionStatus,
  KeyedTopUp,
  TopUpRecord,
} from "../store/store.js";
import { FailedPreconditionError, InvalidArgumentError, NotFoundError } from "./errors.js";
import { ledgered, ledgeredAnswer, topUpRefusal } from "./top-ups.js";
import type { LedgeredTopUp } from "./top-ups.js";
import { usagePageOf, usageReportPage } from "./usage-report.js";
import type { UsageReport } from "./usage-report.js";
import {
  AUDIT_ID,
  DAY_MS,
  GRACE_DAYS,
  MAX_CREDITS_PER_TOPUP,
  MAX_USAGE_DAYS,
  check,
  checkDay,
  checkKeyId,
  checkMetadata,
  checkNoSecret,
  checkOneOf,
  checkPageSize,
  checkRateLimit,
  decodePageToken,
  decodeToken,
  echo,
  encodePageToken,
  externalId,
  keyName,
  reasonText,
} from "./vocabulary.js";

/** Dependencies of the lifecycle service. */
export interface LifecycleDeps {
  store: LifecycleStore & MeteringStore & AuditStore;
  lookup: SnapshotLookup;
  pipeline: DecisionPipeline;
  format: KeyFormat;
  hasher: KeyHasher;
  policy: Policy;
  meter: Meter;
  usage: UsageRecorder;
  /** Remembers ChargeUsage's idempotency keys: in Redis when replicas share it. */
  idempotency: IdempotencyLedger;
  nowMs: () => number;
  logger?: Logger | undefined;
}

/** A ChargeUsage answer: whose usage it was, the charge, and whether it is an earlier call's answer. */
export interface ChargeUsageAnswer {
  ownerId: string;
  keyId: string;
  charge: UsageCharge;
  /** When the charge was decided: its limit headers are as of then. */
  atMs: number;
  replayed: boolean;
}

/** What the idempotency ledger keeps of a ChargeUsage; `fingerprint` is absent from an earlier release's, which replays whatever it is asked. */
interface LedgeredCharge {
  charge: UsageCharge;
  atMs: number;
  fingerprint?: ChargeFingerprint;
}

function sameCharge(a: ChargeFingerprint, b: ChargeFingerprint): boolean {
  return a.cost === b.cost && a.keyId === b.keyId && a.quota === b.quota && a.mode === b.mode;
}

/** The refusal of an idempotency key kept for another charge (`usedFor`), as AddCredits refuses one kept for another amount. */
function reusedChargeKey(usedFor: string, charge: ChargeFingerprint): InvalidArgumentError {
  return new InvalidArgumentError(
    "idempotency_key",
    `was used for ${usedFor}, and this one is ${chargeText(charge)}; nothing was charged: a different charge needs a key of its own`,
  );
}

/** The most credits one ChargeUsage may cost. */
const MAX_CHARGE_COST = 1_000_000_000;
const IDEMPOTENCY_KEY = /^[\x20-\x7e]{1,200}$/;

/** Who made a change: the admin token's id and the caller's address. */
export interface Actor {
  tokenId: string;
  source: string;
}

/** The actor of changes made outside KeyAdmin (tests, tools in the same process). */
export const SYSTEM_ACTOR: Actor = { tokenId: "system", source: "" };

/** An account with its plan cap, current count, credits and limits. */
export interface AccountView {
  account: AccountRecord;
  activeKeyCount: number;
  maxActiveKeys: number;
  activeTestKeyCount: number;
  maxActiveTestKeys: number;
  credits: { balance: number; monthlyCredits: number; topupCredits: number };
  dailyQuota: number | null;
  rateLimit: KeyRateLimit;
}

/**
 * The latest expires_at a key may have: 9999-12-31T23:59:59Z, the end of the range of a protobuf
 * Timestamp in JSON (and of what every store and client can read back as a date).
 */
export const MAX_EXPIRES_AT_MS = Date.UTC(9999, 11, 31, 23, 59, 59);

/** A key's expiry: none, or a time after now and no later than MAX_EXPIRES_AT_MS. */
function checkExpiresAt(expiresAtMs: number | null, nowMs: number): number | null {
  if (expiresAtMs === null) return null;
  if (!Number.isFinite(expiresAtMs) || expiresAtMs > MAX_EXPIRES_AT_MS) throw new InvalidArgumentError("expires_at", "must be no later than 9999-12-31T23:59:59Z");
  if (expiresAtMs <= nowMs) throw new InvalidArgumentError("expires_at", "must be in the future");
  return expiresAtMs;
}

/** Whether two versions of a key have the same name, scopes and rate limit (what UpdateKey sets). */
function sameFields(a: KeyRecord, b: KeyRecord): boolean {
  return a.name === b.name && JSON.stringify(a.scopes) === JSON.stringify(b.scopes) && JSON.stringify(a.rateLimit) === JSON.stringify(b.rateLimit);
}

/** What a key.create record holds of a new key: every field CreateKey sets (never its secret or hash). */
function issuedFields(key: KeyRecord): Record<string, unknown> {
  return {
    name: key.name,
    scopes: key.scopes,
    mode: key.mode,
    project_id: key.projectId,
    expires_at: key.expiresAtMs === null ? null : new Date(key.expiresAtMs).toISOString(),
    rate_limit: key.rateLimit,
    metadata: key.metadata,
  };
}

/** What the account.upsert of a new account holds: the plan, status and role it was given. */
function accountFields(account: Pick<AccountRecord, "plan" | "subscriptionStatus" | "role">): Record<string, unknown> {
  return { plan: account.plan, subscription_status: account.subscriptionStatus, role: account.role };
}

/** What the key.create of a rotation's new key holds: its fields, whether it is disabled, and the key it replaces. */
function rotatedFields(successor: KeyRecord, rotatedFromId: string): Record<string, unknown> {
  return {
    ...issuedFields(successor),
    disabled_at: successor.disabledAtMs === null ? undefined : new Date(successor.disabledAtMs).toISOString(),
    rotated_from_id: rotatedFromId,
  };
}

/**
 * A record named after its change rather than after its append (EventIds.derived): the change's own
 * time and what identifies it, so every call that finds the change made appends the same record.
 */
interface ChangeIdentity {
  atMs: number;
  identity: readonly string[];
}

/** A key's revocation: a key is revoked once, at its revoked_at. */
function revocation(keyId: string, revokedAtMs: number): ChangeIdentity {
  return { atMs: revokedAtMs, identity: ["key.revoke", keyId] };
}

/** A keyed top-up: one per owner and idempotency key, at the time the store recorded it. */
function keyedTopUp(ownerId: string, idempotencyKey: string, atMs: number): ChangeIdentity {
  return { atMs, identity: ["credits.add", ownerId, idempotencyKey] };
}

/**
 * Records of the owner (or key) read after a change's time when looking for its record written by
 * an earlier release (a random id): that record was appended in the same call, so among the first.
 */
const RECORDED_PAGE = 100;

/** Keys of one owner read a call when looking for the keys in grace from a rotation. */
const KEYS_PAGE = 1000;

/** How many times a DisableKey moves its key away from a time another DisableKey took at once (#apart). */
const APART_ROUNDS = 8;
/** How far ahead of this clock the trail's newest record may be and still carry the next records' times. */
const MAX_SEED_LEAD_MS = DAY_MS;

/**
 * Whether `key` was rotated to `successorId` and its grace has not ended: it still authenticates
 * unless disabled, so a disabled key in grace counts too (enabling it would let it through).
 */
function inGraceFor(key: KeyRecord, successorId: string, nowMs: number): boolean {
  return (
    key.rotatedToId === successorId &&
    key.revokedAtMs === null &&
    key.graceEndsAtMs !== null &&
    nowMs < key.graceEndsAtMs &&
    (key.expiresAtMs === null || nowMs < key.expiresAtMs)
  );
}

/**
 * Whether `key`, in grace for `successor`, is disabled only because its successor is: disabling
 * the successor gives it the successor's time, always after the successor's issue (disabledSince),
 * and enabling the successor brings it back. A key disabled on its own never has its successor's
 * time, except one whose successor took it when issued (releases before this one issued the
 * successor of a disabled key with that key's time), which is not after the successor's issue. A
 * tie reads as disabled on its own: the key stays disabled.
 */
function pausedWith(key: KeyRecord, successor: KeyRecord): boolean {
  return key.disabledAtMs !== null && key.disabledAtMs === successor.disabledAtMs && key.disabledAtMs > successor.createdAtMs;
}

/**
 * The time a key disabled now is disabled since: the first millisecond from `nowMs` that is after
 * the key's issue and none of `taken` (the times of the key it follows and of the keys that follow
 * it). On a clock that has not moved between two calls, a key disabled on its own must not read as
 * paused with its successor (pausedWith).
 */
function disabledSince(key: Pick<KeyRecord, "createdAtMs">, nowMs: number, taken: ReadonlyArray<number | null>): number {
  let atMs = Math.max(nowMs, key.createdAtMs + 1);
  while (taken.includes(atMs)) atMs += 1;
  return atMs;
}

/** A new key and its secret, which is shown once. */
export interface IssuedKey {
  key: KeyRecord;
  secret: string;
}

/**
 * Key lifecycle: the domain behind KeyAdmin. Every input is validated before anything is
 * written, and every change that affects a decision drops the cached snapshot everywhere.
 */
export class LifecycleService {
  /** Audit event ids, monotonic along this service's clock. */
  readonly #eventIds = new EventIds();

  constructor(private readonly deps: LifecycleDeps) {}

  /**
   * Continues the audit ids after the trail's newest, so a process started after the clock went
   * back still appends its records after the ones already there (an exporter tailing by `since`
   * or by id would miss them otherwise). Called once at start, before the first change.
   */
  async init(): Promise<void> {
    const lastId = await this.deps.store.lastAuditId();
    if (lastId === null || this.#eventIds.seed(lastId, this.deps.nowMs() + MAX_SEED_LEAD_MS)) return;
    this.deps.logger?.warn(
      { lastAuditId: lastId },
      "the audit trail's newest record is more than a day ahead of this clock; new records follow this clock, not it (check the clocks of the replicas that wrote it)",
    );
  }

  /**
   * The time of a change its audit record is named after (a revocation, a keyed top-up): never
   * before the trail's newest record, or after the clock went back its record would sort before
   * the records already read by an exporter tailing the trail. A retry reads the stored time back.
   */
  #changeMs(): number {
    return Math.max(this.deps.nowMs(), this.#eventIds.lastMs);
  }

  /** Puts a reloaded policy in force for the calls that start after it. */
  reconfigure(policy: Policy): void {
    this.deps.policy = policy;
  }

  get accountDefaults(): AccountDefaults {
    return { plan: this.deps.policy.defaultPlan, subscriptionStatus: "active", role: "standard" };
  }

  /** The cap of a plan's live keys, or of its test keys (testMode.maxActiveKeys, else the same number, counted apart). */
  maxActiveKeysFor(plan: string, mode: KeyMode = "live"): number {
    const plans = this.deps.policy.plans;
    const live = Object.hasOwn(plans, plan) ? (plans[plan]?.maxActiveKeys ?? 0) : 0;
    return mode === "test" ? (this.deps.policy.testMode.maxActiveKeys ?? live) : live;
  }

  async upsertAccount(
    input: { ownerId: string; plan?: string | undefined; subscriptionStatus?: string | undefined; role?: string | undefined },
    actor: Actor = SYSTEM_ACTOR,
  ): Promise<AccountView> {
    // Kept in the audit trail with every record of the account: a write refuses a credential in it.
    const ownerId = checkNoSecret("owner_id", check(externalId, "owner_id", input.ownerId));
    const plans = Object.keys(this.deps.policy.plans);
    const plan = input.plan === undefined ? undefined : checkOneOf("plan", input.plan, plans);
    const subscriptionStatus =
      input.subscriptionStatus === undefined ? undefined : checkOneOf<SubscriptionStatus>("subscription_status", input.subscriptionStatus, SUBSCRIPTION_STATUSES);
    const role = input.role === undefined ? undefined : checkOneOf<Role>("role", input.role, ROLES);
    const changes = { plan, subscription_status: subscriptionStatus, role };
    const { account, before } = await this.#unsure(
      () => this.deps.store.upsertAccount({ ownerId, plan, subscriptionStatus, role }, this.accountDefaults, this.deps.nowMs()),
      () => [this.#record(actor, "account.upsert", null, ownerId, changes)],
      { kind: "owner", ownerId },
    );
    // Still told when nothing changed: a retry of a call that answered UNAVAILABLE is how the
    // other replicas get told. Only a new account or a new plan, status or role is audited, as the
    // store's write found it (so such a retry, or the second of two identical calls at once,
    // appends nothing: the call whose write made the change records it).
    const untold = await this.#tell({ kind: "owner", ownerId });
    const changed = before === null || before.plan !== account.plan || before.subscriptionStatus !== account.subscriptionStatus || before.role !== account.role;
    // A new account is recorded with all it was given (defaults too): the trail holds every plan it was on.
    if (changed) await this.#audit(actor, "account.upsert", null, ownerId, before === null ? accountFields(account) : changes);
    if (untold !== null) throw untold;
    return this.#view(account);
  }

  async getAccount(ownerIdInput: string): Promise<AccountView> {
    const ownerId = check(externalId, "owner_id", ownerIdInput);
    const account = await this.deps.store.getAccount(ownerId);
    if (account === null) throw new NotFoundError(`account "${ownerId}" does not exist`);
    return this.#view(account);
  }

  async #view(account: AccountRecord): Promise<AccountView> {
    const nowMs = this.deps.nowMs();
    // A plan the policy no longer has (renamed or removed): Checks on it are refused (UNKNOWN_PLAN),
    // so the view shows no limits, never the default plan's.
    const plans = this.deps.policy.plans;
    const plan = Object.hasOwn(plans, account.plan) ? plans[account.plan] : undefined;
    const allowance = plan?.monthlyCredits ?? 0;
    const credits = await this.#credits(account.ownerId, nowMs, allowance);
    return {
      account,
      activeKeyCount: await this.deps.store.countActiveKeys(account.ownerId, nowMs),
      maxActiveKeys: this.maxActiveKeysFor(account.plan),
      activeTestKeyCount: await this.deps.store.countActiveKeys(account.ownerId, nowMs, "test"),
      maxActiveTestKeys: this.maxActiveKeysFor(account.plan, "test"),
      credits: {
        balance: plan?.monthlyCredits === null ? 0 : Math.max(0, allowance - credits.monthlyUsed) + Math.max(0, credits.topupBalance),
        monthlyCredits: allowance,
        topupCredits: Math.max(0, credits.topupBalance),
      },
      dailyQuota: plan === undefined ? 0 : plan.dailyQuota,
      rateLimit: plan === undefined ? { limit: 0, windowSeconds: 60 } : (this.deps.policy.limits.roleRateLimits[account.role] ?? plan.rateLimit),
    };
  }

  /** The live credit state when a meter holds it, else the store's plus this replica's unflushed spend. */
  async #credits(ownerId: string, nowMs: number, allowance: number): Promise<{ monthlyUsed: number; topupBalance: number }> {
    const live = await this.deps.meter.credits(ownerId, nowMs, allowance).catch(() => null);
    if (live !== null) return live;
    const stored = await this.deps.store.getCredits(ownerId);
    const period = new Date(nowMs).toISOString().slice(0, 7);
    const unflushed = this.deps.usage.pendingSpend(ownerId, period);
    // The meters' own arithmetic: a stored period newer than this replica's month (another
    // replica's clock ahead) keeps its spend rather than reading as none.
    const { monthlyUsed, topupBalance } = applyCreditDelta(stored, period, unflushed.monthly, unflushed.topup);
    return { monthlyUsed, topupBalance };
  }

  /**
   * Tops up: the store first (durable), then the live counters, told the store's new top-up
   * total rather than the amount, so a top-up racing a balance being loaded is counted once.
   * With an idempotency key the store records the key in the same write as the credits and adds
   * nothing under it again (on any replica, after a restart or a lost answer); the ledger in
   * front answers a repeat without a store write and refuses one still running. Nothing after
   * the store write fails the top-up.
   */
  async addCredits(
    input: { ownerId: string; amount: number; reason: string; idempotencyKey?: string | undefined },
    actor: Actor = SYSTEM_ACTOR,
  ): Promise<{ view: AccountView; replayed: boolean }> {
    const ownerId = check(externalId, "owner_id", input.ownerId);
    const amount = input.amount;
    if (!Number.isInteger(amount) || amount < 1 || amount > MAX_CREDITS_PER_TOPUP) {
      throw new InvalidArgumentError("amount", `must be a whole number from 1 to ${MAX_CREDITS_PER_TOPUP}`);
    }
    const reason = check(reasonText, "reason", input.reason);
    const idempotencyKey = input.idempotencyKey;
    if (idempotencyKey !== undefined && !IDEMPOTENCY_KEY.test(idempotencyKey)) {
      throw new InvalidArgumentError("idempotency_key", "must be 1-200 printable ASCII characters, unique per top-up (or left empty)");
    }
    // Kept in the audit trail (changes.idempotency_key).
    if (idempotencyKey !== undefined) checkNoSecret("idempotency_key", idempotencyKey);
    const account = await this.deps.store.getAccount(ownerId);
    if (account === null) throw new NotFoundError(`account "${ownerId}" does not exist`);
    const changes = { amount, reason, idempotency_key: idempotencyKey };
    // Tells the live counters the store's top-up total (after a repeat too: the call that added
    // may have failed before telling them), audits the top-up, and reads the answer: the account
    // as the top-up left it; null when it could not be read then, and it is read again below (a
    // failure there fails only the answer, the key stays remembered).
    const settle = async (topupTotal: number, audit: () => Promise<void>): Promise<AccountView | null> => {
      // The live counters retry in the background when they cannot be told now.
      await this.deps.meter.addCredits(ownerId, topupTotal).catch((error: unknown) => {
        this.deps.logger?.error({ err: error, ownerId }, "top-up saved, but the live balance could not be told");
      });
      await audit();
      return this.#view(account).catch((error: unknown) => {
        this.deps.logger?.warn({ err: error, ownerId }, "top-up saved, but the account could not be read for the answer");
        return null;
      });
    };
    if (idempotencyKey === undefined) {
      const credited = await this.#unsure(
        () => this.deps.store.addCredits(ownerId, amount),
        () => [this.#record(actor, "credits.add", null, ownerId, changes)],
      );
      const view = await settle(credited.topupTotal, () => this.#audit(actor, "credits.add", null, ownerId, changes));
      return { view: view ?? (await this.#view(account)), replayed: false };
    }
    const keyedCall = async (): Promise<LedgeredTopUp> => {
      const atMs = this.#changeMs();
      const keyed = await this.#unsure(
        // Kept records expire by the clock; a time ahead of it (the trail's newest) would expire them early.
        () => this.deps.store.addCreditsOnce(ownerId, amount, idempotencyKey, this.deps.nowMs(), atMs),
        () => [this.#record(actor, "credits.add", null, ownerId, changes, keyedTopUp(ownerId, idempotencyKey, atMs))],
      ).catch((error: unknown) => {
        throw topUpRefusal(error, ownerId);
      });
      if (keyed === null) throw new NotFoundError(`account "${ownerId}" does not exist`);
      const view = await settle(keyed.credits.topupTotal, () => this.#auditKeyedTopUp(actor, keyed, changes));
      return ledgered(view, amount, keyed.replayed);
    };
    // ChargeUsage's ledger, in a space of its own: its keys start with an owner id, which never
    // holds a space, so no charge key starts with one.
    const once = await this.deps.idempotency.once(` credits ${ownerId} ${idempotencyKey}`, keyedCall);
    const answer = ledgeredAnswer(once.value, amount);
    return { view: answer.view ?? (await this.#view(account)), replayed: once.replayed || answer.storeReplayed };
  }

  /**
   * Records a keyed top-up under the id named after it, also when the store replays it: that is
   * how a retry after a lost answer records it, once however often. One an earlier release
   * recorded (under an id of its own) is not recorded again.
   */
  async #auditKeyedTopUp(actor: Actor, keyed: KeyedTopUp, changes: Record<string, unknown>): Promise<void> {
    const { ownerId, idempotencyKey, atMs } = keyed.topUp;
    if (keyed.replayed && (await this.#topUpRecorded(keyed.topUp))) return;
    await this.#audit(actor, "credits.add", null, ownerId, changes, keyedTopUp(ownerId, idempotencyKey, atMs));
  }

  /**
   * Usage between two UTC days, inclusive, including what this replica has not flushed yet:
   * totals over the whole range, and the per-key, per-day rows a page at a time (usagePageOf).
   */
  async getUsage(input: { ownerId: string; from: string; to: string; pageSize: number; pageToken?: string | undefined }): Promise<UsageReport> {
    const ownerId = check(externalId, "owner_id", input.ownerId);
    const from = checkDay("from", input.from);
    const to = checkDay("to", input.to);
    const spanDays = (Date.parse(`${to}T00:00:00Z`) - Date.parse(`${from}T00:00:00Z`)) / 86_400_000;
    if (spanDays < 0) throw new InvalidArgumentError("to", "must not be before from");
    if (spanDays > MAX_USAGE_DAYS) throw new InvalidArgumentError("to", `must be at most ${MAX_USAGE_DAYS} days after from`);
    const range = { ownerId, from, to };
    const request = usagePageOf(range, input.pageSize, input.pageToken);
    await this.deps.usage.flush();
    // What the flush could not write (the store refusing it: a full disk) is still this
    // replica's to report: added from the recorder, each row counted once (withOwnerRowsSettled).
    // One key-day past the page tells whether another page exists.
    const page = await this.deps.usage.withOwnerRowsSettled(ownerId, from, to, async () => {
      const stored = await this.deps.store.listUsagePage({ ownerId, fromDay: from, toDay: to, after: request.after, keyDays: request.keyDays + 1 });
      return usageReportPage(range, request, stored, this.deps.usage.pendingRows(ownerId, from, to));
    });
    // Names as they are now, one read per key in the page (a report, not the hot path).
    const names = new Map<string, string>();
    for (const keyId of new Set(page.byKey.map((row) => row.keyId))) {
      const key = await this.deps.store.getKey(keyId);
      if (key !== null) names.set(keyId, key.name);
    }
    return { ...page, names };
  }

  #checkScopes(field: string, scopes: readonly string[]): string[] {
    if (scopes.length > 64) throw new InvalidArgumentError(field, "at most 64 scopes");
    const catalog = this.deps.policy.scopes.catalog;
    const out: string[] = [];
    scopes.forEach((scope, i) => {
      if (!catalog.includes(scope)) {
        throw new InvalidArgumentError(`${field}[${i}]`, `unknown scope "${echo(scope)}"; known scopes: ${catalog.join(", ")}`);
      }
      if (!out.includes(scope)) out.push(scope);
    });
    return out;
  }

  /** Issues a key; an unknown owner gets an account on the default plan. */
  async createKey(input: {
    ownerId: string;
    projectId?: string | undefined;
    name: string;
    scopes: readonly string[];
    mode?: string | undefined;
    expiresAtMs: number | null;
    metadata: Record<string, string>;
    rateLimit?: { limit: number; windowSeconds: number } | undefined;
  }, actor: Actor = SYSTEM_ACTOR): Promise<IssuedKey> {
    const nowMs = this.deps.nowMs();
    // Both kept with the key and in the audit trail: a new key refuses a credential in either.
    const ownerId = checkNoSecret("owner_id", check(externalId, "owner_id", input.ownerId));
    const projectId = input.projectId === undefined ? null : checkNoSecret("project_id", check(externalId, "project_id", input.projectId));
    const name = check(keyName, "name", input.name);
    const scopes = input.scopes.length === 0 ? [...this.deps.policy.scopes.default] : this.#checkScopes("scopes", input.scopes);
    const mode: KeyMode = input.mode === undefined ? "live" : checkOneOf<KeyMode>("mode", input.mode, KEY_MODES);
    const expiresAtMs = checkExpiresAt(input.expiresAtMs, nowMs);
    const metadata = checkMetadata(input.metadata);
    const rateLimit = input.rateLimit === undefined ? null : checkRateLimit(input.rateLimit);
    const { record, secret } = this.#newRecord({ ownerId, projectId, name, scopes, mode, expiresAtMs, metadata, rateLimit }, nowMs);
    // Built before the key is saved: nothing that could throw may stand between the insert and
    // the answer that carries the secret.
    const changes = issuedFields(record);
    const accountDefaults = this.accountDefaults;
    // Read first so a lost answer logs the account too: on MongoDB the account is made before the
    // key, and a retry finds it made and records only its key.
    const hadAccount = (await this.deps.store.getAccount(ownerId)) !== null;
    // The account.upsert a lost answer logs: none once the account this call made is recorded.
    let unrecordedAccount: Record<string, unknown> | null = hadAccount ? null : accountFields(accountDefaults);
    const created = await this.#unsure(
      async () => {
        try {
          return await this.deps.store.createKey(record, {
            maxActiveKeysFor: (plan, keyMode) => this.maxActiveKeysFor(plan, keyMode),
            accountDefaults,
            nowMs,
          });
        } catch (error) {
          const made = createdAccountOf(error);
          if (made !== null) unrecordedAccount = (await this.#recordMadeAccount(actor, made, error)) ? null : accountFields(made);
          throw error;
        }
      },
      () => [
        ...(unrecordedAccount === null ? [] : [this.#record(actor, "account.upsert", null, ownerId, unrecordedAccount)]),
        this.#record(actor, "key.create", record.id, ownerId, changes),
      ],
    );
    // No cache is told: nothing can be cached under a hash that did not exist. Only a caller who
    // presented this exact secret before it was issued (a 190-bit guess) could have left a
    // negative entry, and that lasts the negative TTL. So the secret is never lost to a cache error.
    // The account this made for an unknown owner is recorded first, with the plan it is on.
    if (created.createdAccount !== null) await this.#audit(actor, "account.upsert", null, ownerId, accountFields(created.createdAccount));
    await this.#audit(actor, "key.create", record.id, ownerId, changes);
    return { key: record, secret };
  }

  /**
   * Appends the account.upsert of the account a failed CreateKey made (MongoDB makes it in a write
   * of its own, before the key): a retry, or a CreateKey racing this one on another replica, finds
   * it made and records only its key. False when the append failed, which is logged here unless
   * the call's answer was lost: #unsure logs the record then, with the key's.
   */
  async #recordMadeAccount(actor: Actor, account: AccountRecord, failure: unknown): Promise<boolean> {
    let record: AuditRecord | undefined;
    try {
      record = this.#record(actor, "account.upsert", null, account.ownerId, accountFields(account));
      await this.deps.store.appendAudit(record);
      return true;
    } catch (error) {
      const unsure = failure instanceof StoreUnavailableError && !(failure instanceof StoreBusyError);
      if (!unsure) this.deps.logger?.error({ err: error, audit: record ?? { action: "account.upsert", ownerId: account.ownerId } }, "audit append failed");
      return false;
    }
  }

  #newRecord(
    fields: Pick<KeyRecord, "ownerId" | "projectId" | "name" | "scopes" | "mode" | "expiresAtMs" | "metadata" | "rateLimit">,
    nowMs: number,
  ): { record: KeyRecord; secret: string } {
    const secret = this.deps.format.generate(fields.mode);
    const parsed = this.deps.format.parse(secret);
    if (parsed === null) throw new Error("generated key failed its own checksum");
    return {
      secret,
      record: newKeyRecord({
        ...fields,
        id: newKeyId(),
        hash: this.deps.hasher.hash(secret),
        start: parsed.start,
        last4: parsed.last4,
        createdAtMs: nowMs,
      }),
    };
  }

  async getKey(idInput: string): Promise<KeyRecord> {
    const id = checkKeyId("id", idInput);
    const key = await this.deps.store.getKey(id);
    if (key === null) throw new NotFoundError(`key ${id} does not exist`);
    return key;
  }

  async listKeys(input: { ownerId: string; projectId?: string | undefined; includeRevoked: boolean; pageSize: number; pageToken?: string | undefined }): Promise<{ keys: KeyRecord[]; nextPageToken: string }> {
    const ownerId = check(externalId, "owner_id", input.ownerId);
    const projectId = input.projectId === undefined ? undefined : check(externalId, "project_id", input.projectId);
    const limit = checkPageSize(input.pageSize);
    const afterId = input.pageToken === undefined ? undefined : decodePageToken(input.pageToken);
    // One extra row tells whether another page exists.
    const rows = await this.deps.store.listKeys({
      ownerId,
      projectId,
      includeRevoked: input.includeRevoked,
      limit: limit + 1,
      afterId,
      nowMs: this.deps.nowMs(),
    });
    const keys = rows.slice(0, limit);
    const last = keys.at(-1);
    return { keys, nextPageToken: rows.length > limit && last !== undefined ? encodePageToken(last.id) : "" };
  }

  async updateKey(input: {
    id: string;
    name?: string | undefined;
    scopes: readonly string[];
    rateLimit?: { limit: number; windowSeconds: number } | undefined;
    clearRateLimit?: boolean;
  }, actor: Actor = SYSTEM_ACTOR): Promise<KeyRecord> {
    const id = checkKeyId("id", input.id);
    const name = input.name === undefined ? undefined : check(keyName, "name", input.name);
    const scopes = input.scopes.length === 0 ? undefined : this.#checkScopes("scopes", input.scopes);
    if (input.clearRateLimit === true && input.rateLimit !== undefined) throw new InvalidArgumentError("clear_rate_limit", "cannot be set together with rate_limit");
    const rateLimit = input.clearRateLimit === true ? null : input.rateLimit === undefined ? undefined : checkRateLimit(input.rateLimit);
    if (name === undefined && scopes === undefined && rateLimit === undefined) {
      throw new InvalidArgumentError("name", "set name, scopes or rate_limit");
    }
    const current = await this.deps.store.getKey(id);
    if (current === null) throw new NotFoundError(`key ${id} does not exist`);
    // A revoke is final: the record keeps what the key held when it was revoked.
    if (current.revokedAtMs !== null) throw new FailedPreconditionError(`key ${id} is revoked; a revoked key cannot be changed`);
    // A rotation's old key follows its successor (below): scopes or a rate limit of its own would
    // make the old secret wider than the new one.
    if (current.rotatedToId !== null && (scopes !== undefined || rateLimit !== undefined)) {
      throw new FailedPreconditionError(`key ${id} was rotated to ${current.rotatedToId}, whose scopes and rate limit it follows: change that key`);
    }
    const changes = { name, scopes, rate_limit: rateLimit };
    // The same conditions, in the write: a revoke or rotation since the read is not written over.
    const changesAccess = scopes !== undefined || rateLimit !== undefined;
    const updated = await this.#unsure(
      () => this.deps.store.updateKey(id, { name, scopes, rateLimit }, { unrevoked: true, unrotated: changesAccess }),
      () => [this.#record(actor, "key.update", id, current.ownerId, changes)],
      { kind: "key", hash: current.hash },
    );
    if (updated === null) throw new NotFoundError(`key ${id} does not exist`);
    if (updated.revokedAtMs !== null) throw new FailedPreconditionError(`key ${id} is revoked; a revoked key cannot be changed`);
    if (changesAccess && updated.rotatedToId !== null) {
      throw new FailedPreconditionError(`key ${id} was rotated to ${updated.rotatedToId}, whose scopes and rate limit it follows: change that key`);
    }
    const untold = await this.#tell({ kind: "key", hash: updated.hash });
    if (!sameFields(current, updated)) await this.#audit(actor, "key.update", id, updated.ownerId, changes);
    // The key in grace is the same customer's old secret for the same access: new scopes or a new
    // rate limit hold for it too, or narrowing the successor would leave the old secret wider.
    if (scopes !== undefined || rateLimit !== undefined) {
      await this.#followSuccessor(
        updated,
        actor,
        "key.update",
        async (key) => {
          // A revoke since the read is final: not written over (the guard answers the key unchanged).
          const followed = await this.deps.store.updateKey(key.id, { scopes, rateLimit }, { unrevoked: true });
          return followed === null || sameFields(key, followed) ? null : followed;
        },
        { scopes, rate_limit: rateLimit },
      );
    }
    if (untold !== null) throw untold;
    return updated;
  }

  /** Idempotent; refused by every cache at once. */
  async revokeKey(input: { id: string; reason: string }, actor: Actor = SYSTEM_ACTOR): Promise<KeyRecord> {
    const id = checkKeyId("id", input.id);
    const reasonSent = check(reasonText, "reason", input.reason);
    const current = await this.deps.store.getKey(id);
    if (current === null) throw new NotFoundError(`key ${id} does not exist`);
    const nowMs = this.#changeMs();
    const reason = reasonSent === "" ? null : reasonSent;
    const changes = { reason: reasonSent };
    const revoked = await this.#unsure(
      () => this.#revoke(id, nowMs, reason),
      () => [this.#record(actor, "key.revoke", id, current.ownerId, changes, revocation(id, nowMs))],
      { kind: "key", hash: current.hash },
    );
    if (revoked === null) throw new NotFoundError(`key ${id} does not exist`);
    // Still told when the key was revoked before: a retry of a call that answered UNAVAILABLE
    // is how the other replicas get told.
    const untold = await this.#tell({ kind: "key", hash: revoked.key.hash });
    // The record is named after the revocation (its time and the key), so the call that revoked
    // and a retry of it (a key revoked for the same reason: its answer was lost) append it once.
    // A key revoked for another reason was revoked by another call, which recorded it.
    if (revoked.changed || (revoked.key.revokeReason === reason && !(await this.#revokeRecorded(revoked.key)))) {
      await this.#audit(actor, "key.revoke", id, revoked.key.ownerId, changes, revocation(id, revoked.key.revokedAtMs ?? nowMs));
    }
    // Revoking a rotation's new key ends the old key's grace: the old secret must not outlive it.
    const followReason = "its successor was revoked";
    await this.#followSuccessor(
      revoked.key,
      actor,
      "key.revoke",
      async (key) => {
        const followed = await this.#revoke(key.id, this.deps.nowMs(), followReason);
        return followed?.changed === true ? followed.key : null;
      },
      { reason: followReason },
    );
    if (untold !== null) throw untold;
    return revoked.key;
  }

  /**
   * Revokes a key; `changed` is false when it was revoked before (the store keeps the first
   * revocation, so its time and reason are not this call's).
   */
  async #revoke(id: string, nowMs: number, reason: string | null): Promise<{ key: KeyRecord; changed: boolean } | null> {
    const key = await this.deps.store.revokeKey(id, nowMs, reason);
    return key === null ? null : { key, changed: key.revokedAtMs === nowMs && key.revokeReason === reason };
  }

  /**
   * Refuses the key (KEY_DISABLED) until enableKey, at once in every cache, like a revoke. A
   * disabled key keeps its slot under the plan's cap, so enabling it never exceeds the cap.
   * Idempotent; a revoked key cannot be disabled (a revoke is final).
   */
  async disableKey(input: { id: string; reason: string }, actor: Actor = SYSTEM_ACTOR): Promise<KeyRecord> {
    const id = checkKeyId("id", input.id);
    const reason = check(reasonText, "reason", input.reason);
    const current = await this.#disablable(id);
    const nowMs = this.deps.nowMs();
    const changes = { reason };
    const written = await this.#unsure(
      () => this.#disable(current, nowMs),
      () => [this.#record(actor, "key.disable", id, current.ownerId, changes)],
      { kind: "key", hash: current.hash },
    );
    if (written === null) throw new NotFoundError(`key ${id} does not exist`);
    const updated = written.key;
    const untold = await this.#tell({ kind: "key", hash: updated.hash });
    if (written.changed) await this.#audit(actor, "key.disable", id, updated.ownerId, changes);
    // The keys in grace pause with it: disabled since its time as it stands at their write, so an
    // EnableKey of it that came meanwhile (and brought back the keys paused with it) pauses nothing.
    const inGrace = await this.#inGraceFor(updated, this.deps.nowMs());
    if (inGrace.length > 0) {
      const followed = { ...changes, successor_id: id };
      const paused = await this.#unsure(
        () => this.deps.store.pauseKeysInGrace(id, inGrace.map((key) => key.id)),
        () => inGrace.filter((key) => key.disabledAtMs === null).map((key) => this.#record(actor, "key.disable", key.id, key.ownerId, followed)),
        inGrace.map((key): Invalidation => ({ kind: "key", hash: key.hash })),
      );
      await this.#followed(paused, actor, "key.disable", followed);
    }
    if (untold !== null) throw untold;
    return updated;
  }

  /**
   * DisableKey's write: an enabled key is disabled since a time of its own (disabledSince), apart
   * from its successor's and from those of the keys in grace for it (pausedWith); a key in grace
   * disabled only because its successor is moves to such a time, so enabling the successor leaves
   * it disabled; any other disabled key keeps its first time. The write is made only while the
   * key's time is still the one this was decided on (redisableKey's whileAtMs): an EnableKey of its
   * successor brings back only a key still paused with it, so it cannot undo this disable, and a
   * time changed meanwhile (paused, brought back) is read and decided again. `changed`: the write
   * set or moved the key's time, so is audited.
   */
  async #disable(read: KeyRecord, nowMs: number): Promise<{ key: KeyRecord; changed: boolean } | null> {
    let key = read;
    for (let round = 0; round < APART_ROUNDS; round += 1) {
      const successor = key.rotatedToId === null ? null : await this.deps.store.getKey(key.rotatedToId);
      const inGrace = key.disabledAtMs === null ? await this.#inGraceFor(key, nowMs) : [];
      const ownMs = disabledSince(key, nowMs, [successor?.disabledAtMs ?? null, ...inGrace.map((other) => other.disabledAtMs)]);
      const atMs = key.disabledAtMs !== null && !(successor !== null && pausedWith(key, successor)) ? key.disabledAtMs : ownMs;
      const written = await this.deps.store.redisableKey(key.id, atMs, key.disabledAtMs);
      if (written === null) return null;
      if (written.revokedAtMs !== null) throw new FailedPreconditionError(`key ${key.id} is revoked; a revoked key cannot be disabled or enabled`);
      if (written.disabledAtMs === atMs) {
        const set = atMs !== key.disabledAtMs;
        const moved = await this.#apart(written, set, nowMs);
        return { key: moved ?? written, changed: set || moved !== null };
      }
      key = written;
    }
    throw new StoreBusyError(`key ${read.id}: its disabled time kept changing under DisableKey; nothing was written, retry`);
  }

  /**
   * After a DisableKey's write: moves the key to a time of its own when a DisableKey of its
   * successor or of a key in grace for it, in the same millisecond, took the same time (each read
   * the other's as none), or when its successor's DisableKey paused it meanwhile: a key disabled on
   * its own must never read as paused with its successor (pausedWith), or enabling the successor
   * would enable it. `set`: this call's write set the key's time, so a key in grace at that time
   * was not paused by it (the call pauses keys in grace after this). The successor moves past the
   * other's time by two and the key in grace to the next free one, so two calls moving at once
   * part. The key is read again each round: an EnableKey of its successor that came while it had
   * the successor's time brought it back as paused, so a key whose time this call set or moved and
   * that is enabled now is disabled again, after that time. null when the key did not move.
   */
  async #apart(key: KeyRecord, set: boolean, nowMs: number): Promise<KeyRecord | null> {
    let moved: KeyRecord | null = null;
    for (let round = 0; round < APART_ROUNDS; round += 1) {
      const current = await this.deps.store.getKey(key.id);
      if (current === null || current.revokedAtMs !== null) return moved;
      const resumed = current.disabledAtMs === null;
      // Enabled by a call after it that this one wrote nothing against: that call's outcome stands.
      if (resumed && !set && moved === null) return null;
      const successor = current.rotatedToId === null ? null : await this.deps.store.getKey(current.rotatedToId);
      const inGrace = await this.#inGraceFor(current, nowMs);
      const clashing = set && !resumed ? inGrace.filter((other) => other.disabledAtMs === current.disabledAtMs) : [];
      if (!resumed && clashing.length === 0 && !(successor !== null && pausedWith(current, successor))) return moved === null ? null : current;
      const writtenMs = (moved ?? key).disabledAtMs ?? nowMs;
      const fromMs = resumed ? Math.max(nowMs, writtenMs + 1) : Math.max(nowMs, ...clashing.map((other) => (other.disabledAtMs ?? 0) + 2));
      const atMs = disabledSince(current, fromMs, [successor?.disabledAtMs ?? null, ...inGrace.map((other) => other.disabledAtMs)]);
      // Only over the time read: one changed since is read and decided again next round.
      moved = (await this.deps.store.redisableKey(current.id, atMs, current.disabledAtMs)) ?? moved;
      if (moved === null) return null;
    }
    this.deps.logger?.error({ keyId: key.id }, "a disabled key's time kept meeting that of its successor or of a key in grace for it; enabling the successor may enable it too");
    return moved;
  }

  /**
   * Lets a disabled key through again, at once in every cache, and with it the keys in grace for it
   * that were paused with it (in the same store call, before it: a retry after a failure between
   * still finds them paused with it). Idempotent; not for a revoked key.
   */
  async enableKey(input: { id: string }, actor: Actor = SYSTEM_ACTOR): Promise<KeyRecord> {
    const id = checkKeyId("id", input.id);
    const current = await this.#disablable(id);
    const inGrace = await this.#inGraceFor(current, this.deps.nowMs());
    const followed = { successor_id: id };
    // For an outcome unknown only: the store decides which keys come back, by the key's time as it stands.
    const paused = inGrace.filter((key) => pausedWith(key, current));
    const enabled = await this.#unsure(
      () => this.deps.store.enableKey(id, inGrace.map((key) => key.id)),
      () => [this.#record(actor, "key.enable", id, current.ownerId, {}), ...paused.map((key) => this.#record(actor, "key.enable", key.id, key.ownerId, followed))],
      [{ kind: "key", hash: current.hash }, ...paused.map((key): Invalidation => ({ kind: "key", hash: key.hash }))],
    );
    if (enabled === null) throw new NotFoundError(`key ${id} does not exist`);
    if (enabled.key.revokedAtMs !== null) throw new FailedPreconditionError(`key ${id} is revoked; a revoked key cannot be disabled or enabled`);
    const updated = enabled.key;
    const untold = await this.#tell({ kind: "key", hash: updated.hash });
    // Enabling an enabled key does nothing: not a change to audit. Nor is one another call enabled
    // between this call's read and its write (the store says whose write enabled it).
    if (enabled.changed) await this.#audit(actor, "key.enable", id, updated.ownerId, {});
    await this.#followed(enabled.resumed, actor, "key.enable", followed);
    if (untold !== null) throw untold;
    return updated;
  }

  /** The key DisableKey or EnableKey changes: one that exists and is not revoked. */
  async #disablable(id: string): Promise<KeyRecord> {
    const current = await this.deps.store.getKey(id);
    if (current === null) throw new NotFoundError(`key ${id} does not exist`);
    if (current.revokedAtMs !== null) throw new FailedPreconditionError(`key ${id} is revoked; a revoked key cannot be disabled or enabled`);
    if (keyState(current, this.deps.nowMs()) === "rotated") {
      throw new FailedPreconditionError(`key ${id} was rotated and its grace period is over; it cannot be disabled or enabled`);
    }
    return current;
  }

  /**
   * Applies a change made to `successor` to the keys still in grace from rotating to it (at most
   * one, but a concurrent rotation could leave two), each dropped from every cache and audited
   * with `successor_id`. `change` answers null when the key needs no change.
   */
  async #followSuccessor(
    successor: KeyRecord,
    actor: Actor,
    action: string,
    change: (key: KeyRecord) => Promise<KeyRecord | null>,
    changes: Record<string, unknown>,
  ): Promise<void> {
    const followed = { ...changes, successor_id: successor.id };
    for (const key of await this.#inGraceFor(successor, this.deps.nowMs())) {
      const changed = await this.#unsure(
        () => change(key),
        () => [this.#record(actor, action, key.id, key.ownerId, followed)],
        { kind: "key", hash: key.hash },
      );
      if (changed !== null) await this.#followed([changed], actor, action, followed);
    }
  }

  /**
   * Drops keys changed along with another (keys in grace) from every cache and audits each. Told in
   * the background when Redis cannot be told now: the change of the key they follow stands.
   */
  async #followed(keys: readonly KeyRecord[], actor: Actor, action: string, changes: Record<string, unknown>): Promise<void> {
    for (const key of keys) {
      const untold = await this.#tell({ kind: "key", hash: key.hash });
      if (untold !== null) this.deps.logger?.warn({ err: untold, keyId: key.id }, "key in grace: caches not told yet; retrying in the background");
      await this.#audit(actor, action, key.id, key.ownerId, changes);
    }
  }

  /** The keys still in grace from rotating to `successor`, found among all of its owner's live keys, a page at a time. */
  async #inGraceFor(successor: KeyRecord, nowMs: number): Promise<KeyRecord[]> {
    const found: KeyRecord[] = [];
    let afterId: string | undefined;
    for (;;) {
      const page = await this.deps.store.listKeys({ ownerId: successor.ownerId, includeRevoked: false, limit: KEYS_PAGE, nowMs, ...(afterId === undefined ? {} : { afterId }) });
      for (const key of page) if (inGraceFor(key, successor.id, nowMs)) found.push(key);
      const last = page.at(-1);
      if (page.length < KEYS_PAGE || last === undefined) return found;
      afterId = last.id;
    }
  }

  /** Issues a successor with the same owner, project, name, scopes and mode. */
  async rotateKey(
    input: { id: string; graceDays: number | undefined },
    actor: Actor = SYSTEM_ACTOR,
  ): Promise<{ key: KeyRecord; secret: string; previous: KeyRecord }> {
    const id = checkKeyId("id", input.id);
    const graceDays = input.graceDays ?? GRACE_DAYS.default;
    if (!Number.isInteger(graceDays) || graceDays < GRACE_DAYS.min || graceDays > GRACE_DAYS.max) {
      throw new InvalidArgumentError("grace_days", `must be a whole number from ${GRACE_DAYS.min} to ${GRACE_DAYS.max}; got ${graceDays}`);
    }
    const nowMs = this.deps.nowMs();
    const old = await this.deps.store.getKey(id);
    if (old === null) throw new NotFoundError(`key ${id} does not exist`);
    const { record, secret } = this.#newRecord(
      {
        ownerId: old.ownerId,
        projectId: old.projectId,
        name: old.name,
        scopes: old.scopes,
        mode: old.mode,
        expiresAtMs: old.expiresAtMs,
        metadata: old.metadata,
        rateLimit: old.rateLimit,
      },
      nowMs,
    );
    // A disabled key's successor is disabled too, from its issue on: rotating a paused key must not
    // hand out a secret that works, and enabling stays the one way back. The old key was disabled
    // on its own, so its time stays apart from the successor's: enabling the successor leaves it disabled.
    const successor = old.disabledAtMs === null ? record : { ...record, disabledAtMs: disabledSince(record, nowMs, [old.disabledAtMs]) };
    const graceEndsAtMs = nowMs + graceDays * DAY_MS;
    const changes = { rotated_to_id: record.id, grace_days: graceDays, grace_ends_at: new Date(graceEndsAtMs).toISOString() };
    const issued = rotatedFields(successor, id);
    // A chain keeps one key in grace: the store revokes a key still in grace from rotating to the old
    // key with the rotation (Rotation.ended). Read here only for a call that fails.
    const earlier = await this.#inGraceFor(old, nowMs);
    const ended = { reason: CHAIN_GRACE_ENDED };
    // Keys are judged by the clock; a chain's earlier key is revoked at a time that names its
    // key.revoke after the trail's newest record (later than the clock after it went back).
    const revokedAtMs = this.#changeMs();
    let rotation;
    try {
      rotation = await this.#unsure(
        () => this.deps.store.rotateKey(id, successor, graceEndsAtMs, nowMs, revokedAtMs),
        () => [
          this.#record(actor, "key.rotate", id, old.ownerId, changes),
          this.#record(actor, "key.create", record.id, old.ownerId, issued),
          ...earlier.map((key) => this.#record(actor, "key.revoke", key.id, key.ownerId, ended, revocation(key.id, revokedAtMs))),
        ],
        [{ kind: "key", hash: old.hash }, ...earlier.map((key): Invalidation => ({ kind: "key", hash: key.hash }))],
      );
    } catch (error) {
      if (error instanceof ConflictError) throw new FailedPreconditionError(error.message, { cause: error });
      // MongoDB: the new key's id was taken by the placeholder of a rotation of this key made
      // meanwhile (this call's retry after a timeout, or another caller's), which undid this one.
      if (error instanceof DuplicateError) throw new StoreUnavailableError(`key ${id}: another rotation of it was made at the same time; retry`, { cause: error });
      throw error;
    }
    // The old key changed (grace end, or revoked with grace 0), so caches must drop it. When they
    // cannot be told now, the lookup keeps retrying; the new secret is still returned and audited,
    // since failing here would lose it with the rotation already saved. The new hash, like
    // CreateKey's, needs no invalidation.
    const untold = await this.#tell({ kind: "key", hash: rotation.previous.hash });
    if (untold !== null) this.deps.logger?.warn({ err: untold, keyId: id }, "rotated key: caches not told yet; retrying in the background");
    // The keys whose grace the rotation ended, revoked by this call or by an attempt of it that
    // failed after their revoke (whose retry this may be): told by every call that makes it.
    for (const key of rotation.ended) {
      const untoldEnded = await this.#tell({ kind: "key", hash: key.hash });
      if (untoldEnded !== null) this.deps.logger?.warn({ err: untoldEnded, keyId: key.id }, "superseded key: caches not told yet; retrying in the background");
    }
    // Rotating never hands out a fresh rate bucket: the new key takes the old key's, which the old
    // key, in grace, charges from now on too (a failure leaves the new key a bucket of its own).
    await this.deps.meter.inheritKeyBucket(old.ownerId, id, record.id).catch((error: unknown) => {
      this.deps.logger?.warn({ err: error, keyId: id }, "rotated, but the new key could not take the old key's rate bucket");
    });
    await this.#audit(actor, "key.rotate", id, old.ownerId, changes);
    // The new key has its key.create under its own id, as every issued key does, naming the key
    // it replaces: "who issued this key, when, from where" is answered by its id alone.
    await this.#audit(actor, "key.create", record.id, old.ownerId, issued);
    // Named after the revocation (its time and the key), so whichever calls find it append it once.
    for (const key of rotation.ended) {
      if (!(await this.#revokeRecorded(key))) await this.#audit(actor, "key.revoke", key.id, key.ownerId, ended, revocation(key.id, key.revokedAtMs ?? nowMs));
    }
    return { key: await this.#withAccessAsRotated(rotation, actor), secret, previous: rotation.previous };
  }

  /**
   * The new key, with the scopes and rate limit the old key had when the rotation's write found it:
   * the new key was built from this call's earlier read, and an UpdateKey of the old key that
   * landed between them (answered OK, as made before the rotation) would otherwise leave the new
   * secret with what the update took away. Changed as an UpdateKey of the new key is, and audited.
   */
  async #withAccessAsRotated(rotation: Rotation, actor: Actor): Promise<KeyRecord> {
    const { next, previous } = rotation;
    if (JSON.stringify(next.scopes) === JSON.stringify(previous.scopes) && JSON.stringify(next.rateLimit) === JSON.stringify(previous.rateLimit)) return next;
    const changes = { scopes: previous.scopes, rate_limit: previous.rateLimit };
    const updated = await this.deps.store.updateKey(next.id, { scopes: previous.scopes, rateLimit: previous.rateLimit }, { unrevoked: true });
    if (updated === null || sameFields(next, updated)) return updated ?? next;
    const untold = await this.#tell({ kind: "key", hash: updated.hash });
    if (untold !== null) this.deps.logger?.warn({ err: untold, keyId: next.id }, "rotated key's access: caches not told yet; retrying in the background");
    await this.#audit(actor, "key.update", next.id, next.ownerId, changes);
    return updated;
  }

  /**
   * An audit record: at the time of the append under a new id, or, for a change that has one
   * (`change`), at the change's time under the id derived from it.
   */
  #record(actor: Actor, action: string, keyId: string | null, ownerId: string | null, changes: Record<string, unknown>, change?: ChangeIdentity): AuditRecord {
    const id = change === undefined ? this.#eventIds.next(this.deps.nowMs()) : this.#eventIds.derived(change.atMs, change.identity);
    return {
      id,
      // A new record's time is its id's: after the clock went back, the last id's, so `since`
      // (which filters on this time) and the id order agree.
      atMs: change === undefined ? this.#eventIds.lastMs : change.atMs,
      actor: actor.tokenId,
      action,
      keyId,
      ownerId,
      changes: Object.fromEntries(Object.entries(changes).filter(([, value]) => value !== undefined)),
      source: actor.source,
    };
  }

  /**
   * Appends to the audit trail. The change is already made, so a failed append is logged (the
   * event in full, which holds no secret) rather than failing the call and losing a new secret.
   */
  async #audit(actor: Actor, action: string, keyId: string | null, ownerId: string | null, changes: Record<string, unknown>, change?: ChangeIdentity): Promise<void> {
    let record: AuditRecord | undefined;
    try {
      record = this.#record(actor, action, keyId, ownerId, changes, change);
      await this.deps.store.appendAudit(record);
    } catch (error) {
      this.deps.logger?.error({ err: error, audit: record ?? { action, keyId, ownerId, changes } }, "audit append failed");
    }
  }

  /**
   * Makes a store change whose failure may come after the change was made (MongoDB's answer lost:
   * StoreUnavailableError). Such a failure logs the records the change appends, in full at error
   * level, before the caller hears UNAVAILABLE: a retry may find the change made and append
   * nothing (only a revoke and a keyed top-up are recorded by their retry, under the same id).
   * And on any failure but StoreBusyError the caches are told of `told`: a change made in part (a
   * rotation that revoked the earlier key of its chain, then lost its new key's insert) or in full
   * must not wait for the caller's retry to stop cached copies passing; one not made costs a re-read.
   */
  async #unsure<T>(write: () => Promise<T>, records: () => AuditRecord[], told?: Invalidation | readonly Invalidation[]): Promise<T> {
    try {
      return await write();
    } catch (error) {
      // A store that surely wrote nothing (StoreBusyError) leaves nothing unknown to log or tell.
      if (error instanceof StoreBusyError) throw error;
      if (error instanceof StoreUnavailableError) {
        try {
          for (const audit of records()) this.deps.logger?.error({ err: error, audit }, "change outcome unknown: its audit record was not appended");
        } catch (recordError) {
          this.deps.logger?.error({ err: recordError }, "change outcome unknown, and its audit record could not be built");
        }
      }
      const events: readonly Invalidation[] = told === undefined ? [] : "kind" in told ? [told] : told;
      for (const event of events) await this.#tell(event).catch(() => null);
      throw error;
    }
  }

  /**
   * Whether the trail holds the record of `key`'s revocation: a key.revoke (one an earlier release
   * wrote has an id of its own), or the key.rotate of a rotation without grace, which revoked the
   * key itself (reason "rotated").
   */
  async #revokeRecorded(key: KeyRecord): Promise<boolean> {
    const after = await this.deps.store.listAudit({ keyId: key.id, sinceMs: key.revokedAtMs ?? undefined, limit: RECORDED_PAGE }).catch(() => []);
    return after.some((record) => record.action === "key.revoke" || (record.action === "key.rotate" && record.changes["grace_days"] === 0));
  }

  /** Whether the trail holds the credits.add of a keyed top-up (one an earlier release wrote has an id of its own). */
  async #topUpRecorded(topUp: TopUpRecord): Promise<boolean> {
    const after = await this.deps.store.listAudit({ ownerId: topUp.ownerId, sinceMs: topUp.atMs, limit: RECORDED_PAGE }).catch(() => []);
    return after.some((record) => record.action === "credits.add" && record.changes["idempotency_key"] === topUp.idempotencyKey);
  }

  /**
   * Drops a changed record from every cache. When Redis cannot be told, the lookup keeps
   * retrying and the error is returned, not thrown: the rest of the change (its audit record,
   * the key in grace that follows it) is made first, then the caller hears UNAVAILABLE.
   */
  async #tell(event: Invalidation): Promise<CacheUnavailableError | null> {
    try {
      await this.deps.lookup.invalidate(event);
      return null;
    } catch (error) {
      if (error instanceof CacheUnavailableError) return error;
      throw error;
    }
  }

  /** Pages through the audit trail, oldest first. */
  async listAudit(input: { ownerId?: string | undefined; keyId?: string | undefined; sinceMs: number | null; pageSize: number; pageToken?: string | undefined }): Promise<{ events: AuditRecord[]; nextPageToken: string }> {
    const ownerId = input.ownerId === undefined ? undefined : check(externalId, "owner_id", input.ownerId);
    const keyId = input.keyId === undefined ? undefined : checkKeyId("key_id", input.keyId);
    // A Timestamp carries any int64 seconds; past what a date holds, MongoDB would be sent an Invalid Date.
    if (input.sinceMs !== null && !(input.sinceMs >= 0 && input.sinceMs <= MAX_EXPIRES_AT_MS)) {
      throw new InvalidArgumentError("since", "must be from 1970-01-01T00:00:00Z to 9999-12-31T23:59:59Z");
    }
    const limit = checkPageSize(input.pageSize);
    const afterId = input.pageToken === undefined ? undefined : decodeToken(input.pageToken, AUDIT_ID);
    const rows = await this.deps.store.listAudit({ ownerId, keyId, sinceMs: input.sinceMs ?? undefined, afterId, limit: limit + 1 });
    const events = rows.slice(0, limit);
    const last = events.at(-1);
    return { events, nextPageToken: rows.length > limit && last !== undefined ? encodePageToken(last.id) : "" };
  }

  /**
   * ChargeUsage: one metered use of `cost` credits by an account or one of its keys, from a
   * backend. Every input is checked before anything is charged; a retry with the same
   * idempotency key (per owner) gets the first answer and charges nothing. A call with the key for
   * another charge (cost, key, quota or mode) is refused, charging nothing: its answer would
   * otherwise be the first charge's, and what it asked for never billed.
   */
  async chargeUsage(input: { ownerId?: string | undefined; keyId?: string | undefined; cost: number; idempotencyKey: string; quota?: string | undefined }): Promise<ChargeUsageAnswer> {
    const keyId = input.keyId === undefined ? undefined : checkKeyId("key_id", input.keyId);
    let ownerId = input.ownerId === undefined ? undefined : check(externalId, "owner_id", input.ownerId);
    if (keyId === undefined && ownerId === undefined) throw new InvalidArgumentError("owner_id", "is required when key_id is not given");
    this.#checkCharge(input);
    const key = keyId === undefined ? null : await this.deps.store.getKey(keyId);
    if (keyId !== undefined && key === null) throw new NotFoundError(`key ${keyId} does not exist`);
    if (key !== null) {
      if (ownerId !== undefined && ownerId !== key.ownerId) throw new InvalidArgumentError("key_id", `belongs to another owner than "${ownerId}"`);
      ownerId = key.ownerId;
    }
    if (ownerId === undefined) throw new InvalidArgumentError("owner_id", "is required when key_id is not given");
    const owner = ownerId;
    const stored = await this.deps.store.getAccount(owner);
    if (stored === null && key === null) throw new NotFoundError(`account "${owner}" does not exist`);
    const account = stored ?? { ownerId: owner, ...this.accountDefaults };
    const fingerprint: ChargeFingerprint = { cost: input.cost, keyId: key?.id ?? "", quota: input.quota ?? "", mode: key?.mode ?? "live" };
    // Owner ids are printable ASCII without spaces, so the first space ends one.
    const once = await this.deps.idempotency
      .once<LedgeredCharge>(
        `${owner} ${input.idempotencyKey}`,
        // The meter replays a charge it kept only for this same fingerprint, so the one the ledger
        // keeps with a replayed charge is the one kept with it (one kept in the earlier form,
        // without the key, is replayed only when the mode, cost and quota it names match).
        async (afterFailure, confirmClaim) => ({
          charge: await this.deps.pipeline.chargeUsage(account, key, input.cost, input.quota ?? null, input.idempotencyKey, fingerprintText(fingerprint), afterFailure, confirmClaim),
          atMs: this.deps.nowMs(),
          fingerprint,
        }),
        // A refusal by rate or by daily quota charged nothing: not kept, so a retry with the key
        // (after its Retry-After) is judged again.
        (answer) => keptUnderIdempotencyKey(answer.charge),
      )
      // The charge Redis kept beside its counters (the ledger's answer lost) was for another charge.
      .catch((error: unknown) => {
        throw error instanceof IdempotencyKeyMismatchError ? reusedChargeKey(error.usedFor, fingerprint) : error;
      });
    const kept = once.value.fingerprint;
    if (once.replayed && kept !== undefined && !sameCharge(kept, fingerprint)) throw reusedChargeKey(chargeText(kept), fingerprint);
    // Replayed by the ledger, or by the meter from the charge it kept (the ledger's answer lost).
    return { ownerId: owner, keyId: key?.id ?? "", charge: once.value.charge, atMs: once.value.atMs, replayed: once.replayed || once.value.charge.replayed };
  }

  /** A charge's cost, idempotency key and quota name, checked before anything is read or charged. */
  #checkCharge(charge: { cost: number; idempotencyKey: string; quota?: string | undefined }): void {
    if (!Number.isInteger(charge.cost) || charge.cost < 0 || charge.cost > MAX_CHARGE_COST) {
      throw new InvalidArgumentError("cost", `must be a whole number from 0 to ${MAX_CHARGE_COST}`);
    }
    if (!IDEMPOTENCY_KEY.test(charge.idempotencyKey)) throw new InvalidArgumentError("idempotency_key", "must be 1-200 printable ASCII characters, unique per charge (it is required)");
    const quotas = [...new Set(Object.values(this.deps.policy.plans).flatMap((plan) => Object.keys(plan.quotas)))];
    if (charge.quota !== undefined && !quotas.includes(charge.quota)) {
      throw new InvalidArgumentError("quota", `unknown quota "${echo(charge.quota)}"; the plans' quotas: ${quotas.join(", ") || "none"}`);
    }
  }

  /**
   * "Who is this key": the decision (charged only with `charge`), and the key's record when it was
   * found. The decision may come from the in-process cache, which keeps only what a Check reads;
   * the record (name, metadata, times) is read from the store. A valid answer records a use.
   */
  async verifyKey(input: {
    secret: string;
    requiredScopes: readonly string[];
    projectId?: string | undefined;
    /** When set, a valid key is also charged as ChargeUsage would charge it. */
    charge?: { cost: number; idempotencyKey: string; quota?: string | undefined } | undefined;
    /** The owners the caller may see (a scoped admin token's); another owner's key reads as unknown. */
    owners?: ReadonlySet<string> | null | undefined;
  }): Promise<{ decision: Decision; key: KeyRecord | null; charge: ChargeUsageAnswer | null }> {
    if (input.secret === "") throw new InvalidArgumentError("secret", "is required");
    if (input.secret.length > 1024) throw new InvalidArgumentError("secret", "is too long to be a key");
    const requiredScopes = this.#checkScopes("required_scopes", input.requiredScopes);
    const projectId = input.projectId === undefined ? null : check(externalId, "project_id", input.projectId);
    if (input.charge !== undefined) this.#checkCharge(input.charge);
    const verified = await this.deps.pipeline.verify(input.secret, { requiredScopes, projectId, cost: 0, metered: false, minRole: null, quota: null });
    const owners = input.owners ?? null;
    const hidden = owners !== null && verified.snapshot !== undefined && !owners.has(verified.snapshot.key.ownerId);
    const decision: Decision = hidden ? { allow: false, reason: "UNKNOWN_KEY", message: DENIALS.UNKNOWN_KEY.message } : verified;
    const key = decision.snapshot === undefined ? null : await this.deps.store.getKey(decision.snapshot.key.id);
    // Only a valid key is charged: a refused verify costs nothing.
    const charge = input.charge === undefined || !decision.allow || key === null ? null : await this.chargeUsage({ keyId: key.id, ...input.charge });
    // A valid answer is a use of the key, as an allowed Check is: a backend without a proxy
    // authenticates each request with VerifyKey. A refused charge makes the answer invalid.
    if (decision.allow && (charge === null || charge.charge.reason === null)) this.deps.pipeline.recordVerifiedUse(decision);
    return { decision, key, charge };
  }
}
