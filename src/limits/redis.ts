import { createHash, randomBytes } from "node:crypto";
import { BARE_LAYOUT } from "../cache/redis-client.js";
import type { RedisClient, RedisKeyLayout } from "../cache/redis-client.js";
import type { Logger } from "pino";
import type { LookupObserver } from "../cache/lookup.js";
import type { MeteringStore } from "../store/store.js";
import { ChargeAbandonedError, MeterUnavailableError, REBASE_BEYOND_MS, UtcCalendar, applyCreditDelta, bucketName } from "./limits.js";
import type { ChargeInput, ChargeResult, Meter } from "./limits.js";
import { LogThrottle, errorKind } from "../log-throttle.js";
import { IDEMPOTENCY_TTL_MS, IdempotencyKeyMismatchError } from "./idempotency.js";
import { chargeText, fingerprintText, parseFingerprint } from "./charge-fingerprint.js";
import type { MemoryMeter } from "./memory.js";
import type { UsageRecorder } from "./usage.js";

// One round trip per Check: rate (GCRA), daily quota and credits are tested in that order and
// charged together only when all pass. Same arithmetic as limits.ts: times from now in parts of
// 1/limit ms, whole numbers (one interval is windowMs parts, a full bucket windowMs * limit),
// and the bucket's time stored as "<whole ms>.<fraction>", the fraction a multiple of 1/limit
// written to 17 places so it reads back exactly (an earlier "%.4f" time reads as its nearest).
// KEYS: rate bucket, quota counter, credit hash, and for a charge with an idempotency key its
//       outcome (see below).
// ARGV: now ms, window ms, limit, quota (-1 none), quota lifetime ms, metered (0/1), allowance, period, cost,
//       dry run (1: report the state and write nothing), credit idle lifetime ms, outcome lifetime ms,
//       counted (1: the request counts toward the quota counter whether or not a quota limits it).
// A credit hash is loaded when it has `seen` (see SEED); one without it (partial, or written by an
// earlier release) is reported as not loaded, and SEED adopts or replaces it.
// Reply: status (0 ok, 1 rate, 2 quota, 3 credits, 4 credits not loaded, 5 dry run, 6 the
//        idempotency key was used for another charge: see below), rate remaining,
//        rate reset ms, retry-after ms, quota used, credit balance (-1 not metered or not loaded),
//        spent monthly, spent top-up, and on 0 the period charged as YYYYMM (0 when not metered):
//        the balance's, which is later than the caller's when the caller's clock reads an earlier
//        month than another replica's, a 10th place of 0 (not a kept reply, see below) and the
//        rate bucket's time as written (a string: a reply's numbers are integers), for GIVE_BACK
//        to tell whether a charge was made since. Refusals read the quota count and balance they
//        report only on their own branch, so an allowed charge reads nothing more for them.
// A charge with an idempotency key (ChargeUsage) keeps its reply under the fourth key, and a
// script with a kept reply answers it again and charges nothing: a charge whose answer never came
// back (a frozen Redis runs it when it thaws, after the caller was told UNAVAILABLE and its claim
// was let go) is then not made a second time by the caller's retry, whichever runs first. A kept
// reply is answered padded to 9 places with a 10th, 1, so the caller records nothing again. A
// refusal by rate or by daily quota is not kept: like a payments API's 429 it is no charge, and
// the retry its Retry-After asks for (the quota's reset at midnight), with the same key, is
// judged again (keptUnderIdempotencyKey, the ledger's rule). ARGV[14], with the fourth key: the
// charge's own nonce, kept as the 10th place (earlier releases read it as a number and overwrite
// it with 1); a script that finds its own nonce kept (the same script run again) answers a 10th
// place of 0, so the call records the charge it made. ARGV[15], with the fourth key: what the
// charge is for (ChargeInput.idempotencyFingerprint, the ledger's own), kept as the 11th place; a
// kept reply whose 11th place differs is not answered: the reply is {6, the kept fingerprint}, and
// nothing is charged. A kept reply without one (an earlier release's) is answered as before. Earlier releases' scripts read the 11th place as a number (it is never one,
// so it is dropped) or not at all.
const CHARGE = `
local function outcome(reply)
  if KEYS[4] then
    local parts = {}
    for i = 1, 9 do parts[i] = string.format('%.0f', reply[i] or 0) end
    parts[10] = ARGV[14] or '0'
    if ARGV[15] then parts[11] = ARGV[15] end
    redis.call('SET', KEYS[4], table.concat(parts, ','), 'PX', ARGV[12])
  end
  return reply
end
if KEYS[4] then
  local kept = redis.call('GET', KEYS[4])
  if kept then
    local parts = {}
    for v in string.gmatch(kept, '[^,]+') do parts[#parts + 1] = v end
    if ARGV[15] and parts[11] and parts[11] ~= ARGV[15] then return {6, parts[11]} end
    local reply = {}
    for i = 1, 9 do reply[i] = tonumber(parts[i] or '0') or 0 end
    if ARGV[14] and parts[10] == ARGV[14] then reply[10] = 0 else reply[10] = 1 end
    return reply
  end
end
-- The balance as it stands, for an answer that charges nothing (-1: not metered, or not loaded).
local function balanceNow()
  if ARGV[6] ~= '1' or redis.call('HEXISTS', KEYS[3], 'seen') == 0 then return -1 end
  local c = redis.call('HMGET', KEYS[3], 'period', 'monthly_used', 'topup')
  local monthlyUsed = tonumber(c[2] or '0')
  if (c[1] or '') < ARGV[8] then monthlyUsed = 0 end
  return math.max(0, tonumber(ARGV[7]) - monthlyUsed) + math.max(0, tonumber(c[3] or '0'))
end
local now = tonumber(ARGV[1])
local windowMs = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local full = windowMs * limit
local nowWhole = math.floor(now)
local nowParts = math.floor((now - nowWhole) * limit)
local before = 0
local rebased = false
local stored = redis.call('GET', KEYS[1])
if stored then
  local dot = string.find(stored, '.', 1, true)
  local whole = tonumber(dot and string.sub(stored, 1, dot - 1) or stored)
  local frac = 0
  if dot then frac = tonumber('0' .. string.sub(stored, dot)) end
  local ahead = (whole - nowWhole) * limit + math.floor(frac * limit + 0.5) - nowParts
  if ahead > full and (ahead > full + ${REBASE_BEYOND_MS} * limit or redis.call('PTTL', KEYS[1]) - 1000 > windowMs) then
    -- Further ahead than a full bucket reaches, and either by more than replicas' clocks differ
    -- (a clock stepped ahead wrote it) or, by the key's own life, written under a longer window:
    -- a full bucket's debt from this caller's now, stored on refusal. A time a replica whose clock
    -- runs a little ahead wrote is a debt (limits.ts, gcra and REBASE_BEYOND_MS).
    before = full
    rebased = true
  elseif ahead > 0 then
    before = ahead
  end
end
local after = before + windowMs
if ARGV[10] == '1' then
  local conforming = 0
  if after <= full then
    conforming = math.min(limit, math.floor((full - after) / windowMs) + 1)
  end
  local usedNow = 0
  if tonumber(ARGV[4]) >= 0 then usedNow = tonumber(redis.call('GET', KEYS[2]) or '0') end
  return {5, conforming, math.ceil(before / limit), 0, usedNow, balanceNow(), 0, 0}
end
local function tatOf(parts)
  local ms = math.floor(parts / limit)
  return string.format('%.0f', nowWhole + ms) .. string.sub(string.format('%.17f', (parts - ms * limit) / limit), 2)
end
if after > full then
  if rebased then redis.call('SET', KEYS[1], tatOf(nowParts + before), 'PX', math.ceil(before / limit) + 1000) end
  local usedNow = 0
  if tonumber(ARGV[4]) >= 0 then usedNow = tonumber(redis.call('GET', KEYS[2]) or '0') end
  return {1, 0, math.ceil(before / limit), math.max(1000, math.ceil((after - full) / limit)), usedNow, balanceNow(), 0, 0}
end
local remainingAfter = math.floor((full - after) / windowMs)
local resetMs = math.ceil(after / limit)
local resetBeforeMs = math.ceil(before / limit)
local quota = tonumber(ARGV[4])
local used = 0
if quota >= 0 then
  used = tonumber(redis.call('GET', KEYS[2]) or '0')
  if used >= quota then return {2, remainingAfter + 1, resetBeforeMs, 0, used, balanceNow(), 0, 0} end
end
local balance = -1
local spendMonthly = 0
local spendTopup = 0
local chargedPeriod = 0
if ARGV[6] == '1' then
  if redis.call('HEXISTS', KEYS[3], 'seen') == 0 then return {4, remainingAfter + 1, resetBeforeMs, 0, used, -1, 0, 0} end
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
  if balance < cost then return outcome({3, remainingAfter + 1, resetBeforeMs, 0, used, balance, 0, 0}) end
  spendMonthly = math.min(monthlyLeft, cost)
  spendTopup = cost - spendMonthly
  balance = balance - cost
  redis.call('HSET', KEYS[3], 'period', period, 'monthly_used', monthlyUsed + spendMonthly, 'topup', topup - spendTopup)
  redis.call('PEXPIRE', KEYS[3], ARGV[11])
  chargedPeriod = tonumber(string.sub(period, 1, 4) .. string.sub(period, 6, 7))
end
local written = tatOf(nowParts + after)
redis.call('SET', KEYS[1], written, 'PX', resetMs + 1000)
if quota >= 0 or ARGV[13] == '1' then
  used = redis.call('INCR', KEYS[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
end
return outcome({0, remainingAfter, resetMs, 0, used, balance, spendMonthly, spendTopup, chargedPeriod, 0, written})
`;

