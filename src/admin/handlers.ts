import { create } from "@bufbuild/protobuf";
import { timestampFromMs, timestampMs } from "@bufbuild/protobuf/wkt";
import type { Timestamp } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createContextKey } from "@connectrpc/connect";
import type { ConnectRouter, HandlerContext, Interceptor, ServiceImpl } from "@connectrpc/connect";
import type { Logger } from "pino";
import type { MessageInitShape } from "@bufbuild/protobuf";
import {
  AccountSchema,
  ApiKeySchema,
  AuditEventSchema,
  GetUsageResponseSchema,
  KeyAdmin,
  UsageCountsSchema,
  VerifyKeyResponseSchema,
  ChargeUsageResponseSchema,
} from "../gen/keygate/v1/key_admin_pb.js";
import type { Account, ApiKey } from "../gen/keygate/v1/key_admin_pb.js";
import { DENIALS } from "../authz/reasons.js";
import { CacheUnavailableError } from "../cache/cache.js";
import { CapExceededError, StoreUnavailableError } from "../store/errors.js";
import { IdempotencyInProgressError, IdempotencyUnavailableError } from "../limits/idempotency.js";
import { MeterUnavailableError } from "../limits/limits.js";
import { limitHeaders } from "../authz/rate-headers.js";
import { METHOD_PERMISSIONS, missingPermission } from "./permissions.js";
import { checkKeyId } from "./vocabulary.js";
import type { Permission } from "./permissions.js";
import { keyState } from "../store/store.js";
import type { KeyRecord } from "../store/store.js";
import { admittedGenerationKey } from "./auth.js";
import type { AdminGate } from "./auth.js";
import { FailedPreconditionError, InvalidArgumentError, NotFoundError } from "./errors.js";
import { MAX_EXPIRES_AT_MS } from "./lifecycle.js";
import type { AccountView, Actor, ChargeUsageAnswer, LifecycleService } from "./lifecycle.js";
import type { UsageCounts } from "./usage-report.js";
import type { AuditRecord } from "../store/store.js";

/** The admin token id of the caller, set by the auth interceptor. */
export const adminIdentityKey = createContextKey<string>("", { description: "admin token id" });
/** Nothing: the permissions of a call no token admitted. */
export const NO_PERMISSIONS: ReadonlySet<Permission> = new Set();
export const adminPermissionsKey = createContextKey<ReadonlySet<Permission>>(NO_PERMISSIONS, { description: "admin token permissions" });
/** The owners an admin token is limited to; null: every owner. */
export const adminOwnersKey = createContextKey<ReadonlySet<string> | null>(null, { description: "admin token owners" });
/** The caller's network address, set by the admin server for each request. */
export const sourceAddressKey = createContextKey<string>("", { description: "source address" });

function actorOf(ctx: HandlerContext): Actor {
  return { tokenId: ctx.values.get(adminIdentityKey), source: ctx.values.get(sourceAddressKey) };
}

function permissionsOf(ctx: HandlerContext): ReadonlySet<Permission> {
  return ctx.values.get(adminPermissionsKey);
}

function ts(ms: number | null): Timestamp | undefined {
  return ms === null ? undefined : timestampFromMs(ms);
}

// Proto3 conventions stop here: the domain (lifecycle.ts) takes undefined for "not set" where the
// wire has "", and numbers where the wire has int64.

/** A proto3 string field: "" is "not set". */
function unset(value: string): string | undefined {
  return value === "" ? undefined : value;
}

/** An int64 as a number; one beyond the safe range reads as NaN, which every range check refuses. */
function wholeNumber(value: bigint): number {
  return value > BigInt(Number.MAX_SAFE_INTEGER) || value < BigInt(Number.MIN_SAFE_INTEGER) ? Number.NaN : Number(value);
}

