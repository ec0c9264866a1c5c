import { Redis } from "ioredis";
import { describe, expect, it } from "vitest";
import { redisOptions } from "../../src/cache/redis.js";
import { MemoryMeter } from "../../src/limits/memory.js";
import { RedisMeter } from "../../src/limits/redis.js";
import type { CreditState } from "../../src/store/store.js";
import { requireServer } from "../harness/ports.js";
import { chargeInput, stubMeterDeps, suiteRedisClient } from "../harness/redis-charge.js";
import { redisAvailable } from "../harness/redis-server.js";

// A credit hash an earlier release (1dffb08) loaded (period, monthly_used, topup; no `seen`, no
// expiry) is adopted with `seen` set to the store's top-up total read then. A top-up made through
// this version whose ADD has not reached Redis yet (its ADD failed and waits in the retry queue,
// or its replica stopped between the store write and the ADD) is in that total but not in the
// adopted balance: an ADD finding "nothing to add" would leave it out until the hash went idle for
// an hour. So an adopted hash is marked, and the next ADD drops it for a reload from the store,
// which has every top-up; a hash of this version catches up at the retry or the next top-up.

const ready = requireServer("redis-server", redisAvailable(), "apt-get install redis-server");

/** The store's credit state for one account, as a test double that top-ups move. */
function storeWith(initial: CreditState): { state: CreditState; getCredits: () => Promise<CreditState>; topUp(amount: number): number } {
  const box = {
    state: { ...initial },
    getCredits: async () => ({ ...box.state }),
    topUp(amount: number): number {
      box.state = { ...box.state, topupBalance: box.state.topupBalance + amount, topupTotal: box.state.topupTotal + amount };
      return box.state.topupTotal;
    },
  };
  return box;
}

describe.runIf(ready)("a top-up through this version that reaches Redis after an earlier release's hash was adopted", () => {
  const client = suiteRedisClient();

  async function replica(getCredits: () => Promise<CreditState>): Promise<{ meter: RedisMeter; connection: Redis }> {
    const { logger, store, usage } = stubMeterDeps();
    const port = client().options.port ?? 6379;
    const connection = new Redis({ ...redisOptions(), host: "127.0.0.1", port });
    await connection.connect();
    const meteringStore = { ...store, getCredits };
    return { meter: new RedisMeter(connection, meteringStore, usage, new MemoryMeter(meteringStore, usage), "fail-closed", logger), connection };
  }

  /** As 1dffb08's SEED and charges leave it: the 10-credit allowance spent, no `seen`, no expiry. */
  async function releaseHash(ownerId: string): Promise<void> {
    await client().hset(`kg:c:${ownerId}`, "period", "2026-12", "monthly_used", 10, "topup", 0);
    expect(await client().pttl(`kg:c:${ownerId}`)).toBe(-1);
  }

  it("a top-up whose ADD failed and was retried after the adoption is in the balance", async () => {
    const ownerId = "adopt-retried-topup";
    await releaseHash(ownerId);
    // The store lags what the old replicas spent (their usage flush has not run): 7 of 10.
    const store = storeWith({ period: "2026-12", monthlyUsed: 7, topupBalance: 0, topupTotal: 0 });
    const a = await replica(store.getCredits);
    const b = await replica(store.getCredits);
    try {
      // AddCredits 6 through replica B: the store write is made; B's connection is down at that
      // moment (a blip), so its ADD fails and waits in B's retry queue (AddCredits answers OK).
      const total = store.topUp(6);
      b.connection.disconnect();
      await b.meter.addCredits(ownerId, total);
      // A Check through replica A meanwhile: the earlier release's hash is adopted.
      const first = await a.meter.charge(chargeInput(ownerId));
      expect(await client().hget(`kg:c:${ownerId}`, "seen")).toBe("6");
      // B's connection is back and its retry pass sends the ADD (close() runs one last pass).
      await b.connection.connect();
      await b.meter.close();
      const second = await a.meter.charge(chargeInput(ownerId));
      // The account has 0 of its allowance left and a top-up of 6: a charge of 3 is allowed.
      expect({ first: first.allowed, second: second.allowed, reason: second.reason }).toEqual({ first: false, second: true, reason: null });
      expect(second.credits?.balance).toBeGreaterThanOrEqual(3);
    } finally {
      a.connection.disconnect();
      b.connection.disconnect();
    }
  });

  it("a top-up whose ADD never came is caught up by the next top-up, as on a hash of this version", async () => {
    for (const [ownerId, releaseWrote] of [
      ["own-hash-lost-add", false],
      ["adopted-hash-lost-add", true],
    ] as const) {
      const store = storeWith({ period: "2026-12", monthlyUsed: 7, topupBalance: 0, topupTotal: 0 });
      const a = await replica(store.getCredits);
      try {
        if (releaseWrote) {
          await releaseHash(ownerId);
        } else {
          // This version loads the balance itself (7 + 3 = 10 spent: nothing left).
          expect((await a.meter.charge(chargeInput(ownerId))).allowed).toBe(true);
        }
        // AddCredits 6: the store write is made, and the replica that made it stops before its
        // ADD (SIGKILL, a crash): Redis never hears of it.
        store.topUp(6);
        // A Check meanwhile (for the release's hash: the adoption).
        expect((await a.meter.charge(chargeInput(ownerId))).allowed).toBe(false);
        // A later top-up of 2 through this version: total 8.
        await a.meter.addCredits(ownerId, store.topUp(2));
        const after = await a.meter.charge(chargeInput(ownerId));
        expect({ ownerId, allowed: after.allowed }).toEqual({ ownerId, allowed: true });
      } finally {
        a.connection.disconnect();
      }
    }
  });
});
