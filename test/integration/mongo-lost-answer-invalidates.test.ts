import { Code } from "@connectrpc/connect";
import mongoose from "mongoose";
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from "vitest";
import { adminRefusal, checkInit, checkOutcome, startKeygate, TEST_POLICY } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { mongoWireAvailable, startMongoWire } from "../harness/mongo-wire.js";
import type { MongoWire } from "../harness/mongo-wire.js";
import { loseNextAnswer, modelOn } from "../harness/mongo-lost-answer.js";
import type { LosableMethod } from "../harness/mongo-lost-answer.js";
import { requireServer } from "../harness/ports.js";

// A KeyAdmin change MongoDB made but whose answer was lost answers UNAVAILABLE, and the caller is
// asked to retry. The caches are told all the same: a key revoked that way must not keep passing
// from a replica's cache until the caller retries, or until the entry's lifetime ends.

const mongoReady = requireServer("MongoDB-wire server", mongoWireAvailable(), "run .ci/install-mongo-wire.sh");
const PEPPER = "lost-answer-invalidates-pepper-0123456789ab";

describe.runIf(mongoReady)("a KeyAdmin change whose MongoDB answer was lost still reaches the caches", { timeout: 60_000 }, () => {
  let mongo: MongoWire | undefined;
  let kg: TestKeygate;
  let connections: mongoose.Connection[] = [];

  beforeAll(async () => {
    mongo = await startMongoWire();
    const before = mongoose.connections.length;
    kg = await startKeygate({ policy: TEST_POLICY, env: { KEYGATE_MONGODB_URI: mongo.uri, KEYGATE_PEPPER: PEPPER } });
    connections = mongoose.connections.slice(before);
  }, 120_000);
  afterEach(() => {
    vi.restoreAllMocks();
  });
  afterAll(async () => {
    await kg?.stop();
    await mongo?.stop();
  });

  /** The next `method` call on the model's collection is made by the server, then its answer is lost. */
  function loseNext(modelName: string, method: LosableMethod): void {
    loseNextAnswer(modelOn(connections, modelName), method);
  }

  it("RevokeKey: the key is refused at once, before any retry", async () => {
    const { key, secret } = await kg.admin.createKey({ ownerId: "lost-revoke", name: "k" });
    const check = async (): Promise<{ status: number; code: string | null }> => checkOutcome(await kg.check(checkInit({ authorization: `Bearer ${secret}` })));
    expect(await check()).toEqual({ status: 200, code: null });
    // Cached now: the next Check is answered from the cache.
    expect(await check()).toEqual({ status: 200, code: null });
    loseNext("Key", "updateOne");
    const refused = await adminRefusal(kg.admin.revokeKey({ id: key?.id ?? "", reason: "leaked" }));
    expect(refused.code).toBe(Code.Unavailable);
    expect(await check()).toEqual({ status: 401, code: "KEY_REVOKED" });
  });

  it("UpdateKey: the key's new scopes hold at once, before any retry", async () => {
    const { key, secret } = await kg.admin.createKey({ ownerId: "lost-update", name: "k", scopes: ["tutor"] });
    const check = async (): Promise<{ status: number; code: string | null }> =>
      checkOutcome(await kg.check(checkInit({ authorization: `Bearer ${secret}` }, "/v1/decks", "GET", { required_scopes: "tutor" })));
    expect(await check()).toEqual({ status: 200, code: null });
    loseNext("Key", "findOneAndUpdate");
    const refused = await adminRefusal(kg.admin.updateKey({ id: key?.id ?? "", scopes: ["progress"] }));
    expect(refused.code).toBe(Code.Unavailable);
    expect(await check()).toEqual({ status: 403, code: "FORBIDDEN" });
  });
});