// Loads an account's credit state read from the store, unless another replica already did.
// `seen` is the store's top-up total (CreditState.topupTotal) the balance includes; it is
// written in the same command as every other field, so its presence means the whole hash is
// there. The hash lives while the account is charged and expires once it has been idle for the
// idle lifetime, by when every replica has flushed its spend: the next charge then reloads it
// from the store, so a wrong balance does not last forever.
// A hash with the balance but neither `seen` nor an expiry was loaded by an earlier release
// (those write period, monthly_used and topup only, and never expire the hash; this version's
// hashes always have both), whose replicas may still be charging it. It is adopted, not
// replaced, as the store lacks what they spent since their last flush: its balance stays (one of
// an earlier month is reset by the charge, as any other) and `seen` is the total just read, for
// those releases add their own top-ups to the hash and never move the total, and a top-up of
// this version that reached the hash first dropped it (see ADD). A top-up of this version whose
// ADD is still on its way (queued for a retry, or lost with the replica that wrote the store) is
// in that total but not in the balance: the hash is marked `adopted`, and the next ADD drops it
// as it drops an earlier release's, so the next charge reloads it from the store, which has every
// top-up. Any other hash without `seen` (partial, or altered by hand) is replaced whole.
// KEYS: credit hash. ARGV: period, monthly used, top-up balance, top-up total, idle lifetime ms.
// Reply: 0 already loaded, 1 loaded, 2 adopted.
const SEED = `
if redis.call('HEXISTS', KEYS[1], 'seen') == 1 then return 0 end
local reply = 2
local c = redis.call('HMGET', KEYS[1], 'period', 'monthly_used', 'topup')
if c[1] and c[2] and c[3] and redis.call('PTTL', KEYS[1]) == -1 then
  redis.call('HSET', KEYS[1], 'seen', ARGV[4], 'adopted', 1)
else
  reply = 1
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'period', ARGV[1], 'monthly_used', ARGV[2], 'topup', ARGV[3], 'seen', ARGV[4])
end
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return reply
`;

