import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { TestClock } from "../harness/clock.js";
import { TEST_POLICY, checkInit, checkOutcome, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { mongoWireAvailable, startMongoWire } from "../harness/mongo-wire.js";
import type { MongoWire } from "../harness/mongo-wire.js";
import { requireServer } from "../harness/ports.js";

// Two replicas on one MongoDB, B's clock 10 s ahead of A's. B issues K1 by rotating E; A then
// rotates K1, ending E's grace: E is revoked at A's time, before K1's issue by B's clock. The
// rotation answered the keys it revoked by revoke time >= the rotated key's issue time, so it
// missed E: no cache was told (A's cached E kept passing) and no key.revoke was audited. It
// answers them by the rotation alone now.

const mongoReady = requireServer("MongoDB-wire server", mongoWireAvailable(), "run .ci/install-mongo-wire.sh");
const PEPPER = "skew-chain-skew-pepper-0123456789abcdef";

describe.runIf(mongoReady)("MongoDB: a chain revoke by a replica whose clock is behind the issuing replica's", { timeout: 120_000 }, () => {
  let mongo: MongoWire | undefined;
  let a: TestKeygate;
  let b: TestKeygate;
  const clockA = new TestClock();
  const clockB = new TestClock();
  beforeAll(async () => {
    clockA.freeze("2027-03-01T10:00:00.000Z");
    clockB.freeze("2027-03-01T10:00:10.000Z");
    mongo = await startMongoWire();
    const env = { KEYGATE_MONGODB_URI: mongo.uri, KEYGATE_PEPPER: PEPPER };
    a = await startKeygate({ env, clock: clockA, policy: TEST_POLICY });
    b = await startKeygate({ env, clock: clockB, policy: TEST_POLICY });
  }, 120_000);
  afterAll(async () => {
    await b?.stop();
    await a?.stop();
    await mongo?.stop();
  });

  it("revokes E, tells the caches and audits its key.revoke", async () => {
    const ownerId = "skew-skew";
    await a.admin.upsertAccount({ ownerId, plan: "business" });
    const e = await a.admin.createKey({ ownerId, name: "k", scopes: ["tutor"] });
    const eId = e.key?.id ?? "";
    const k1 = await b.admin.rotateKey({ id: eId, graceDays: 7 });
    const check = async (secret: string) => checkOutcome(await a.check(checkInit({ authorization: `Bearer ${secret}` }, "/v1/things")));
    expect(await check(e.secret)).toEqual({ status: 200, code: null }); // E in grace, cached on A
    clockA.advanceMs(1000);
    await a.admin.rotateKey({ id: k1.key?.id ?? "", graceDays: 7 });
    const state = (await a.admin.getKey({ id: eId })).key?.state;
    const { events } = await a.admin.listAuditEvents({ keyId: eId });
    const after = await check(e.secret);
    // By id, which follows each replica's clock: the revoke (A's time) sorts before B's key.rotate.
    expect({ state, actions: events.map((ev) => ev.action), after }).toEqual({
      state: "revoked",
      actions: ["key.create", "key.revoke", "key.rotate"],
      after: { status: 401, code: "KEY_REVOKED" },
    });
  });
});
