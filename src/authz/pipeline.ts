import type { SnapshotLookup } from "../cache/lookup.js";
import { CheckBudgetExceededError, DEFAULT_CHECK_BUDGET_MS, withinBudget } from "./budget.js";
import { DEFAULT_LAST_USED_RESOLUTION_SECONDS, ROLES } from "../config.js";
import type { Plan, Policy, RateLimitRule } from "../config.js";
import { UtcCalendar, noQuotaAllowance } from "../limits/limits.js";
import type { ChargeInput, ChargeResult, Meter } from "../limits/limits.js";
import type { ConfirmClaim } from "../limits/idempotency.js";
import type { UsageRecorder } from "../limits/usage.js";
import type { KeyFormat } from "../keys/key-format.js";
import type { KeyHasher } from "../keys/hasher.js";
import type { LastUsedRecorder } from "../store/last-used.js";
import { ALLOWED_UNMETERED, allowedOutcome, keyState } from "../store/store.js";
import type { AccountRecord, CheckSnapshot, CheckedKey } from "../store/store.js";
import { PresentCredentialHeaders, extractCredential } from "./credential.js";
import type { HeaderBag } from "./headers.js";
import { DENIALS, NO_QUOTA_ALLOWANCE } from "./reasons.js";
import type { DenyReason } from "./reasons.js";
import { ROUTE_CONFIG_REFUSALS, RouteRefusal } from "./routes.js";
import { REDIS_CHARGE_SPAN, REDIS_PEEK_SPAN, backendAttributes, traceCall } from "../tracing/tracing.js";
import type { DecisionTrace } from "../tracing/tracing.js";
import type { RouteRequirements, RouteTable } from "./routes.js";

/** One request to decide, as both entry points present it. */
export interface CheckInput {
  method: string;
  path: string;
  headers: HeaderBag;
  /** Envoy's per-route context_extensions; undefined in the HTTP mode. */
  contextExtensions: Readonly<Record<string, string>> | undefined;
  /** The decision's span while tracing is on; undefined (nothing traced, nothing built) when off. */
  trace?: DecisionTrace | undefined;
}

/** A granted request: who it is, and what the route asked for. */
export interface Allow {
  allow: true;
  snapshot: CheckSnapshot;
  /** Every configured credential header the request carries, to strip before it goes upstream. */
  credentialHeaders: readonly string[];
  route: RouteRequirements;
  /** Where the caller stands on rate, quota and credits; null for VerifyKey, which charges nothing. */
  limits: ChargeResult | null;
  /** The key's metadata the policy forwards, as [x-keygate-meta-<name>, value]; usually none. */
  forwarded: ReadonlyArray<readonly [string, string]>;
  /**
   * The header of every entry the policy forwards, the key's or not: the HTTP answer sends each,
   * empty where the key has no value, for proxies that copy a fixed list of names.
   */
  forwardHeaders?: readonly string[];
}

/** A refused request. Denials are data; failures are thrown. */
export interface Deny {
  allow: false;
  reason: DenyReason;
  message: string;
  /** Known when the key was found: lets VerifyKey say whose key it was. */
  snapshot?: CheckSnapshot;
  retryAfterSeconds?: number;
  /** Set when the limits step ran: its headers go out with 402 and 429. */
  limits?: ChargeResult;
}

/** The outcome of the pipeline. */
export type Decision = Allow | Deny;

/** The outcome of a ChargeUsage: charged, or refused as a Check would be, and where the account stands. */
export interface UsageCharge {
  charged: boolean;
  /** Null when charged. */
  reason: DenyReason | null;
  message: string;
  /** Null when refused before the limits step (the key's state, the subscription). */
  limits: ChargeResult | null;
  retryAfterSeconds: number | null;
  /**
   * The answer Redis kept beside its counters for this idempotency key (an earlier call's, whose
   * answer the ledger lost): nothing was charged, counted or spent again.
   */
  replayed: boolean;
}