// Brings a loaded balance up to a top-up total: adds what it has not seen, and nothing twice.
// An unloaded balance is left alone: whoever loads it reads the total again after seeding it.
// An earlier release's hash (no `seen`) is dropped: it lacks this top-up, the total does not tell
// the amount to add, and SEED would adopt it as including the total. So is an adopted one (see
// SEED): its `seen` may count top-ups it lacks. The next charge reloads it from the store, which
// has every top-up but not what the earlier release's replicas spent since their last flush: the
// bound of a lost Redis, paid once for each balance such a release loaded.
// KEYS: credit hash. ARGV: top-up total. Reply: 0 not loaded, 1 already included, 2 added,
// 3 an earlier release's (or an adopted) hash dropped.
const ADD = `
local seen = redis.call('HGET', KEYS[1], 'seen')
if not seen or redis.call('HEXISTS', KEYS[1], 'adopted') == 1 then
  if redis.call('DEL', KEYS[1]) == 1 then return 3 end
  return 0
end
local gap = tonumber(ARGV[1]) - tonumber(seen)
if gap <= 0 then return 1 end
redis.call('HINCRBY', KEYS[1], 'topup', gap)
redis.call('HSET', KEYS[1], 'seen', ARGV[1])
return 2
`;

// Gives a rotation's new key the old key's rate bucket, for what is left of its lifetime, unless
// the new key's own is further ahead already (the old key in grace charges it from the rotation on).
// KEYS: the old key's bucket, the new key's. Reply: 1 copied, 0 not.
const INHERIT = `
local tat = redis.call('GET', KEYS[1])
if not tat then return 0 end
local ttl = redis.call('PTTL', KEYS[1])
if ttl <= 0 then return 0 end
local own = redis.call('GET', KEYS[2])
if own and tonumber(own) >= tonumber(tat) then return 0 end
redis.call('SET', KEYS[2], tat, 'PX', ttl)
return 1
`;

