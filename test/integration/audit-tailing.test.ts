import { timestampFromMs, timestampMs } from "@bufbuild/protobuf/wkt";
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from "vitest";
import type { AuditEvent } from "../../src/gen/keygate/v1/key_admin_pb.js";
import type { AuditRecord } from "../../src/store/store.js";
import { readAuditFrom, SETTLE_MARGIN_MS } from "../harness/audit-tail.js";
import { startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { mongoWireAvailable, startMongoWire } from "../harness/mongo-wire.js";
import type { MongoWire } from "../harness/mongo-wire.js";
import { requireServer } from "../harness/ports.js";
import { until } from "../harness/poll.js";

// An audit record's id and time are fixed before its insert lands, so two calls at once (or two
// replicas) can insert out of id order: a consumer paging on with a page token or `since` the
// newest time it saw skips the later insert. README "Audit trail" gives the recipe of a tailing
// exporter: re-read from `since` the newest time seen minus a margin, and drop the ids it has.

const mongoReady = requireServer("MongoDB-wire server", mongoWireAvailable(), "run .ci/install-mongo-wire.sh");

const BACKENDS = [
  { name: "SQLite", ready: true, mongo: false },
  { name: "MongoDB", ready: mongoReady, mongo: true },
];

for (const backend of BACKENDS) {
  describe.runIf(backend.ready)(`a tailing exporter of the audit trail (${backend.name})`, { timeout: 60_000 }, () => {
    let mongo: MongoWire | undefined;
    let kg: TestKeygate;
    beforeAll(async () => {
      if (backend.mongo) mongo = await startMongoWire();
      kg = await startKeygate({ env: mongo === undefined ? {} : { KEYGATE_MONGODB_URI: mongo.uri, KEYGATE_PEPPER: "audit-tailing-pepper-0123456789abcdefgh" } });
    }, 120_000);
    afterEach(() => {
      vi.restoreAllMocks();
    });
    afterAll(async () => {
      await kg?.stop();
      await mongo?.stop();
    });

    /** Every event from `since` on, page by page, one a page. */
    const readFrom = (ownerId: string, since: number): Promise<AuditEvent[]> => readAuditFrom(kg, ownerId, since, 1);

    it("happy: re-reading from the newest time seen minus the margin finds a record inserted late, once", async () => {
      const ownerId = "audit-tailing";
      await kg.admin.upsertAccount({ ownerId, plan: "business" });
      const ids: string[] = [];
      for (const name of ["k1", "k2", "k3"]) ids.push((await kg.admin.createKey({ ownerId, name })).key?.id ?? "");
      const seen = new Map<string, AuditEvent>();
      for (const e of await readFrom(ownerId, 0)) seen.set(e.id, e);
      const start = [...seen.keys()].at(-1) ?? "";

      // The first revoke's record is slow to land (a busy server, a driver retry after a failover).
      const store = kg.app.store;
      const append = store.appendAudit.bind(store);
      let release: () => void = () => undefined;
      const held = new Promise<void>((resolve) => (release = resolve));
      let holding = false;
      vi.spyOn(store, "appendAudit").mockImplementationOnce(async (record: AuditRecord) => {
        holding = true;
        await held;
        return append(record);
      });
      const first = kg.admin.revokeKey({ id: ids[0] ?? "", reason: "r1" });
      await until(() => holding, 10_000, "the first revoke's audit insert is in flight");
      // The later revokes are a millisecond on at least, so no `since` the exporter takes from
      // them holds the first one's time.
      kg.clock.advanceMs(1);
      await kg.admin.revokeKey({ id: ids[1] ?? "", reason: "r2" });
      await kg.admin.revokeKey({ id: ids[2] ?? "", reason: "r3" });

      // The exporter pages on from the last id it has, one event a page, and sees the two that landed.
      let pageToken = Buffer.from(`after:${start}`, "utf8").toString("base64url");
      let lastToken = pageToken;
      const paged: AuditEvent[] = [];
      while (pageToken !== "") {
        const page = await kg.admin.listAuditEvents({ ownerId, pageSize: 1, pageToken });
        paged.push(...page.events);
        lastToken = pageToken;
        pageToken = page.nextPageToken;
      }
      expect(paged.map((e) => [e.action, e.keyId])).toEqual([
        ["key.revoke", ids[1]],
        ["key.revoke", ids[2]],
      ]);
      for (const e of paged) seen.set(e.id, e);
      const newestMs = Math.max(...[...seen.values()].map((e) => timestampMs(e.time ?? timestampFromMs(0))));

      release();
      await first;
      // Going on from the last page token the API gave misses it (its id is older than the ids
      // seen), and so does `since` the newest time seen: that is what the margin is for.
      const goingOn = (await kg.admin.listAuditEvents({ ownerId, pageSize: 100, pageToken: lastToken })).events;
      expect(goingOn.filter((e) => !seen.has(e.id))).toEqual([]);
      expect((await readFrom(ownerId, newestMs)).filter((e) => !seen.has(e.id))).toEqual([]);
      const fresh = (await readFrom(ownerId, newestMs - SETTLE_MARGIN_MS)).filter((e) => !seen.has(e.id));
      expect(fresh.map((e) => [e.action, e.keyId, e.changes["reason"]])).toEqual([["key.revoke", ids[0], '"r1"']]);
    });
  });
}
