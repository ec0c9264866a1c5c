import { status as GrpcStatus } from "@grpc/grpc-js";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { KeySnapshot } from "../../src/store/store.js";
import { checkInit, checkOutcome, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { mongoWireAvailable, startMongoWire } from "../harness/mongo-wire.js";
import type { MongoWire } from "../harness/mongo-wire.js";
import { until } from "../harness/poll.js";
import { requireServer } from "../harness/ports.js";
import { redisAvailable, startRedis } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";
import { startTcpRelay } from "../harness/tcp-relay.js";
import type { TcpRelay } from "../harness/tcp-relay.js";

// While MongoDB answers slower than the Check budget (load, a GC pause, every key cold after a
// restart), a key no cache holds is answered UNAVAILABLE. Its lookup's read goes on, and its
// answer used to be thrown away: every retry read MongoDB again and was thrown away again, so
// the cache never warmed and MongoDB's load stayed high (a metastable failure). Now the late
// answer is cached as an answer in time would have been (SnapshotLookup), so the retry is
// answered from L1 without another read; and a change seen while the late read was out (here a
// revoke through KeyAdmin) keeps it out of the caches, as it keeps out an answer in time.

const BUDGET_MS = 150;
/** How long MongoDB's answers take while it is slow: well past the budget. */
const SLOW_MS = 400;
/** How long the lookup's answer is held in the revoke case: past the revoke's own round trips. */
const HELD_MS = 2500;

const mongoReady = requireServer("MongoDB-wire server", mongoWireAvailable(), "run .ci/install-mongo-wire.sh");
const withRedis = redisAvailable();

/** Whether a Check failed with gRPC UNAVAILABLE (the budget ran out, a fail-closed 503). */
async function unavailable(kg: TestKeygate, secret: string): Promise<boolean> {
  return kg.check(checkInit({ "x-api-key": secret })).then(
    () => false,
    (error: unknown) => error instanceof Error && "code" in error && error.code === GrpcStatus.UNAVAILABLE,
  );
}

/**
 * Counts the store's lookups (one MongoDB read each: no two are made in one turn here) and the
 * late answers SnapshotLookup took from them, after the cache step it runs on one.
 */
function watchLookups(kg: TestKeygate): { lookups: () => number; lateAnswers: () => number } {
  const store = kg.app.store;
  const find = store.findSnapshotByHash.bind(store);
  let lookups = 0;
  let lateAnswers = 0;
  store.findSnapshotByHash = (hash: string, late?: (snapshot: KeySnapshot | null) => void): Promise<KeySnapshot | null> => {
    lookups += 1;
    return find(hash, (snapshot) => {
      late?.(snapshot);
      lateAnswers += 1;
    });
  };
  return { lookups: () => lookups, lateAnswers: () => lateAnswers };
}

describe.runIf(mongoReady).each([
  ["without Redis", false],
  ["with Redis (L2 and its bus)", true],
] as const)("MongoDB slower than the Check budget, %s: a late lookup answer", (_name, redisToo) => {
  let mongo: MongoWire | undefined;
  let redis: RedisServer | null = null;
  let relay: TcpRelay | undefined;
  let kg: TestKeygate;
  let delayMs = 0;
  let seq = 0;

  beforeAll(async () => {
    mongo = await startMongoWire();
    relay = await startTcpRelay(Number(new URL(mongo.uri).port), { answerDelayMs: () => delayMs });
    const uri = new URL(mongo.uri);
    uri.port = String(relay.port);
    if (redisToo && withRedis) redis = await startRedis();
    kg = await startKeygate({
      env: {
        KEYGATE_MONGODB_URI: uri.toString(),
        KEYGATE_PEPPER: "late-lookup-pepper-0123456789abcdefghijkl",
        KEYGATE_CHECK_BUDGET_MS: String(BUDGET_MS),
        ...(redis === null ? {} : { KEYGATE_REDIS_URL: redis.url }),
      },
    });
  }, 120_000);
  afterAll(async () => {
    await kg?.stop();
    await relay?.close();
    await redis?.stop();
    await mongo?.stop();
  });

  /** A new key, issued while MongoDB answers at once; no cache holds it. */
  async function coldKey(): Promise<{ id: string; secret: string }> {
    delayMs = 0;
    const ownerId = `late-lookup-${++seq}`;
    await kg.admin.upsertAccount({ ownerId, plan: "business" });
    const { key, secret } = await kg.admin.createKey({ ownerId, name: "late" });
    if (key === undefined) throw new Error("CreateKey returned no key");
    return { id: key.id, secret };
  }

  it.skipIf(redisToo && !withRedis)("happy: is cached, and the retry is allowed from the cache without another MongoDB read", async () => {
    const { secret } = await coldKey();
    const watch = watchLookups(kg);
    delayMs = SLOW_MS;
    expect(await unavailable(kg, secret)).toBe(true);
    expect(watch.lookups()).toBe(1);
    await until(() => watch.lateAnswers() === 1, 10_000, "the late answer reached SnapshotLookup");
    delayMs = 0;

    expect(checkOutcome(await kg.check(checkInit({ "x-api-key": secret })))).toEqual({ status: 200, code: null });
    expect(watch.lookups()).toBe(1);
  });

  it.skipIf(redisToo && !withRedis)("security: a key revoked while its late lookup was out is not allowed afterwards", async () => {
    const { id, secret } = await coldKey();
    const watch = watchLookups(kg);
    // The lookup's answer (the key active) is held past the revoke, which runs at full speed.
    delayMs = HELD_MS;
    expect(await unavailable(kg, secret)).toBe(true);
    delayMs = 0;
    await kg.admin.revokeKey({ id, reason: "leaked" });
    expect(watch.lateAnswers()).toBe(0);
    await until(() => watch.lateAnswers() === 1, 10_000, "the late answer reached SnapshotLookup");

    // The revoke's invalidation came after the read began: the late answer was not cached, so the
    // next Check reads MongoDB again and sees the revoke.
    expect(checkOutcome(await kg.check(checkInit({ "x-api-key": secret })))).toEqual({ status: 401, code: "KEY_REVOKED" });
    expect(watch.lookups()).toBe(2);
  });
});