/**
 * Whether a ChargeUsage answer is kept under its idempotency key (IdempotencyLedger.once's `keep`).
 * A refusal by rate or by daily quota is not: like a payments API's 429 it is no charge, and a
 * retry with the same key after its Retry-After (the quota's reset at midnight) is judged again.
 * Every other answer, refusals included, is kept.
 */
export function keptUnderIdempotencyKey(charge: UsageCharge): boolean {
  return charge.reason !== "RATE_LIMITED" && charge.reason !== "QUOTA_EXCEEDED";
}

/** Everything the pipeline reads. Tests pass real or in-memory parts. */
export interface PipelineDeps {
  format: KeyFormat;
  hasher: KeyHasher;
  lookup: SnapshotLookup;
  routes: RouteTable;
  credentialHeaders: readonly string[];
  lastUsed: LastUsedRecorder;
  meter: Meter;
  usage: UsageRecorder;
  policy: Pick<Policy, "plans" | "defaultPlan" | "limits" | "scopes"> & Partial<Pick<Policy, "forwardMetadata" | "testMode" | "lastUsedResolutionSeconds">>;
  nowMs: () => number;
  /** The most a Check may wait on its backends (KEYGATE_CHECK_BUDGET_MS); then it is UNAVAILABLE. */
  checkBudgetMs?: number;
  /** Where the meter keeps its counts: with "redis", a traced decision's charge is a Redis span. */
  limitsBackend?: "memory" | "redis";
}

const CHARGE_ATTRIBUTES = backendAttributes("redis", "charge");
const PEEK_ATTRIBUTES = backendAttributes("redis", "peek");

// Denials that carry no per-request data are built once.
const FIXED: Readonly<Record<"MISSING_CREDENTIAL" | "MALFORMED_KEY" | "UNKNOWN_KEY", Deny>> = {
  MISSING_CREDENTIAL: { allow: false, reason: "MISSING_CREDENTIAL", message: DENIALS.MISSING_CREDENTIAL.message },
  MALFORMED_KEY: { allow: false, reason: "MALFORMED_KEY", message: DENIALS.MALFORMED_KEY.message },
  UNKNOWN_KEY: { allow: false, reason: "UNKNOWN_KEY", message: DENIALS.UNKNOWN_KEY.message },
};

// VerifyKey answers for a bare key: there is no request whose headers would go upstream.
const NO_HEADERS: readonly string[] = [];
const NOTHING_FORWARDED: ReadonlyArray<readonly [string, string]> = [];

/** The prefix of a forwarded metadata entry's header. */
export const METADATA_HEADER_PREFIX = "x-keygate-meta-";

