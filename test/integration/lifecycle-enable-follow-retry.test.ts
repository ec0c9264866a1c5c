import { Code, ConnectError } from "@connectrpc/connect";
import mongoose from "mongoose";
import { describe, expect, it, vi } from "vitest";
import { StoreBusyError, StoreUnavailableError } from "../../src/store/errors.js";
import type { KeyStore } from "../../src/store/store.js";
import { lifecycleKeygate } from "../harness/lifecycle-keygate.js";
import { mongoWireAvailable } from "../harness/mongo-wire.js";
import { requireServer } from "../harness/ports.js";

// README: EnableKey on a rotation's new key B lets the old key A, paused with it, "through again",
// and a change answered UNAVAILABLE is made right by its retry ("a retry is idempotent"). EnableKey
// wrote B first and A after: when the store refused A's write (SQLite's write lock held past its
// wait, MongoDB unreachable), the call answered UNAVAILABLE with B enabled, and its retry, reading
// B as enabled, no longer found A paused with it, so A stayed KEY_DISABLED for the rest of its
// grace. Now A comes back before B (in the same transaction on SQLite): whichever write fails, the
// retry finds A still paused with B, or back already.

const mongoReady = requireServer("MongoDB-wire server", mongoWireAvailable(), "run .ci/install-mongo-wire.sh");
const PEPPER = "lifecycle-enable-follow-retry-pepper-0123456789";

const BACKENDS = [
  { store: "SQLite", ready: true, refusal: (): Error => new StoreBusyError("database is locked (held past the 5 s wait)") },
  { store: "MongoDB", ready: mongoReady, refusal: (): Error => new StoreUnavailableError("MongoDB is unreachable") },
];

const ALLOWED = { status: 200, code: null };
const DISABLED = { status: 401, code: "KEY_DISABLED" };

/** Has every store call that writes a key's disabled time throw `refusal()` instead, when `fire()` says so. */
function refuseWrites(store: KeyStore, fire: () => boolean, refusal: () => Error): void {
  const enableKey = store.enableKey.bind(store);
  const updateKey = store.updateKey.bind(store);
  const redisableKey = store.redisableKey.bind(store);
  const pauseKeysInGrace = store.pauseKeysInGrace.bind(store);
  const refuse = (): void => {
    if (fire()) throw refusal();
  };
  vi.spyOn(store, "enableKey").mockImplementation(async (id, inGraceIds) => {
    refuse();
    return enableKey(id, inGraceIds);
  });
  vi.spyOn(store, "updateKey").mockImplementation(async (id, patch) => {
    refuse();
    return updateKey(id, patch);
  });
  vi.spyOn(store, "redisableKey").mockImplementation(async (id, atMs, whileAtMs) => {
    refuse();
    return redisableKey(id, atMs, whileAtMs);
  });
  vi.spyOn(store, "pauseKeysInGrace").mockImplementation(async (id, inGraceIds) => {
    refuse();
    return pauseKeysInGrace(id, inGraceIds);
  });
}

