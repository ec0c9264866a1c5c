import { createHash } from "node:crypto";
import type { Redis } from "ioredis";
import type { Logger } from "pino";
import type { LookupObserver } from "../cache/lookup.js";
import type { KeyStore } from "../store/store.js";
import { UtcCalendar, applyCreditDelta } from "./limits.js";
import type { ChargeInput, ChargeResult, Meter } from "./limits.js";
import type { MemoryMeter } from "./memory.js";
import type { UsageRecorder } from "./usage.js";

// One round trip per Check: rate (GCRA), daily quota and credits are tested in that order and
// charged together only when all pass. Same arithmetic as limits.ts.
// KEYS: rate bucket, quota counter, credit hash.
// ARGV: now ms, window ms, limit, quota (-1 none), quota lifetime ms, metered (0/1), allowance, period, cost,
//       dry run (1: report the state and write nothing).
// Reply: status (0 ok, 1 rate, 2 quota, 3 credits, 4 credits not loaded, 5 dry run), rate remaining,
//        rate reset ms, retry-after ms, quota used, credit balance, spent monthly, spent top-up.
const CHARGE = `
local now = tonumber(ARGV[1])
local windowMs = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local interval = windowMs / limit
local eps = 0.000001
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local nextTat = tat + interval
if ARGV[10] == '1' then
  local before = 0
  if nextTat - now <= windowMs + eps then
    before = math.min(limit, math.max(0, math.floor((windowMs - (nextTat - now) + eps) / interval)) + 1)
  end
  local usedNow = 0
  if tonumber(ARGV[4]) >= 0 then usedNow = tonumber(redis.call('GET', KEYS[2]) or '0') end
  local balanceNow = -1
  if ARGV[6] == '1' and redis.call('EXISTS', KEYS[3]) == 1 then
    local c = redis.call('HMGET', KEYS[3], 'period', 'monthly_used', 'topup')
    local monthlyUsed = tonumber(c[2] or '0')
    if (c[1] or '') < ARGV[8] then monthlyUsed = 0 end
    balanceNow = math.max(0, tonumber(ARGV[7]) - monthlyUsed) + math.max(0, tonumber(c[3] or '0'))
  end
  return {5, before, math.ceil(tat - now), 0, usedNow, balanceNow, 0, 0}
end
if nextTat - now > windowMs + eps then
  return {1, 0, math.ceil(tat - now), math.max(1000, math.ceil(nextTat - windowMs - now)), -1, -1, 0, 0}
end
local remainingAfter = math.max(0, math.floor((windowMs - (nextTat - now) + eps) / interval))
local resetMs = math.ceil(nextTat - now)
local resetBeforeMs = math.ceil(tat - now)
local quota = tonumber(ARGV[4])
local used = 0
if quota >= 0 then
  used = tonumber(redis.call('GET', KEYS[2]) or '0')
  if used >= quota then return {2, remainingAfter + 1, resetBeforeMs, 0, used, -1, 0, 0} end
end
local balance = -1
local spendMonthly = 0
local spendTopup = 0
if ARGV[6] == '1' then
  if redis.call('EXISTS', KEYS[3]) == 0 then return {4, remainingAfter + 1, resetBeforeMs, 0, used, -1, 0, 0} end
  local c = redis.call('HMGET', KEYS[3], 'period', 'monthly_used', 'topup')
  local period = c[1] or ''
  local monthlyUsed = tonumber(c[2] or '0')
  local topup = tonumber(c[3] or '0')
  if period < ARGV[8] then
    period = ARGV[8]
    monthlyUsed = 0
  end
  local allowance = tonumber(ARGV[7])
  local monthlyLeft = math.max(0, allowance - monthlyUsed)
  local cost = tonumber(ARGV[9])
  balance = monthlyLeft + math.max(0, topup)
  if balance < cost then return {3, remainingAfter + 1, resetBeforeMs, 0, used, balance, 0, 0} end
  spendMonthly = math.min(monthlyLeft, cost)
  spendTopup = cost - spendMonthly
  balance = balance - cost
  redis.call('HSET', KEYS[3], 'period', period, 'monthly_used', monthlyUsed + spendMonthly, 'topup', topup - spendTopup)
end
redis.call('SET', KEYS[1], string.format('%.4f', nextTat), 'PX', resetMs + 1000)
if quota >= 0 then
  used = redis.call('INCR', KEYS[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
end
return {0, remainingAfter, resetMs, 0, used, balance, spendMonthly, spendTopup}
`;

// Loads an account's credit state from the store, unless another replica already did.
const SEED = `
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'period', ARGV[1], 'monthly_used', ARGV[2], 'topup', ARGV[3])
return 1
`;

// A top-up reaches a loaded balance; an unloaded one reads the store, which already has it.
const ADD = `
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[1], 'topup', ARGV[1])
return 1
`;

const STATUS_REASON = [null, "RATE_LIMITED", "QUOTA_EXCEEDED", "INSUFFICIENT_CREDITS"] as const;
const QUOTA_KEEP_MS = 86_400_000;

/** What to do when Redis fails: count in-process, let through uncharged, or refuse to decide. */
export type RedisFailureMode = "fallback" | "fail-open" | "fail-closed";

/** Limits shared by every replica, in Redis: one Lua script per Check. */
export class RedisMeter implements Meter {
  readonly #calendar = new UtcCalendar();
  readonly #sha = new Map<string, string>();

  constructor(
    private readonly redis: Redis,
    private readonly store: KeyStore,
    private readonly usage: UsageRecorder,
    private readonly fallback: MemoryMeter,
    private readonly onError: RedisFailureMode,
    private readonly logger: Logger,
    private readonly observer?: LookupObserver,
    private readonly prefix = "kg:",
  ) {}

