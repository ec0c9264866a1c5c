import { Redis } from "ioredis";
import { pino } from "pino";
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from "vitest";
import { LocalIdempotencyLedger, RedisIdempotencyLedger } from "../../src/limits/idempotency.js";
import type { IdempotencyLedger } from "../../src/limits/idempotency.js";
import { requireServer } from "../harness/ports.js";
import { redisAvailable, startRedis } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";

// The idempotency ledgers (README, "Charges from a backend"): a repeat within 24 hours gets the first
// answer; an answer its caller says not to keep (a ChargeUsage refused RATE_LIMITED, which charged
// nothing) lets the key go, so the retry its Retry-After asks for is judged again. The Redis ledger
// tries twice to store an answer, and says so at warn when both fail.

/** A run that counts its calls and answers `answer`. */
function counted<T>(answer: T) {
  const calls = { n: 0 };
  return { calls, run: async (): Promise<T> => ((calls.n += 1), answer) };
}

const notRateLimited = (answer: { reason: string | null }): boolean => answer.reason !== "RATE_LIMITED";

function keepCases(ledger: () => IdempotencyLedger): void {
  it("an answer not kept lets the key go: the next call runs and is not a replay", async () => {
    const limited = counted({ reason: "RATE_LIMITED" });
    expect(await ledger().once("o k1", limited.run, notRateLimited)).toEqual({ value: { reason: "RATE_LIMITED" }, replayed: false });
    const charged = counted({ reason: null });
    expect(await ledger().once("o k1", charged.run, notRateLimited)).toEqual({ value: { reason: null }, replayed: false });
    expect(await ledger().once("o k1", charged.run, notRateLimited)).toEqual({ value: { reason: null }, replayed: true });
    expect([limited.calls.n, charged.calls.n]).toEqual([1, 1]);
  });

  it("a kept refusal is replayed", async () => {
    const refused = counted({ reason: "INSUFFICIENT_CREDITS" });
    await ledger().once("o k2", refused.run, notRateLimited);
    expect(await ledger().once("o k2", refused.run, notRateLimited)).toEqual({ value: { reason: "INSUFFICIENT_CREDITS" }, replayed: true });
    expect(refused.calls.n).toBe(1);
  });
}

describe("the in-process ledger", () => {
  const local = new LocalIdempotencyLedger();
  keepCases(() => local);

  it("a call waiting on one whose answer is not kept runs on its own", async () => {
    let answerFirst: (value: { reason: string | null }) => void = () => undefined;
    const first = local.once("o k3", () => new Promise<{ reason: string | null }>((resolve) => (answerFirst = resolve)), notRateLimited);
    const second = counted({ reason: null });
    const waiting = local.once("o k3", second.run, notRateLimited);
    answerFirst({ reason: "RATE_LIMITED" });
    expect(await first).toEqual({ value: { reason: "RATE_LIMITED" }, replayed: false });
    expect(await waiting).toEqual({ value: { reason: null }, replayed: false });
    expect(second.calls.n).toBe(1);
  });
});

const redisReady = requireServer("redis-server", redisAvailable(), "apt-get install redis-server");

describe.runIf(redisReady)("the Redis ledger", () => {
  let redis: RedisServer;
  let client: Redis;
  const lines: string[] = [];
  const logger = pino({ level: "warn" }, { write: (line: string) => void lines.push(line) });
  let ledger: RedisIdempotencyLedger;
  beforeAll(async () => {
    const started = await startRedis();
    if (started === null) throw new Error("redis-server is not on PATH");
    redis = started;
    client = new Redis(redis.url);
    ledger = new RedisIdempotencyLedger(client, logger);
  });
  afterEach(() => vi.restoreAllMocks());
  afterAll(async () => {
    client?.disconnect();
    await redis?.stop();
  });

  keepCases(() => ledger);

  it("an answer not kept deletes the claim at once; a kept one is stored for 24 hours", async () => {
    await ledger.once("o k4", counted({ reason: "RATE_LIMITED" }).run, notRateLimited);
    await ledger.once("o k7", counted({ reason: "QUOTA_EXCEEDED" }).run, notRateLimited);
    const ttlMs = await client.pttl("kg:idem:o k7");
    expect([await client.exists("kg:idem:o k4"), await client.get("kg:idem:o k7"), ttlMs > 86_000_000 && ttlMs <= 86_400_000]).toEqual([0, '{"reason":"QUOTA_EXCEEDED"}', true]);
  });

  /** Makes `client`'s SET of an answer (JSON) fail `times` times. */
  function failAnswerWrites(times: number): void {
    const realSet = client.set.bind(client);
    let failures = 0;
    vi.spyOn(client, "set").mockImplementation(((...args: Parameters<typeof realSet>) => {
      if (typeof args[1] === "string" && args[1].startsWith("{") && failures < times) {
        failures += 1;
        return Promise.reject(new Error("injected: connection reset"));
      }
      return realSet(...args);
    }) as typeof client.set);
  }

  it("an answer whose first write fails is stored by the second, and nothing is logged", async () => {
    failAnswerWrites(1);
    lines.length = 0;
    expect(await ledger.once("o k5", counted({ reason: null }).run)).toEqual({ value: { reason: null }, replayed: false });
    expect([await client.get("kg:idem:o k5"), lines]).toEqual(['{"reason":null}', []]);
  });

  it("an answer both writes fail: the caller still gets it, the claim is left to run out, and a warning names the key", async () => {
    failAnswerWrites(2);
    lines.length = 0;
    expect(await ledger.once("o k6", counted({ reason: null }).run)).toEqual({ value: { reason: null }, replayed: false });
    expect(await client.get("kg:idem:o k6")).toBe("running");
    const logged = lines.map((line) => JSON.parse(line) as { level: number; idempotencyKey: string; err: { message: string } });
    expect(logged.map((entry) => [entry.level, entry.idempotencyKey, entry.err.message])).toEqual([[40, "o k6", "injected: connection reset"]]);
  });
});