function toApiKey(key: KeyRecord, nowMs: number): ApiKey {
  return create(ApiKeySchema, {
    id: key.id,
    ownerId: key.ownerId,
    projectId: key.projectId ?? "",
    name: key.name,
    mode: key.mode,
    start: key.start,
    last4: key.last4,
    scopes: key.scopes,
    createdAt: ts(key.createdAtMs),
    lastUsedAt: ts(key.lastUsedAtMs),
    // An expiry past the last Timestamp JSON can write (stored before CreateKey bounded it) is
    // shown as that last one: the key would otherwise make its owner's list unreadable as JSON.
    expiresAt: ts(key.expiresAtMs === null ? null : Math.min(key.expiresAtMs, MAX_EXPIRES_AT_MS)),
    revokedAt: ts(key.revokedAtMs),
    graceEndsAt: ts(key.graceEndsAtMs),
    rotatedToId: key.rotatedToId ?? "",
    state: keyState(key, nowMs),
    metadata: key.metadata,
    revokeReason: key.revokeReason ?? "",
    rateLimit: key.rateLimit === null ? undefined : { limit: key.rateLimit.limit, windowSeconds: key.rateLimit.windowSeconds },
    disabledAt: ts(key.disabledAtMs),
  });
}

function toAccount(view: AccountView): Account {
  const { account } = view;
  return create(AccountSchema, {
    ownerId: account.ownerId,
    plan: account.plan,
    subscriptionStatus: account.subscriptionStatus,
    role: account.role,
    activeKeyCount: view.activeKeyCount,
    maxActiveKeys: view.maxActiveKeys,
    activeTestKeyCount: view.activeTestKeyCount,
    maxActiveTestKeys: view.maxActiveTestKeys,
    createdAt: ts(account.createdAtMs),
    updatedAt: ts(account.updatedAtMs),
    creditBalance: BigInt(view.credits.balance),
    monthlyCredits: BigInt(view.credits.monthlyCredits),
    topupCredits: BigInt(view.credits.topupCredits),
    dailyQuota: view.dailyQuota === null ? undefined : BigInt(view.dailyQuota),
    rateLimit: { limit: view.rateLimit.limit, windowSeconds: view.rateLimit.windowSeconds },
  });
}

function toAuditEvent(record: AuditRecord): MessageInitShape<typeof AuditEventSchema> {
  return {
    id: record.id,
    time: timestampFromMs(record.atMs),
    actor: record.actor,
    action: record.action,
    keyId: record.keyId ?? "",
    ownerId: record.ownerId ?? "",
    changes: Object.fromEntries(Object.entries(record.changes).map(([field, value]) => [field, JSON.stringify(value)])),
    source: record.source,
  };
}

function toCounts(counts: UsageCounts): MessageInitShape<typeof UsageCountsSchema> {
  return {
    allowed: BigInt(counts.allowed),
    denied: Object.fromEntries(Object.entries(counts.denied).map(([code, n]) => [code, BigInt(n)])),
    creditsUsed: BigInt(counts.creditsUsed),
  };
}

/** The limit headers a Check's answer would carry, for a ChargeUsage (or a charging VerifyKey). */
function chargeHeaders(answer: ChargeUsageAnswer): Record<string, string> {
  const headers: Record<string, string> = {};
  if (answer.charge.retryAfterSeconds !== null) headers["retry-after"] = String(answer.charge.retryAfterSeconds);
  if (answer.charge.limits !== null) for (const [name, value] of limitHeaders(answer.charge.limits, answer.atMs)) headers[name] = value;
  return headers;
}

/** Maps domain errors to Connect codes. Unexpected errors are logged and shown as INTERNAL. */
export function toConnectError(error: unknown, logger: Logger): ConnectError {
  if (error instanceof ConnectError) return error;
  if (error instanceof InvalidArgumentError) return new ConnectError(error.message, Code.InvalidArgument);
  if (error instanceof NotFoundError) return new ConnectError(error.message, Code.NotFound);
  if (error instanceof FailedPreconditionError) return new ConnectError(error.message, Code.FailedPrecondition);
  if (error instanceof CapExceededError) return new ConnectError(error.message, Code.ResourceExhausted);
  if (error instanceof CacheUnavailableError) {
    logger.warn({ err: error }, "cache invalidation failed");
    return new ConnectError(error.message, Code.Unavailable);
  }
  if (error instanceof IdempotencyInProgressError) return new ConnectError(error.message, Code.Aborted);
  if (error instanceof IdempotencyUnavailableError) {
    logger.warn({ err: error.cause }, "idempotency ledger unavailable");
    return new ConnectError(error.message, Code.Unavailable);
  }
  if (error instanceof MeterUnavailableError) {
    return new ConnectError(
      "usage cannot be charged: Redis is unavailable; retry shortly with the same idempotency_key (a charge Redis received before failing is not made twice)",
      Code.Unavailable,
    );
  }
  if (error instanceof StoreUnavailableError) {
    logger.warn({ err: error }, "store unavailable");
    return new ConnectError("the key store is unavailable; retry shortly", Code.Unavailable);
  }
  logger.error({ err: error }, "KeyAdmin call failed");
  return new ConnectError("internal error", Code.Internal);
}

