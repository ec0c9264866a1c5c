import { join } from "node:path";
import { DatabaseSync, StatementSync } from "node:sqlite";
import { timestampFromMs, timestampMs } from "@bufbuild/protobuf/wkt";
import { afterAll, beforeAll, describe, expect, it, vi } from "vitest";
import { startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

// ListAuditEvents{since} asked SQLite for `at >= @since ORDER BY id LIMIT n`. Nothing indexes `at`,
// so SQLite walked the trail in id order from its first record (or the owner's first) until it had
// n rows: a `since` near now, what the README's tailing recipe sends on every poll, read the whole
// trail on every call, on the thread that answers Checks (about 24 ms a call at 300,000 records).
// Ids are ULIDs of a time never earlier than the record's (EventIds), so `since` bounds the id from
// below (eventIdFloor) and the search starts there; `at` still decides what is returned.

describe("ListAuditEvents with since searches the trail from since, not from its start (SQLite)", () => {
  let kg: TestKeygate;
  const all = vi.spyOn(StatementSync.prototype, "all");
  beforeAll(async () => {
    kg = await startKeygate();
    for (const ownerId of ["search-a", "search-b"]) {
      await kg.admin.upsertAccount({ ownerId, plan: "business" });
      await kg.admin.createKey({ ownerId, name: "k" });
    }
  }, 60_000);
  afterAll(async () => {
    all.mockRestore();
    await kg.stop();
  });

  /** The query plan of the audit query `call` made, as SQLite explains it. */
  async function planOf(call: () => Promise<unknown>): Promise<string[]> {
    all.mockClear();
    await call();
    const queries = all.mock.contexts.flatMap((statement, i) =>
      statement instanceof StatementSync && statement.sourceSQL.includes("FROM audit") ? [{ sql: statement.sourceSQL, params: all.mock.calls[i] ?? [] }] : [],
    );
    const query = queries.at(-1);
    if (query === undefined) throw new Error("no audit query was made");
    const db = new DatabaseSync(join(kg.dataDir, "keygate.db"), { readOnly: true });
    try {
      return db
        .prepare(`EXPLAIN QUERY PLAN ${query.sql}`)
        .all(...query.params)
        .map((row) => String(row["detail"]));
    } finally {
      db.close();
    }
  }

  const since = () => timestampFromMs(kg.clock.now());

  it("no owner: a search of the id index from since", async () => {
    expect(await planOf(() => kg.admin.listAuditEvents({ since: since() }))).toEqual(["SEARCH audit USING INDEX sqlite_autoindex_audit_1 (id>?)"]);
  });

  it("one owner: a search of the owner's index from since", async () => {
    expect(await planOf(() => kg.admin.listAuditEvents({ ownerId: "search-a", since: since() }))).toEqual(["SEARCH audit USING INDEX audit_owner (owner_id=? AND id>?)"]);
  });

  it("happy: since still selects by time: the records before it are left out, the records at it kept", async () => {
    const trail = (await kg.admin.listAuditEvents({})).events;
    expect(trail).toHaveLength(4);
    const third = timestampMs(trail[2]?.time ?? timestampFromMs(0));
    const from = await kg.admin.listAuditEvents({ since: timestampFromMs(third) });
    expect(from.events.map((e) => e.id)).toEqual(trail.filter((e) => timestampMs(e.time ?? timestampFromMs(0)) >= third).map((e) => e.id));
  });
});
