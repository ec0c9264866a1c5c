import { describe, expect, it } from "vitest";
import { SnapshotLookup } from "../../src/cache/lookup.js";
import type { LookupObserver } from "../../src/cache/lookup.js";
import type { FillToken, SharedCache, SharedRead } from "../../src/cache/cache.js";
import { LocalInvalidationBus, MemoryCache } from "../../src/cache/memory.js";
import { StoreUnavailableError } from "../../src/store/errors.js";
import { newKeyRecord } from "../../src/store/store.js";
import type { KeySnapshot, SnapshotStore } from "../../src/store/store.js";

const SNAPSHOT: KeySnapshot = {
  key: newKeyRecord({ id: "key_01NOW", hash: "h-known", ownerId: "owner-now", name: "now", mode: "live", start: "kg_live_abcd", last4: "wxyz", createdAtMs: 0 }),
  account: { ownerId: "owner-now", plan: "business", subscriptionStatus: "active", role: "standard", createdAtMs: 0, updatedAtMs: 0 },
};

/** A store that answers in the caller's turn, as SQLite does, and counts both kinds of read. */
function nowStore(fail = false): SnapshotStore & { now: number; waiting: number } {
  const store = {
    now: 0,
    waiting: 0,
    findSnapshotByHashNow(hash: string): KeySnapshot | null {
      store.now += 1;
      if (fail) throw new StoreUnavailableError("the test's store is down");
      return hash === SNAPSHOT.key.hash ? SNAPSHOT : null;
    },
    async findSnapshotByHash(hash: string): Promise<KeySnapshot | null> {
      store.waiting += 1;
      return hash === SNAPSHOT.key.hash ? SNAPSHOT : null;
    },
  };
  return store;
}

function recorder(): LookupObserver & { calls: string[] } {
  const calls: string[] = [];
  return {
    calls,
    cacheResult: (layer, result) => calls.push(`${layer} ${result}`),
    backendCall: (backend, op, _seconds, ok) => calls.push(`${backend} ${op} ${ok ? "ok" : "failed"}`),
  };
}

const FILL: FillToken = { generation: 0, atMs: 0 };

const local = (): MemoryCache => new MemoryCache({ maxEntries: 10, ttlSeconds: 60, negativeMaxEntries: 10, negativeTtlSeconds: 5 });

describe("SnapshotLookup.loadNow (an L1 miss read in the caller's turn)", () => {
  it("reads a store that answers at once, keeps the key in L1 and reports the store call", () => {
    const store = nowStore();
    const observer = recorder();
    const lookup = new SnapshotLookup({ local: local(), store, bus: new LocalInvalidationBus(), observer });
    // What L1 keeps, the same object later Checks read.
    const read = lookup.loadNow("h-known");
    expect(read).toStrictEqual(local().set("h-known", SNAPSHOT));
    expect(read?.key.id).toBe("key_01NOW");
    expect(lookup.peek("h-known")).toBe(read);
    expect(store.now).toBe(1);
    expect(store.waiting).toBe(0);
    expect(observer.calls).toEqual(["store find_snapshot ok", "l1 hit"]);
  });

  it("answers an unknown key null and caches the miss", () => {
    const store = nowStore();
    const lookup = new SnapshotLookup({ local: local(), store, bus: new LocalInvalidationBus() });
    expect(lookup.loadNow("h-unknown")).toBeNull();
    expect(lookup.peek("h-unknown")).toBeNull();
    expect(store.now).toBe(1);
  });

  it("throws what the store throws, reports the failed call and caches nothing", () => {
    const store = nowStore(true);
    const observer = recorder();
    const lookup = new SnapshotLookup({ local: local(), store, bus: new LocalInvalidationBus(), observer });
    expect(() => lookup.loadNow("h-known")).toThrow(StoreUnavailableError);
    expect(observer.calls).toEqual(["store find_snapshot failed"]);
    expect(lookup.peek("h-known")).toBeUndefined();
  });

  it("leaves the read to load() when the store must wait (no findSnapshotByHashNow)", async () => {
    const waitingOnly: SnapshotStore = { findSnapshotByHash: async (hash) => (hash === SNAPSHOT.key.hash ? SNAPSHOT : null) };
    const lookup = new SnapshotLookup({ local: local(), store: waitingOnly, bus: new LocalInvalidationBus() });
    expect(lookup.loadNow("h-known")).toBeUndefined();
    expect(lookup.peek("h-known")).toBeUndefined();
    expect(await lookup.load("h-known")).toStrictEqual(local().set("h-known", SNAPSHOT));
  });

  it("leaves the read to load() when an L2 comes first, even before a store that answers at once", () => {
    const store = nowStore();
    const shared: SharedCache = {
      read: async (): Promise<SharedRead> => ({ value: undefined, fill: FILL }),
      get: async () => undefined,
      set: async () => true,
      setMissing: async () => undefined,
      invalidate: async () => undefined,
      distrustEarlierEntries: async () => undefined,
    };
    const lookup = new SnapshotLookup({ local: local(), shared, store, bus: new LocalInvalidationBus() });
    expect(lookup.loadNow("h-known")).toBeUndefined();
    expect(store.now).toBe(0);
  });
});
