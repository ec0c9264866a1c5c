import { Redis } from "ioredis";
import { pino } from "pino";
import { afterAll, beforeAll } from "vitest";
import type { Logger } from "pino";
import type { ChargeInput } from "../../src/limits/limits.js";
import type { RedisMeter } from "../../src/limits/redis.js";
import { UsageRecorder } from "../../src/limits/usage.js";
import type { MeteringStore } from "../../src/store/store.js";
import { checkInit, checkOutcome, startKeygate } from "./keygate.js";
import type { TestKeygate } from "./keygate.js";
import { until } from "./poll.js";
import { startRedis } from "./redis-server.js";
import type { RedisServer } from "./redis-server.js";
import { startTcpRelay } from "./tcp-relay.js";
import type { TcpRelay } from "./tcp-relay.js";

/** A redis-server for a meter's tests, and an ioredis client to read what the meter wrote. */
export interface RedisWithClient {
  redis: RedisServer;
  client: Redis;
  /** Disconnects the client and stops the server. */
  stop(): Promise<void>;
}

/** Starts a redis-server and connects a client to it; throws when redis-server is not on PATH. */
export async function startRedisWithClient(): Promise<RedisWithClient> {
  const redis = await startRedis();
  if (redis === null) throw new Error("redis-server is not on PATH");
  const client = new Redis(redis.url);
  return {
    redis,
    client,
    async stop() {
      client.disconnect();
      await redis.stop();
    },
  };
}

/**
 * Starts a redis-server with a client in the calling suite's beforeAll and stops both in its
 * afterAll; the function returned gives the client inside a test.
 */
export function suiteRedisClient(): () => Redis {
  let started: RedisWithClient | undefined;
  beforeAll(async () => {
    started = await startRedisWithClient();
  });
  afterAll(async () => {
    await started?.stop();
  });
  return () => {
    if (started === undefined) throw new Error("the suite's redis-server did not start");
    return started.client;
  };
}

/** The store a meter's tests give it: no credits loaded, no usage, every write accepted. */
export type StubMeteringStore = Pick<MeteringStore, "getCredits" | "listUsage" | "applyUsage">;

/** What a meter needs besides its connection: a silent logger, a store with no credits or usage, and a recorder over it. */
export function stubMeterDeps(): { logger: Logger; store: StubMeteringStore; usage: UsageRecorder } {
  const logger = pino({ level: "silent" });
  const store: StubMeteringStore = {
    getCredits: async () => ({ period: "", monthlyUsed: 0, topupBalance: 0, topupTotal: 0 }),
    listUsage: async () => [],
    applyUsage: async () => undefined,
  };
  return { logger, store, usage: new UsageRecorder(store, logger, 5000) };
}

/** A live key's charge of 3 against 1000 a minute, 100 a day and 10 credits a month, at 2026-12-03T12:00Z, in `ownerId`'s own bucket. */
export function chargeInput(ownerId: string): ChargeInput {
  return {
    ownerId,
    bucketKind: "u",
    bucketId: ownerId,
    rate: { limit: 1000, windowSeconds: 60 },
    dailyQuota: 100,
    countsDaily: true,
    monthlyCredits: 10,
    cost: 3,
    nowMs: Date.parse("2026-12-03T12:00:00Z"),
    meter: "live",
    quota: null,
    budgetExpired: false,
  };
}

/** A keygate whose Redis connections go through a relay that can hold a charge script and lose its answer. */
export interface KeygateBehindRelay extends RedisWithClient {
  relay: TcpRelay;
  kg: TestKeygate;
  /**
   * Runs `call` with the charge script for `scriptFor` held, then lets it run, and resets every
   * connection once `ran` says Redis ran it (its answer on the way back); resolves with what `call`
   * answered after keygate's connections came back.
   */
  withAnswerLost<T>(call: () => Promise<T>, ran: () => Promise<boolean>, scriptFor: string): Promise<T>;
}

