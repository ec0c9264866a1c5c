import mongoose from "mongoose";
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from "vitest";
import { CapExceededError, ConflictError, DuplicateError, StoreUnavailableError } from "../../src/store/errors.js";
import { MongoKeyStore, SLOT_LEASE_MS } from "../../src/store/mongo.js";
import type { AccountDoc, KeyDoc } from "../../src/store/mongo.js";
import { keyState } from "../../src/store/store.js";
import { testKeyRecord } from "../harness/records.js";
import { mongoWireAvailable, startMongoWire } from "../harness/mongo-wire.js";
import type { MongoWire } from "../harness/mongo-wire.js";
import { requireServer } from "../harness/ports.js";
import { until } from "../harness/poll.js";

// README "Production: MongoDB and Redis": the active-key cap holds across replicas without
// transactions. Every change to an account's slot counters carries a token in the same update
// (accounts.slot_claims), so a change whose answer was lost (the connection dropped) and is sent
// again is made once, and one left unfinished is finished or undone by the owner's next CreateKey
// once its lease is over. Before the tokens, each of these lost answers left the account with a
// slot no key held, for good: a basic account (cap 1) could never create a key again.

const mongoReady = requireServer("MongoDB-wire server", mongoWireAvailable(), "run .ci/install-mongo-wire.sh");
const NOW = 1_800_000_000_000;
const DAY_MS = 86_400_000;
const caps = { maxActiveKeysFor: () => 1, accountDefaults: { plan: "basic", subscriptionStatus: "active" as const, role: "standard" as const }, nowMs: NOW };

type Method = "updateOne" | "findOneAndUpdate" | "findOne" | "insertOne";

