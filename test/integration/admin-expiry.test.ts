import { join } from "node:path";
import { DatabaseSync } from "node:sqlite";
import { Code } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { postJson, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { mongoWireAvailable, startMongoWire } from "../harness/mongo-wire.js";
import type { MongoWire } from "../harness/mongo-wire.js";
import { requireServer } from "../harness/ports.js";

// CreateKey's expires_at, on both stores (keygate in-process): from just after now to
// 9999-12-31T23:59:59Z, the last second a protobuf Timestamp can carry in JSON. A later one is
// refused before anything is written, so no key is stored that ListKeys could not answer.

const MONGO_PEPPER = "admin-expiry-test-pepper-0123456789abcdef";
/** 9999-12-31T23:59:59Z in Unix seconds. */
const LAST_SECOND = 253_402_300_799n;
const REFUSED = { code: Code.InvalidArgument, rawMessage: "expires_at: must be no later than 9999-12-31T23:59:59Z" };

const mongoReady = requireServer("MongoDB-wire server", mongoWireAvailable(), "run .ci/install-mongo-wire.sh");

const BACKENDS: Array<{ name: string; ready: boolean; start: () => Promise<{ kg: TestKeygate; stop: () => Promise<void> }> }> = [
  {
    name: "SQLite",
    ready: true,
    async start() {
      const kg = await startKeygate();
      return { kg, stop: () => kg.stop() };
    },
  },
  {
    name: "MongoDB (MongoDB-wire server)",
    ready: mongoReady,
    async start() {
      const mongo: MongoWire = await startMongoWire();
      const kg = await startKeygate({ env: { KEYGATE_MONGODB_URI: mongo.uri, KEYGATE_PEPPER: MONGO_PEPPER } }).catch(async (error: unknown) => {
        await mongo.stop();
        throw error;
      });
      return {
        kg,
        async stop() {
          await kg.stop();
          await mongo.stop();
        },
      };
    },
  },
];

for (const { name, ready, start } of BACKENDS) {
  describe.runIf(ready)(`CreateKey expires_at on ${name}`, () => {
    let kg: TestKeygate;
    let stop: () => Promise<void>;
    beforeAll(async () => {
      ({ kg, stop } = await start());
    }, 60_000);
    afterAll(async () => {
      await stop?.();
    });

    describe("error", () => {
      // 10^15 s is past what a JS Date holds; 3 * 10^11 s (year 11476) is past a JSON Timestamp.
      it.each([
        ["10^15 seconds", 1_000_000_000_000_000n, 0],
        ["year 11476", 300_000_000_000n, 0],
        ["one second after 9999-12-31T23:59:59Z", LAST_SECOND + 1n, 0],
        ["one millisecond after 9999-12-31T23:59:59Z", LAST_SECOND, 1_000_000],
      ])("an expires_at %s is INVALID_ARGUMENT, and no key, slot or audit record is written", async (_case, seconds, nanos) => {
        const ownerId = `expiry-refused-${seconds}-${nanos}`;
        // basic: one key, so a slot taken by a refused call would refuse the real key below.
        await kg.admin.upsertAccount({ ownerId, plan: "basic" });
        await expect(kg.admin.createKey({ ownerId, name: "far", expiresAt: { seconds, nanos } })).rejects.toMatchObject(REFUSED);
        expect((await kg.admin.listKeys({ ownerId, includeRevoked: true })).keys).toEqual([]);
        expect((await kg.admin.getAccount({ ownerId })).account?.activeKeyCount).toBe(0);
        expect((await kg.admin.listAuditEvents({ ownerId })).events.map((e) => e.action)).toEqual(["account.upsert"]);
        const real = await kg.admin.createKey({ ownerId, name: "real" });
        expect(real.key?.state).toBe("active");
      });
    });

    describe("happy", () => {
      it("the last second allowed is stored, audited and listed, over Connect JSON too", async () => {
        const ownerId = "expiry-last-second";
        const created = await kg.admin.createKey({ ownerId, name: "long-lived", expiresAt: { seconds: LAST_SECOND, nanos: 0 } });
        expect(created.key?.expiresAt?.seconds).toBe(LAST_SECOND);
        const listed = await postJson(kg.ports.admin, "ListKeys", { ownerId });
        expect(listed.status).toBe(200);
        expect((listed.json["keys"] as Array<Record<string, unknown>>).map((k) => k["expiresAt"])).toEqual(["9999-12-31T23:59:59Z"]);
        const events = (await kg.admin.listAuditEvents({ ownerId })).events;
        expect(events.map((e) => [e.action, e.changes["expires_at"]])).toEqual([
          ["account.upsert", undefined],
          ["key.create", '"9999-12-31T23:59:59.000Z"'],
        ]);
      });
    });
  });
}

describe("a key an earlier version stored with an expiry past 9999 (SQLite)", () => {
  it("is listed over Connect JSON with expires_at 9999-12-31T23:59:59Z, not a 500 for its owner's whole list", async () => {
    const kg = await startKeygate();
    try {
      const ownerId = "expiry-earlier";
      const created = await kg.admin.createKey({ ownerId, name: "far" });
      // As CreateKey stored it before expiry had an upper bound: year 11476.
      const db = new DatabaseSync(join(kg.dataDir, "keygate.db"));
      try {
        db.prepare("UPDATE keys SET expires_at = ? WHERE id = ?").run(300_000_000_000_000, created.key?.id ?? "");
      } finally {
        db.close();
      }
      const listed = await postJson(kg.ports.admin, "ListKeys", { ownerId });
      expect(listed.status).toBe(200);
      expect((listed.json["keys"] as Array<Record<string, unknown>>).map((k) => k["expiresAt"])).toEqual(["9999-12-31T23:59:59Z"]);
    } finally {
      await kg.stop();
    }
  });
});
