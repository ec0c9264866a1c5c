import type { ChargeResult } from "../limits/limits.js";

const POLICY_NAMES: Readonly<Record<number, string>> = { 1: "second", 60: "minute", 3600: "hour", 86_400: "day" };

/** A rate window's name in the RateLimit fields: "minute" for 60, else "<n>s" for an unnamed one. */
export function policyName(windowSeconds: number): string {
  return POLICY_NAMES[windowSeconds] ?? `${windowSeconds}s`;
}

/** A daily quota's name in the RateLimit fields: the plan's own is "day", a named one its name. */
export function quotaLabel(name: string | null): string {
  return name ?? "day";
}

/** The seconds until a daily quota resets, as the RateLimit field's t= gives them. */
export function quotaResetSeconds(resetAtMs: number, nowMs: number): number {
  return Math.max(0, Math.ceil((resetAtMs - nowMs) / 1000));
}

/**
 * Client response headers that tell a caller where it stands: X-RateLimit-Limit / -Remaining /
 * -Reset (seconds until the bucket is full again, as Envoy's own rate limiter sends it), the
 * IETF draft-11 RateLimit-Policy and RateLimit fields (with a "day" entry when a daily quota
 * applies), and X-Credits-Remaining on metered plans.
 */
export function limitHeaders(limits: ChargeResult, nowMs: number): Array<[string, string]> {
  const { rate, quota, credits } = limits;
  const name = policyName(rate.windowSeconds);
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