for (const { store, ready, refusal } of BACKENDS) {
  describe.runIf(ready)(`a retried EnableKey of a rotation's new key, on ${store}`, { timeout: 60_000 }, () => {
    const suite = lifecycleKeygate(store === "MongoDB" ? { pepper: PEPPER } : null);
    const { check } = suite;
    let seq = 0;

    /** A key (A) rotated with 7 days of grace to B, then B disabled: A is paused with it. */
    async function pausedPair(): Promise<{ a: { id: string; secret: string }; b: { id: string; secret: string } }> {
      const ownerId = `owner-enable-retry-${++seq}`;
      await suite.kg.admin.upsertAccount({ ownerId, plan: "business" });
      const created = await suite.kg.admin.createKey({ ownerId, name: "pair", scopes: ["tutor"] });
      const rotated = await suite.kg.admin.rotateKey({ id: created.key?.id ?? "", graceDays: 7 });
      const pair = { a: { id: created.key?.id ?? "", secret: created.secret }, b: { id: rotated.key?.id ?? "", secret: rotated.secret } };
      suite.kg.clock.advanceMs(1000);
      await suite.kg.admin.disableKey({ id: pair.b.id, reason: "card declined" });
      expect([await check(pair.a.secret), await check(pair.b.secret)]).toEqual([DISABLED, DISABLED]);
      suite.kg.clock.advanceMs(1000);
      return pair;
    }

    /** EnableKey(id): "OK", or the refusal's code. */
    const enable = (id: string): Promise<string> =>
      suite.kg.admin.enableKey({ id }).then(
        () => "OK",
        (error: unknown) => {
          if (error instanceof ConnectError) return Code[error.code];
          throw error;
        },
      );

    /** Counts calls: `fire()` is true for the `n`th; `reached()` tells whether it came. */
    function failNth(n: number): { fire: () => boolean; reached: () => boolean } {
      let calls = 0;
      return {
        fire: () => {
          calls += 1;
          return calls === n;
        },
        reached: () => calls >= n,
      };
    }

    describe("security", () => {
      it("the store refusing any one write of EnableKey(B) (nothing written): it answers UNAVAILABLE, and the retry brings back both keys", async () => {
        const outcomes = [];
        for (let n = 1; ; n += 1) {
          const pair = await pausedPair();
          const nth = failNth(n);
          refuseWrites(suite.kg.app.store, nth.fire, refusal);
          const first = await enable(pair.b.id);
          vi.restoreAllMocks();
          if (!nth.reached()) {
            expect({ n, first }).toEqual({ n, first: "OK" });
            break;
          }
          const retry = await enable(pair.b.id);
          outcomes.push({ n, first, retry, a: await check(pair.a.secret), b: await check(pair.b.secret), state: (await suite.kg.admin.getKey({ id: pair.a.id })).key?.state });
        }
        expect(outcomes.length).toBeGreaterThan(0);
        expect(outcomes).toEqual(outcomes.map(({ n }) => ({ n, first: "Unavailable", retry: "OK", a: ALLOWED, b: ALLOWED, state: "grace" })));
      });

      // Its two writes apart (no transaction): each may fail on its own.
      if (store === "MongoDB") it("MongoDB failing any one key write of EnableKey(B), before it is made or with its answer lost: the retry brings back both keys", async () => {
        const keys = suite.keys;
        if (keys === undefined) throw new Error("the store's Key model was not found");
        const collection = keys.collection as unknown as Record<"findOneAndUpdate" | "updateOne", (...args: unknown[]) => Promise<unknown>>;
        const outcomes = [];
        for (const made of [false, true]) {
          for (let n = 1; ; n += 1) {
            const pair = await pausedPair();
            const nth = failNth(n);
            for (const method of ["findOneAndUpdate", "updateOne"] as const) {
              const original = collection[method].bind(collection);
              vi.spyOn(collection, method).mockImplementation(async (...args: unknown[]) => {
                if (!nth.fire()) return original(...args);
                if (made) await original(...args);
                throw new mongoose.mongo.MongoNetworkError("connection 7 to 127.0.0.1:27017 closed");
              });
            }
            const first = await enable(pair.b.id);
            vi.restoreAllMocks();
            if (!nth.reached()) {
              expect({ made, n, first }).toEqual({ made, n, first: "OK" });
              break;
            }
            const retry = await enable(pair.b.id);
            outcomes.push({ made, n, first, retry, a: await check(pair.a.secret), b: await check(pair.b.secret) });
          }
        }
        // The key in grace, then the new key: two writes, each failed in both ways.
        expect(outcomes).toEqual(
          [false, true].flatMap((made) => [1, 2].map((n) => ({ made, n, first: "Unavailable", retry: "OK", a: ALLOWED, b: ALLOWED }))),
        );
      });
    });
  });
}
