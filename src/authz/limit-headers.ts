import type { ChargeResult } from "../limits/limits.js";
import { quotaLabel, quotaResetSeconds, rateName } from "./rate-headers.js";
import { ADD_TAG, APPEND_ACTION, KEY_TAG, fieldBytes, nameField, writeAppendAction, writeOptionHead } from "./wire.js";

// An allow's limit headers (rate-headers.ts's limitHeaders) written straight into the answer from
// the numbers: building their strings first, then measuring and copying them, was about half of
// what encoding an allow cost. The bytes are limitHeaders' exactly (the encoding test compares
// them through toCheckResponse); a value this cannot write digit by digit goes the general way.

const LIMIT = nameField(KEY_TAG, "x-ratelimit-limit");
const REMAINING = nameField(KEY_TAG, "x-ratelimit-remaining");
const RESET = nameField(KEY_TAG, "x-ratelimit-reset");
const POLICY = nameField(KEY_TAG, "ratelimit-policy");
const STATE = nameField(KEY_TAG, "ratelimit");
const CREDITS = nameField(KEY_TAG, "x-credits-remaining");

// The fixed text of the RateLimit-Policy and RateLimit values, between the names and numbers.
const QUOTE = 0x22;
const Q = '";q=';
const R = '";r=';
const W = ";w=";
const T = ";t=";
const NEXT = ", ";
const DAY = ";w=86400";

/** A whole number String() writes as plain digits (no sign, fraction or exponent). */
function isCount(n: number): boolean {
  return Number.isSafeInteger(n) && n >= 0;
}

function isAscii(text: string): boolean {
  for (let i = 0; i < text.length; i++) if (text.charCodeAt(i) > 0x7f) return false;
  return true;
}

function digits(n: number): number {
  let count = 1;
  for (let rest = n; rest >= 10; rest = Math.floor(rest / 10)) count++;
  return count;
}

/**
 * True when every number of `limits` is a count and every name ASCII, so sizeLimitHeaders and
 * writeLimitHeaders write exactly limitHeaders' strings.
 */
export function directLimits(limits: ChargeResult, nowMs: number): boolean {
  const { rate, quota, credits } = limits;
  if (!isCount(rate.limit) || !isCount(rate.remaining) || !isCount(rate.resetSeconds) || !isCount(rate.windowSeconds)) return false;
  if (!isAscii(rateName(rate.windowSeconds, quota))) return false;
  if (quota !== null && (!isCount(quota.limit) || !isCount(quota.remaining) || !isCount(quotaResetSeconds(quota.resetAtMs, nowMs)) || !isAscii(quotaLabel(quota.name)))) return false;
  return credits === null || isCount(credits.balance);
}

function policyBytes(limits: ChargeResult): number {
  const { rate, quota } = limits;
  const own = 1 + rateName(rate.windowSeconds, quota).length + Q.length + digits(rate.limit) + W.length + digits(rate.windowSeconds);
  return quota === null ? own : own + NEXT.length + 1 + quotaLabel(quota.name).length + Q.length + digits(quota.limit) + DAY.length;
}

function stateBytes(limits: ChargeResult, nowMs: number): number {
  const { rate, quota } = limits;
  const own = 1 + rateName(rate.windowSeconds, quota).length + R.length + digits(rate.remaining) + T.length + digits(rate.resetSeconds);
  if (quota === null) return own;
  return own + NEXT.length + 1 + quotaLabel(quota.name).length + R.length + digits(quota.remaining) + T.length + digits(quotaResetSeconds(quota.resetAtMs, nowMs));
}

/** A response_headers_to_add field holding `name` and a value of `valueBytes` (never empty). */
function optionBytes(name: Buffer, valueBytes: number): number {
  return fieldBytes(fieldBytes(name.length + fieldBytes(valueBytes)) + APPEND_ACTION.length);
}

/** Bytes of the limit headers' fields, for limits directLimits accepts. */
export function sizeLimitHeaders(limits: ChargeResult, nowMs: number): number {
  const { rate, credits } = limits;
  let total = optionBytes(LIMIT, digits(rate.limit)) + optionBytes(REMAINING, digits(rate.remaining)) + optionBytes(RESET, digits(rate.resetSeconds));
  total += optionBytes(POLICY, policyBytes(limits)) + optionBytes(STATE, stateBytes(limits, nowMs));
  if (credits !== null) total += optionBytes(CREDITS, digits(credits.balance));
  return total;
}

/** Everything of a response_headers_to_add field up to its value's bytes (never empty); returns where the value goes. */
function writeHead(out: Buffer, at: number, name: Buffer, valueBytes: number): number {
  return writeOptionHead(out, at, ADD_TAG, name, valueBytes);
}

function writeCount(out: Buffer, at: number, n: number): number {
  const end = at + digits(n);
  let rest = n;
  for (let pos = end - 1; pos >= at; pos--) {
    out[pos] = 0x30 + (rest % 10);
    rest = Math.floor(rest / 10);
  }
  return end;
}

function writeAscii(out: Buffer, at: number, text: string): number {
  for (let i = 0; i < text.length; i++) out[at + i] = text.charCodeAt(i);
  return at + text.length;
}

function writeNumberHeader(out: Buffer, at: number, name: Buffer, n: number): number {
  return writeAppendAction(out, writeCount(out, writeHead(out, at, name, digits(n)), n));
}

/** `"name";<sep>a;<sep2>b`: one entry of the RateLimit-Policy or RateLimit value. */
function writeEntry(out: Buffer, at: number, name: string, sep: string, a: number, sep2: string, b: number | null): number {
  let pos = at;
  out[pos++] = QUOTE;
  pos = writeAscii(out, pos, name);
  pos = writeCount(out, writeAscii(out, pos, sep), a);
  pos = writeAscii(out, pos, sep2);
  return b === null ? pos : writeCount(out, pos, b);
}

/** Writes the limit headers' fields at `at` (limits directLimits accepts); returns the position after them. */
export function writeLimitHeaders(out: Buffer, at: number, limits: ChargeResult, nowMs: number): number {
  const { rate, quota, credits } = limits;
  const name = rateName(rate.windowSeconds, quota);
  let pos = writeNumberHeader(out, at, LIMIT, rate.limit);
  pos = writeNumberHeader(out, pos, REMAINING, rate.remaining);
  pos = writeNumberHeader(out, pos, RESET, rate.resetSeconds);
  pos = writeHead(out, pos, POLICY, policyBytes(limits));
  pos = writeEntry(out, pos, name, Q, rate.limit, W, rate.windowSeconds);
  if (quota !== null) pos = writeEntry(out, writeAscii(out, pos, NEXT), quotaLabel(quota.name), Q, quota.limit, DAY, null);
  pos = writeAppendAction(out, pos);
  pos = writeHead(out, pos, STATE, stateBytes(limits, nowMs));
  pos = writeEntry(out, pos, name, R, rate.remaining, T, rate.resetSeconds);
  if (quota !== null) pos = writeEntry(out, writeAscii(out, pos, NEXT), quotaLabel(quota.name), R, quota.remaining, T, quotaResetSeconds(quota.resetAtMs, nowMs));
  pos = writeAppendAction(out, pos);
  return credits === null ? pos : writeNumberHeader(out, pos, CREDITS, credits.balance);
}
