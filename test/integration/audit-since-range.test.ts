import { Code } from "@connectrpc/connect";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from "vitest";
import { adminRefusal, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { mongoWireAvailable, startMongoWire } from "../harness/mongo-wire.js";
import type { MongoWire } from "../harness/mongo-wire.js";
import { requireServer } from "../harness/ports.js";

// ListAuditEvents' `since` is a Timestamp, which on the gRPC binary encoding carries any int64
// seconds. Outside 1970-01-01T00:00:00Z..9999-12-31T23:59:59Z (what every store and client reads
// back as a date, the bound of CreateKey's expires_at) it is refused naming `since`, before
// anything is read: MongoDB was sent an Invalid Date and the call failed INTERNAL.

const mongoReady = requireServer("MongoDB-wire server", mongoWireAvailable(), "run .ci/install-mongo-wire.sh");
const LAST_SECOND = 253_402_300_799n;
const REFUSED = { code: Code.InvalidArgument, message: "since: must be from 1970-01-01T00:00:00Z to 9999-12-31T23:59:59Z" };

const BACKENDS = [
  { name: "SQLite", ready: true, mongo: false },
  { name: "MongoDB", ready: mongoReady, mongo: true },
];

for (const backend of BACKENDS) {
  describe.runIf(backend.ready)(`ListAuditEvents' since (${backend.name})`, { timeout: 60_000 }, () => {
    let mongo: MongoWire | undefined;
    let kg: TestKeygate;
    const ownerId = "audit-since";
    beforeAll(async () => {
      if (backend.mongo) mongo = await startMongoWire();
      kg = await startKeygate({ env: mongo === undefined ? {} : { KEYGATE_MONGODB_URI: mongo.uri, KEYGATE_PEPPER: "audit-since-pepper-0123456789abcdefghij" } });
      await kg.admin.createKey({ ownerId, name: "k" });
    }, 120_000);
    afterEach(() => {
      vi.restoreAllMocks();
    });
    afterAll(async () => {
      await kg?.stop();
      await mongo?.stop();
    });

    it("error: past 9999-12-31T23:59:59Z or before 1970 is INVALID_ARGUMENT naming since, and nothing is read", async () => {
      const reads = vi.spyOn(kg.app.store, "listAudit");
      const cases = [
        { seconds: 100_000_000_000_000n, nanos: 0 },
        { seconds: LAST_SECOND + 1n, nanos: 0 },
        { seconds: LAST_SECOND, nanos: 1_000_000 },
        { seconds: -1n, nanos: 0 },
      ];
      for (const since of cases) expect(await adminRefusal(kg.admin.listAuditEvents({ ownerId, since }))).toEqual(REFUSED);
      expect(reads).not.toHaveBeenCalled();
    });

    it("happy: the first and the last second allowed are answered", async () => {
      expect((await kg.admin.listAuditEvents({ ownerId, since: timestampFromMs(0) })).events.map((e) => e.action)).toEqual(["account.upsert", "key.create"]);
      expect((await kg.admin.listAuditEvents({ ownerId, since: { seconds: LAST_SECOND, nanos: 0 } })).events).toEqual([]);
    });
  });
}