// A value forwarded as a header: printable ASCII, no space at either end. Anything else (line
// breaks above all) is left out rather than sent.
const HEADER_VALUE = /^[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?$/;

// A key state that refuses, and the denial it is.
const KEY_STATE_DENIALS = { revoked: "KEY_REVOKED", rotated: "KEY_ROTATED", expired: "KEY_EXPIRED", disabled: "KEY_DISABLED" } as const satisfies Record<string, DenyReason>;
const KEY_STATE_REFUSALS: ReadonlySet<DenyReason> = new Set(Object.values(KEY_STATE_DENIALS));

function deny(reason: DenyReason, snapshot: CheckSnapshot, message = DENIALS[reason].message): Deny {
  return { allow: false, reason, message, snapshot };
}

/**
 * Records an allowed Check's use of `key` unless the last use on record is less than
 * `resolutionMs` old: a busy key then costs the write-behind one row, and the store one write,
 * once a resolution instead of once a flush. The snapshot's time moves on with each use recorded,
 * so this replica records the next one a resolution later; a replica that read the key before
 * another's write may record once more, which the store's never-backwards update makes harmless.
 * A time on record later than now (another replica's clock) counts as recent.
 */
export function recordUse(lastUsed: Pick<LastUsedRecorder, "record">, key: CheckedKey, nowMs: number, resolutionMs: number): void {
  const onRecord = key.lastUsedAtMs;
  if (onRecord !== null && nowMs - onRecord < resolutionMs) return;
  key.lastUsedAtMs = nowMs;
  lastUsed.record(key.id, nowMs);
}

/** One policy and what is derived from it, built once when it comes into force. */
class PolicyVersion {
  /**
   * The plans by name. An account's plan not among them is refused (UNKNOWN_PLAN), never judged
   * on another; a Map, so no name can read Object.prototype.
   */
  readonly plans: ReadonlyMap<string, Plan>;
  readonly presentCredentials: PresentCredentialHeaders;
  /** [metadata name, header name] of each forwarded entry. */
  readonly forward: ReadonlyArray<readonly [string, string]>;
  /** The header names of `forward`. */
  readonly forwardHeaders: readonly string[];
  /** lastUsedResolutionSeconds in milliseconds (recordUse). */
  readonly lastUsedResolutionMs: number;
  /** Every quota name some plan lists: a route (or the proxy) naming another is misconfigured. */
  readonly quotaNames: ReadonlySet<string>;
  /** The scopes a key can hold: a per-route required scope outside it is the proxy's mistake. */
  readonly scopeCatalog: ReadonlySet<string>;

  constructor(
    readonly policy: PipelineDeps["policy"],
    readonly routes: RouteTable,
    readonly credentialHeaders: readonly string[],
  ) {
    this.plans = new Map(Object.entries(policy.plans));
    if (!this.plans.has(policy.defaultPlan)) throw new Error(`default plan "${policy.defaultPlan}" is not configured`);
    this.presentCredentials = new PresentCredentialHeaders(credentialHeaders);
    this.forward = (policy.forwardMetadata ?? []).map((name) => [name, `${METADATA_HEADER_PREFIX}${name}`] as const);
    this.forwardHeaders = this.forward.map(([, header]) => header);
    this.lastUsedResolutionMs = (policy.lastUsedResolutionSeconds ?? DEFAULT_LAST_USED_RESOLUTION_SECONDS) * 1000;
    this.quotaNames = new Set(Object.values(policy.plans).flatMap((p) => Object.keys(p.quotas)));
    this.scopeCatalog = new Set(policy.scopes.catalog);
  }
}

/** The plan's cap for a named quota; null (unlimited on this plan) when the plan does not list it. */
function namedQuota(plan: Plan, quota: string): number | null {
  return Object.hasOwn(plan.quotas, quota) ? (plan.quotas[quota] ?? null) : null;
}

/**
 * The decision, in the order DESIGN.md fixes: credential, shape and checksum, lookup,
 * key state, project lock, subscription, scopes, then the rate and quota slots. The first
 * step that refuses ends it, so nothing is charged for a request that is refused anyway.
 */
export class DecisionPipeline {
  readonly #calendar = new UtcCalendar();
  /** The policy in force; a decision reads the one it started with to its end. */
  #version: PolicyVersion;

  readonly #checkBudgetMs: number;

  constructor(private readonly deps: PipelineDeps) {
    this.#version = new PolicyVersion(deps.policy, deps.routes, deps.credentialHeaders);
    this.#checkBudgetMs = deps.checkBudgetMs ?? DEFAULT_CHECK_BUDGET_MS;
  }

  /**
   * Puts a new policy in force (a live reload). Decisions already started finish on the version
   * they started with; the next one reads this.
   */
  reconfigure(policy: PipelineDeps["policy"], routes: RouteTable, credentialHeaders: readonly string[]): void {
    this.#version = new PolicyVersion(policy, routes, credentialHeaders);
  }

  /** The key's forwarded metadata as headers. */
  #forwarded(v: PolicyVersion, snapshot: CheckSnapshot): ReadonlyArray<readonly [string, string]> {
    if (v.forward.length === 0) return NOTHING_FORWARDED;
    const { metadata } = snapshot.key;
    const out: Array<readonly [string, string]> = [];
    for (const [name, header] of v.forward) {
      const value = Object.hasOwn(metadata, name) ? metadata[name] : undefined;
      if (value !== undefined && HEADER_VALUE.test(value)) out.push([header, value]);
    }
    return out;
  }

  /** Decides a proxied request. Synchronous when the key is in L1. */
  decide(input: CheckInput): Decision | Promise<Decision> {
    const v = this.#version;
    const credential = extractCredential(input.headers, v.credentialHeaders);
    if (!credential.ok) return FIXED[credential.reason];
    if (!this.deps.format.isWellFormed(credential.key)) return FIXED.MALFORMED_KEY;
    // After the credential's shape (a keyless or malformed request is a 401 whatever its path, and
    // a flood of bad keys pays nothing for routing) and before the lookup: a path with no canonical
    // form, or unusable per-route settings, is refused before anything is looked up or charged.
    const route = v.routes.requirements(input.method, input.path, input.contextExtensions, v.scopeCatalog);
    if (route instanceof RouteRefusal) return route;
    // A quota no plan lists (a typo in the proxy's per-route settings) would leave the route
    // uncapped on every plan: refused as the proxy's mistake, never allowed on a guess.
    if (route.quota !== null && !v.quotaNames.has(route.quota)) return ROUTE_CONFIG_REFUSALS.unknownQuota;
    const trace = input.trace;
    // A key in L1 is judged here and now, without the closure a lookup waits with.
    const hash = this.deps.hasher.hash(credential.key);
    const cached = this.deps.lookup.peek(hash);
    if (cached !== undefined) {
      if (trace !== undefined) trace.cacheTier = "l1";
      return this.#judge(v, cached, v.presentCredentials.of(input.headers), route, true, trace, this.#checkBudgetMs);
    }
    // An embedded store answers in this turn (a traced decision takes the path its spans follow).
    const read = trace === undefined ? this.deps.lookup.loadNow(hash) : undefined;
    if (read !== undefined) return this.#judge(v, read, v.presentCredentials.of(input.headers), route, true, trace, this.#checkBudgetMs);
    // A lookup that answers after the budget ran out is not judged: the Check was answered
    // UNAVAILABLE, and a refused request is never charged or counted as used. What is left of
    // the budget then bounds the limits step.
    const startedMs = performance.now();
    return withinBudget(this.deps.lookup.load(hash, trace), this.#checkBudgetMs).then((snapshot) =>
      this.#judge(v, snapshot, v.presentCredentials.of(input.headers), route, true, trace, Math.max(0, this.#checkBudgetMs - (performance.now() - startedMs))),
    );
  }

  /** VerifyKey: the same steps for a bare key, with optional requirements, charging nothing. */
  async verify(key: string, route: RouteRequirements): Promise<Decision> {
    const v = this.#version;
    if (!this.deps.format.isWellFormed(key)) return FIXED.MALFORMED_KEY;
    const hash = this.deps.hasher.hash(key);
    const cached = this.deps.lookup.peek(hash);
    // undefined: not in L1; null: in L1 as unknown.
    const snapshot = cached !== undefined ? cached : await this.deps.lookup.load(hash, undefined);
    return this.#judge(v, snapshot, NO_HEADERS, route, false, undefined, this.#checkBudgetMs);
  }

  /**
   * Records the use of a key VerifyKey answered valid for, as an allowed Check records its use
   * (recordUse: the same write-behind and resolution, no store write of its own).
   */
  recordVerifiedUse(decision: Allow): void {
    recordUse(this.deps.lastUsed, decision.snapshot.key, this.deps.nowMs(), this.#version.lastUsedResolutionMs);
  }

  /**
   * ChargeUsage: one metered use costing `cost` credits, by an account (and one of its keys, when
   * given), without a request: the daily quota and credits a Check on a metered route uses, in the
   * same meter and as atomically. Charges have a rate bucket of their own per account
   * (limits.chargeRateLimit), so backend charging never uses up the account's Check rate.
   * `idempotencyKey` (unique per owner) goes to the meter (ChargeInput.idempotencyKey), with
   * `idempotencyFingerprint`, what the charge is as the caller's ledger compares it.
   */
  async chargeUsage(
    account: Pick<AccountRecord, "ownerId" | "plan" | "subscriptionStatus">,
    key: CheckedKey | null,
    cost: number,
    quotaName: string | null,
    idempotencyKey: string,
    /** The charge as asked, before the test-mode adjustments below (ChargeInput.idempotencyFingerprint). */
    idempotencyFingerprint: string,
    /** An earlier call with the key failed having recorded nothing (IdempotencyLedger.once). */
    afterFailure = false,
    /** Whether the call still holds its key's claim (IdempotencyLedger.once); none: it always does. */
    confirmClaim?: ConfirmClaim,
  ): Promise<UsageCharge> {
    const nowMs = this.deps.nowMs();
    const keyId = key === null ? "" : key.id;
    const refused = (reason: DenyReason, limits: ChargeResult | null, message = DENIALS[reason].message): UsageCharge => {
      this.deps.usage.record(account.ownerId, keyId, this.#calendar.day(nowMs), DENIALS[reason].code, 0);
      return { charged: false, reason, message, limits, retryAfterSeconds: limits?.retryAfterSeconds ?? null, replayed: limits?.replayed ?? false };
    };
    if (key !== null) {
      const state = keyState(key, nowMs);
      if (state !== "active" && state !== "grace") return refused(KEY_STATE_DENIALS[state], null);
    }
    if (account.subscriptionStatus !== "active") return refused("PLAN_REQUIRED", null);
    const v = this.#version;
    const plan = v.plans.get(account.plan);
    if (plan === undefined) return refused("UNKNOWN_PLAN", null);
    // A test key's charge uses the test-mode quota and spends nothing, as its Checks do.
    const test = key !== null && key.mode === "test";
    const quota = test ? null : quotaName;
    const input: ChargeInput = {
      ownerId: account.ownerId,
      bucketKind: test ? "ut" : "u",
      bucketId: account.ownerId,
      rate: v.policy.limits.chargeRateLimit,
      dailyQuota: test ? (v.policy.testMode?.dailyQuota ?? null) : quota === null ? plan.dailyQuota : namedQuota(plan, quota),
      countsDaily: true,
      monthlyCredits: test ? null : plan.monthlyCredits,
      cost: test ? 0 : cost,
      nowMs,
      meter: test ? "test" : "live",
      quota,
      idempotencyKey,
      idempotencyFingerprint,
      recordReplay: afterFailure,
      confirmClaim,
      budgetExpired: false,
    };
    const limits = await this.deps.meter.charge(input);
    // Answered from the charge Redis kept for this key: the call that kept it counted it and its
    // spend, unless it failed before it could (afterFailure): then it is recorded here, once.
    if (limits.replayed && !afterFailure) {
      const message = limits.reason === null ? "" : limitMessage(limits, input);
      return { charged: limits.allowed, reason: limits.reason, message, limits, retryAfterSeconds: limits.retryAfterSeconds, replayed: true };
    }
    const spent = limits.spent === null ? 0 : limits.spent.monthly + limits.spent.topup;
    if (limits.spent !== null && spent > 0) this.deps.usage.spend(account.ownerId, limits.spent.period, limits.spent.monthly, limits.spent.topup);
    if (!limits.allowed && limits.reason !== null) return refused(limits.reason, limits, limitMessage(limits, input));
    this.deps.usage.record(account.ownerId, keyId, this.#calendar.day(nowMs), allowedOutcome(test ? "test" : "live", quota), spent);
    return { charged: true, reason: null, message: "", limits, retryAfterSeconds: null, replayed: limits.replayed };
  }

  /** The limits step; a Redis meter's call is a span of a traced decision. */
  #charge(input: ChargeInput, trace: DecisionTrace | undefined): ChargeResult | Promise<ChargeResult> {
    if (trace === undefined || this.deps.limitsBackend !== "redis") return this.deps.meter.charge(input);
    return traceCall(trace, REDIS_CHARGE_SPAN, CHARGE_ATTRIBUTES, () => this.deps.meter.charge(input));
  }

  #judge(
    v: PolicyVersion,
    snapshot: CheckSnapshot | null,
    credentialHeaders: readonly string[],
    route: RouteRequirements,
    charge: boolean,
    trace: DecisionTrace | undefined,
    /** The most the limits step may wait (what is left of the Check's budget). */
    budgetMs: number,
  ): Decision | Promise<Decision> {
    if (snapshot === null) return FIXED.UNKNOWN_KEY;
    const nowMs = this.deps.nowMs();
    const plan = v.plans.get(snapshot.account.plan);
    const refusal = this.#refusal(snapshot, plan, route, nowMs);
    if (refusal !== null) {
      if (!charge) return refusal;
      // Without a plan there are no limits to report; nor to a key that no longer authenticates
      // (revoked, rotated, expired, disabled): its holder learns nothing of the account's balance,
      // plan or traffic.
      if (plan !== undefined && !KEY_STATE_REFUSALS.has(refusal.reason)) {
        return this.#withLimitHeaders(refusal, snapshot, this.#chargeInput(v, snapshot, plan, route, nowMs), trace, budgetMs);
      }
      this.#count(snapshot, nowMs, DENIALS[refusal.reason].code, 0);
      return refusal;
    }
    // #refusal refuses every account whose plan the policy does not have.
    if (plan === undefined) throw new Error(`plan "${snapshot.account.plan}" is not configured, yet it was not refused`);
    if (!charge) return { allow: true, snapshot, credentialHeaders, route, limits: null, forwarded: this.#forwarded(v, snapshot), forwardHeaders: v.forwardHeaders };
    const limitsInput = this.#chargeInput(v, snapshot, plan, route, nowMs);
    const charged = this.#charge(limitsInput, trace);
    if (!(charged instanceof Promise)) return this.#afterLimits(v, snapshot, credentialHeaders, route, charged, limitsInput);
    // Only a decision that waits on a backend (the store, the Redis meter) needs the budget. Once
    // it runs out the meter learns so from its input (budgetExpired): it charges nothing not yet
    // sent, and gives back an allow that comes back later. The Check was answered UNAVAILABLE, so
    // a late answer is neither counted nor recorded as a use (the budget's rejection stands).
    return withinBudget(
      charged.then((limits) => {
        if (limitsInput.budgetExpired) throw new CheckBudgetExceededError(budgetMs);
        return this.#afterLimits(v, snapshot, credentialHeaders, route, limits, limitsInput);
      }),
      budgetMs,
      limitsInput,
    );
  }

  /**
   * Key state, project lock, subscription (on a plan the policy has; `plan` is undefined when it
   * does not), scopes and role: the steps that cost nothing.
   */
  #refusal(snapshot: CheckSnapshot, plan: Plan | undefined, route: RouteRequirements, nowMs: number): Deny | null {
    const { key, account } = snapshot;
    switch (keyState(key, nowMs)) {
      case "revoked":
        return deny("KEY_REVOKED", snapshot);
      case "rotated":
        return deny("KEY_ROTATED", snapshot);
      case "expired":
        return deny("KEY_EXPIRED", snapshot);
      case "disabled":
        return deny("KEY_DISABLED", snapshot);
      case "active":
      case "grace":
        break;
    }
    if (route.projectId !== null && key.projectId !== null && key.projectId !== route.projectId) {
      return deny("PROJECT_MISMATCH", snapshot);
    }
    if (account.subscriptionStatus !== "active") return deny("PLAN_REQUIRED", snapshot);
    // A plan renamed or removed since the account was put on it: the default plan, or any other,
    // could be unlimited where the account's was not.
    if (plan === undefined) return deny("UNKNOWN_PLAN", snapshot);
    for (const scope of route.requiredScopes) {
      if (!key.scopes.includes(scope)) {
        return deny("MISSING_SCOPE", snapshot, `This API key does not have the "${scope}" scope.`);
      }
    }
    if (route.minRole !== null && ROLES.indexOf(account.role) < ROLES.indexOf(route.minRole)) {
      return deny("MISSING_ROLE", snapshot, `This route needs the "${route.minRole}" role; the API key's account has "${account.role}".`);
    }
    return null;
  }

  #chargeInput(v: PolicyVersion, snapshot: CheckSnapshot, plan: Plan, route: RouteRequirements, nowMs: number): ChargeInput {
    const { key, account } = snapshot;
    const ownBucket = key.rateLimit !== null || v.policy.limits.rateLimitPer === "key";
    // A key's own bucket; a key in grace from a rotation charges its successor's, which took this
    // one's at the rotation (Meter.inheritKeyBucket): old and new secret share one limit.
    const keyBucket = key.rotatedToId ?? key.id;
    if (key.mode === "test") {
      // Test keys are counted apart from live keys: their own bucket and quota, no credits.
      const test = v.policy.testMode;
      return {
        ownerId: account.ownerId,
        bucketKind: ownBucket ? "k" : "t",
        bucketId: ownBucket ? keyBucket : account.ownerId,
        rate: key.rateLimit ?? test?.rateLimit ?? this.#rateRule(v, snapshot, plan),
        dailyQuota: route.metered ? (test?.dailyQuota ?? null) : null,
        countsDaily: route.metered,
        monthlyCredits: null,
        cost: 0,
        nowMs,
        meter: "test",
        // Test keys have one daily quota, whatever quota the route names.
        quota: null,
        budgetExpired: false,
      };
    }
    const quota = route.metered ? route.quota : null;
    return {
      ownerId: account.ownerId,
      bucketKind: ownBucket ? "k" : "a",
      bucketId: ownBucket ? keyBucket : account.ownerId,
      rate: this.#rateRule(v, snapshot, plan),
      // An unmetered route counts toward no quota and spends nothing; a named quota the plan
      // does not list is unlimited on it.
      dailyQuota: !route.metered ? null : quota === null ? plan.dailyQuota : namedQuota(plan, quota),
      countsDaily: route.metered,
      monthlyCredits: plan.monthlyCredits,
      cost: route.metered ? route.cost : 0,
      nowMs,
      meter: "live",
      quota,
      budgetExpired: false,
    };
  }

  /**
   * A refusal of a known key still tells the caller where it stands on its limits, charging
   * nothing, and is counted. If the limits cannot be read, the refusal goes out without those
   * headers. One whose limits are read after the budget ran out was answered UNAVAILABLE instead,
   * and is not counted.
   */
  #withLimitHeaders(refusal: Deny, snapshot: CheckSnapshot, input: ChargeInput, trace: DecisionTrace | undefined, budgetMs: number): Deny | Promise<Deny> {
    const code = DENIALS[refusal.reason].code;
    let peeked: ChargeResult | Promise<ChargeResult>;
    try {
      peeked =
        trace === undefined || this.deps.limitsBackend !== "redis"
          ? this.deps.meter.peek(input)
          : traceCall(trace, REDIS_PEEK_SPAN, PEEK_ATTRIBUTES, () => this.deps.meter.peek(input));
    } catch {
      this.#count(snapshot, input.nowMs, code, 0);
      return refusal;
    }
    if (!(peeked instanceof Promise)) {
      this.#count(snapshot, input.nowMs, code, 0);
      refusal.limits = peeked;
      return refusal;
    }
    const attach = (limits: ChargeResult | null): Deny => {
      if (input.budgetExpired) return refusal;
      this.#count(snapshot, input.nowMs, code, 0);
      if (limits !== null) refusal.limits = limits;
      return refusal;
    };
    return withinBudget(peeked.then(attach, () => attach(null)), budgetMs, input);
  }

  /** The key's own limit, else its account role's tier, else the plan's. */
  #rateRule(v: PolicyVersion, snapshot: CheckSnapshot, plan: Plan): RateLimitRule {
    return snapshot.key.rateLimit ?? v.policy.limits.roleRateLimits[snapshot.account.role] ?? plan.rateLimit;
  }

  #afterLimits(v: PolicyVersion, snapshot: CheckSnapshot, credentialHeaders: readonly string[], route: RouteRequirements, limits: ChargeResult, input: ChargeInput): Decision {
    const { nowMs } = input;
    // Credits count as used only when the plan is metered and they were actually spent.
    const spent = limits.spent === null ? 0 : limits.spent.monthly + limits.spent.topup;
    if (limits.spent !== null && spent > 0) {
      this.deps.usage.spend(snapshot.account.ownerId, limits.spent.period, limits.spent.monthly, limits.spent.topup);
    }
    if (limits.allowed || limits.reason === null) {
      const test = snapshot.key.mode === "test";
      this.#count(snapshot, nowMs, route.metered ? allowedOutcome(snapshot.key.mode, test ? null : route.quota) : ALLOWED_UNMETERED, spent);
      recordUse(this.deps.lastUsed, snapshot.key, nowMs, v.lastUsedResolutionMs);
      return { allow: true, snapshot, credentialHeaders, route, limits, forwarded: this.#forwarded(v, snapshot), forwardHeaders: v.forwardHeaders };
    }
    this.#count(snapshot, nowMs, DENIALS[limits.reason].code, 0);
    const refused = deny(limits.reason, snapshot, limitMessage(limits, input));
    refused.limits = limits;
    if (limits.retryAfterSeconds !== null) refused.retryAfterSeconds = limits.retryAfterSeconds;
    return refused;
  }

  /** Counts one request: `outcome` is ALLOWED, ALLOWED_UNMETERED or the denial's public code. */
  #count(snapshot: CheckSnapshot, nowMs: number, outcome: string, credits: number): void {
    this.deps.usage.record(snapshot.account.ownerId, snapshot.key.id, this.#calendar.day(nowMs), outcome, credits);
  }
}

