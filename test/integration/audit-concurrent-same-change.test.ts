import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { mongoWireAvailable, startMongoWire } from "../harness/mongo-wire.js";
import type { MongoWire } from "../harness/mongo-wire.js";
import { requireServer } from "../harness/ports.js";

// README "Audit trail": "a call that changes nothing ... appends no record". Two identical calls
// at once make one change: the second finds it made. Each call compared the store's answer with
// what it had read before its write, so both could read the old value and both append a record.
// The store now says whether its own write changed the account or enabled the key (the document
// as the write found it on MongoDB, in the same transaction on SQLite), and only that call records.

const mongoReady = requireServer("MongoDB-wire server", mongoWireAvailable(), "run .ci/install-mongo-wire.sh");
const PEPPER = "audit-concurrent-pepper-0123456789abcdefgh";

for (const backend of [{ name: "SQLite", mongo: false, ready: true }, { name: "MongoDB", mongo: true, ready: mongoReady }]) {
  describe.runIf(backend.ready)(`audit (${backend.name}): the same change sent twice at once is one change`, { timeout: 60_000 }, () => {
    let mongo: MongoWire | undefined;
    let a: TestKeygate;
    let b: TestKeygate;
    beforeAll(async () => {
      if (backend.mongo) mongo = await startMongoWire();
      const env: Record<string, string> = mongo === undefined ? {} : { KEYGATE_MONGODB_URI: mongo.uri, KEYGATE_PEPPER: PEPPER };
      a = await startKeygate({ env });
      // A second replica on the same MongoDB (a client retrying on another replica); on SQLite the same one.
      b = backend.mongo ? await startKeygate({ env }) : a;
    }, 120_000);
    afterAll(async () => {
      if (b !== a) await b?.stop();
      await a?.stop();
      await mongo?.stop();
    });

    it("UpsertAccount basic -> pro twice at once appends one account.upsert", async () => {
      for (let round = 0; round < 5; round++) {
        const ownerId = `audit-concurrent-plan-${round}`;
        await a.admin.upsertAccount({ ownerId, plan: "basic" });
        await Promise.all([a.admin.upsertAccount({ ownerId, plan: "pro" }), b.admin.upsertAccount({ ownerId, plan: "pro" })]);
        const { events } = await a.admin.listAuditEvents({ ownerId });
        expect(events.map((e) => [e.action, e.changes["plan"]])).toEqual([
          ["account.upsert", '"basic"'],
          ["account.upsert", '"pro"'],
        ]);
      }
    });

    it("EnableKey twice at once appends one key.enable", async () => {
      const ownerId = "audit-concurrent-enable";
      await a.admin.upsertAccount({ ownerId, plan: "business" });
      for (let round = 0; round < 5; round++) {
        const key = await a.admin.createKey({ ownerId, name: `k${round}` });
        const id = key.key?.id ?? "";
        await a.admin.disableKey({ id, reason: "unpaid" });
        await Promise.all([a.admin.enableKey({ id }), b.admin.enableKey({ id })]);
        const { events } = await a.admin.listAuditEvents({ keyId: id });
        expect(events.map((e) => e.action)).toEqual(["key.create", "key.disable", "key.enable"]);
      }
    });
  });
}
