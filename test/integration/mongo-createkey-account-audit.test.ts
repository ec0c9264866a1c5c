import { Code } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { z } from "zod";
import { adminRefusal, startKeygate, TEST_POLICY } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { mongoWireAvailable, startMongoWire } from "../harness/mongo-wire.js";
import type { MongoWire } from "../harness/mongo-wire.js";
import { until } from "../harness/poll.js";
import { requireServer } from "../harness/ports.js";
import { startTcpRelay } from "../harness/tcp-relay.js";
import type { TcpRelay } from "../harness/tcp-relay.js";

// CreateKey for an owner with no account makes the account too, and README "Audit trail" says
// its account.upsert comes before the key.create, and that a call whose answer was lost logs its
// records in full. On MongoDB the account's upsert is a write of its own, before the slot
// admission and the key's insert, and the account was left made with no record of it anywhere:
//  - error: the connection dropped after the upsert. The lost call logged only its key.create,
//    and the retry found the account made and recorded only its key. The lost call now logs the
//    account.upsert as well, with the defaults the store made the account from.
//  - a refusal, with no fault: a test key at testMode.maxActiveKeys 0 answered RESOURCE_EXHAUSTED
//    with the account made on MongoDB (SQLite rolls it back in the CreateKey's transaction). Both
//    stores now refuse it with nothing written.

const mongoReady = requireServer("MongoDB-wire server", mongoWireAvailable(), "run .ci/install-mongo-wire.sh");
const PEPPER = "mongo-createkey-account-audit-pepper-0123";
/** No test keys at all: any CreateKey of a test key is refused at the cap. */
const POLICY = { ...TEST_POLICY, testMode: { rateLimit: null, dailyQuota: null, maxActiveKeys: 0 } };
/** The account.upsert of an account CreateKey makes: the default plan, active, standard. */
const CREATED = { plan: "basic", subscription_status: "active", role: "standard" };

const loggedRecord = z.object({
  level: z.number(),
  msg: z.string(),
  audit: z.object({ action: z.string(), keyId: z.string().nullable(), ownerId: z.string().nullable(), changes: z.record(z.string(), z.unknown()) }),
});

/** The audit records logged for `ownerId`'s changes whose outcome is unknown, in the order logged. */
function unsureRecords(kg: TestKeygate, ownerId: string): Array<z.infer<typeof loggedRecord>> {
  return kg.logLines
    .map((line) => loggedRecord.safeParse(JSON.parse(line)))
    .flatMap((parsed) =>
      parsed.success && parsed.data.msg === "change outcome unknown: its audit record was not appended" && parsed.data.audit.ownerId === ownerId ? [parsed.data] : [],
    );
}

describe.runIf(mongoReady)("CreateKey of an owner with no account on MongoDB, its answer lost after the account was made", { timeout: 90_000 }, () => {
  let mongo: MongoWire | undefined;
  let relay: TcpRelay | undefined;
  let kg: TestKeygate | undefined;
  beforeAll(async () => {
    mongo = await startMongoWire();
    relay = await startTcpRelay(Number(new URL(mongo.uri).port));
    const uri = new URL(mongo.uri);
    uri.port = String(relay.port);
    kg = await startKeygate({ policy: POLICY, env: { KEYGATE_MONGODB_URI: uri.toString(), KEYGATE_PEPPER: PEPPER } });
  }, 120_000);
  afterAll(async () => {
    await kg?.stop();
    await relay?.close();
    await mongo?.stop();
  });

  it("error: the lost call logs the account.upsert before its key.create; the retry records its key", async () => {
    if (kg === undefined || relay === undefined) throw new Error("keygate did not start");
    const app = kg;
    const ownerId = "lost-after-account-made";
    // The first command naming the owner after the account's findAndModify (the slot work's or
    // the admission's read) is never sent: the connection drops, and the relay refuses new ones
    // until listen(). The reads before the upsert go through.
    let upserted = false;
    relay.dropWhen = (chunk) => {
      if (!chunk.includes(ownerId)) return false;
      if (chunk.includes("\x02findAndModify\x00")) upserted = true;
      else if (upserted && chunk.includes("\x02find\x00")) return true;
      return false;
    };
    expect((await adminRefusal(app.admin.createKey({ ownerId, name: "first" }))).code).toBe(Code.Unavailable);
    expect(upserted).toBe(true);
    expect(unsureRecords(app, ownerId).map((r) => [r.level, r.audit.action, r.audit.keyId, r.audit.changes])).toEqual([
      [50, "account.upsert", null, CREATED],
      [50, "key.create", expect.stringMatching(/^key_/), expect.objectContaining({ name: "first", mode: "live" })],
    ]);

    await relay.listen();
    // The upsert landed before the drop: the account is there once the driver reconnects.
    await until(async () => app.admin.getAccount({ ownerId }).then(() => true, () => false), 20_000, "the account made by the lost call readable");
    const { key } = await app.admin.createKey({ ownerId, name: "retry" });
    const { events } = await app.admin.listAuditEvents({ ownerId });
    // The retry finds the account made and appends only its key's record: the account's is the log's.
    expect(events.map((e) => [e.action, e.keyId])).toEqual([["key.create", key?.id]]);
    expect((await app.admin.getAccount({ ownerId })).account?.plan).toBe(CREATED.plan);
  });
});

const BACKENDS = [
  { name: "SQLite", ready: true, mongo: false },
  { name: "MongoDB", ready: mongoReady, mongo: true },
];

for (const backend of BACKENDS) {
  describe.runIf(backend.ready)(`CreateKey refused at the cap for an owner with no account (${backend.name})`, { timeout: 60_000 }, () => {
    let mongo: MongoWire | undefined;
    let kg: TestKeygate | undefined;
    beforeAll(async () => {
      if (backend.mongo) mongo = await startMongoWire();
      kg = await startKeygate({ policy: POLICY, env: mongo === undefined ? {} : { KEYGATE_MONGODB_URI: mongo.uri, KEYGATE_PEPPER: PEPPER } });
    }, 120_000);
    afterAll(async () => {
      await kg?.stop();
      await mongo?.stop();
    });

    it("error: a test key at a cap of 0 is RESOURCE_EXHAUSTED, with no account made and nothing recorded", async () => {
      if (kg === undefined) throw new Error("keygate did not start");
      const ownerId = "refused-at-cap-zero";
      expect((await adminRefusal(kg.admin.createKey({ ownerId, name: "t", mode: "test" }))).code).toBe(Code.ResourceExhausted);
      expect((await adminRefusal(kg.admin.getAccount({ ownerId }))).code).toBe(Code.NotFound);
      expect((await kg.admin.listAuditEvents({ ownerId })).events).toEqual([]);

      // A live key then makes the account, recorded before the key as for any new owner.
      const { key } = await kg.admin.createKey({ ownerId, name: "l" });
      const { events } = await kg.admin.listAuditEvents({ ownerId });
      expect(events.map((e) => [e.action, e.keyId])).toEqual([
        ["account.upsert", ""],
        ["key.create", key?.id],
      ]);
    });
  });
}
