import { Code } from "@connectrpc/connect";
import { timestampMs } from "@bufbuild/protobuf/wkt";
import type { Timestamp } from "@bufbuild/protobuf/wkt";
import mongoose from "mongoose";
import { ulid } from "ulid";
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from "vitest";
import { z } from "zod";
import type { AuditEvent } from "../../src/gen/keygate/v1/key_admin_pb.js";
import { adminRefusal, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { LIMITS_POLICY } from "../harness/limits-policy.js";
import { mongoWireAvailable, startMongoWire } from "../harness/mongo-wire.js";
import type { MongoWire } from "../harness/mongo-wire.js";
import { loseNextAnswer, modelOn } from "../harness/mongo-lost-answer.js";
import type { LosableMethod } from "../harness/mongo-lost-answer.js";
import { requireServer } from "../harness/ports.js";

// A KeyAdmin change whose MongoDB write was made but whose answer was lost answers UNAVAILABLE,
// and the caller retries (README "Audit trail"): a revoke and a keyed top-up are recorded once,
// under the id named after the change, by whichever call finds it made; other changes are logged
// in full at error level by the call whose answer was lost. And a change an earlier release made
// and recorded (under an id of its own) is not recorded again when it is repeated after an upgrade.

const mongoReady = requireServer("MongoDB-wire server", mongoWireAvailable(), "run .ci/install-mongo-wire.sh");
const PEPPER = "audit-lost-answer-pepper-0123456789abcdefgh";

const loggedRecord = z.object({
  level: z.number(),
  msg: z.string(),
  audit: z.object({ id: z.string(), atMs: z.number(), action: z.string(), keyId: z.string().nullable(), ownerId: z.string().nullable(), changes: z.record(z.string(), z.unknown()) }),
});

/** The audit records logged at error level for changes whose outcome is unknown. */
function unsureRecords(kg: TestKeygate): Array<z.infer<typeof loggedRecord>> {
  return kg.logLines
    .map((line) => loggedRecord.safeParse(JSON.parse(line)))
    .flatMap((parsed) => (parsed.success && parsed.data.msg === "change outcome unknown: its audit record was not appended" ? [parsed.data] : []));
}

function msOf(time: Timestamp | undefined): number | undefined {
  return time === undefined ? undefined : timestampMs(time);
}

function summary(events: readonly AuditEvent[]): Array<[string, string, Record<string, string>]> {
  return events.map((e) => [e.action, e.id, e.changes]);
}

describe.runIf(mongoReady)("audit of a change whose MongoDB answer was lost, then retried", { timeout: 60_000 }, () => {
  let mongo: MongoWire | undefined;
  let kg: TestKeygate;
  let connections: mongoose.Connection[] = [];

  beforeAll(async () => {
    mongo = await startMongoWire();
    const before = mongoose.connections.length;
    kg = await startKeygate({ policy: LIMITS_POLICY, env: { KEYGATE_MONGODB_URI: mongo.uri, KEYGATE_PEPPER: PEPPER } });
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

  const trail = async (filter: { ownerId?: string; keyId?: string }): Promise<AuditEvent[]> => (await kg.admin.listAuditEvents({ ...filter, pageSize: 100 })).events;

  describe("happy", () => {
    it("RevokeKey: the retry records the revoke once, under the id the lost call logged, at the key's revoked_at", async () => {
      const ownerId = "lost-revoke";
      const { key } = await kg.admin.createKey({ ownerId, name: "k" });
      const id = key?.id ?? "";
      const logged = unsureRecords(kg).length;
      loseNext("Key", "updateOne");
      expect((await adminRefusal(kg.admin.revokeKey({ id, reason: "leaked" }))).code).toBe(Code.Unavailable);
      const lost = unsureRecords(kg).slice(logged);
      expect(lost.map((r) => [r.level, r.audit.action, r.audit.keyId, r.audit.ownerId, r.audit.changes])).toEqual([[50, "key.revoke", id, ownerId, { reason: "leaked" }]]);
      expect(await trail({ keyId: id })).toHaveLength(1);

      const retry = await kg.admin.revokeKey({ id, reason: "leaked" });
      expect([retry.key?.state, retry.key?.revokeReason]).toEqual(["revoked", "leaked"]);
      const events = await trail({ keyId: id });
      expect(summary(events).slice(1)).toEqual([["key.revoke", lost[0]?.audit.id, { reason: '"leaked"' }]]);
      expect(events.map((e) => e.action)).toEqual(["key.create", "key.revoke"]);
      expect(msOf(retry.key?.revokedAt)).toEqual(expect.any(Number));
      expect(msOf(events[1]?.time)).toBe(msOf(retry.key?.revokedAt));
      expect(lost[0]?.audit.atMs).toBe(msOf(retry.key?.revokedAt));

      // Once recorded, neither a further retry nor another revoke for the same reason adds one.
      await kg.admin.revokeKey({ id, reason: "leaked" });
      await kg.admin.revokeKey({ id, reason: "routine cleanup" });
      expect(await trail({ keyId: id })).toEqual(events);
    });

    it("AddCredits with an idempotency key: 100 credits added once, and the retry records the top-up once, under the id the lost call logged", async () => {
      const ownerId = "lost-topup";
      await kg.admin.upsertAccount({ ownerId, plan: "metered" });
      const logged = unsureRecords(kg).length;
      loseNext("Account", "findOneAndUpdate");
      const topUp = { ownerId, amount: 100n, reason: "order 9", idempotencyKey: "order-9" };
      expect((await adminRefusal(kg.admin.addCredits(topUp))).code).toBe(Code.Unavailable);
      const lost = unsureRecords(kg).slice(logged);
      expect(lost.map((r) => [r.level, r.audit.action, r.audit.ownerId, r.audit.changes])).toEqual([
        [50, "credits.add", ownerId, { amount: 100, reason: "order 9", idempotency_key: "order-9" }],
      ]);

      const retry = await kg.admin.addCredits(topUp);
      expect([retry.replayed, retry.account?.topupCredits]).toEqual([true, 100n]);
      const events = await trail({ ownerId });
      expect(summary(events).slice(1)).toEqual([["credits.add", lost[0]?.audit.id, { amount: "100", reason: '"order 9"', idempotency_key: '"order-9"' }]]);
      expect(events.map((e) => e.action)).toEqual(["account.upsert", "credits.add"]);
      expect(msOf(events[1]?.time)).toBe(lost[0]?.audit.atMs);

      const again = await kg.admin.addCredits(topUp);
      expect([again.replayed, again.account?.topupCredits]).toEqual([true, 100n]);
      expect(await trail({ ownerId })).toEqual(events);
    });

    it("RevokeKey whose record's own insert lost its answer: the record stands once, and the retry adds none", async () => {
      const ownerId = "lost-audit-insert";
      const { key } = await kg.admin.createKey({ ownerId, name: "k" });
      const id = key?.id ?? "";
      loseNext("Audit", "insertOne");
      // The change was made and answered; the record's append is logged as failed, though made.
      expect((await kg.admin.revokeKey({ id, reason: "leaked" })).key?.state).toBe("revoked");
      expect(kg.logLines.some((line) => line.includes('"msg":"audit append failed"') && line.includes(id))).toBe(true);
      const events = await trail({ keyId: id });
      expect(events.map((e) => e.action)).toEqual(["key.create", "key.revoke"]);
      await kg.admin.revokeKey({ id, reason: "leaked" });
      expect(await trail({ keyId: id })).toEqual(events);
    });
  });

  describe("error", () => {
    it("UpsertAccount: the lost call logs its record in full at error level; the retry finds the plan set and appends nothing", async () => {
      const ownerId = "lost-upsert";
      await kg.admin.upsertAccount({ ownerId, plan: "small" });
      const logged = unsureRecords(kg).length;
      loseNext("Account", "findOneAndUpdate");
      expect((await adminRefusal(kg.admin.upsertAccount({ ownerId, plan: "metered" }))).code).toBe(Code.Unavailable);
      const lost = unsureRecords(kg).slice(logged);
      expect(lost.map((r) => [r.level, r.audit.action, r.audit.keyId, r.audit.ownerId, r.audit.changes])).toEqual([[50, "account.upsert", null, ownerId, { plan: "metered" }]]);
      expect(lost[0]?.audit.id).toMatch(/^evt_[0-9A-HJKMNP-TV-Z]{26}$/);

      const retry = await kg.admin.upsertAccount({ ownerId, plan: "metered" });
      expect(retry.account?.plan).toBe("metered");
      expect((await trail({ ownerId })).map((e) => [e.action, e.changes["plan"]])).toEqual([["account.upsert", '"small"']]);
    });
  });
});

/** A KeyAdmin change as a released keygate recorded it: under a random ULID, at the time of the append. */
function releasedRecord(fields: { atMs: number; action: string; keyId: string | null; ownerId: string; changes: Record<string, unknown> }) {
  return { id: `evt_${ulid(fields.atMs)}`, actor: "tok_released", source: "10.0.0.9", ...fields };
}

const BACKENDS = [
  { name: "SQLite", ready: true, env: (): Record<string, string> => ({}) },
  { name: "MongoDB", ready: mongoReady, env: (mongo: MongoWire | undefined): Record<string, string> => ({ KEYGATE_MONGODB_URI: mongo?.uri ?? "", KEYGATE_PEPPER: PEPPER }) },
];

for (const backend of BACKENDS) {
  describe.runIf(backend.ready)(`changes an earlier release made and recorded, repeated after an upgrade (${backend.name})`, { timeout: 60_000 }, () => {
    let mongo: MongoWire | undefined;
    let kg: TestKeygate;
    beforeAll(async () => {
      if (backend.name === "MongoDB") mongo = await startMongoWire();
      kg = await startKeygate({ policy: LIMITS_POLICY, env: backend.env(mongo) });
    }, 120_000);
    afterAll(async () => {
      await kg?.stop();
      await mongo?.stop();
    });

    it("happy: RevokeKey for the same reason keeps the one key.revoke the release wrote", async () => {
      const ownerId = "released-revoke";
      const { key } = await kg.admin.createKey({ ownerId, name: "k" });
      const id = key?.id ?? "";
      const revokedAtMs = kg.clock.now();
      await kg.app.store.revokeKey(id, revokedAtMs, "leaked");
      const released = releasedRecord({ atMs: revokedAtMs + 3, action: "key.revoke", keyId: id, ownerId, changes: { reason: "leaked" } });
      await kg.app.store.appendAudit(released);
      await kg.admin.revokeKey({ id, reason: "leaked" });
      expect((await kg.admin.listAuditEvents({ keyId: id })).events.map((e) => [e.action, e.id])).toEqual([
        ["key.create", expect.stringMatching(/^evt_/)],
        ["key.revoke", released.id],
      ]);
    });

    it("happy: a revoke the release made but never recorded (its answer lost) is recorded by the retry, at revoked_at", async () => {
      const ownerId = "released-revoke-unrecorded";
      const { key } = await kg.admin.createKey({ ownerId, name: "k" });
      const id = key?.id ?? "";
      const revokedAtMs = kg.clock.now();
      await kg.app.store.revokeKey(id, revokedAtMs, "leaked");
      await kg.admin.revokeKey({ id, reason: "leaked" });
      const events = (await kg.admin.listAuditEvents({ keyId: id })).events;
      expect(events.map((e) => [e.action, e.changes])).toEqual([
        ["key.create", expect.anything()],
        ["key.revoke", { reason: '"leaked"' }],
      ]);
      expect(msOf(events[1]?.time)).toBe(revokedAtMs);
    });

    it("happy: AddCredits repeating a keyed top-up the release made keeps its one credits.add", async () => {
      const ownerId = "released-topup";
      await kg.admin.upsertAccount({ ownerId, plan: "metered" });
      const atMs = kg.clock.now();
      await kg.app.store.addCreditsOnce(ownerId, 40, "order-40", atMs);
      const released = releasedRecord({ atMs: atMs + 2, action: "credits.add", keyId: null, ownerId, changes: { amount: 40, reason: "order 40", idempotency_key: "order-40" } });
      await kg.app.store.appendAudit(released);
      // This replica's ledger never saw the key: the store answers the repeat.
      const repeat = await kg.admin.addCredits({ ownerId, amount: 40n, reason: "order 40", idempotencyKey: "order-40" });
      expect([repeat.replayed, repeat.account?.topupCredits]).toEqual([true, 40n]);
      expect((await kg.admin.listAuditEvents({ ownerId })).events.map((e) => [e.action, e.id])).toEqual([
        ["account.upsert", expect.stringMatching(/^evt_/)],
        ["credits.add", released.id],
      ]);
    });
  });
}