describe.runIf(mongoReady)("MongoKeyStore's slot counters after a lost answer, and the caller's retry", { timeout: 60_000 }, () => {
  let mongo: MongoWire | undefined;
  let store: MongoKeyStore;
  let keys: mongoose.Model<KeyDoc>;
  let accounts: mongoose.Model<AccountDoc>;
  let owner = 0;
  // The store's lease clock: moved past a lease instead of waiting for one.
  let clockOffsetMs = 0;
  beforeAll(async () => {
    mongo = await startMongoWire();
    const before = mongoose.connections.length;
    store = await MongoKeyStore.connect(mongo.uri, { clock: () => Date.now() + clockOffsetMs });
    const connection = mongoose.connections.slice(before).at(-1);
    const keyModel = connection?.models["Key"];
    const accountModel = connection?.models["Account"];
    if (keyModel === undefined || accountModel === undefined) throw new Error("the store's models were not found");
    keys = keyModel;
    accounts = accountModel;
  }, 120_000);
  afterEach(() => {
    vi.restoreAllMocks();
    clockOffsetMs = 0;
  });
  afterAll(async () => {
    await store?.close();
    await mongo?.stop();
  });

  /**
   * The call of `method` on the model's collection after `skip` others fails as a dropped
   * connection: made by the server first when `made` (its answer lost), or never sent.
   */
  function dropCall(model: mongoose.Model<KeyDoc> | mongoose.Model<AccountDoc>, method: Method, { skip = 0, made = true }: { skip?: number; made?: boolean } = {}): void {
    const collection = model.collection as unknown as Record<Method, (...args: unknown[]) => Promise<unknown>>;
    const original = collection[method].bind(collection);
    let calls = 0;
    vi.spyOn(collection, method).mockImplementation(async (...args: unknown[]) => {
      calls += 1;
      if (calls !== skip + 1) return original(...args);
      if (made) await original(...args);
      throw new mongoose.mongo.MongoNetworkError("connection 9 to 127.0.0.1:27017 closed");
    });
  }

  const account = async (ownerId: string): Promise<{ slotsHeld: number | undefined; claims: string[] }> => {
    const doc = await accounts.findById(ownerId).lean<AccountDoc>();
    return { slotsHeld: doc?.active_key_count, claims: doc?.slot_claims ?? [] };
  };
  const outcome = (call: Promise<unknown>): Promise<string> =>
    call.then(
      () => "created",
      (e: unknown) => (e instanceof CapExceededError ? "RESOURCE_EXHAUSTED" : e instanceof ConflictError ? "FAILED_PRECONDITION" : String(e)),
    );

  describe("error", () => {
    it("createKey whose slot admission was made but answered lost: the admission is undone, and the retry creates the key", async () => {
      const ownerId = `lost-admit-${++owner}`;
      dropCall(accounts, "updateOne");
      await expect(store.createKey(testKeyRecord(ownerId, NOW), caps)).rejects.toBeInstanceOf(StoreUnavailableError);
      expect(await store.countActiveKeys(ownerId, NOW)).toBe(0);
      const retry = await outcome(store.createKey(testKeyRecord(ownerId, NOW), caps));
      expect({ retry, activeKeys: await store.countActiveKeys(ownerId, NOW), ...(await account(ownerId)) }).toEqual({ retry: "created", activeKeys: 1, slotsHeld: 1, claims: [] });
    });

    it("createKey whose give-back (an insert refused on a duplicate hash) was made but answered lost: sent again, the slot comes back once", async () => {
      const other = testKeyRecord(`dup-holder-${++owner}`, NOW);
      await store.createKey(other, caps);
      const ownerId = `lost-give-back-${++owner}`;
      // The account's second updateOne is the give-back (the first, the admission).
      dropCall(accounts, "updateOne", { skip: 1 });
      await expect(store.createKey(testKeyRecord(ownerId, NOW, { hash: other.hash }), caps)).rejects.toBeInstanceOf(DuplicateError);
      const afterRefusal = await account(ownerId);
      vi.restoreAllMocks();
      const created = await outcome(store.createKey(testKeyRecord(ownerId, NOW), caps));
      // Given back twice, the counter would read -1 and admit a second key over the cap of 1.
      const another = await outcome(store.createKey(testKeyRecord(ownerId, NOW), caps));
      expect({ afterRefusal, created, another, activeKeys: await store.countActiveKeys(ownerId, NOW) }).toEqual({
        afterRefusal: { slotsHeld: 0, claims: [] },
        created: "created",
        another: "RESOURCE_EXHAUSTED",
        activeKeys: 1,
      });
    });

    it("revokeKey whose slot release (counted: false) was made but answered lost: the release's nonce says it was made, and the slot comes back", async () => {
      const ownerId = `lost-release-${++owner}`;
      const key = testKeyRecord(ownerId, NOW);
      await store.createKey(key, caps);
      dropCall(keys, "findOneAndUpdate");
      expect((await store.revokeKey(key.id, NOW + 1, "leaked"))?.revokedAtMs).toBe(NOW + 1);
      expect((await store.revokeKey(key.id, NOW + 2, "leaked"))?.revokedAtMs).toBe(NOW + 1);
      const next = await outcome(store.createKey(testKeyRecord(ownerId, NOW + 3), caps));
      expect({ next, activeKeys: await store.countActiveKeys(ownerId, NOW + 3), ...(await account(ownerId)) }).toEqual({ next: "created", activeKeys: 1, slotsHeld: 1, claims: [] });
    });

    it("revokeKey whose release was made and whose answer and read-back were both lost: the slot comes back once the release's lease is over", async () => {
      const ownerId = `lost-release-read-${++owner}`;
      const key = testKeyRecord(ownerId, NOW);
      await store.createKey(key, caps);
      dropCall(keys, "findOneAndUpdate");
      // revokeKey reads the key once before its release, then reads the release back.
      dropCall(keys, "findOne", { skip: 1, made: false });
      await expect(store.revokeKey(key.id, NOW + 1, "leaked")).rejects.toBeInstanceOf(StoreUnavailableError);
      vi.restoreAllMocks();
      expect((await store.revokeKey(key.id, NOW + 2, "leaked"))?.revokedAtMs).toBe(NOW + 1);
      // Within the lease the release may still be finishing elsewhere: it is left alone.
      const inLease = await outcome(store.createKey(testKeyRecord(ownerId, NOW + 3), caps));
      clockOffsetMs = SLOT_LEASE_MS + 1_000;
      const afterLease = await outcome(store.createKey(testKeyRecord(ownerId, NOW + 3), caps));
      const revoked = await keys.findById(key.id).lean<KeyDoc>();
      expect({ inLease, afterLease, slotRelease: revoked?.slot_release ?? null, activeKeys: await store.countActiveKeys(ownerId, NOW + 3), ...(await account(ownerId)) }).toEqual({
        inLease: "RESOURCE_EXHAUSTED",
        afterLease: "created",
        slotRelease: null,
        activeKeys: 1,
        slotsHeld: 1,
        claims: [],
      });
    });

    it("revokeKey whose account give-back (a release's second step) was made but answered lost: sent again, the slot comes back once", async () => {
      const ownerId = `lost-release-dec-${++owner}`;
      const key = testKeyRecord(ownerId, NOW);
      await store.createKey(key, caps);
      dropCall(accounts, "updateOne");
      expect((await store.revokeKey(key.id, NOW + 1, "leaked"))?.revokedAtMs).toBe(NOW + 1);
      vi.restoreAllMocks();
      const afterRevoke = await account(ownerId);
      const created = await outcome(store.createKey(testKeyRecord(ownerId, NOW + 2), caps));
      const another = await outcome(store.createKey(testKeyRecord(ownerId, NOW + 2), caps));
      expect({ afterRevoke, created, another, activeKeys: await store.countActiveKeys(ownerId, NOW + 2) }).toEqual({
        afterRevoke: { slotsHeld: 0, claims: [] },
        created: "created",
        another: "RESOURCE_EXHAUSTED",
        activeKeys: 1,
      });
    });

    it("a release whose give-back was made but both its sends answered lost: the slot is back at once, and the token is cleared once the lease is over", async () => {
      const ownerId = `lost-release-dec-twice-${++owner}`;
      const key = testKeyRecord(ownerId, NOW);
      await store.createKey(key, caps);
      const collection = accounts.collection as unknown as Record<"updateOne", (...args: unknown[]) => Promise<unknown>>;
      const original = collection.updateOne.bind(collection);
      vi.spyOn(collection, "updateOne")
        .mockImplementationOnce(async (...args: unknown[]) => {
          await original(...args);
          throw new mongoose.mongo.MongoNetworkError("connection 9 to 127.0.0.1:27017 closed");
        })
        .mockImplementationOnce(async () => {
          throw new mongoose.mongo.MongoNetworkError("connection 10 to 127.0.0.1:27017 closed");
        });
      await expect(store.revokeKey(key.id, NOW + 1, "leaked")).rejects.toBeInstanceOf(StoreUnavailableError);
      vi.restoreAllMocks();
      const created = await outcome(store.createKey(testKeyRecord(ownerId, NOW + 2), caps));
      const inLease = await account(ownerId);
      clockOffsetMs = SLOT_LEASE_MS + 1_000;
      const another = await outcome(store.createKey(testKeyRecord(ownerId, NOW + 2), caps));
      const revoked = await keys.findById(key.id).lean<KeyDoc>();
      expect({ created, inLeaseSlots: inLease.slotsHeld, inLeaseClaims: inLease.claims.length, another, slotRelease: revoked?.slot_release ?? null, ...(await account(ownerId)) }).toEqual({
        created: "created",
        inLeaseSlots: 1,
        inLeaseClaims: 1,
        another: "RESOURCE_EXHAUSTED",
        slotRelease: null,
        slotsHeld: 1,
        claims: [],
      });
    });

    it("rotateKey (no grace) whose first write (old key marked rotated) was made but answered lost: the retry rotates, and the old key is revoked as rotated", async () => {
      const ownerId = `lost-rotate-mark-${++owner}`;
      const key = testKeyRecord(ownerId, NOW);
      await store.createKey(key, caps);
      const lost = testKeyRecord(ownerId, NOW);
      dropCall(keys, "findOneAndUpdate");
      await expect(store.rotateKey(key.id, lost, NOW, NOW)).rejects.toBeInstanceOf(StoreUnavailableError);
      vi.restoreAllMocks();
      // The caller retries the rotation, with a new successor (as LifecycleService.rotateKey makes one per call).
      const successor = testKeyRecord(ownerId, NOW);
      const retry = await store.rotateKey(key.id, successor, NOW, NOW).then(
        (r) => `rotated to ${r.next.id === successor.id ? "successor" : "?"}`,
        (e: unknown) => (e instanceof ConflictError ? "FAILED_PRECONDITION" : String(e)),
      );
      const old = await store.getKey(key.id);
      const pointsTo = old?.rotatedToId ?? null;
      expect({
        retry,
        oldKeyState: old === null ? null : keyState(old, NOW),
        oldKeyPointsToAKeyThatExists: pointsTo === null ? null : (await store.getKey(pointsTo)) !== null,
        activeKeys: await store.countActiveKeys(ownerId, NOW),
      }).toEqual({ retry: "rotated to successor", oldKeyState: "revoked", oldKeyPointsToAKeyThatExists: true, activeKeys: 1 });
    });

    it("rotateKey (with grace) whose first write was made but answered lost, the old key revoked at once: the slot comes back once the rotation's lease is over", async () => {
      const ownerId = `lost-rotate-slot-${++owner}`;
      const key = testKeyRecord(ownerId, NOW);
      await store.createKey(key, caps);
      const lost = testKeyRecord(ownerId, NOW);
      dropCall(keys, "findOneAndUpdate");
      await expect(store.rotateKey(key.id, lost, NOW + DAY_MS, NOW)).rejects.toBeInstanceOf(StoreUnavailableError);
      vi.restoreAllMocks();
      // An operator gives up on the key and revokes it, then creates a fresh one. Within the
      // lease the rotation may still be between its two writes, and is left to finish.
      await store.revokeKey(key.id, NOW + 1, "rotation failed");
      const inLease = await outcome(store.createKey(testKeyRecord(ownerId, NOW + 2), caps));
      clockOffsetMs = SLOT_LEASE_MS + 1_000;
      const afterLease = await outcome(store.createKey(testKeyRecord(ownerId, NOW + 2), caps));
      const placeholder = await store.getKey(lost.id);
      const old = await store.getKey(key.id);
      expect({
        inLease,
        afterLease,
        old: old === null ? null : [keyState(old, NOW + 2), old.revokeReason, old.rotatedToId],
        placeholder: placeholder === null ? null : [keyState(placeholder, NOW + 2), placeholder.revokeReason],
        activeKeys: await store.countActiveKeys(ownerId, NOW + 2),
        ...(await account(ownerId)),
      }).toEqual({
        inLease: "RESOURCE_EXHAUSTED",
        afterLease: "created",
        old: ["revoked", "rotation failed", null],
        placeholder: ["revoked", "never issued: the rotation that named it was not finished"],
        activeKeys: 1,
        slotsHeld: 1,
        claims: [],
      });
    });

    it("rotateKey (with grace) whose first write was made but answered lost, the old key revoked after the rotation's lease: the revoke undoes the rotation and frees its slot", async () => {
      const ownerId = `lost-rotate-slot-late-${++owner}`;
      const key = testKeyRecord(ownerId, NOW);
      await store.createKey(key, caps);
      dropCall(keys, "findOneAndUpdate");
      await expect(store.rotateKey(key.id, testKeyRecord(ownerId, NOW), NOW + DAY_MS, NOW)).rejects.toBeInstanceOf(StoreUnavailableError);
      vi.restoreAllMocks();
      clockOffsetMs = SLOT_LEASE_MS + 1_000;
      const revoked = await store.revokeKey(key.id, NOW + 1, "rotation failed");
      const afterRevoke = await account(ownerId);
      const next = await outcome(store.createKey(testKeyRecord(ownerId, NOW + 2), caps));
      expect({ rotatedToId: revoked?.rotatedToId, afterRevoke, next, activeKeys: await store.countActiveKeys(ownerId, NOW + 2) }).toEqual({
        rotatedToId: null,
        afterRevoke: { slotsHeld: 0, claims: [] },
        next: "created",
        activeKeys: 1,
      });
    });

    it("an admission whose answer and read-back were both lost: left alone within its lease (it may be in flight), undone after it by the next createKey", async () => {
      const ownerId = `lost-admit-read-${++owner}`;
      const lost = testKeyRecord(ownerId, NOW);
      dropCall(accounts, "updateOne");
      // createKey reads the account once before its admission, then reads the admission back.
      dropCall(accounts, "findOne", { skip: 1, made: false });
      await expect(store.createKey(lost, caps)).rejects.toBeInstanceOf(StoreUnavailableError);
      vi.restoreAllMocks();
      const inLease = await outcome(store.createKey(testKeyRecord(ownerId, NOW), caps));
      const claimsInLease = (await account(ownerId)).claims;
      clockOffsetMs = SLOT_LEASE_MS + 1_000;
      const afterLease = await outcome(store.createKey(testKeyRecord(ownerId, NOW), caps));
      const placeholder = await store.getKey(lost.id);
      expect({
        inLease,
        claimsInLease,
        afterLease,
        placeholder: placeholder === null ? null : [keyState(placeholder, NOW), placeholder.revokeReason, placeholder.hash === lost.hash],
        lookup: await store.findSnapshotByHash(lost.hash),
        activeKeys: await store.countActiveKeys(ownerId, NOW),
        ...(await account(ownerId)),
      }).toEqual({
        inLease: "RESOURCE_EXHAUSTED",
        claimsInLease: [`add:live:${lost.id}`],
        afterLease: "created",
        placeholder: ["revoked", "never issued: the admission that named it was not finished", false],
        lookup: null,
        activeKeys: 1,
        slotsHeld: 1,
        claims: [],
      });
    });

    it("an insert that lands after the repair took its id fails, and its slot is not given back twice: the cap admits one key", async () => {
      const ownerId = `late-insert-${++owner}`;
      let release = (): void => undefined;
      const held = new Promise<void>((resolve) => (release = resolve));
      let reached = false;
      const collection = keys.collection as unknown as Record<"insertOne", (...args: unknown[]) => Promise<unknown>>;
      const original = collection.insertOne.bind(collection);
      vi.spyOn(collection, "insertOne").mockImplementationOnce(async (...args: unknown[]) => {
        reached = true;
        await held;
        return original(...args);
      });
      const late = testKeyRecord(ownerId, NOW);
      const first = outcome(store.createKey(late, caps));
      await until(() => reached, 10_000, "the first key's insert to be on its way");
      clockOffsetMs = SLOT_LEASE_MS + 1_000;
      const second = await outcome(store.createKey(testKeyRecord(ownerId, NOW), caps));
      release();
      const firstAnswer = await first;
      const third = await outcome(store.createKey(testKeyRecord(ownerId, NOW), caps));
      expect({
        second,
        firstAnswer: firstAnswer.startsWith("DuplicateError"),
        third,
        lookup: await store.findSnapshotByHash(late.hash),
        activeKeys: await store.countActiveKeys(ownerId, NOW),
        ...(await account(ownerId)),
      }).toEqual({ second: "created", firstAnswer: true, third: "RESOURCE_EXHAUSTED", lookup: null, activeKeys: 1, slotsHeld: 1, claims: [] });
    });
  });

  describe("happy", () => {
    it("a createKey, a revoke and a rotation leave no token on the account and no nonce on a key", async () => {
      const ownerId = `clean-${++owner}`;
      const key = testKeyRecord(ownerId, NOW);
      await store.createKey(key, caps);
      const successor = testKeyRecord(ownerId, NOW);
      await store.rotateKey(key.id, successor, NOW + DAY_MS, NOW);
      await store.revokeKey(successor.id, NOW + 1, "done");
      await store.createKey(testKeyRecord(ownerId, NOW + 2), caps);
      const nonces = await keys.countDocuments({ owner_id: ownerId, slot_release: { $ne: null } });
      expect({ nonces, activeKeys: await store.countActiveKeys(ownerId, NOW + 2), ...(await account(ownerId)) }).toEqual({ nonces: 0, activeKeys: 1, slotsHeld: 1, claims: [] });
    });
  });
});
