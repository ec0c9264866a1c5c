import { createHash } from "node:crypto";
import { isAllowedOutcome } from "../store/store.js";
import type { UsageKeyDay, UsagePage, UsageRow, UsageTotal } from "../store/store.js";
import { FailedPreconditionError, InvalidArgumentError } from "./errors.js";
import { DAY_PATTERN, encodePageToken } from "./vocabulary.js";

/** GetUsage's by_key rows (key-days) per page: page_size 0 with a page_token means `default`. */
export const USAGE_PAGE_SIZE = { default: 1000, max: 1000 } as const;

/**
 * The most by_key rows of an answer without page_size, as a client from before paging asks: it
 * reads no next_page_token, so past this GetUsage refuses rather than cut the list short. 10,000
 * rows of the usual size (about 100 bytes: a key id, a short name, a denial code or two) are about
 * 1 MB, inside a gRPC client's default 4 MB receive limit, and bound what keygate builds.
 */
export const MAX_UNPAGED_USAGE_ROWS = 10_000;

/** Usage counts of one key and day, or of a whole range. */
export interface UsageCounts {
  allowed: number;
  denied: Record<string, number>;
  creditsUsed: number;
}

/** The owner and days a GetUsage asks about. */
export interface UsageRange {
  ownerId: string;
  from: string;
  to: string;
}

/** Which key-days of the range one GetUsage answers (usagePageOf). */
export interface UsagePageRequest {
  /** The previous page's last key-day; null for the first page. */
  after: UsageKeyDay | null;
  keyDays: number;
  /** False without page_size and page_token: the whole range in one answer, or a refusal. */
  paged: boolean;
}

/** GetUsage: totals over the whole range and one page of the per-key, per-day breakdown. */
export interface UsageReport {
  totals: UsageCounts;
  /** By day, then key id. */
  byKey: Array<{ keyId: string; day: string; usage: UsageCounts }>;
  /** Each key's name now, by id; a key that no longer exists has none. */
  names: ReadonlyMap<string, string>;
  /** "" on the last page. */
  nextPageToken: string;
}

function emptyCounts(): UsageCounts {
  return { allowed: 0, denied: {}, creditsUsed: 0 };
}

function addRow(counts: UsageCounts, row: UsageTotal): void {
  if (isAllowedOutcome(row.outcome)) counts.allowed += row.count;
  else counts.denied[row.outcome] = (counts.denied[row.outcome] ?? 0) + row.count;
  counts.creditsUsed += row.credits;
}

/**
 * A token's check: a digest of the owner, range and position it was made for. One sent with
 * another owner or range is refused, where its position would skip that range's first rows and
 * an invoice built from the pages would be short without a sign of it; so is one edited or cut.
 * Not a secret: it guards against mistakes, and any owner's usage is the caller's to read.
 */
function tokenCheck(range: UsageRange, day: string, keyId: string): string {
  return createHash("sha256").update(`${range.ownerId}\n${range.from}\n${range.to}\n${day}\n${keyId}`).digest("base64url").slice(0, 16);
}

function encodeUsageToken(range: UsageRange, last: UsageKeyDay): string {
  return encodePageToken(`${last.day}|${last.keyId}|${tokenCheck(range, last.day, last.keyId)}`);
}

function decodeUsageToken(range: UsageRange, token: string): UsageKeyDay {
  const text = Buffer.from(token, "base64url").toString("utf8");
  const day = text.slice(6, 16);
  const bar = text.lastIndexOf("|");
  const keyId = text.slice(17, bar);
  if (!text.startsWith("after:") || text[16] !== "|" || bar < 17 || !DAY_PATTERN.test(day) || text.slice(bar + 1) !== tokenCheck(range, day, keyId)) {
    throw new InvalidArgumentError("page_token", "is not a token from a previous response");
  }
  return { day, keyId };
}

/** The part of `range` that page_size and page_token ask for; INVALID_ARGUMENT naming either when bad. */
export function usagePageOf(range: UsageRange, pageSize: number, pageToken: string | undefined): UsagePageRequest {
  if (!Number.isInteger(pageSize) || pageSize < 0 || pageSize > USAGE_PAGE_SIZE.max) {
    throw new InvalidArgumentError("page_size", `must be between 0 and ${USAGE_PAGE_SIZE.max}`);
  }
  if (pageSize === 0 && pageToken === undefined) return { after: null, keyDays: MAX_UNPAGED_USAGE_ROWS, paged: false };
  return { after: pageToken === undefined ? null : decodeUsageToken(range, pageToken), keyDays: pageSize === 0 ? USAGE_PAGE_SIZE.default : pageSize, paged: true };
}

function byDayThenKey(a: UsageKeyDay, b: UsageKeyDay): number {
  if (a.day !== b.day) return a.day < b.day ? -1 : 1;
  return a.keyId < b.keyId ? -1 : a.keyId > b.keyId ? 1 : 0;
}

/**
 * Folds one page into the answer: the store's page (of `request.keyDays + 1` key-days, the one
 * past it telling whether another page exists) and totals, with `pending`, this replica's rows of
 * the range not in the store yet, added where they fall. A key-day the store holds past its page
 * sorts after all of that page, so it is cut before it would be answered without its stored rows.
 * An answer without page_size past MAX_UNPAGED_USAGE_ROWS is refused (FAILED_PRECONDITION).
 */
export function usageReportPage(range: UsageRange, request: UsagePageRequest, stored: UsagePage, pending: readonly UsageRow[]): Omit<UsageReport, "names"> {
  const totals = emptyCounts();
  for (const total of stored.totals) addRow(totals, total);
  for (const row of pending) addRow(totals, row);
  const { after } = request;
  const entries = new Map<string, { keyId: string; day: string; usage: UsageCounts }>();
  for (const row of [...stored.rows, ...pending]) {
    if (after !== null && byDayThenKey(row, after) <= 0) continue;
    const id = `${row.day}|${row.keyId}`;
    let entry = entries.get(id);
    if (entry === undefined) {
      entry = { keyId: row.keyId, day: row.day, usage: emptyCounts() };
      entries.set(id, entry);
    }
    addRow(entry.usage, row);
  }
  const ordered = [...entries.values()].sort(byDayThenKey);
  const more = ordered.length > request.keyDays;
  if (more && !request.paged) {
    throw new FailedPreconditionError(
      `by_key would hold more than ${MAX_UNPAGED_USAGE_ROWS} rows (one per key and day from ${range.from} to ${range.to}), more than an answer without page_size carries: ` +
        `send page_size (1-${USAGE_PAGE_SIZE.max}) and follow next_page_token, or ask for fewer days`,
    );
  }
  const byKey = ordered.slice(0, request.keyDays);
  const last = byKey.at(-1);
  return { totals, byKey, nextPageToken: more && last !== undefined ? encodeUsageToken(range, last) : "" };
}
