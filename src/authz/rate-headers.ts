import type { ChargeResult } from "../limits/limits.js";

const POLICY_NAMES: Readonly<Record<number, string>> = { 1: "second", 60: "minute", 3600: "hour", 86_400: "day" };
/** The "<n>s" names of the named windows, built once: only those can meet a quota's name. */
const SECONDS_NAMES: Readonly<Record<number, string>> = { 1: "1s", 60: "60s", 3600: "3600s", 86_400: "86400s" };

/** A rate window's name in the RateLimit fields: "minute" for 60, else "<n>s" for an unnamed one. */
function policyName(windowSeconds: number): string {
  return POLICY_NAMES[windowSeconds] ?? `${windowSeconds}s`;
}

/** A daily quota's name in the RateLimit fields: the plan's own is "day", a named one its name. */
export function quotaLabel(name: string | null): string {
  return name ?? "day";
}

/**
 * The rate entry's name beside `quota`'s: policyName, unless the quota's label is that name (a
 * 86400 s window and a daily quota, a 60 s window and a quota named "minute"); then "<n>s", since
 * RateLimit's items refer to RateLimit-Policy's by name. A quota name starts with a letter, so it
 * never equals an "<n>s" name.
 */
export function rateName(windowSeconds: number, quota: { name: string | null } | null): string {
  const name = policyName(windowSeconds);
  if (quota === null || quotaLabel(quota.name) !== name) return name;
  return SECONDS_NAMES[windowSeconds] ?? `${windowSeconds}s`;
}

/** The seconds until a daily quota resets, as the RateLimit field's t= gives them. */
export function quotaResetSeconds(resetAtMs: number, nowMs: number): number {
  return Math.max(0, Math.ceil((resetAtMs - nowMs) / 1000));
}

/**
 * Client response headers that tell a caller where it stands: X-RateLimit-Limit / -Remaining /
 * -Reset (seconds until the bucket is full again, as Envoy's own rate limiter sends it), the
 * IETF draft-11 RateLimit-Policy and RateLimit fields (with the quota's entry when a daily quota
 * applies; names unique, see rateName), and X-Credits-Remaining on metered plans.
 */
export function limitHeaders(limits: ChargeResult, nowMs: number): Array<[string, string]> {
  const { rate, quota, credits } = limits;
  const name = rateName(rate.windowSeconds, quota);
  let policy = `"${name}";q=${rate.limit};w=${rate.windowSeconds}`;
  let state = `"${name}";r=${rate.remaining};t=${rate.resetSeconds}`;
  if (quota !== null) {
    const label = quotaLabel(quota.name);
    policy += `, "${label}";q=${quota.limit};w=86400`;
    state += `, "${label}";r=${quota.remaining};t=${quotaResetSeconds(quota.resetAtMs, nowMs)}`;
  }
  const headers: Array<[string, string]> = [
    ["x-ratelimit-limit", String(rate.limit)],
    ["x-ratelimit-remaining", String(rate.remaining)],
    ["x-ratelimit-reset", String(rate.resetSeconds)],
    ["ratelimit-policy", policy],
    ["ratelimit", state],
  ];
  if (credits !== null) headers.push(["x-credits-remaining", String(credits.balance)]);
  return headers;
}
