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
//    When the store is back at once, the lost call appends the account.upsert (it knows its write
//    made the account) and logs only its key.create: the account is in the trail once.
//  - a refusal, with no fault: a test key at testMode.maxActiveKeys 0 answered RESOURCE_EXHAUSTED
//    with the account made on MongoDB (SQLite rolls it back in the CreateKey's transaction). Both
//    stores now refuse it with nothing written.
//  - a refusal after the account was made: two CreateKeys for one new owner on two replicas (a
//    client's retry sent to another replica). A's upsert made the account, B found it made
//    (recording only its key) and took the plan's one slot, and A was refused RESOURCE_EXHAUSTED,
//    its account.upsert lost with the refusal: the account had no record in the trail or in any
//    log. The refused call now appends it.

const mongoReady = requireServer("MongoDB-wire server", mongoWireAvailable(), "run .ci/install-mongo-wire.sh");
const PEPPER = "mongo-createkey-account-audit-pepper-0123";
/** No test keys at all: any CreateKey of a test key is refused at the cap. */
const POLICY = { ...TEST_POLICY, testMode: { rateLimit: null, dailyQuota: null, maxActiveKeys: 0 } };
/** The account.upsert of an account CreateKey makes: the default plan, active, standard. */
const CREATED = { plan: "basic", subscription_status: "active", role: "standard" };
/** CREATED as ListAuditEvents answers it: each value JSON. */
const CREATED_ON_WIRE = Object.fromEntries(Object.entries(CREATED).map(([field, value]) => [field, JSON.stringify(value)]));

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

  it("error: the answer lost after the account was made, the store back at once: the account.upsert is appended, and only the key.create is logged", async () => {
    if (kg === undefined || relay === undefined) throw new Error("keygate did not start");
    const app = kg;
    const tcp = relay;
    const ownerId = "lost-admission-account-recorded";
    // The slot admission (the first update naming the owner, after the account's findAndModify)
    // is held, and its connection dropped with it unsent: the driver answers a lost connection,
    // which may have carried the write. The relay takes new connections, so the append can land.
    const heldBefore = tcp.heldChunks;
    tcp.holdWhen = (chunk) => chunk.includes(ownerId) && chunk.includes("\x02update\x00");
    const first = adminRefusal(app.admin.createKey({ ownerId, name: "first" }));
    await until(() => tcp.heldChunks > heldBefore, 20_000, "the admission held");
    tcp.dropAll();
    tcp.release();
    expect((await first).code).toBe(Code.Unavailable);

    const { events } = await app.admin.listAuditEvents({ ownerId });
    expect(events.map((e) => [e.action, e.keyId, e.changes])).toEqual([["account.upsert", "", CREATED_ON_WIRE]]);
    // The account's record is in the trail, so the log holds only the key's: no second account.upsert.
    expect(unsureRecords(app, ownerId).map((r) => [r.level, r.audit.action, r.audit.changes["name"]])).toEqual([[50, "key.create", "first"]]);

    // The retry finds the account made and records only its key (the admission never landed: the slot is free).
    const { key } = await app.admin.createKey({ ownerId, name: "retry" });
    const after = await app.admin.listAuditEvents({ ownerId });
    expect(after.events.map((e) => [e.action, e.keyId])).toEqual([
      ["account.upsert", ""],
      ["key.create", key?.id],
    ]);
  });
});

describe.runIf(mongoReady)("two CreateKeys for one new owner on two replicas, the one that made the account refused at the cap (MongoDB)", { timeout: 120_000 }, () => {
  let mongo: MongoWire | undefined;
  let relay: TcpRelay | undefined;
  let a: TestKeygate | undefined;
  let b: TestKeygate | undefined;
  beforeAll(async () => {
    mongo = await startMongoWire();
    relay = await startTcpRelay(Number(new URL(mongo.uri).port));
    const viaRelay = new URL(mongo.uri);
    viaRelay.port = String(relay.port);
    // TEST_POLICY's default plan (basic) allows one live key: the two calls race for its slot.
    a = await startKeygate({ policy: TEST_POLICY, env: { KEYGATE_MONGODB_URI: viaRelay.toString(), KEYGATE_PEPPER: PEPPER } });
    b = await startKeygate({ policy: TEST_POLICY, env: { KEYGATE_MONGODB_URI: mongo.uri, KEYGATE_PEPPER: PEPPER } });
  }, 120_000);
  afterAll(async () => {
    relay?.release();
    await a?.stop();
    await b?.stop();
    await relay?.close();
    await mongo?.stop();
  });

  it("error: A, whose write made the account, is RESOURCE_EXHAUSTED and appends its account.upsert; B records only its key", async () => {
    if (a === undefined || b === undefined || relay === undefined) throw new Error("keygate did not start");
    const tcp = relay;
    const ownerId = "race-new-owner";
    // A's commands after its account's upsert (its slot work, its admission) wait until B is done.
    let upserted = false;
    tcp.holdWhen = (chunk) => {
      if (!chunk.includes(ownerId)) return false;
      if (chunk.includes("\x02findAndModify\x00")) {
        upserted = true;
        return false;
      }
      return upserted;
    };
    const first = adminRefusal(a.admin.createKey({ ownerId, name: "from-a" }));
    await until(() => tcp.heldChunks > 0, 20_000, "A's CreateKey held after its account's upsert");

    // B finds the account A made, and takes its plan's one slot.
    const { key } = await b.admin.createKey({ ownerId, name: "from-b" });
    tcp.release();
    expect((await first).code).toBe(Code.ResourceExhausted);

    expect((await b.admin.getAccount({ ownerId })).account?.plan).toBe(CREATED.plan);
    const { events } = await b.admin.listAuditEvents({ ownerId });
    // In the order appended: A records the account once its refusal is known, after B's key.
    expect(events.map((e) => [e.action, e.keyId, e.action === "account.upsert" ? e.changes : {}])).toEqual([
      ["key.create", key?.id, {}],
      ["account.upsert", "", CREATED_ON_WIRE],
    ]);
    // A refusal's outcome is known: nothing is logged as unknown.
    expect(unsureRecords(a, ownerId)).toEqual([]);
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