// Gives back what an allowed charge took when the Check it was for had been answered UNAVAILABLE
// before the answer came back (README, "One budget per Check"): the client was refused, so it is
// charged nothing. Same arithmetic as CHARGE, from the charge's own now: one interval off the
// rate bucket's time, one off the quota counter (a bucket full again, or a counter back at 0, is
// dropped, as if never charged), and the credits spent back into the balance, the monthly part
// only while the balance is in the month charged. Charges made since keep theirs: each moved the
// counters by its own amount. The bucket's interval is given back only while the bucket still
// holds the time this charge wrote: a charge made since started from the later of that time and
// its own now, so when this charge's slot had come back on its own before it (an answer later than
// one interval), an interval off its time would free a slot a served charge used, one request
// over the limit. The slot is then left taken: it comes back within one window. A balance no
// longer loaded (dropped since, see ADD) is left alone: the store it is loaded from never had
// this charge.
// KEYS: rate bucket, quota counter, credit hash. ARGV: now ms, window ms, limit, counted (1: the
// charge counted toward the quota counter), monthly spent, top-up spent, period charged (YYYY-MM),
// the bucket's time the charge wrote (CHARGE's reply).
const GIVE_BACK = `
local now = tonumber(ARGV[1])
local limit = tonumber(ARGV[3])
local nowWhole = math.floor(now)
local nowParts = math.floor((now - nowWhole) * limit)
local stored = redis.call('GET', KEYS[1])
if stored and stored == ARGV[8] then
  local dot = string.find(stored, '.', 1, true)
  local whole = tonumber(dot and string.sub(stored, 1, dot - 1) or stored)
  local frac = 0
  if dot then frac = tonumber('0' .. string.sub(stored, dot)) end
  local ahead = (whole - nowWhole) * limit + math.floor(frac * limit + 0.5) - nowParts - tonumber(ARGV[2])
  if ahead <= 0 then
    redis.call('DEL', KEYS[1])
  else
    local parts = nowParts + ahead
    local ms = math.floor(parts / limit)
    local tat = string.format('%.0f', nowWhole + ms) .. string.sub(string.format('%.17f', (parts - ms * limit) / limit), 2)
    redis.call('SET', KEYS[1], tat, 'PX', math.ceil(ahead / limit) + 1000)
  end
end
if ARGV[4] == '1' then
  local used = tonumber(redis.call('GET', KEYS[2]) or '0')
  if used > 1 then redis.call('DECR', KEYS[2]) elseif used == 1 then redis.call('DEL', KEYS[2]) end
end
local monthly = tonumber(ARGV[5])
local topup = tonumber(ARGV[6])
if (monthly > 0 or topup > 0) and redis.call('HEXISTS', KEYS[3], 'seen') == 1 then
  local c = redis.call('HMGET', KEYS[3], 'period', 'monthly_used', 'topup')
  redis.call('HSET', KEYS[3], 'topup', tonumber(c[3] or '0') + topup)
  if c[1] == ARGV[7] then redis.call('HSET', KEYS[3], 'monthly_used', math.max(0, tonumber(c[2] or '0') - monthly)) end
end
return 1
`;

const STATUS_REASON = [null, "RATE_LIMITED", "QUOTA_EXCEEDED", "INSUFFICIENT_CREDITS"] as const;

/**
 * A charge's fingerprint when its caller gave none (ChargeInput.idempotencyFingerprint): its mode,
 * cost and quota as charged, and no key. No comma (the kept reply's separator), and never a
 * number (earlier releases' scripts drop it).
 */
function meterFingerprint(input: ChargeInput): string {
  return fingerprintText({ mode: input.meter, cost: input.cost, quota: input.quota ?? "", keyId: "" });
}

/** What a kept fingerprint's charge was, for IdempotencyKeyMismatchError; never the idempotency key, nor other text the reply carried. */
function keptChargeText(fingerprint: unknown): string {
  const charge = parseFingerprint(fingerprint);
  return charge === null ? "another charge" : chargeText(charge);
}

/** A period the charge script names as YYYYMM, as "YYYY-MM". */
function periodText(yyyymm: number): string {
  return `${Math.floor(yyyymm / 100)}-${String(yyyymm % 100).padStart(2, "0")}`;
}
const QUOTA_KEEP_MS = 86_400_000;
/** How often the warn line for one kind of Redis failure of a charge is written; each is counted (keygate_backend_errors_total). */
const REDIS_FAILURE_LOG_INTERVAL_MS = 60_000;
/** Kinds of Redis failure remembered for that; past it they start over. */
const MAX_REDIS_FAILURES_TRACKED = 256;
/**
 * Least idle lifetime of a credit hash; it is also at least three usage flush intervals, so a
 * reload from the store after it expired finds every replica's spend flushed.
 */
const CREDIT_IDLE_MIN_MS = 3_600_000;
/** How often a top-up that did not reach Redis is tried again, and how many wait at most. */
const TOPUP_RETRY_MS = 1000;
const MAX_UNSYNCED_TOPUPS = 100_000;

/**
 * What to do when Redis fails: count in-process, let through uncharged, or refuse to decide.
 * fail-open lets Checks through; a charge with an idempotency key is refused as fail-closed.
 */
export type RedisFailureMode = "fallback" | "fail-open" | "fail-closed";

/** The Redis key of a daily quota counter: per owner and day, test keys' and each named quota's apart. */
function quotaCounter(prefix: string, layout: RedisKeyLayout, input: ChargeInput, day: string): string {
  return `${prefix}q:${layout.owner(input.ownerId)}:${day}${input.meter === "test" ? ":test" : ""}${input.quota === null ? "" : `:n:${input.quota}`}`;
}

/** A charge's answer, and for an allow the rate bucket's time it wrote: GIVE_BACK's sign that no charge was made since. */
interface Charged {
  result: ChargeResult;
  bucketTime: string | null;
}

