import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { mongoWireAvailable, startMongoWire } from "../harness/mongo-wire.js";
import type { MongoWire } from "../harness/mongo-wire.js";
import { requireServer } from "../harness/ports.js";

// README "Audit trail": every KeyAdmin change appends a record with the changed fields and their
// new values, and a billing or compliance consumer rebuilds an account's plan history from it. An
// account UpsertAccount created without naming a plan (so on the default plan, active, standard)
// was recorded with no field at all, and one CreateKey created had no record; a later UpsertAccount
// to the default plan changes nothing and appends nothing, so the trail never said which plan the
// account was on. A new account is now recorded with the plan, status and role it was given.

const mongoReady = requireServer("MongoDB-wire server", mongoWireAvailable(), "run .ci/install-mongo-wire.sh");
const CREATED = { plan: '"basic"', subscription_status: '"active"', role: '"standard"' };

const BACKENDS = [
  { name: "SQLite", ready: true, mongo: false },
  { name: "MongoDB", ready: mongoReady, mongo: true },
];

for (const backend of BACKENDS) {
  describe.runIf(backend.ready)(`audit: the plan an account is created on (${backend.name})`, { timeout: 60_000 }, () => {
    let mongo: MongoWire | undefined;
    let kg: TestKeygate;
    beforeAll(async () => {
      if (backend.mongo) mongo = await startMongoWire();
      kg = await startKeygate({ env: mongo === undefined ? {} : { KEYGATE_MONGODB_URI: mongo.uri, KEYGATE_PEPPER: "audit-account-created-pepper-0123456789ab" } });
    }, 120_000);
    afterAll(async () => {
      await kg?.stop();
      await mongo?.stop();
    });

    it("UpsertAccount of a new owner without a plan: its account.upsert names the plan, status and role it was given", async () => {
      const ownerId = "created-by-upsert";
      expect((await kg.admin.upsertAccount({ ownerId })).account?.plan).toBe("basic");
      const { events } = await kg.admin.listAuditEvents({ ownerId });
      expect(events.map((e) => [e.action, e.changes])).toEqual([["account.upsert", CREATED]]);
    });

    it("UpsertAccount of a new owner naming a field: the record holds it and the defaults it was given", async () => {
      const ownerId = "created-by-upsert-pro";
      await kg.admin.upsertAccount({ ownerId, plan: "pro" });
      const { events } = await kg.admin.listAuditEvents({ ownerId });
      expect(events.map((e) => [e.action, e.changes])).toEqual([["account.upsert", { ...CREATED, plan: '"pro"' }]]);
    });

    it("CreateKey of a new owner: an account.upsert of the account it made comes before the key.create, by the same actor", async () => {
      const ownerId = "created-by-create-key";
      const { key } = await kg.admin.createKey({ ownerId, name: "k" });
      // The operator "sets" the plan it already has: nothing changes, nothing is appended.
      await kg.admin.upsertAccount({ ownerId, plan: "basic" });
      const { events } = await kg.admin.listAuditEvents({ ownerId });
      expect(events.map((e) => [e.action, e.keyId, e.changes["plan"]])).toEqual([
        ["account.upsert", "", '"basic"'],
        ["key.create", key?.id, undefined],
      ]);
      expect(events[0]?.changes).toEqual(CREATED);
      expect(events[0]?.actor).toBe(events[1]?.actor);
      expect(events[0]?.source).toBe(events[1]?.source);
    });

    it("CreateKey for an owner with an account: no account record", async () => {
      const ownerId = "created-before-key";
      await kg.admin.upsertAccount({ ownerId, plan: "pro" });
      await kg.admin.createKey({ ownerId, name: "k" });
      const { events } = await kg.admin.listAuditEvents({ ownerId });
      expect(events.map((e) => e.action)).toEqual(["account.upsert", "key.create"]);
    });
  });
}
