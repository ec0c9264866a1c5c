import { DatabaseSync } from "node:sqlite";
import { describe, expect, it } from "vitest";
import { snapshotSchema } from "../../src/cache/redis.js";
import { AccountSchema, ApiKeySchema, AuditEventSchema, KeyDayUsageSchema } from "../../src/gen/keygate/v1/key_admin_pb.js";
import { ACCOUNT_FIELDS, ACCOUNT_STORE_ONLY, AUDIT_FIELDS, KEY_FIELDS, KEY_PROTO_ONLY, KEY_STORE_ONLY, TOPUP_FIELDS, USAGE_FIELDS, USAGE_STORE_ONLY } from "../../src/store/fields.js";
import { accountSchema, auditSchema, keySchema, topUpSchema, usageSchema } from "../../src/store/mongo.js";
import { text } from "../../src/store/sqlite-db.js";
import { migrateSqlite } from "../../src/store/sqlite-migrations.js";
import { newKeyRecord } from "../../src/store/store.js";

// One definition of each record (src/store/fields.ts), held against every place the record is
// spelled out: a field added to one and not the others fails here, naming where it is missing.

function sqliteColumns(table: string): string[] {
  const db = new DatabaseSync(":memory:");
  try {
    migrateSqlite(db);
    return db.prepare(`SELECT name FROM pragma_table_info('${table}')`).all().map((c) => text(c, "name"));
  } finally {
    db.close();
  }
}

/** Top-level paths of a mongoose schema (a sub-document's own paths are not counted). */
function mongoPaths(schema: { paths: Record<string, unknown> }): string[] {
  return [...new Set(Object.keys(schema.paths).map((path) => path.split(".")[0] ?? path))];
}

// Account fields the API derives (from the plan, the key count and the credit state) rather than stores.
const ACCOUNT_PROTO_ONLY = ["activeKeyCount", "maxActiveKeys", "activeTestKeyCount", "maxActiveTestKeys", "creditBalance", "monthlyCredits", "topupCredits", "dailyQuota", "rateLimit"];

const sorted = (names: Iterable<string>): string[] => [...names].sort();

describe("record fields happy", () => {
  it("the key record: SQLite columns, MongoDB fields, the Redis snapshot, the proto and newKeyRecord all hold exactly its fields", () => {
    const fields = Object.values(KEY_FIELDS);
    expect(sorted(sqliteColumns("keys"))).toEqual(sorted([...fields.map((f) => f.sqlite), ...KEY_STORE_ONLY.sqlite]));
    expect(sorted(mongoPaths(keySchema))).toEqual(sorted([...fields.map((f) => f.mongo), ...KEY_STORE_ONLY.mongo]));
    expect(sorted(Object.keys(snapshotSchema.shape.key.shape))).toEqual(sorted(Object.keys(KEY_FIELDS)));
    const proto = fields.flatMap((f) => (f.proto === null ? [] : [f.proto]));
    expect(sorted(ApiKeySchema.fields.map((f) => f.localName))).toEqual(sorted([...proto, ...KEY_PROTO_ONLY]));
    const made = newKeyRecord({ id: "key_x", hash: "h", ownerId: "o", name: "n", mode: "live", start: "kg_live_abcd", last4: "wxyz", createdAtMs: 1 });
    expect(sorted(Object.keys(made))).toEqual(sorted(Object.keys(KEY_FIELDS)));
  });

  it("the account record: SQLite columns, MongoDB fields, the Redis snapshot and the proto all hold its fields", () => {
    const fields = Object.values(ACCOUNT_FIELDS);
    expect(sorted(sqliteColumns("accounts"))).toEqual(sorted([...fields.map((f) => f.sqlite), ...ACCOUNT_STORE_ONLY.sqlite]));
    expect(sorted(mongoPaths(accountSchema))).toEqual(sorted([...fields.map((f) => f.mongo), ...ACCOUNT_STORE_ONLY.mongo]));
    expect(sorted(Object.keys(snapshotSchema.shape.account.shape))).toEqual(sorted(Object.keys(ACCOUNT_FIELDS)));
    expect(sorted(AccountSchema.fields.map((f) => f.localName))).toEqual(sorted([...fields.map((f) => f.proto), ...ACCOUNT_PROTO_ONLY]));
  });

  it("the usage counter: SQLite columns, MongoDB fields and the proto's per-key row hold its fields", () => {
    const fields = Object.values(USAGE_FIELDS);
    expect(sorted(sqliteColumns("usage"))).toEqual(sorted([...fields.map((f) => f.sqlite), ...USAGE_STORE_ONLY.sqlite]));
    expect(sorted(mongoPaths(usageSchema))).toEqual(sorted([...fields.map((f) => f.mongo), ...USAGE_STORE_ONLY.mongo]));
    // KeyDayUsage's `usage` holds the outcome, count and credits, folded into counts; `keyName` is the key's, looked up.
    expect(sorted(KeyDayUsageSchema.fields.map((f) => f.localName))).toEqual(sorted([...fields.flatMap((f) => (f.proto === null ? [] : [f.proto])), "usage", "keyName"]));
  });

  it("the keyed top-up: SQLite's credit_topups columns and the fields of MongoDB's credit_topups elements hold exactly its fields", () => {
    const { ownerId, ...own } = TOPUP_FIELDS;
    expect(sorted(sqliteColumns("credit_topups"))).toEqual(sorted(Object.values(TOPUP_FIELDS).map((f) => f.sqlite)));
    // In MongoDB the owner is the account document's own _id, which holds the array.
    expect(ownerId.mongo).toBe(ACCOUNT_FIELDS.ownerId.mongo);
    expect(sorted(mongoPaths(topUpSchema))).toEqual(sorted(Object.values(own).map((f) => f.mongo)));
  });

  it("the audit event: SQLite columns, MongoDB fields and the proto hold exactly its fields", () => {
    const fields = Object.values(AUDIT_FIELDS);
    expect(sorted(sqliteColumns("audit"))).toEqual(sorted(fields.map((f) => f.sqlite)));
    expect(sorted(mongoPaths(auditSchema))).toEqual(sorted(fields.map((f) => f.mongo)));
    expect(sorted(AuditEventSchema.fields.map((f) => f.localName))).toEqual(sorted(fields.map((f) => f.proto)));
  });
});