/** Limits shared by every replica, in Redis: one Lua script per Check. */
export class RedisMeter implements Meter {
  readonly #calendar = new UtcCalendar();
  readonly #sha = new Map<string, string>();
  /** Top-up totals Redis has not confirmed, by owner, oldest first. */
  readonly #unsynced = new Map<string, number>();
  #retryTimer: NodeJS.Timeout | undefined;
  #retrying = false;
  /** A charge went to the in-process fallback since Redis last answered one. */
  #fellBack = false;
  /**
   * Charges the fallback made, ever: a Redis answer proves Redis counts again only for a charge
   * sent after the last of them (see charge()).
   */
  #fallbackCharges = 0;
  /** Charges skip Redis while it is known not to answer (logged once each time). */
  #skipping = false;
  /**
   * Each Redis failure logged lately: a charge fails with it for every Check of a known key while
   * Redis is down (under fail-closed, every one), and a line with its stack for each would let
   * anyone holding a key flood the log while cached keys' Checks wait behind its writes.
   */
  readonly #failures = new LogThrottle(REDIS_FAILURE_LOG_INTERVAL_MS, MAX_REDIS_FAILURES_TRACKED);

  constructor(
    private readonly redis: RedisClient,
    private readonly store: Pick<MeteringStore, "getCredits">,
    private readonly usage: UsageRecorder,
    private readonly fallback: MemoryMeter,
    private readonly onError: RedisFailureMode,
    private readonly logger: Logger,
    private readonly observer?: LookupObserver,
    private readonly prefix = "kg:",
    private readonly layout: RedisKeyLayout = BARE_LAYOUT,
    /**
     * True while Redis is known not to answer (the invalidation bus's heartbeats stopped): a
     * frozen Redis keeps its connections open, and each charge would wait out the command
     * timeout, longer than a Check's budget, so fallback and fail-open would never take over.
     */
    private readonly redisLost: () => boolean = () => false,
  ) {}

