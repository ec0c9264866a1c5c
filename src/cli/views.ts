import { timestampDate } from "@bufbuild/protobuf/wkt";
import type { Timestamp } from "@bufbuild/protobuf/wkt";
import type { Account, AddCreditsResponse, ApiKey, AuditEvent, ChargeUsageResponse, GetUsageResponse, RateLimit, UsageCounts, VerifyKeyResponse } from "../gen/keygate/v1/key_admin_pb.js";
import { NONE, details, list, table } from "./format.js";

/** A timestamp as ISO 8601 UTC, or NONE when unset. */
export function time(ts: Timestamp | undefined): string {
  return ts === undefined ? NONE : timestampDate(ts).toISOString();
}

function rate(limit: RateLimit | undefined): string {
  return limit === undefined ? NONE : `${limit.limit}/${limit.windowSeconds}s`;
}

function preview(key: ApiKey): string {
  return `${key.start}…${key.last4}`;
}

/** A label and its text, one line of a details block. */
export type Pair = readonly [string, string];

/** One key's metadata, label by label, then `extra`; lifecycle lines appear only once they apply. */
export function keyDetails(key: ApiKey, extra: readonly Pair[] = []): string {
  const pairs: Pair[] = [
    ["id", key.id],
    ["name", key.name],
    ["owner", key.ownerId],
    ["project", key.projectId === "" ? NONE : key.projectId],
    ["mode", key.mode],
    ["state", key.state],
    ["key", preview(key)],
    ["scopes", list(key.scopes)],
    ["rate limit", key.rateLimit === undefined ? "plan" : rate(key.rateLimit)],
    ["created", time(key.createdAt)],
    ["last used", time(key.lastUsedAt)],
    ["expires", time(key.expiresAt)],
  ];
  if (key.disabledAt !== undefined) pairs.push(["disabled", time(key.disabledAt)]);
  if (key.revokedAt !== undefined) pairs.push(["revoked", time(key.revokedAt)], ["reason", key.revokeReason === "" ? NONE : key.revokeReason]);
  if (key.graceEndsAt !== undefined) pairs.push(["grace ends", time(key.graceEndsAt)]);
  if (key.rotatedToId !== "") pairs.push(["rotated to", key.rotatedToId]);
  return details([...pairs, ...extra]);
}

/** Keys as a table, one row each. */
export function keyTable(keys: readonly ApiKey[]): string {
  const rows = keys.map((k) => [k.id, k.name, k.mode, k.state, preview(k), list(k.scopes), time(k.createdAt), time(k.lastUsedAt)]);
  return table(["ID", "NAME", "MODE", "STATE", "KEY", "SCOPES", "CREATED", "LAST USED"], rows);
}

/** An account with its plan's limits and its credit balance. */
export function accountDetails(account: Account): string {
  return details(accountPairs(account));
}

/** A top-up's account, and a line saying so when its idempotency key had been used: nothing was added. */
export function topUpDetails(answer: AddCreditsResponse): string {
  if (answer.account === undefined) return "";
  const pairs = accountPairs(answer.account);
  if (answer.replayed) pairs.push(["replayed", "yes (the first answer for this idempotency key; nothing added)"]);
  return details(pairs);
}

function accountPairs(account: Account): Pair[] {
  return [
    ["owner", account.ownerId],
    ["plan", account.plan],
    ["subscription", account.subscriptionStatus],
    ["role", account.role],
    ["active keys", `${account.activeKeyCount}/${account.maxActiveKeys}`],
    ["credits", `${account.creditBalance} (monthly ${account.monthlyCredits}, top-up ${account.topupCredits})`],
    ["daily quota", account.dailyQuota === undefined ? "unlimited" : String(account.dailyQuota)],
    ["rate limit", rate(account.rateLimit)],
    ["created", time(account.createdAt)],
    ["updated", time(account.updatedAt)],
  ];
}

/** The verdict on a key, then who it belongs to when the server knows. */
export function verifyDetails(answer: VerifyKeyResponse): string {
  const pairs: Pair[] = [
    ["valid", answer.valid ? "yes" : "no"],
    ["code", answer.code],
    ["message", answer.message === "" ? NONE : answer.message],
  ];
  if (answer.key !== undefined) {
    pairs.push(["key", answer.key.id], ["owner", answer.key.ownerId], ["state", answer.key.state], ["scopes", list(answer.key.scopes)]);
  }
  if (answer.account !== undefined) pairs.push(["plan", answer.account.plan]);
  return details(pairs);
}

export function chargeDetails(answer: ChargeUsageResponse): string {
  const pairs: Pair[] = [
    ["charged", answer.charged === true ? "yes" : "no"],
    ["code", answer.code],
    ["message", answer.message === "" ? NONE : answer.message],
    ["owner", answer.ownerId],
    ["key", answer.keyId === "" ? NONE : answer.keyId],
    ["replayed", answer.replayed ? "yes (the first answer for this idempotency key)" : "no"],
  ];
  for (const [name, value] of Object.entries(answer.headers).sort(([a], [b]) => a.localeCompare(b))) pairs.push([name, value]);
  return details(pairs);
}

function denied(counts: UsageCounts | undefined): string {
  const entries = Object.entries(counts?.denied ?? {}).sort(([a], [b]) => a.localeCompare(b));
  return entries.length === 0 ? "0" : entries.map(([code, n]) => `${code}=${n}`).join(",");
}

/** Usage totals, then a row per key and day. */
export function usageReport(usage: GetUsageResponse): string {
  const totals = details([
    ["allowed", String(usage.totals?.allowed ?? 0n)],
    ["denied", denied(usage.totals)],
    ["credits used", String(usage.totals?.creditsUsed ?? 0n)],
  ]);
  if (usage.byKey.length === 0) return `${totals}\nno usage in this range\n`;
  const rows = usage.byKey.map((u) => [u.day, u.keyId, u.keyName || NONE, String(u.usage?.allowed ?? 0n), denied(u.usage), String(u.usage?.creditsUsed ?? 0n)]);
  return `${totals}\n${table(["DAY", "KEY", "NAME", "ALLOWED", "DENIED", "CREDITS"], rows)}`;
}

/** Audit events as a table; CHANGES names the changed fields (their values are in --json). */
export function auditTable(events: readonly AuditEvent[]): string {
  const rows = events.map((e) => [time(e.time), e.action, e.ownerId || NONE, e.keyId || NONE, e.actor, list(Object.keys(e.changes).sort()), e.source || NONE]);
  return table(["TIME", "ACTION", "OWNER", "KEY", "ACTOR", "CHANGES", "SOURCE"], rows);
}

/** The line that tells how to fetch the next page, or nothing on the last page. */
export function nextPage(token: string): string {
  return token === "" ? "" : `more: --page-token ${token}\n`;
}
