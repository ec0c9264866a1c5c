import { Redis } from "ioredis";
import { pino } from "pino";
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from "vitest";
import { IdempotencyInProgressError, IdempotencyUnavailableError, LocalIdempotencyLedger, RedisIdempotencyLedger } from "../../src/limits/idempotency.js";
import type { ConfirmClaim, IdempotencyLedger } from "../../src/limits/idempotency.js";
import { until } from "../harness/poll.js";
import { requireServer } from "../harness/ports.js";
import { redisAvailable, startRedis } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";

// The idempotency ledgers (README, "Charges from a backend"): a repeat within 24 hours gets the first
// answer; an answer its caller says not to keep (a ChargeUsage refused RATE_LIMITED, which charged
// nothing) lets the key go, so the retry its Retry-After asks for is judged again. The Redis ledger
// tries twice to store an answer, and says so at warn when both fail. Its claim is the call's own
// (a token), renewed while the call runs; a call whose claim another call took writes nothing.

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

  /** Makes `client`'s write of an answer (JSON, put in place of the call's claim by a script) fail `times` times. */
  function failAnswerWrites(times: number): void {
    const realEval = client.eval.bind(client);
    let failures = 0;
    vi.spyOn(client, "eval").mockImplementation(((...args: Parameters<typeof realEval>) => {
      if (typeof args[4] === "string" && args[4].startsWith("{") && failures < times) {
        failures += 1;
        return Promise.reject(new Error("injected: connection reset"));
      }
      return realEval(...args);
    }) as typeof client.eval);
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
    expect(await client.get("kg:idem:o k6")).toMatch(/^running:/);
    const logged = lines.map((line) => JSON.parse(line) as { level: number; idempotencyKey: string; err: { message: string } });
    expect(logged.map((entry) => [entry.level, entry.idempotencyKey, entry.err.message])).toEqual([[40, "o k6", "injected: connection reset"]]);
  });
  /**
   * Starts a call with `key` that waits until released, lets its claim run out by hand (as when
   * Redis could not be reached to renew it for 30 s), and has a retry take the key and keep
   * `{reason: null}`. Resolves once the retry has; `finish` ends the first call with `outcome`.
   */
  async function outlastedClaim(key: string): Promise<{ first: Promise<unknown>; confirm: ConfirmClaim; finish: (outcome: { reason: string | null } | Error) => void }> {
    let finish: (outcome: { reason: string | null } | Error) => void = () => undefined;
    let confirm: ConfirmClaim = () => Promise.resolve();
    const first = ledger.once(
      key,
      (_afterFailure, confirmClaim) => {
        confirm = confirmClaim;
        return new Promise<{ reason: string | null }>((resolve, reject) => {
          finish = (outcome) => (outcome instanceof Error ? reject(outcome) : resolve(outcome));
        });
      },
      notRateLimited,
    );
    first.catch(() => undefined);
    await until(async () => (await client.get(`kg:idem:${key}`))?.startsWith("running:") === true, 5000, "the first call's claim");
    await confirm();
    await client.pexpire(`kg:idem:${key}`, 1);
    await until(async () => (await client.exists(`kg:idem:${key}`)) === 0, 5000, "the claim ran out");
    expect(await ledger.once(key, counted({ reason: null }).run, notRateLimited)).toEqual({ value: { reason: null }, replayed: false });
    return { first, confirm, finish };
  }

  describe("error: a call that outlasted its claim", () => {
    it("is told its claim is gone, and its failure leaves the retry's answer under the key", async () => {
      const { first, confirm, finish } = await outlastedClaim("o k8");
      await expect(confirm()).rejects.toBeInstanceOf(IdempotencyUnavailableError);
      finish(new Error("injected: the store read timed out"));
      await expect(first).rejects.toThrow("injected");
      expect(await client.get("kg:idem:o k8")).toBe('{"reason":null}');
    });

    it("stores neither its answer nor its release over the retry's answer", async () => {
      const kept = await outlastedClaim("o k9");
      lines.length = 0;
      kept.finish({ reason: "QUOTA_EXCEEDED" });
      expect(await kept.first).toEqual({ value: { reason: "QUOTA_EXCEEDED" }, replayed: false });
      expect(await client.get("kg:idem:o k9")).toBe('{"reason":null}');
      expect(lines.map((line) => (JSON.parse(line) as { idempotencyKey: string }).idempotencyKey)).toEqual(["o k9"]);
      const released = await outlastedClaim("o k10");
      released.finish({ reason: "RATE_LIMITED" });
      await released.first;
      expect(await client.get("kg:idem:o k10")).toBe('{"reason":null}');
    });
  });

  it("a call running longer than its claim's 30 s renews it, and still holds it", async () => {
    vi.useFakeTimers({ toFake: ["setInterval", "clearInterval"] });
    try {
      let finish: () => void = () => undefined;
      let confirm: ConfirmClaim = () => Promise.resolve();
      const running = ledger.once("o k11", (_afterFailure, confirmClaim) => {
        confirm = confirmClaim;
        return new Promise<{ reason: null }>((resolve) => (finish = () => resolve({ reason: null })));
      });
      await until(async () => (await client.get("kg:idem:o k11"))?.startsWith("running:") === true, 5000, "the claim");
      // 25 s of the claim gone by: the next renewal (every 10 s) gives it 30 s again.
      await client.pexpire("kg:idem:o k11", 5000);
      vi.advanceTimersByTime(10_000);
      await until(async () => (await client.pttl("kg:idem:o k11")) > 25_000, 5000, "the claim renewed");
      await expect(confirm()).resolves.toBeUndefined();
      finish();
      expect(await running).toEqual({ value: { reason: null }, replayed: false });
      expect(await client.get("kg:idem:o k11")).toBe('{"reason":null}');
    } finally {
      vi.useRealTimers();
    }
  });

  it("error: a claim written by an earlier release (the bare word) is another call's: the key is still running", async () => {
    await client.set("kg:idem:o k12", "running", "PX", 30_000);
    const run = counted({ reason: null });
    await expect(ledger.once("o k12", run.run)).rejects.toBeInstanceOf(IdempotencyInProgressError);
    expect([run.calls.n, await client.get("kg:idem:o k12")]).toEqual([0, "running"]);
  });
});