  /** Runs a script; `op` names it in the backend metrics (a dry-run charge is a peek). */
  async #run(script: string, keys: string[], args: Array<string | number>, op: string = script === CHARGE ? "charge" : script === INHERIT ? "inherit_bucket" : "credits"): Promise<unknown> {
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
      this.observer?.backendCall("redis", op, (performance.now() - started) / 1000, ok);
    }
  }

  charge(input: ChargeInput): ChargeResult | Promise<ChargeResult> {
    // fail-closed keeps asking: it refuses either way, and Redis may answer this connection yet.
    if (this.onError !== "fail-closed" && this.redisLost()) {
      if (!this.#skipping) {
        this.#skipping = true;
        this.logger.warn({ mode: this.onError }, "Redis limits failed: Redis is not answering; charges go to limits.onRedisError until it is back");
      }
      return this.#degraded(input, undefined);
    }
    this.#skipping = false;
    const fallbackChargesBefore = this.#fallbackCharges;
    return this.#charge(input, true, false).then(
      ({ result, bucketTime }) => {
        // Redis is back: the counts the fallback held are out of date from now on (Redis counts
        // on), so they go, and a later outage loads them afresh. Only an answer to a charge sent
        // after the fallback's last charge, and with Redis not counted lost, says so: a slow
        // Redis's late answer to a charge sent before it was counted lost would otherwise wipe
        // the buckets the fallback still counts in, a fresh bucket per late answer.
        if (this.#fellBack && fallbackChargesBefore === this.#fallbackCharges && !this.redisLost()) {
          this.#fellBack = false;
          this.fallback.reset();
        }
        // Checks carry no idempotency key; a ChargeUsage, which does, has no budget.
        if (input.budgetExpired && result.allowed && input.idempotencyKey === undefined) return this.#giveBack(input, result, bucketTime);
        return result;
      },
      (error: unknown) => this.#degrade(input, error),
    );
  }

  /**
   * An allow that came back after its Check was answered UNAVAILABLE (a Redis slower than the
   * budget): what it took is given back (GIVE_BACK) and nothing is recorded, for the client was
   * refused. A give-back Redis does not take leaves that charge in Redis, never recorded: the
   * bucket and quota count come back with their window and day, the credits when the balance is
   * next loaded from the store.
   */
  async #giveBack(input: ChargeInput, charged: ChargeResult, bucketTime: string | null): Promise<never> {
    const spent = charged.spent ?? { period: "", monthly: 0, topup: 0 };
    const counted = input.dailyQuota !== null || input.countsDaily ? 1 : 0;
    // No bucket time (never for a fresh allow): no stored time matches "", so the slot is left.
    const args = [input.nowMs, input.rate.windowSeconds * 1000, input.rate.limit, counted, spent.monthly, spent.topup, spent.period, bucketTime ?? ""];
    try {
      await this.#run(GIVE_BACK, this.#chargeKeys(input), args, "give_back");
    } catch (error) {
      const since = this.#failures.due(`give back: ${errorKind(error)}`);
      if (since !== null) this.logger.warn({ err: error, since }, "a charge whose Check was answered UNAVAILABLE could not be given back in Redis");
    }
    throw new ChargeAbandonedError("the check was answered before its charge came back; the charge was given back");
  }

  /** A charge's rate bucket, quota counter and credit hash, in CHARGE's and GIVE_BACK's order. */
  #chargeKeys(input: ChargeInput): string[] {
    const day = this.#calendar.day(input.nowMs);
    return [`${this.prefix}rl:${this.layout.bucket(input.ownerId, bucketName(input))}`, quotaCounter(this.prefix, this.layout, input, day), this.#creditKey(input.ownerId)];
  }

  peek(input: ChargeInput): ChargeResult | Promise<ChargeResult> {
    if (this.onError !== "fail-closed" && this.redisLost()) {
      if (this.onError === "fallback") return this.fallback.peek(input);
      return Promise.reject(new MeterUnavailableError("Redis is not answering"));
    }
    return this.#charge(input, false, true).then(
      ({ result }) => result,
      (error: unknown) => {
        if (this.onError === "fallback") return this.fallback.peek(input);
        throw error;
      },
    );
  }

  async #charge(input: ChargeInput, mayLoad: boolean, dryRun: boolean): Promise<Charged> {
    const { nowMs } = input;
    const period = this.#calendar.month(nowMs);
    const midnightMs = this.#calendar.nextMidnightMs(nowMs);
    const keys = this.#chargeKeys(input);
    const args: Array<string | number> = [
      nowMs,
      input.rate.windowSeconds * 1000,
      input.rate.limit,
      input.dailyQuota ?? -1,
      // Relative, so the counter's life does not depend on Redis's clock agreeing with ours. Whole
      // ms, as every duration the script sends to PX or PEXPIRE (the script takes a fractional now).
      Math.ceil(midnightMs + QUOTA_KEEP_MS - nowMs),
      input.monthlyCredits === null ? 0 : 1,
      input.monthlyCredits ?? 0,
      period,
      input.cost,
      dryRun ? 1 : 0,
      this.#creditIdleMs,
      IDEMPOTENCY_TTL_MS,
      input.countsDaily ? 1 : 0,
    ];
    if (input.idempotencyKey !== undefined && !dryRun) {
      keys.push(`${this.prefix}cu:${this.layout.owner(input.ownerId)} ${input.idempotencyKey}`);
      args.push(randomBytes(9).toString("base64url"), input.idempotencyFingerprint ?? meterFingerprint(input));
    }
    const reply = await this.#run(CHARGE, keys, args, dryRun ? "peek" : "charge");
    if (Array.isArray(reply) && reply[0] === 6) throw new IdempotencyKeyMismatchError(keptChargeText(reply[1]));
    if (!Array.isArray(reply) || reply.length < 8 || reply.length > 11) throw new Error("unexpected reply from the charge script");
    const counts = reply.slice(0, 10);
    const written: unknown = reply[10];
    if (!counts.every((v): v is number => typeof v === "number") || (written !== undefined && typeof written !== "string")) {
      throw new Error("unexpected reply from the charge script");
    }
    const [status = 0, remaining = 0, resetMs = 0, retryMs = 0, used = 0, balance = -1, spentMonthly = 0, spentTopup = 0, chargedPeriod = 0, kept = 0] = counts;
    if (status === 4) {
      if (!mayLoad) throw new Error("credit state did not load");
      // A Check answered UNAVAILABLE meanwhile is charged nothing: the script is not sent again.
      if (input.budgetExpired) throw new ChargeAbandonedError("the check was answered before its balance was loaded");
      await this.#loadCredits(input.ownerId, period);
      if (input.budgetExpired) throw new ChargeAbandonedError("the check was answered while its balance loaded");
      return this.#charge(input, false, false);
    }
    const reason = STATUS_REASON[status] ?? null;
    const quotaUsed = status === 0 ? used : Math.max(0, used);
    const replayed = kept === 1;
    const result: ChargeResult = {
      allowed: status === 0,
      reason,
      rate: { limit: input.rate.limit, windowSeconds: input.rate.windowSeconds, remaining, resetSeconds: Math.ceil(resetMs / 1000) },
      // A quota of 0 comes back as 0 at midnight: no time to retry at.
      retryAfterSeconds:
        reason === "RATE_LIMITED"
          ? Math.max(1, Math.ceil(retryMs / 1000))
          : reason === "QUOTA_EXCEEDED" && input.dailyQuota !== 0
            ? Math.max(1, Math.ceil((midnightMs - nowMs) / 1000))
            : null,
      quota: input.dailyQuota === null ? null : { name: input.quota, limit: input.dailyQuota, remaining: Math.max(0, input.dailyQuota - quotaUsed), resetAtMs: midnightMs },
      credits: input.monthlyCredits === null || balance < 0 ? null : { balance },
      // A kept reply's credits were spent by the call that kept it, and recorded then, unless
      // that call failed (recordReplay): then this one records them.
      spent:
        status === 0 && (!replayed || input.recordReplay === true) && input.monthlyCredits !== null ? { period: chargedPeriod > 0 ? periodText(chargedPeriod) : period, monthly: spentMonthly, topup: spentTopup } : null,
      replayed,
    };
    // A refusal or peek of a metered account whose balance no charge has loaded yet (its first
    // request, or the first since the hash went idle) loads it, as the in-process meter does, so
    // it reports X-Credits-Remaining as every later one does. Allows never come here.
    if (status !== 0 && balance < 0 && input.monthlyCredits !== null) return { result: await this.#withBalance(result, input.monthlyCredits, input, period, dryRun), bucketTime: null };
    return { result, bucketTime: written ?? null };
  }

  /**
   * `refusal` with the account's balance, loaded into Redis from the store first. The refusal
   * stands without it when the load fails (as a failed peek leaves a refusal without its limit
   * headers): it charged nothing, so nothing falls back. A charge's refusal whose Check was
   * answered (UNAVAILABLE) while the balance loaded is abandoned, as a charge waiting on a load
   * is, so it is not counted as a refusal too; a peek's caller sees the budget itself.
   */
  async #withBalance(refusal: ChargeResult, monthlyCredits: number, input: ChargeInput, period: string, dryRun: boolean): Promise<ChargeResult> {
    // A reply that came after the Check was answered is not counted (the pipeline drops it): no
    // balance is loaded for it.
    if (input.budgetExpired) return refusal;
    let balance: ChargeResult["credits"] = null;
    try {
      await this.#loadCredits(input.ownerId, period);
      const state = await this.credits(input.ownerId, input.nowMs);
      if (state !== null) balance = { balance: Math.max(0, monthlyCredits - state.monthlyUsed) + Math.max(0, state.topupBalance) };
    } catch {
      // The refusal stands without the balance.
    }
    if (input.budgetExpired && !dryRun) throw new ChargeAbandonedError("the check was answered while its refusal's balance loaded");
    return balance === null ? refusal : { ...refusal, credits: balance };
  }

  /** The hash holding an owner's credit state. */
  #creditKey(ownerId: string): string {
    return `${this.prefix}c:${this.layout.owner(ownerId)}`;
  }

  get #creditIdleMs(): number {
    // Whole ms: PEXPIRE refuses a fraction (a usageFlushSeconds of 2048.2 is 2048199.9999999998 ms
    // in floats), and the scripts send it after writing the credit hash, which an error does not undo.
    return Math.max(CREDIT_IDLE_MIN_MS, Math.ceil(3 * this.usage.flushIntervalMs));
  }

  /**
   * Seeds Redis with the store's balance minus what this replica spent and has not flushed, or
   * adopts the balance an earlier release's replica loaded (see SEED). Credits other replicas
   * spent in their last flush interval are not in the store: that is the bound of what a lost
   * Redis can give back.
   *
   * A top-up racing the seed cannot be lost or doubled: the seed records the top-up total it
   * read, so a top-up it already includes is not added again when its ADD comes later; and an
   * ADD that came first found nothing loaded, so the total is read again after the seed and the
   * difference added. (That ADD was sent after its store write, and this read follows the seed,
   * which Redis ran after the ADD: the read sees the write.)
   */
  async #loadCredits(ownerId: string, period: string): Promise<void> {
    const key = this.#creditKey(ownerId);
    const { stored, unflushed } = await this.usage.withoutFlush(async () => {
      const state = await this.store.getCredits(ownerId);
      return { stored: state, unflushed: this.usage.pendingSpend(ownerId, period) };
    });
    const state = applyCreditDelta(stored, period, unflushed.monthly, unflushed.topup);
    await this.#run(SEED, [key], [state.period, state.monthlyUsed, state.topupBalance, stored.topupTotal, this.#creditIdleMs]);
    const after = await this.store.getCredits(ownerId);
    if (after.topupTotal > stored.topupTotal) await this.#run(ADD, [key], [after.topupTotal]);
  }

  async #degrade(input: ChargeInput, error: unknown): Promise<ChargeResult> {
    // Not a Redis failure: the Check was answered before its charge was sent, or Redis refused
    // the charge for another one's idempotency key.
    if (error instanceof ChargeAbandonedError || error instanceof IdempotencyKeyMismatchError) throw error;
    const since = this.#failures.due(errorKind(error));
    if (since !== null) this.logger.warn({ err: error, mode: this.onError, since }, "Redis limits failed");
    if (this.onError === "fail-closed") throw new MeterUnavailableError("rate limits, quotas and credits cannot be checked: Redis is unavailable", { cause: error });
    // A failure that came after the Check was answered UNAVAILABLE: the fallback charges nothing either.
    if (input.budgetExpired) throw new ChargeAbandonedError("the check was answered before Redis failed", { cause: error });
    return this.#degraded(input, error);
  }

  /**
   * A charge without Redis, as limits.onRedisError says: counted in-process, or let through.
   * `failure`: what Redis failed with; undefined when it was not asked (known not to answer).
   */
  #degraded(input: ChargeInput, failure: unknown): ChargeResult | Promise<ChargeResult> {
    // fail-open lets no charge with an idempotency key (ChargeUsage, VerifyKey with a cost)
    // through: its answer is kept under the key, so a charge Redis made whose reply was lost
    // (a connection reset) would never be recorded, and one Redis never saw never made. It is
    // UNAVAILABLE as under fail-closed, and the retry is answered from the charge Redis kept (and
    // records it once) or charges afresh.
    if (this.onError === "fail-open" && input.idempotencyKey !== undefined) {
      const message = "a charge with an idempotency key is not let through uncharged: Redis is unavailable";
      return Promise.reject(failure === undefined ? new MeterUnavailableError(message) : new MeterUnavailableError(message, { cause: failure }));
    }
    // A ChargeUsage's retries look for its charge in Redis, under its idempotency key: one that
    // outlasted its claim (a retry may hold the key, and have charged) charges nothing here.
    if (input.confirmClaim !== undefined) {
      const { confirmClaim, ...confirmed } = input;
      return confirmClaim().then(() => this.#degraded(confirmed, failure));
    }
    if (this.onError === "fallback") {
      this.#fellBack = true;
      this.#fallbackCharges += 1;
      return this.fallback.charge(input);
    }
    // A Check whose reply a reset lost may have been charged by Redis all the same: its credits
    // are then in Redis's balance but never recorded, and come back when the balance is next
    // loaded from the store. Telling would cost a nonce and a write per Check; fail-open is lenient.
    return {
      allowed: true,
      reason: null,
      rate: { limit: input.rate.limit, windowSeconds: input.rate.windowSeconds, remaining: input.rate.limit, resetSeconds: 0 },
      retryAfterSeconds: null,
      quota: null,
      credits: null,
      spent: null,
      replayed: false,
    };
  }

  async addCredits(ownerId: string, topupTotal: number): Promise<void> {
    await this.fallback.addCredits(ownerId, topupTotal);
    try {
      await this.#run(ADD, [this.#creditKey(ownerId)], [topupTotal]);
    } catch (error) {
      this.#queueTopup(ownerId, topupTotal, error);
    }
  }

  /**
   * Keeps a top-up total Redis did not take, to send again until it does. The top-up is in the
   * store already, so AddCredits has succeeded; ADD is idempotent, so a late first attempt
   * landing as well does no harm.
   */
  #queueTopup(ownerId: string, topupTotal: number, error: unknown): void {
    const queued = this.#unsynced.get(ownerId);
    this.#unsynced.delete(ownerId);
    this.#unsynced.set(ownerId, Math.max(queued ?? 0, topupTotal));
    if (queued === undefined) this.logger.warn({ err: error, ownerId }, "a top-up did not reach Redis; retrying until it does");
    if (this.#unsynced.size > MAX_UNSYNCED_TOPUPS) {
      const [oldest] = this.#unsynced.keys();
      if (oldest !== undefined) {
        this.#unsynced.delete(oldest);
        this.logger.error({ ownerId: oldest }, "gave up telling Redis about a top-up: the balance there catches up at the next top-up or reload");
      }
    }
    if (this.#retryTimer === undefined) {
      this.#retryTimer = setInterval(() => void this.#retryTopups(), TOPUP_RETRY_MS);
      this.#retryTimer.unref();
    }
  }

  /** One pass over the waiting top-ups, oldest first; stops at the first failure. */
  async #retryTopups(): Promise<void> {
    if (this.#retrying) return;
    this.#retrying = true;
    try {
      for (const [ownerId, topupTotal] of [...this.#unsynced]) {
        await this.#run(ADD, [this.#creditKey(ownerId)], [topupTotal]);
        if (this.#unsynced.get(ownerId) === topupTotal) this.#unsynced.delete(ownerId);
      }
    } catch {
      // Redis still fails; the next pass tries again.
    } finally {
      this.#retrying = false;
    }
    if (this.#unsynced.size === 0 && this.#retryTimer !== undefined) {
      clearInterval(this.#retryTimer);
      this.#retryTimer = undefined;
      this.logger.info("waiting top-ups reached Redis");
    }
  }

  async inheritKeyBucket(ownerId: string, fromKeyId: string, toKeyId: string): Promise<void> {
    const name = (keyId: string): string => `${this.prefix}rl:${this.layout.bucket(ownerId, bucketName({ bucketKind: "k", bucketId: keyId }))}`;
    await this.#run(INHERIT, [name(fromKeyId), name(toKeyId)], []);
    await this.fallback.inheritKeyBucket(ownerId, fromKeyId, toKeyId);
  }

  async credits(ownerId: string, nowMs: number): Promise<{ period: string; monthlyUsed: number; topupBalance: number } | null> {
    const [period, monthlyUsed, topup, seen] = await this.redis.hmget(this.#creditKey(ownerId), "period", "monthly_used", "topup", "seen");
    if (period === null || period === undefined || seen === null || seen === undefined) return null;
    return applyCreditDelta({ period, monthlyUsed: Number(monthlyUsed ?? 0), topupBalance: Number(topup ?? 0) }, this.#calendar.month(nowMs), 0, 0);
  }

  async close(): Promise<void> {
    if (this.#retryTimer !== undefined) {
      clearInterval(this.#retryTimer);
      this.#retryTimer = undefined;
      await this.#retryTopups();
      if (this.#unsynced.size > 0) {
        this.logger.error({ owners: this.#unsynced.size }, "top-ups not yet in Redis at shutdown: those balances catch up at their next top-up or reload from the store");
      }
    }
    await this.fallback.close();
  }
}
