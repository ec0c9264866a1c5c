import { Code } from "@connectrpc/connect";
import mongoose from "mongoose";
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from "vitest";
import { z } from "zod";
import { CapExceededError, ConflictError, StoreUnavailableError } from "../../src/store/errors.js";
import { MongoKeyStore, keyDocument } from "../../src/store/mongo.js";
import type { AccountDoc, KeyDoc } from "../../src/store/mongo.js";
import { keyState } from "../../src/store/store.js";
import { adminRefusal, checkInit, checkOutcome, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { testKeyRecord } from "../harness/records.js";
import { mongoWireAvailable, startMongoWire } from "../harness/mongo-wire.js";
import type { MongoWire } from "../harness/mongo-wire.js";
import { loseNextAnswer } from "../harness/mongo-lost-answer.js";
import { requireServer } from "../harness/ports.js";
import { until } from "../harness/poll.js";

// A RotateKey whose first MongoDB write (the old key marked rotated to the new id, its slot moved
// to the new key) is made while its answer is lost answers UNAVAILABLE, and the caller retries,
// as the README tells it to. The old key then pointed at a new key that was never inserted: the
// retry was refused (FAILED_PRECONDITION, "not active"), with grace 0 the customer's only key was
// refused from then on, and the slot the rotation moved was held by no key, so CreateKey was
// refused too. A retry now undoes that unfinished rotation (the missing key's id taken by a
// revoked placeholder first, so a lost insert of it can never land) and makes its own.

const mongoReady = requireServer("MongoDB-wire server", mongoWireAvailable(), "run .ci/install-mongo-wire.sh");
const PEPPER = "rotate-lost-answer-pepper-0123456789abcdefgh";
const NOW = 1_800_000_000_000;
const DAY_MS = 86_400_000;
const caps = { maxActiveKeysFor: () => 1, accountDefaults: { plan: "basic", subscriptionStatus: "active" as const, role: "standard" as const }, nowMs: NOW };

type Method = "findOneAndUpdate";

/** The next `method` on `model`'s collection is made by the server, then its answer is lost (as a dropped connection). */
function loseNext(model: mongoose.Model<KeyDoc>, method: Method): void {
  loseNextAnswer(model, method);
}

/** The store's Key model on the connection made last. */
function lastKeyModel(connections: readonly mongoose.Connection[]): mongoose.Model<KeyDoc> {
  const model = connections.findLast((c) => c.models["Key"] !== undefined)?.models["Key"];
  if (model === undefined) throw new Error("the store's Key model was not found");
  return model;
}

const undoneLine = z.object({ level: z.number(), msg: z.literal("a rotation whose new key never went in was undone"), keyId: z.string(), nextId: z.string() });

describe.runIf(mongoReady)("RotateKey on MongoDB after a lost answer", { timeout: 60_000 }, () => {
  let mongo: MongoWire | undefined;
  beforeAll(async () => {
    mongo = await startMongoWire();
  }, 120_000);
  afterEach(() => {
    vi.restoreAllMocks();
  });
  afterAll(async () => {
    await mongo?.stop();
  });

  describe("KeyAdmin.error", () => {
    let kg: TestKeygate;
    let keys: mongoose.Model<KeyDoc>;
    beforeAll(async () => {
      const before = mongoose.connections.length;
      kg = await startKeygate({ env: { KEYGATE_MONGODB_URI: mongo?.uri ?? "", KEYGATE_PEPPER: PEPPER } });
      keys = lastKeyModel(mongoose.connections.slice(before));
    }, 120_000);
    afterAll(async () => {
      await kg?.stop();
    });

    it("grace_days 0, the old key's mark made and its answer lost: the retry rotates to a working key, the old key is refused, the cap holds", async () => {
      const ownerId = "rotate-lost";
      const created = await kg.admin.createKey({ ownerId, name: "prod" });
      const id = created.key?.id ?? "";
      loseNext(keys, "findOneAndUpdate");
      expect((await adminRefusal(kg.admin.rotateKey({ id, graceDays: 0 }))).code).toBe(Code.Unavailable);

      const retry = await kg.admin.rotateKey({ id, graceDays: 0 });
      const successor = checkOutcome(await kg.check(checkInit({ authorization: `Bearer ${retry.secret}` })));
      const old = checkOutcome(await kg.check(checkInit({ authorization: `Bearer ${created.secret}` })));
      // The basic plan's one slot is held by the successor: no second key.
      const another = await adminRefusal(kg.admin.createKey({ ownerId, name: "another" }));
      const undone = kg.logLines.flatMap((line) => {
        const parsed = undoneLine.safeParse(JSON.parse(line));
        return parsed.success && parsed.data.keyId === id ? [[parsed.data.level, parsed.data.nextId === retry.key?.id]] : [];
      });
      expect({ successor: successor.status, old: old.status, another: Code[another.code], undone }).toEqual({
        successor: 200,
        old: 401,
        another: "ResourceExhausted",
        undone: [[50, false]],
      });
    });
  });

  describe("MongoKeyStore.rotateKey", () => {
    let store: MongoKeyStore;
    let keys: mongoose.Model<KeyDoc>;
    let accounts: mongoose.Model<AccountDoc>;
    let owner = 0;
    beforeAll(async () => {
      const before = mongoose.connections.length;
      store = await MongoKeyStore.connect(mongo?.uri ?? "");
      const connection = mongoose.connections.slice(before).at(-1);
      const accountModel = connection?.models["Account"];
      if (accountModel === undefined) throw new Error("the store's Account model was not found");
      keys = lastKeyModel(mongoose.connections.slice(before));
      accounts = accountModel;
    }, 120_000);
    afterAll(async () => {
      await store?.close();
    });

    const slotsHeld = async (ownerId: string): Promise<number | undefined> => (await accounts.findById(ownerId).lean<AccountDoc>())?.active_key_count;
    const outcome = (call: Promise<unknown>): Promise<string> =>
      call.then(
        () => "made",
        (e: unknown) => (e instanceof CapExceededError ? "RESOURCE_EXHAUSTED" : e instanceof ConflictError ? "FAILED_PRECONDITION" : String(e)),
      );

    describe("error", () => {
      it("no grace, the mark's answer lost: the retry rotates to its own successor, and the old key is revoked as rotated", async () => {
        const ownerId = `lost-mark-${++owner}`;
        const key = testKeyRecord(ownerId, NOW);
        await store.createKey(key, caps);
        const lost = testKeyRecord(ownerId, NOW);
        loseNext(keys, "findOneAndUpdate");
        await expect(store.rotateKey(key.id, lost, NOW, NOW)).rejects.toBeInstanceOf(StoreUnavailableError);
        const successor = testKeyRecord(ownerId, NOW);
        const rotation = await store.rotateKey(key.id, successor, NOW, NOW);
        const old = await store.getKey(key.id);
        const placeholder = await store.getKey(lost.id);
        expect({
          next: rotation.next.id === successor.id,
          old: old === null ? null : [keyState(old, NOW), old.revokeReason, old.rotatedToId === successor.id],
          successor: keyState((await store.getKey(successor.id)) ?? successor, NOW),
          placeholder: placeholder === null ? null : [keyState(placeholder, NOW), placeholder.revokeReason],
          activeKeys: await store.countActiveKeys(ownerId, NOW),
          slotsHeld: await slotsHeld(ownerId),
        }).toEqual({
          next: true,
          old: ["revoked", "rotated", true],
          successor: "active",
          placeholder: ["revoked", "never issued: the rotation that named it was not finished"],
          activeKeys: 1,
          slotsHeld: 1,
        });
      });

      it("an insert of the unfinished rotation's new key still on its way can no longer land", async () => {
        const ownerId = `lost-mark-late-insert-${++owner}`;
        const key = testKeyRecord(ownerId, NOW);
        await store.createKey(key, caps);
        const lost = testKeyRecord(ownerId, NOW);
        loseNext(keys, "findOneAndUpdate");
        await expect(store.rotateKey(key.id, lost, NOW + DAY_MS, NOW)).rejects.toBeInstanceOf(StoreUnavailableError);
        await store.rotateKey(key.id, testKeyRecord(ownerId, NOW), NOW + DAY_MS, NOW);
        const late = await keys.create(keyDocument(lost, true)).then(
          () => "landed",
          (e: unknown) => (e instanceof Error && "code" in e ? e.code : String(e)),
        );
        expect({ late, lookup: await store.findSnapshotByHash(lost.hash), activeKeys: await store.countActiveKeys(ownerId, NOW), slotsHeld: await slotsHeld(ownerId) }).toEqual({
          late: 11000,
          lookup: null,
          activeKeys: 1,
          slotsHeld: 1,
        });
      });

      it("with grace, the mark's answer lost: the retry rotates, the old key in grace points to the new successor, one slot held", async () => {
        const ownerId = `lost-mark-grace-${++owner}`;
        const key = testKeyRecord(ownerId, NOW);
        await store.createKey(key, caps);
        loseNext(keys, "findOneAndUpdate");
        await expect(store.rotateKey(key.id, testKeyRecord(ownerId, NOW), NOW + DAY_MS, NOW)).rejects.toBeInstanceOf(StoreUnavailableError);
        const successor = testKeyRecord(ownerId, NOW);
        await store.rotateKey(key.id, successor, NOW + DAY_MS, NOW);
        const old = await store.getKey(key.id);
        expect({
          old: old === null ? null : [keyState(old, NOW), old.rotatedToId === successor.id, old.graceEndsAtMs],
          another: await outcome(store.createKey(testKeyRecord(ownerId, NOW), caps)),
          activeKeys: await store.countActiveKeys(ownerId, NOW),
          slotsHeld: await slotsHeld(ownerId),
        }).toEqual({ old: ["grace", true, NOW + DAY_MS], another: "RESOURCE_EXHAUSTED", activeKeys: 1, slotsHeld: 1 });
      });

      it("a rotation whose insert is still on its way when another rotation undoes it fails: its new key is the revoked placeholder, and the old key stays in grace for the other's", async () => {
        const ownerId = `lost-insert-undone-${++owner}`;
        const key = testKeyRecord(ownerId, NOW);
        await store.createKey(key, caps);
        // The first rotation's insert is held until the second rotation is done, then its answer
        // is lost before it reached the server (a dropped connection).
        let release = (): void => undefined;
        const held = new Promise<void>((resolve) => (release = resolve));
        let reached = false;
        const collection = keys.collection as unknown as Record<"insertOne", (...args: unknown[]) => Promise<unknown>>;
        vi.spyOn(collection, "insertOne").mockImplementationOnce(async () => {
          reached = true;
          await held;
          throw new mongoose.mongo.MongoNetworkError("connection 7 to 127.0.0.1:27017 closed");
        });
        const first = testKeyRecord(ownerId, NOW);
        const firstRotation = outcome(store.rotateKey(key.id, first, NOW, NOW));
        await until(() => reached, 10_000, "the first rotation's insert to be on its way");
        // A second RotateKey (another operator, or the caller's retry after a timeout), with grace.
        const second = testKeyRecord(ownerId, NOW);
        await store.rotateKey(key.id, second, NOW + DAY_MS, NOW);
        release();
        const firstAnswer = await firstRotation;
        const old = await store.getKey(key.id);
        const placeholder = await store.getKey(first.id);
        expect({
          firstAnswer: firstAnswer.startsWith("StoreUnavailableError"),
          placeholder: placeholder === null ? null : [keyState(placeholder, NOW), placeholder.revokeReason, placeholder.hash === first.hash],
          lookup: await store.findSnapshotByHash(first.hash),
          old: old === null ? null : [keyState(old, NOW), old.rotatedToId === second.id, old.graceEndsAtMs],
          second: keyState((await store.getKey(second.id)) ?? second, NOW),
          activeKeys: await store.countActiveKeys(ownerId, NOW),
          slotsHeld: await slotsHeld(ownerId),
        }).toEqual({
          firstAnswer: true,
          placeholder: ["revoked", "never issued: the rotation that named it was not finished", false],
          lookup: null,
          old: ["grace", true, NOW + DAY_MS],
          second: "active",
          activeKeys: 1,
          slotsHeld: 1,
        });
      });
    });

    describe("happy", () => {
      it("a finished rotation is never undone: rotating its old key again is refused, and the successor keeps the slot", async () => {
        const ownerId = `finished-${++owner}`;
        const key = testKeyRecord(ownerId, NOW);
        await store.createKey(key, caps);
        const successor = testKeyRecord(ownerId, NOW);
        await store.rotateKey(key.id, successor, NOW + DAY_MS, NOW);
        const again = await outcome(store.rotateKey(key.id, testKeyRecord(ownerId, NOW), NOW + DAY_MS, NOW));
        const revoked = await store.revokeKey(key.id, NOW + 1, "done");
        expect({
          again,
          revokedPointsTo: revoked?.rotatedToId === successor.id,
          successor: keyState((await store.getKey(successor.id)) ?? successor, NOW + 1),
          activeKeys: await store.countActiveKeys(ownerId, NOW + 1),
          slotsHeld: await slotsHeld(ownerId),
        }).toEqual({ again: "FAILED_PRECONDITION", revokedPointsTo: true, successor: "active", activeKeys: 1, slotsHeld: 1 });
      });
    });
  });
});
