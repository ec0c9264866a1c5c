import { describe, expect, it } from "vitest";
import { SnapshotLookup } from "../../src/cache/lookup.js";
import { LocalInvalidationBus, MemoryCache } from "../../src/cache/memory.js";
import { StoreUnavailableError } from "../../src/store/errors.js";
import type { Invalidation, InvalidationBus } from "../../src/cache/cache.js";
import type { KeySnapshot, SnapshotStore } from "../../src/store/store.js";
import { lookupSnapshot } from "../harness/lookup-stores.js";

// A store read that outlives the store's deadline (MongoKeyStore's LookupBatcher) fails its
// lookup, and its answer comes later through findSnapshotByHash's `late`. SnapshotLookup keeps
// it as an answer in time would have been, by the same rules, so the retry is answered from L1:
// not after a change seen since the read began, and never over a newer read's answer.

const HASH = "h-late";
const LIVE = lookupSnapshot("owner-late", "key_late", HASH);
const REVOKED = lookupSnapshot("owner-late", "key_late", HASH, 1_700_000_000_001);

/** A store each of whose reads fails at once, as on its deadline, and is answered by the test later. */
function slowStore(): SnapshotStore & { late: Array<(snapshot: KeySnapshot | null) => void>; answerNext: KeySnapshot | null | undefined } {
  const store = {
    late: [] as Array<(snapshot: KeySnapshot | null) => void>,
    /** When set, the next read answers in time with it instead. */
    answerNext: undefined as KeySnapshot | null | undefined,
    async findSnapshotByHash(_hash: string, late?: (snapshot: KeySnapshot | null) => void): Promise<KeySnapshot | null> {
      if (store.answerNext !== undefined) {
        const answer = store.answerNext;
        store.answerNext = undefined;
        return answer;
      }
      if (late !== undefined) store.late.push(late);
      throw new StoreUnavailableError("the test's store did not answer in time");
    },
  };
  return store;
}

function setup(): { lookup: SnapshotLookup; store: ReturnType<typeof slowStore>; bus: LocalInvalidationBus } {
  const store = slowStore();
  const bus = new LocalInvalidationBus();
  const local = new MemoryCache({ maxEntries: 10, ttlSeconds: 60, negativeMaxEntries: 10, negativeTtlSeconds: 5 });
  return { lookup: new SnapshotLookup({ local, store, bus }), store, bus };
}

/** A bus whose Redis is down: it delivers nothing, and publishing fails. */
class DownBus implements InvalidationBus {
  readonly connected = false;
  async publish(): Promise<void> {
    throw new Error("Redis is down");
  }
  subscribe(_handler: (event: Invalidation) => void): void {}
  async close(): Promise<void> {}
}

describe("SnapshotLookup: a store answer that comes after the lookup failed", () => {
  it("happy: is kept in L1, a key as a key and an unknown hash as a miss", async () => {
    const { lookup, store } = setup();
    await expect(lookup.load(HASH)).rejects.toBeInstanceOf(StoreUnavailableError);
    await expect(lookup.load("h-none")).rejects.toBeInstanceOf(StoreUnavailableError);
    expect(lookup.peek(HASH)).toBeUndefined();
    store.late[0]?.(LIVE);
    store.late[1]?.(null);
    expect(lookup.peek(HASH)?.key.id).toBe("key_late");
    expect(lookup.peek("h-none")).toBeNull();
  });

  it("security: is not kept after an invalidation seen since its read began", async () => {
    const { lookup, store } = setup();
    await expect(lookup.load(HASH)).rejects.toBeInstanceOf(StoreUnavailableError);
    await lookup.invalidate({ kind: "key", hash: HASH });
    store.late[0]?.(LIVE);
    expect(lookup.peek(HASH)).toBeUndefined();
  });

  it("security: an older read's late answer never replaces a newer read's answer", async () => {
    const { lookup, store } = setup();
    // Read 1 gives up; read 2 (the retry) is answered in time with the key revoked; read 1's
    // answer, the key as it was, comes after.
    await expect(lookup.load(HASH)).rejects.toBeInstanceOf(StoreUnavailableError);
    store.answerNext = REVOKED;
    expect((await lookup.load(HASH))?.key.revokedAtMs).toBe(REVOKED.key.revokedAtMs);
    store.late[0]?.(LIVE);
    expect(lookup.peek(HASH)?.key.revokedAtMs).toBe(REVOKED.key.revokedAtMs);
  });

  it("security: of two late answers, the older coming last is not kept over the newer", async () => {
    const { lookup, store } = setup();
    await expect(lookup.load(HASH)).rejects.toBeInstanceOf(StoreUnavailableError);
    await expect(lookup.load(HASH)).rejects.toBeInstanceOf(StoreUnavailableError);
    store.late[1]?.(REVOKED);
    store.late[0]?.(LIVE);
    expect(lookup.peek(HASH)?.key.revokedAtMs).toBe(REVOKED.key.revokedAtMs);
  });

  it("happy: under a steady stream of retries the first late answer is kept (the cache warms)", async () => {
    const { lookup, store } = setup();
    for (let i = 0; i < 3; i += 1) await expect(lookup.load(HASH)).rejects.toBeInstanceOf(StoreUnavailableError);
    store.late[0]?.(LIVE);
    expect(lookup.peek(HASH)?.key.id).toBe("key_late");
  });

  it("security: is not kept while the bus is down, when no invalidation could reach this replica", async () => {
    // While Redis is down L1 trusts a read for DISCONNECTED_TTL_MS (1 s) from when it is kept, so
    // a key revoked on another replica stops passing here within about a second. A late answer
    // may show the store as it was up to LATE_ANSWER_WINDOW_MS (5 s) ago: kept, it let a key
    // revoked elsewhere after its read ran pass for up to about 6 s.
    const store = slowStore();
    const local = new MemoryCache({ maxEntries: 10, ttlSeconds: 60, negativeMaxEntries: 10, negativeTtlSeconds: 5 });
    const lookup = new SnapshotLookup({ local, store, bus: new DownBus() });
    await expect(lookup.load(HASH)).rejects.toBeInstanceOf(StoreUnavailableError);
    expect(store.late).toHaveLength(1);
    store.late[0]?.(LIVE);
    expect(lookup.peek(HASH)).toBeUndefined();
  });
});
