import { createHash } from "node:crypto";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ADMIN_TOKEN, TEST_POLICY, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

let kg: TestKeygate;
beforeAll(async () => {
  kg = await startKeygate({ policy: { ...TEST_POLICY, plans: { ...TEST_POLICY.plans, basic: { ...TEST_POLICY.plans.basic, monthlyCredits: 10 } } } });
});
afterAll(async () => {
  await kg.stop();
});

const tokenId = `tok_${createHash("sha256").update(ADMIN_TOKEN).digest().subarray(0, 4).toString("hex")}`;

describe("audit trail", () => {
  it("records every KeyAdmin change with actor, action, key, owner, changed fields and source, and no secret", async () => {
    const ownerId = "audit-owner";
    await kg.admin.upsertAccount({ ownerId, plan: "business" });
    const created = await kg.admin.createKey({ ownerId, name: "first", scopes: ["tutor"], rateLimit: { limit: 5, windowSeconds: 60 } });
    const id = created.key?.id ?? "";
    await kg.admin.updateKey({ id, name: "renamed", scopes: ["tutor", "decks"] });
    const rotated = await kg.admin.rotateKey({ id, graceDays: 2 });
    await kg.admin.revokeKey({ id: rotated.key?.id ?? "", reason: "leaked" });
    await kg.admin.addCredits({ ownerId, amount: 5n, reason: "order 7" });
    // Reads are not audited.
    await kg.admin.getKey({ id });
    await kg.admin.listKeys({ ownerId });

    const { events, nextPageToken } = await kg.admin.listAuditEvents({ ownerId });
    expect(nextPageToken).toBe("");
    expect(events.map((e) => [e.action, e.keyId])).toEqual([
      ["account.upsert", ""],
      ["key.create", id],
      ["key.update", id],
      ["key.rotate", id],
      ["key.revoke", rotated.key?.id],
      ["credits.add", ""],
    ]);
    for (const event of events) {
      expect(event.actor).toBe(tokenId);
      expect(event.ownerId).toBe(ownerId);
      expect(event.source).toMatch(/^(::ffff:)?127\.0\.0\.1$/);
      expect(event.id).toMatch(/^evt_[0-9A-HJKMNP-TV-Z]{26}$/);
    }
    expect(events[0]?.changes).toEqual({ plan: '"business"' });
    expect(events[1]?.changes).toEqual({
      name: '"first"',
      scopes: '["tutor"]',
      mode: '"live"',
      project_id: "null",
      expires_at: "null",
      rate_limit: '{"limit":5,"windowSeconds":60}',
      metadata: "{}",
    });
    expect(events[2]?.changes).toEqual({ name: '"renamed"', scopes: '["tutor","decks"]' });
    expect(events[3]?.changes["rotated_to_id"]).toBe(JSON.stringify(rotated.key?.id));
    expect(events[3]?.changes["grace_days"]).toBe("2");
    expect(events[4]?.changes).toEqual({ reason: '"leaked"' });
    expect(events[5]?.changes).toEqual({ amount: "5", reason: '"order 7"' });
    const everything = JSON.stringify(events, (_k, v: unknown) => (typeof v === "bigint" ? v.toString() : v));
    expect(everything).not.toContain(created.secret);
    expect(everything).not.toContain(rotated.secret);
    expect(everything).not.toContain(ADMIN_TOKEN);
  });

  it("filters by key and time, and pages", async () => {
    const ownerId = "audit-pages";
    const created = await kg.admin.createKey({ ownerId, name: "k" });
    const id = created.key?.id ?? "";
    for (let i = 0; i < 4; i++) await kg.admin.updateKey({ id, name: `n${i}` });
    const byKey = await kg.admin.listAuditEvents({ keyId: id });
    expect(byKey.events.map((e) => e.action)).toEqual(["key.create", "key.update", "key.update", "key.update", "key.update"]);
    const first = await kg.admin.listAuditEvents({ keyId: id, pageSize: 2 });
    const second = await kg.admin.listAuditEvents({ keyId: id, pageSize: 2, pageToken: first.nextPageToken });
    const third = await kg.admin.listAuditEvents({ keyId: id, pageSize: 2, pageToken: second.nextPageToken });
    expect([...first.events, ...second.events, ...third.events].map((e) => e.id)).toEqual(byKey.events.map((e) => e.id));
    expect(third.nextPageToken).toBe("");
    const future = await kg.admin.listAuditEvents({ keyId: id, since: timestampFromMs(Date.now() + 60_000) });
    expect(future.events).toEqual([]);
    await expect(kg.admin.listAuditEvents({ keyId: "nope" })).rejects.toThrow(/key_id: must be a key id/);
    await expect(kg.admin.listAuditEvents({ pageToken: "garbage" })).rejects.toThrow(/page_token/);
  });

  it("a refused change is not audited", async () => {
    const before = (await kg.admin.listAuditEvents({ ownerId: "audit-refused" })).events.length;
    await expect(kg.admin.createKey({ ownerId: "audit-refused", name: "" })).rejects.toThrow(/name/);
    expect((await kg.admin.listAuditEvents({ ownerId: "audit-refused" })).events.length).toBe(before);
  });
});