/** Starts a redis-server, a relay in front of it, and a keygate with `policy` whose KEYGATE_REDIS_URL is the relay. */
export async function startKeygateBehindRelay(policy: unknown): Promise<KeygateBehindRelay> {
  const { redis, client, stop: stopRedis } = await startRedisWithClient();
  let delayAnswers = false;
  // What started is stopped again when a later part fails to start.
  const relay = await startTcpRelay(redis.port, { answerDelayMs: () => (delayAnswers ? 3000 : 0) }).catch(async (error: unknown) => {
    await stopRedis();
    throw error;
  });
  const kg = await startKeygate({ policy, env: { KEYGATE_REDIS_URL: `redis://127.0.0.1:${relay.port}` } }).catch(async (error: unknown) => {
    await relay.close();
    await stopRedis();
    throw error;
  });
  return {
    redis,
    client,
    relay,
    kg,
    async withAnswerLost<T>(call: () => Promise<T>, ran: () => Promise<boolean>, scriptFor: string): Promise<T> {
      // Hold the charge script for a moment, so only its answer (not the idempotency claim's) is delayed.
      relay.holdWhen = (chunk) => chunk.toLowerCase().includes("evalsha") && chunk.includes(scriptFor);
      const heldBefore = relay.heldChunks;
      const pending = call();
      await until(() => relay.heldChunks > heldBefore, 5000, "the charge script sent", { intervalMs: 1 });
      delayAnswers = true;
      relay.release();
      await until(ran, 5000, "Redis running the charge script", { intervalMs: 5 });
      // The answer is on its way back when the connection resets.
      relay.dropAll();
      delayAnswers = false;
      const answer = await pending;
      // keygate's connections come back by themselves: an admin change (which tells every replica
      // through Redis) goes through again.
      await until(() => kg.admin.upsertAccount({ ownerId: "reconnected", plan: "metered" }).then(() => true), 10_000, "Redis answering keygate again", { intervalMs: 50, retryErrors: true });
      return answer;
    },
    async stop() {
      client.disconnect();
      await kg.stop();
      await relay.close();
      await redis.stop();
    },
  };
}

/** Scripts of kind `op` ("charge", "give_back", …) `kg` has run against Redis, answered or failed (keygate_backend_duration_seconds's count). */
export async function redisCallCount(kg: TestKeygate, op: string): Promise<number> {
  const metric = kg.app.metrics.registry.getSingleMetric("keygate_backend_duration_seconds");
  if (metric === undefined) throw new Error("keygate_backend_duration_seconds is not registered");
  const { values } = await metric.get();
  return values.find((v) => "metricName" in v && v.metricName === "keygate_backend_duration_seconds_count" && v.labels["backend"] === "redis" && v.labels["op"] === op)?.value ?? 0;
}

/** Charges `input` as a Check whose budget runs out while the charge is in Redis: "charged", or what the charge threw. */
export async function lateCharge(meter: RedisMeter, input: ChargeInput): Promise<unknown> {
  const late = { ...input };
  const charged = meter.charge(late);
  late.budgetExpired = true;
  return Promise.resolve(charged).then(
    () => "charged",
    (error: unknown) => error,
  );
}

/** A keygate whose Redis answers every command `delayMs()` late, in order, and a Check budget of its own. */
export interface KeygateBehindSlowRedis {
  kg: TestKeygate;
  stop(): Promise<void>;
}

/** A suite's keygate behind a slow Redis (suiteBehindSlowRedis): the keygate, and the delay every answer waits, set by the test. */
export interface SuiteBehindSlowRedis {
  kg(): TestKeygate;
  /** Milliseconds each Redis answer waits from now on (0 at the start and after the suite). */
  setDelay(ms: number): void;
}

/** Starts a keygate behind a slow Redis (startKeygateBehindSlowRedis) in the calling suite's beforeAll and stops it in its afterAll. */
export function suiteBehindSlowRedis(policy: unknown, budgetMs: number): SuiteBehindSlowRedis {
  let delayMs = 0;
  let started: KeygateBehindSlowRedis | undefined;
  beforeAll(async () => {
    started = await startKeygateBehindSlowRedis(policy, budgetMs, () => delayMs);
  });
  afterAll(async () => {
    delayMs = 0;
    await started?.stop();
  });
  return {
    kg() {
      if (started === undefined) throw new Error("the suite's keygate did not start");
      return started.kg;
    },
    setDelay(ms) {
      delayMs = ms;
    },
  };
}

/** Starts a redis-server, an ordered delay relay in front of it, and a keygate with `policy` and KEYGATE_CHECK_BUDGET_MS `budgetMs` on the relay. */
export async function startKeygateBehindSlowRedis(policy: unknown, budgetMs: number, delayMs: () => number): Promise<KeygateBehindSlowRedis> {
  const redis = await startRedis();
  if (redis === null) throw new Error("redis-server is not on PATH");
  const relay = await startTcpRelay(redis.port, { answerDelayMs: delayMs }).catch(async (error: unknown) => {
    await redis.stop();
    throw error;
  });
  const kg = await startKeygate({ policy, env: { KEYGATE_REDIS_URL: `redis://127.0.0.1:${relay.port}`, KEYGATE_CHECK_BUDGET_MS: String(budgetMs) } }).catch(async (error: unknown) => {
    await relay.close();
    await redis.stop();
    throw error;
  });
  return {
    kg,
    async stop() {
      await kg.stop();
      await relay.close();
      await redis.stop();
    },
  };
}

/** A gRPC Check's HTTP status, or "grpc <code>" when the call itself failed (UNAVAILABLE is "grpc 14"). */
export async function checkStatusOrCode(kg: TestKeygate, secret: string, path?: string): Promise<number | string> {
  try {
    return checkOutcome(await kg.check(checkInit({ "x-api-key": secret }, path))).status;
  } catch (error) {
    return `grpc ${error instanceof Error && "code" in error ? String(error.code) : "?"}`;
  }
}
