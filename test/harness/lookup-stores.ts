import { Redis } from "ioredis";
import { redisOptions } from "../../src/cache/redis.js";
import type { KeySnapshot, KeyStore } from "../../src/store/store.js";
import { newKeyRecord } from "../../src/store/store.js";
import { until } from "./poll.js";

/** A live key's snapshot (revoked at `revokedAtMs` when given), for the read path's tests. */
export function lookupSnapshot(ownerId: string, id: string, hash: string, revokedAtMs: number | null = null): KeySnapshot {
  return {
    key: newKeyRecord({ id, hash, ownerId, name: id, mode: "live", start: "kg_live_abcd", last4: "wxyz", scopes: ["read"], createdAtMs: 1_700_000_000_000, revokedAtMs }),
    account: { ownerId, plan: "pro", subscriptionStatus: "active", role: "standard", createdAtMs: 1, updatedAtMs: 2 },
  };
}

/** A KeyStore of which the read path uses findSnapshotByHash alone; anything else throws. */
export function lookupOnlyStore(findSnapshotByHash: (hash: string) => Promise<KeySnapshot | null>, kind = "lookup-only"): KeyStore {
  const unused = async (): Promise<never> => {
    throw new Error("not used");
  };
  return {
    kind,
    findSnapshotByHash,
    upsertAccount: unused,
    getAccount: unused,
    countActiveKeys: unused,
    createKey: unused,
    getKey: unused,
    listKeys: unused,
    updateKey: unused,
    redisableKey: unused,
    enableKey: unused,
    pauseKeysInGrace: unused,
    revokeKey: unused,
    rotateKey: unused,
    getCredits: unused,
    addCredits: unused,
    addCreditsOnce: unused,
    applyUsage: unused,
    listUsage: unused,
    listUsagePage: unused,
    appendAudit: unused,
    listAudit: unused,
    lastAuditId: unused,
    touchLastUsed: unused,
    claimPepperCheck: unused,
    claimKeyPrefix: unused,
    ping: unused,
    close: async () => undefined,
  };
}

/** A store serving `snapshots`, counting its reads. */
export function mapStore(snapshots: Map<string, KeySnapshot>): { store: KeyStore; calls: () => number } {
  let calls = 0;
  const store = lookupOnlyStore(async (hash) => {
    calls += 1;
    return snapshots.get(hash) ?? null;
  }, "map");
  return { store, calls: () => calls };
}

/** A store whose reads wait for the test to answer them: a store read in flight. */
export function heldStore(): { store: KeyStore; calls: () => number; answer: (value: KeySnapshot | null) => void } {
  let calls = 0;
  const waiting: Array<(value: KeySnapshot | null) => void> = [];
  const store = lookupOnlyStore(
    (_hash) =>
      new Promise<KeySnapshot | null>((resolve) => {
        calls += 1;
        waiting.push(resolve);
      }),
    "held",
  );
  return { store, calls: () => calls, answer: (value) => waiting.shift()?.(value) };
}

/** Opens ioredis connections to `url`, each ready before it is returned; closeAll disconnects them. */
export function redisConnections(url: () => string): { open(options?: Parameters<typeof redisOptions>[0]): Promise<Redis>; closeAll(): void } {
  const connections: Redis[] = [];
  return {
    async open(options = {}) {
      const redis = new Redis(url(), redisOptions({ lazyConnect: false, retryStrategy: () => 100, ...options }));
      redis.on("error", () => undefined);
      connections.push(redis);
      await until(() => redis.status === "ready", 5000, "connection ready", { intervalMs: 10 });
      return redis;
    },
    closeAll() {
      for (const connection of connections.splice(0)) connection.disconnect();
    },
  };
}