  async #run(script: string, keys: string[], args: Array<string | number>): Promise<unknown> {
    let sha = this.#sha.get(script);
    if (sha === undefined) {
      sha = createHash("sha1").update(script).digest("hex");
      this.#sha.set(script, sha);
    }
    const started = performance.now();
    let ok = false;
    try {
      const reply = await this.redis.evalsha(sha, keys.length, ...keys, ...args).catch((error: unknown) => {
        if (!(error instanceof Error) || !error.message.startsWith("NOSCRIPT")) throw error;
        return this.redis.eval(script, keys.length, ...keys, ...args);
      });
      ok = true;
      return reply;
    } finally {
      this.observer?.backendCall("redis", script === CHARGE ? "charge" : "credits", (performance.now() - started) / 1000, ok);
    }
  }

  charge(input: ChargeInput): Promise<ChargeResult> {
    return this.#charge(input, true, false).catch((error: unknown) => this.#degrade(input, error));
  }

  peek(input: ChargeInput): Promise<ChargeResult> {
    return this.#charge(input, false, true).catch((error: unknown) => {
      if (this.onError === "fallback") return this.fallback.peek(input);
      throw error;
    });
  }

  async #charge(input: ChargeInput, mayLoad: boolean, dryRun: boolean): Promise<ChargeResult> {
    const { nowMs } = input;
    const day = this.#calendar.day(nowMs);
    const period = this.#calendar.month(nowMs);
    const midnightMs = this.#calendar.nextMidnightMs(nowMs);
    const reply = await this.#run(
      CHARGE,
      [`${this.prefix}rl:${input.bucket}`, `${this.prefix}q:${input.ownerId}:${day}`, `${this.prefix}c:${input.ownerId}`],
      [
        nowMs,
        input.rate.windowSeconds * 1000,
        input.rate.limit,
        input.dailyQuota ?? -1,
        // Relative, so the counter's life does not depend on Redis's clock agreeing with ours.
        midnightMs + QUOTA_KEEP_MS - nowMs,
        input.monthlyCredits === null ? 0 : 1,
        input.monthlyCredits ?? 0,
        period,
        input.cost,
        dryRun ? 1 : 0,
      ],
    );
    if (!Array.isArray(reply) || reply.length !== 8 || !reply.every((v): v is number => typeof v === "number")) {
      throw new Error("unexpected reply from the charge script");
    }
    const [status = 0, remaining = 0, resetMs = 0, retryMs = 0, used = 0, balance = -1, spentMonthly = 0, spentTopup = 0] = reply;
    if (status === 4) {
      if (!mayLoad) throw new Error("credit state did not load");
      await this.#loadCredits(input.ownerId, period);
      return this.#charge(input, false, false);
    }
    const reason = STATUS_REASON[status] ?? null;
    const quotaUsed = status === 0 ? used : Math.max(0, used);
    return {
      allowed: status === 0,
      reason,
      rate: { limit: input.rate.limit, windowSeconds: input.rate.windowSeconds, remaining, resetSeconds: Math.ceil(resetMs / 1000) },
      retryAfterSeconds:
        reason === "RATE_LIMITED" ? Math.max(1, Math.ceil(retryMs / 1000)) : reason === "QUOTA_EXCEEDED" ? Math.max(1, Math.ceil((midnightMs - nowMs) / 1000)) : null,
      quota:
        input.dailyQuota === null || status === 1
          ? null
          : { limit: input.dailyQuota, remaining: Math.max(0, input.dailyQuota - quotaUsed), resetAtMs: midnightMs },
      credits: input.monthlyCredits === null || balance < 0 ? null : { balance },
      spent: status === 0 && input.monthlyCredits !== null ? { period, monthly: spentMonthly, topup: spentTopup } : null,
    };
  }

  /**
   * Seeds Redis with the store's balance minus what this replica spent and has not flushed.
   * Credits other replicas spent in their last flush interval are not in it: that is the
   * bound of what a lost Redis can give back.
   */
  async #loadCredits(ownerId: string, period: string): Promise<void> {
    const stored = await this.store.getCredits(ownerId);
    const unflushed = this.usage.pendingSpend(ownerId, period);
    const state = applyCreditDelta(stored, period, unflushed.monthly, unflushed.topup);
    await this.#run(SEED, [`${this.prefix}c:${ownerId}`], [state.period, state.monthlyUsed, state.topupBalance]);
  }

  async #degrade(input: ChargeInput, error: unknown): Promise<ChargeResult> {
    this.logger.warn({ err: error, mode: this.onError }, "Redis limits failed");
    if (this.onError === "fail-closed") throw error;
    if (this.onError === "fallback") return this.fallback.charge(input);
    return {
      allowed: true,
      reason: null,
      rate: { limit: input.rate.limit, windowSeconds: input.rate.windowSeconds, remaining: input.rate.limit, resetSeconds: 0 },
      retryAfterSeconds: null,
      quota: null,
      credits: null,
      spent: null,
    };
  }

  async addCredits(ownerId: string, amount: number): Promise<void> {
    await this.#run(ADD, [`${this.prefix}c:${ownerId}`], [amount]);
    await this.fallback.addCredits(ownerId, amount);
  }

  async credits(ownerId: string, nowMs: number): Promise<{ period: string; monthlyUsed: number; topupBalance: number } | null> {
    const [period, monthlyUsed, topup] = await this.redis.hmget(`${this.prefix}c:${ownerId}`, "period", "monthly_used", "topup");
    if (period === null || period === undefined) return null;
    return applyCreditDelta({ period, monthlyUsed: Number(monthlyUsed ?? 0), topupBalance: Number(topup ?? 0) }, this.#calendar.month(nowMs), 0, 0);
  }

  async close(): Promise<void> {
    await this.fallback.close();
  }
}