/**
 * The words of a limits refusal: what ran out and when it comes back. An allowance of 0 (a daily
 * quota, a plan's monthly credits) never comes back, so none is promised.
 */
function limitMessage(limits: ChargeResult, input: Pick<ChargeInput, "cost" | "monthlyCredits" | "meter">): string {
  switch (limits.reason) {
    case "RATE_LIMITED":
      return `Rate limit of ${limits.rate.limit} requests per ${describeWindow(limits.rate.windowSeconds)} exceeded. Retry in ${limits.retryAfterSeconds ?? 1} seconds.`;
    case "QUOTA_EXCEEDED": {
      const name = limits.quota?.name ?? null;
      if (noQuotaAllowance(limits.quota)) {
        if (input.meter === "test") return "Test-mode keys include no requests (a daily quota of 0).";
        return name === null ? NO_QUOTA_ALLOWANCE.message : `The plan includes no "${name}" requests (a daily quota of 0).`;
      }
      const resets = new Date(limits.quota?.resetAtMs ?? 0).toISOString();
      if (name !== null) return `The daily "${name}" quota of ${limits.quota?.limit ?? 0} is used up. It resets at ${resets}.`;
      return `The daily quota of ${limits.quota?.limit ?? 0} requests is used up. It resets at ${resets}.`;
    }
    case "INSUFFICIENT_CREDITS": {
      const { cost } = input;
      const short = `This request costs ${cost} credit${cost === 1 ? "" : "s"} and the account has ${limits.credits?.balance ?? 0} left.`;
      // A plan of top-ups only: the monthly renewal adds nothing.
      return input.monthlyCredits === 0 ? `${short} Add credits.` : `${short} Add credits or wait for the monthly renewal.`;
    }
    case null:
      return "";
  }
}

/** "minute" for 60, "hour" for 3600, "day" for 86400, else "N seconds". */
export function describeWindow(windowSeconds: number): string {
  if (windowSeconds === 60) return "minute";
  if (windowSeconds === 3600) return "hour";
  if (windowSeconds === 86_400) return "day";
  if (windowSeconds === 1) return "second";
  return `${windowSeconds} seconds`;
}
