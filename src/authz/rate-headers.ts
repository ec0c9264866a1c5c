import type { ChargeResult } from "../limits/limits.js";

const POLICY_NAMES: Readonly<Record<number, string>> = { 1: "second", 60: "minute", 3600: "hour", 86_400: "day" };

function policyName(windowSeconds: number): string {
  return POLICY_NAMES[windowSeconds] ?? `${windowSeconds}s`;
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
    // The plan's daily quota is "day"; a named one goes by its name.
    const label = quota.name ?? "day";
    policy += `, "${label}";q=${quota.limit};w=86400`;
    state += `, "${label}";r=${quota.remaining};t=${Math.max(0, Math.ceil((quota.resetAtMs - nowMs) / 1000))}`;
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
