import { status as GrpcStatus } from "@grpc/grpc-js";
import { afterAll, beforeAll, describe, expect, it, vi } from "vitest";
import { StoreUnavailableError } from "../../src/store/errors.js";
import type { KeySnapshot, SnapshotStore } from "../../src/store/store.js";
import { checkInit, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { until } from "../harness/poll.js";
import { requireServer } from "../harness/ports.js";
import { redisAvailable, startRedis } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";

const CONCURRENT = 100;
const withRedis = requireServer("redis-server", redisAvailable(), "apt-get install redis-server");

/** L1 misses so far: every Check that missed L1 has asked the lookup to load its key. */
async function l1Misses(kg: TestKeygate): Promise<number> {
  const metric = kg.app.metrics.registry.getSingleMetric("keygate_cache_lookups_total");
  if (metric === undefined) throw new Error("keygate_cache_lookups_total is not registered");
  const { values } = await metric.get();
  return values.find((v) => v.labels["layer"] === "l1" && v.labels["result"] === "miss")?.value ?? 0;
}

/**
 * Holds every store lookup until `release()`, counting them; `fail` makes the held ones reject
 * as a store outage would.
 */
function holdLookups(kg: TestKeygate, fail: boolean): { calls: () => number; release: () => void } {
  const store = kg.app.store;
  const find = store.findSnapshotByHash.bind(store);
  let calls = 0;
  let open: () => void = () => undefined;
  const released = new Promise<void>((resolve) => {
    open = resolve;
  });
  vi.spyOn(store, "findSnapshotByHash").mockImplementation(async (hash: string): Promise<KeySnapshot | null> => {
    calls += 1;
    await released;
    if (fail) throw new StoreUnavailableError("the test's store is down");
    return find(hash);
  });
  return { calls: () => calls, release: () => open() };
}

function suite(name: string, env: () => Record<string, string>): void {
  describe(name, () => {
    let kg: TestKeygate;
    let seq = 0;

    beforeAll(async () => {
      kg = await startKeygate({ env: env() });
    });
    afterAll(async () => {
      vi.restoreAllMocks();
      await kg?.stop();
    });

    async function freshKey(): Promise<string> {
      const ownerId = `coalesce-${++seq}`;
      await kg.admin.upsertAccount({ ownerId, plan: "business" });
      return (await kg.admin.createKey({ ownerId, name: "coalesce" })).secret;
    }

    it(`${CONCURRENT} concurrent Checks for one uncached key make exactly one store lookup`, async () => {
      const secret = await freshKey();
      const missesBefore = await l1Misses(kg);
      const held = holdLookups(kg, false);
      const checks = Array.from({ length: CONCURRENT }, () => kg.check(checkInit({ "x-api-key": secret })));
      // Every Check has missed L1 and asked for the key before the store answers any of them.
      await until(async () => (await l1Misses(kg)) - missesBefore >= CONCURRENT, 10_000, `${CONCURRENT} L1 misses`);
      held.release();
      const answers = await Promise.all(checks);
      vi.restoreAllMocks();
      expect(answers.map((a) => a.httpResponse.case)).toEqual(Array.from({ length: CONCURRENT }, () => "okResponse"));
      expect(held.calls()).toBe(1);
    });

    it("a failed lookup fails every Check waiting on it, and is not cached: the next Check looks again", async () => {
      const secret = await freshKey();
      const missesBefore = await l1Misses(kg);
      const held = holdLookups(kg, true);
      const checks = Array.from({ length: CONCURRENT }, () =>
        kg.check(checkInit({ "x-api-key": secret })).then(
          () => "answered",
          (error: unknown) => (error instanceof Error && "code" in error ? error.code : "other error"),
        ),
      );
      await until(async () => (await l1Misses(kg)) - missesBefore >= CONCURRENT, 10_000, `${CONCURRENT} L1 misses`);
      held.release();
      const outcomes = await Promise.all(checks);
      expect(outcomes).toEqual(Array.from({ length: CONCURRENT }, () => GrpcStatus.UNAVAILABLE));
      expect(held.calls()).toBe(1);
      vi.restoreAllMocks();

      const lookups = vi.spyOn(kg.app.store, "findSnapshotByHash");
      const after = await kg.check(checkInit({ "x-api-key": secret }));
      expect(after.httpResponse.case).toBe("okResponse");
      expect(lookups).toHaveBeenCalledTimes(1);
    });
  });
}

/**
 * Embedded SQLite answers a miss in the Check's own turn (SnapshotLookup.loadNow): the first of
 * many concurrent Checks reads the key and puts it in L1 before the next one is decided, so there
 * is nothing to coalesce and nothing to hold. Counts the reads, and makes the next `failures` throw
 * as a failing store would.
 */
function countReadsNow(kg: TestKeygate, failures: number): () => number {
  const store = kg.app.store as SnapshotStore;
  const read = store.findSnapshotByHashNow?.bind(store);
  if (read === undefined) throw new Error("the embedded store has no findSnapshotByHashNow");
  let calls = 0;
  let failing = failures;
  vi.spyOn(store as Required<SnapshotStore>, "findSnapshotByHashNow").mockImplementation((hash: string): KeySnapshot | null => {
    calls += 1;
    if (failing > 0) {
      failing -= 1;
      throw new StoreUnavailableError("the test's store is down");
    }
    return read(hash);
  });
  return () => calls;
}

describe("lookup coalescing, embedded (SQLite read in the Check's turn, in-process cache)", () => {
  let kg: TestKeygate;
  let seq = 0;

  beforeAll(async () => {
    kg = await startKeygate();
  });
  afterAll(async () => {
    vi.restoreAllMocks();
    await kg?.stop();
  });

  async function freshKey(): Promise<string> {
    const ownerId = `coalesce-now-${++seq}`;
    await kg.admin.upsertAccount({ ownerId, plan: "business" });
    return (await kg.admin.createKey({ ownerId, name: "coalesce" })).secret;
  }

  it(`${CONCURRENT} concurrent Checks for one uncached key make exactly one store read, none of it through a promise`, async () => {
    const secret = await freshKey();
    const waiting = vi.spyOn(kg.app.store, "findSnapshotByHash");
    const reads = countReadsNow(kg, 0);
    const answers = await Promise.all(Array.from({ length: CONCURRENT }, () => kg.check(checkInit({ "x-api-key": secret }))));
    vi.restoreAllMocks();
    expect(answers.map((a) => a.httpResponse.case)).toEqual(Array.from({ length: CONCURRENT }, () => "okResponse"));
    expect(reads()).toBe(1);
    expect(waiting).not.toHaveBeenCalled();
  });

  it("a read that throws answers that Check UNAVAILABLE and caches nothing: the next Check reads again and is allowed", async () => {
    const secret = await freshKey();
    const reads = countReadsNow(kg, 1);
    const failed = await kg.check(checkInit({ "x-api-key": secret })).then(
      () => "answered",
      (error: unknown) => (error instanceof Error && "code" in error ? error.code : "other error"),
    );
    expect(failed).toBe(GrpcStatus.UNAVAILABLE);
    const after = await kg.check(checkInit({ "x-api-key": secret }));
    vi.restoreAllMocks();
    expect(after.httpResponse.case).toBe("okResponse");
    expect(reads()).toBe(2);
  });
});


if (withRedis) {
  let redis: RedisServer | null = null;
  beforeAll(async () => {
    redis = await startRedis();
  });
  afterAll(async () => {
    await redis?.stop();
  });
  suite("lookup coalescing with the Redis L2 in front of the store", () => {
    if (redis === null) throw new Error("redis-server did not start");
    return { KEYGATE_REDIS_URL: redis.url };
  });
}