/**
 * Rejects calls without a valid admin token, and records the caller's token id. The admin
 * server admits a call before its body is read and passes the token id in adminIdentityKey;
 * a call that arrives here without one (routes mounted some other way) is admitted here, so
 * no route is ever reachable without a token. An address that keeps failing is refused with
 * RESOURCE_EXHAUSTED before its token is even compared. A call admitted before a reload of the
 * tokens is checked again here, against the tokens the reload put in force.
 */
export function adminAuthInterceptor(gate: AdminGate, logger: Logger): Interceptor {
  return (next) => async (req) => {
    const values = req.contextValues;
    const source = values.get(sourceAddressKey);
    const admittedAs = values.get(adminIdentityKey);
    // The body of a call arrives after its admission, for up to the request timeout: a token a
    // reload removed or narrowed in between must not finish the call under its old grant.
    const reloaded = admittedAs !== "" && values.get(admittedGenerationKey) !== gate.generation;
    if (admittedAs === "" || reloaded) {
      const authorization = req.header.get("authorization");
      const admission = reloaded ? gate.readmit(authorization) : gate.admit(source, authorization);
      if (!admission.ok) {
        if (admission.refusal === "blocked") throw new ConnectError(admission.message, Code.ResourceExhausted);
        if (reloaded) logger.warn({ source, method: req.method.name, tokenId: admittedAs }, "admin call refused: a reload removed its token");
        else logger.warn({ source, method: req.method.name }, "admin authentication failed");
        throw new ConnectError(admission.message, Code.Unauthenticated);
      }
      values.set(adminIdentityKey, admission.tokenId);
      values.set(adminPermissionsKey, admission.permissions);
      values.set(adminOwnersKey, admission.owners);
      values.set(admittedGenerationKey, admission.generation);
    }
    // Checked here as well as in the admin server: no route is reachable without its permission.
    const needed = METHOD_PERMISSIONS.get(req.method.name);
    const tokenId = req.contextValues.get(adminIdentityKey);
    if (needed === undefined) throw new ConnectError(`${req.method.name} has no permission assigned; refusing it`, Code.PermissionDenied);
    if (!req.contextValues.get(adminPermissionsKey).has(needed)) throw new ConnectError(missingPermission(tokenId, needed, req.method.name), Code.PermissionDenied);
    return next(req);
  };
}

/** The owner and/or key a call acts for; `keyField` is the key id's field name in the request ("id" unless named). */
interface Subject {
  ownerId?: string;
  keyId?: string;
  keyField?: string;
}

