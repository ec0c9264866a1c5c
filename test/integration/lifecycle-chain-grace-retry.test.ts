import { Code, ConnectError } from "@connectrpc/connect";
import mongoose from "mongoose";
import { beforeAll, describe, expect, it, vi } from "vitest";
import type { KeyDoc } from "../../src/store/mongo.js";
import { CHAIN_GRACE_ENDED } from "../../src/store/store.js";
import { lifecycleKeygate } from "../harness/lifecycle-keygate.js";
import { loseNextAnswer } from "../harness/mongo-lost-answer.js";
import { mongoWireAvailable } from "../harness/mongo-wire.js";
import { until } from "../harness/poll.js";
import { requireServer } from "../harness/ports.js";

// README (RotateKey): on MongoDB a key still in grace from the rotation before (A) is revoked
// before the new key goes in, and a failure after that answers an error whose retry finishes the
// rotation. Only the call whose store call revoked A told the caches and audited it: when that
// call failed after A's revoke (its new key's insert refused against its retry's placeholder, or
// A's revoke answer lost), the retry found A revoked already, so A kept passing from the caches
// after the retry's OK and its key.revoke was never appended. Now every call that makes the
// rotation tells the caches of A and appends A's key.revoke, named after the revocation, once.

const mongoReady = requireServer("MongoDB-wire server", mongoWireAvailable(), "run .ci/install-mongo-wire.sh");
const PEPPER = "lifecycle-chain-retry-pepper-0123456789abcdef";

const ALLOWED = { status: 200, code: null };
const REVOKED = { status: 401, code: "KEY_REVOKED" };

describe.runIf(mongoReady)("RotateKey(B) on MongoDB that revoked the earlier key A and then failed, and its retry", { timeout: 60_000 }, () => {
  const suite = lifecycleKeygate({ pepper: PEPPER });
  const { check } = suite;
  let keys: mongoose.Model<KeyDoc>;
  let seq = 0;
  beforeAll(() => {
    const model = suite.keys;
    if (model === undefined) throw new Error("Key model not found");
    keys = model;
  });

  /** A basic-plan key A rotated with 7 days of grace to B; both pass, so A is in this replica's cache. */
  async function chain(): Promise<{ a: { id: string; secret: string }; b: { id: string; secret: string } }> {
    const ownerId = `owner-chain-retry-${++seq}`;
    const { a, b } = await suite.rotatedAtOnce(ownerId, "basic", "chain");
    expect([await check(a.secret), await check(b.secret)]).toEqual([ALLOWED, ALLOWED]);
    suite.kg.clock.advanceMs(1000);
    return { a, b };
  }

  const rotate = (id: string): Promise<{ answer: string; secret: string }> =>
    suite.kg.admin.rotateKey({ id, graceDays: 7 }).then(
      (rotated) => ({ answer: "OK", secret: rotated.secret }),
      (error: unknown) => {
        if (error instanceof ConnectError) return { answer: Code[error.code], secret: "" };
        throw error;
      },
    );

  const revokeReasons = async (id: string): Promise<unknown[]> =>
    (await suite.kg.admin.listAuditEvents({ keyId: id })).events.filter((event) => event.action === "key.revoke").map((event) => event.changes["reason"]);

  describe("security", () => {
    it("a retry after a timeout while the first call's new key is still on its way: A refused from the retry's OK on, its revoke audited once, the first call UNAVAILABLE", async () => {
      const { a, b } = await chain();
      // The first call's insert of its new key is held until its retry has answered, then reaches
      // the server, where the retry's placeholder holds that key's id.
      let release = (): void => undefined;
      const held = new Promise<void>((resolve) => (release = resolve));
      let reached = false;
      const collection = keys.collection as unknown as Record<"insertOne", (...args: unknown[]) => Promise<unknown>>;
      const insertOne = collection.insertOne.bind(collection);
      vi.spyOn(collection, "insertOne").mockImplementationOnce(async (...args: unknown[]) => {
        reached = true;
        await held;
        return insertOne(...args);
      });
      const first = rotate(b.id);
      await until(() => reached, 10_000, "the first rotation's insert to be on its way");
      const retry = await rotate(b.id);
      const afterRetry = { retry: retry.answer, a: await check(a.secret), b: await check(b.secret), c: await check(retry.secret) };
      release();
      expect({ ...afterRetry, first: (await first).answer }).toEqual({ retry: "OK", a: REVOKED, b: ALLOWED, c: ALLOWED, first: "Unavailable" });
      expect({
        a: await check(a.secret),
        aState: (await suite.kg.admin.getKey({ id: a.id })).key?.state,
        reasons: await revokeReasons(a.id),
      }).toEqual({ a: REVOKED, aState: "revoked", reasons: [JSON.stringify(CHAIN_GRACE_ENDED)] });
    });
  });

  describe("error", () => {
    it("A's revoke made and its answer lost (UNAVAILABLE), then the retry's OK: A refused, its revoke audited once", async () => {
      const { a, b } = await chain();
      // The rotation's only keys.updateOne before its new key's insert is A's revoke.
      loseNextAnswer(keys, "updateOne");
      const firstCall = await rotate(b.id);
      vi.restoreAllMocks();
      const retried = await rotate(b.id);
      expect({
        first: firstCall.answer,
        retry: retried.answer,
        a: await check(a.secret),
        c: await check(retried.secret),
        aState: (await suite.kg.admin.getKey({ id: a.id })).key?.state,
        reasons: await revokeReasons(a.id),
      }).toEqual({ first: "Unavailable", retry: "OK", a: REVOKED, c: ALLOWED, aState: "revoked", reasons: [JSON.stringify(CHAIN_GRACE_ENDED)] });
    });
  });
});