/** KeyAdmin handlers: translate between proto and the lifecycle domain, nothing more. */
export function keyAdminRoutes(service: LifecycleService, nowMs: () => number, logger: Logger): (router: ConnectRouter) => void {
  /**
   * A token limited to listed owners may act only for them: `subject` names the owner and/or key
   * a call acts for. Another owner's account is PERMISSION_DENIED; another owner's key reads as
   * one that does not exist, so key ids of other owners are not confirmed.
   */
  const checkSubject = async (ctx: HandlerContext, subject: Subject): Promise<void> => {
    const owners = ctx.values.get(adminOwnersKey);
    if (owners === null) return;
    const tokenId = ctx.values.get(adminIdentityKey);
    if (subject.keyId !== undefined && subject.keyId !== "") {
      // Named as the caller sent it (key_id on ChargeUsage and ListAuditEvents), before the lookup.
      checkKeyId(subject.keyField ?? "id", subject.keyId);
      const key = await service.getKey(subject.keyId);
      if (!owners.has(key.ownerId)) throw new NotFoundError(`key ${key.id} does not exist`);
      if (subject.ownerId === undefined || subject.ownerId === "") return;
    }
    if (subject.ownerId === undefined || subject.ownerId === "") {
      throw new ConnectError(`the admin token "${tokenId}" is limited to listed owners: name one in owner_id`, Code.PermissionDenied);
    }
    if (!owners.has(subject.ownerId)) throw new ConnectError(`the admin token "${tokenId}" may not act for this owner_id`, Code.PermissionDenied);
  };

  const guard =
    <Req, Res>(fn: (req: Req, actor: Actor, ctx: HandlerContext) => Promise<Res>, subject?: (req: Req) => Subject) =>
    async (req: Req, ctx: HandlerContext): Promise<Res> => {
      try {
        if (subject !== undefined) await checkSubject(ctx, subject(req));
        return await fn(req, actorOf(ctx), ctx);
      } catch (error) {
        throw toConnectError(error, logger);
      }
    };

  const impl: ServiceImpl<typeof KeyAdmin> = {
    upsertAccount: guard(async (req, actor) => ({
      account: toAccount(
        await service.upsertAccount({ ownerId: req.ownerId, plan: req.plan, subscriptionStatus: req.subscriptionStatus, role: req.role }, actor),
      ),
    }), (r) => ({ ownerId: r.ownerId })),
    getAccount: guard(async (req) => ({ account: toAccount(await service.getAccount(req.ownerId)) }), (r) => ({ ownerId: r.ownerId })),
    createKey: guard(async (req, actor) => {
      const issued = await service.createKey({
        ownerId: req.ownerId,
        projectId: unset(req.projectId),
        name: req.name,
        scopes: req.scopes,
        mode: unset(req.mode),
        expiresAtMs: req.expiresAt === undefined ? null : timestampMs(req.expiresAt),
        metadata: req.metadata,
        rateLimit: req.rateLimit === undefined ? undefined : { limit: req.rateLimit.limit, windowSeconds: req.rateLimit.windowSeconds },
      }, actor);
      return { key: toApiKey(issued.key, nowMs()), secret: issued.secret };
    }, (r) => ({ ownerId: r.ownerId })),
    getKey: guard(async (req) => ({ key: toApiKey(await service.getKey(req.id), nowMs()) }), (r) => ({ keyId: r.id })),
    listKeys: guard(async (req) => {
      const page = await service.listKeys({
        ownerId: req.ownerId,
        projectId: unset(req.projectId),
        includeRevoked: req.includeRevoked,
        pageSize: req.pageSize,
        pageToken: unset(req.pageToken),
      });
      const now = nowMs();
      return { keys: page.keys.map((k) => toApiKey(k, now)), nextPageToken: page.nextPageToken };
    }, (r) => ({ ownerId: r.ownerId })),
    updateKey: guard(async (req, actor) => {
      const updated = await service.updateKey({
        id: req.id,
        name: req.name,
        scopes: req.scopes,
        rateLimit: req.rateLimit === undefined ? undefined : { limit: req.rateLimit.limit, windowSeconds: req.rateLimit.windowSeconds },
        clearRateLimit: req.clearRateLimit,
      }, actor);
      return { key: toApiKey(updated, nowMs()) };
    }, (r) => ({ keyId: r.id })),
    revokeKey: guard(async (req, actor) => ({ key: toApiKey(await service.revokeKey({ id: req.id, reason: req.reason }, actor), nowMs()) }), (r) => ({ keyId: r.id })),
    disableKey: guard(async (req, actor) => ({ key: toApiKey(await service.disableKey({ id: req.id, reason: req.reason }, actor), nowMs()) }), (r) => ({ keyId: r.id })),
    enableKey: guard(async (req, actor) => ({ key: toApiKey(await service.enableKey({ id: req.id }, actor), nowMs()) }), (r) => ({ keyId: r.id })),
    rotateKey: guard(async (req, actor) => {
      const rotation = await service.rotateKey({ id: req.id, graceDays: req.graceDays }, actor);
      const now = nowMs();
      return { key: toApiKey(rotation.key, now), secret: rotation.secret, previous: toApiKey(rotation.previous, now) };
    }, (r) => ({ keyId: r.id })),
    verifyKey: guard(async (req, actor, ctx) => {
      if (req.cost !== undefined && !permissionsOf(ctx).has("usage:write")) {
        throw new ConnectError(missingPermission(actor.tokenId, "usage:write", "VerifyKey with a cost"), Code.PermissionDenied);
      }
      const charge = req.cost === undefined ? undefined : { cost: wholeNumber(req.cost), idempotencyKey: req.idempotencyKey, quota: unset(req.quota) };
      const { decision, key, charge: charged } = await service.verifyKey({
        secret: req.secret,
        requiredScopes: req.requiredScopes,
        projectId: unset(req.projectId),
        charge,
        owners: ctx.values.get(adminOwnersKey),
      });
      const now = nowMs();
      const account = key === null ? undefined : toAccount(await service.getAccount(key.ownerId));
      // A refused charge makes a valid key's answer invalid, with the charge's code and message.
      let verdict = { valid: true, code: "OK", message: "" };
      if (!decision.allow) verdict = { valid: false, code: DENIALS[decision.reason].code, message: decision.message };
      else if (charged !== null && charged.charge.reason !== null) verdict = { valid: false, code: DENIALS[charged.charge.reason].code, message: charged.charge.message };
      return create(VerifyKeyResponseSchema, {
        ...verdict,
        key: key === null ? undefined : toApiKey(key, now),
        account,
        charged: charged?.charge.charged ?? false,
        headers: charged === null ? {} : chargeHeaders(charged),
      });
    }),
    chargeUsage: guard(async (req) => {
      const answer = await service.chargeUsage({ ownerId: unset(req.ownerId), keyId: unset(req.keyId), cost: wholeNumber(req.cost), idempotencyKey: req.idempotencyKey, quota: unset(req.quota) });
      const { charge } = answer;
      const headers = chargeHeaders(answer);
      return create(ChargeUsageResponseSchema, {
        charged: charge.charged,
        code: charge.reason === null ? "OK" : DENIALS[charge.reason].code,
        message: charge.message,
        ownerId: answer.ownerId,
        keyId: answer.keyId,
        headers,
        replayed: answer.replayed,
      });
    }, (r) => ({ ownerId: r.ownerId, keyId: r.keyId, keyField: "key_id" })),
    addCredits: guard(async (req, actor) => {
      const added = await service.addCredits({ ownerId: req.ownerId, amount: wholeNumber(req.amount), reason: req.reason, idempotencyKey: unset(req.idempotencyKey) }, actor);
      return { account: toAccount(added.view), replayed: added.replayed };
    }, (r) => ({ ownerId: r.ownerId })),
    listAuditEvents: guard(async (req) => {
      const page = await service.listAudit({
        ownerId: unset(req.ownerId),
        keyId: unset(req.keyId),
        sinceMs: req.since === undefined ? null : timestampMs(req.since),
        pageSize: req.pageSize,
        pageToken: unset(req.pageToken),
      });
      return { events: page.events.map(toAuditEvent), nextPageToken: page.nextPageToken };
    }, (r) => ({ ownerId: r.ownerId, keyId: r.keyId, keyField: "key_id" })),
    getUsage: guard(async (req) => {
      const report = await service.getUsage({ ownerId: req.ownerId, from: req.from, to: req.to, pageSize: req.pageSize, pageToken: unset(req.pageToken) });
      return create(GetUsageResponseSchema, {
        totals: toCounts(report.totals),
        byKey: report.byKey.map((entry) => ({ keyId: entry.keyId, keyName: report.names.get(entry.keyId) ?? "", day: entry.day, usage: toCounts(entry.usage) })),
        nextPageToken: report.nextPageToken,
      });
    }, (r) => ({ ownerId: r.ownerId })),
  };
  return (router) => router.service(KeyAdmin, impl);
}
