import { Code } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { TEST_POLICY, adminRefusal, checkInit, checkOutcome, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { until } from "../harness/poll.js";
import { requireServer } from "../harness/ports.js";
import { redisAvailable, startRedis } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";

/** Polls every 20 ms: these waits are for Redis and delivery to come back, not measured delays. */
const POLL = { intervalMs: 20 } as const;

// CreateKey, RotateKey and AddCredits while Redis is stopped or frozen: the store change is the
// call's result, so a cache that cannot be told must not turn it into an error (the secret would
// be lost, no audit row written, and the caller's retry would hit the plan cap or add twice).
// The other changes answer UNAVAILABLE then, but only after the whole change is made: audited,
// and followed by the key still in grace from a rotation to the changed key.

/** What a change answers when it is saved but Redis could not be told. */
const UNTOLD = { code: Code.Unavailable, message: "the change is saved; other replicas could not be told yet, and keygate keeps telling them until Redis answers" };

const refusal = adminRefusal;

const ready = requireServer("redis-server", redisAvailable(), "apt-get install redis-server");

const POLICY = {
  ...TEST_POLICY,
  plans: {
    ...TEST_POLICY.plans,
    // One key at most: a second CreateKey for the same account proves how many the first made.
    single: { maxActiveKeys: 1, rateLimit: { limit: 1000, windowSeconds: 60 }, dailyQuota: null, monthlyCredits: null },
    metered: { maxActiveKeys: 5, rateLimit: { limit: 1000, windowSeconds: 60 }, dailyQuota: null, monthlyCredits: 10 },
  },
};

describe.runIf(ready)("KeyAdmin changes while Redis is stopped or frozen", () => {
  let redis: RedisServer;
  let kg: TestKeygate;

  beforeAll(async () => {
    const started = await startRedis();
    if (started === null) throw new Error("redis-server is not on PATH");
    redis = started;
    kg = await startKeygate({ policy: POLICY, env: { KEYGATE_REDIS_URL: redis.url } });
  });

  afterAll(async () => {
    await kg?.stop();
    await redis?.stop();
  });

  /**
   * UpsertAccount once Redis is reachable again: an account change must tell the caches, so
   * after a restart or a thaw it answers UNAVAILABLE until keygate's connection is back.
   */
  async function upsertAccount(ownerId: string, plan: string): Promise<void> {
    await until(
      () =>
        kg.admin.upsertAccount({ ownerId, plan }).then(
          () => true,
          (error: unknown) => {
            if (error instanceof Error && "code" in error && error.code === 14) return false;
            throw error;
          },
        ),
      15_000,
      "UpsertAccount with Redis reachable",
      POLL,
    );
  }

  const allowed = async (secret: string): Promise<boolean> => (await kg.check(checkInit({ "x-api-key": secret }))).httpResponse.case === "okResponse";

  async function auditActions(ownerId: string): Promise<string[]> {
    return (await kg.admin.listAuditEvents({ ownerId, pageSize: 100 })).events.map((e) => e.action);
  }

  async function expectOneWorkingKey(ownerId: string): Promise<void> {
    const created = await kg.admin.createKey({ ownerId, name: "during outage" });
    expect(created.secret).toMatch(/^kg_live_/);
    expect(await allowed(created.secret)).toBe(true);
    expect(await auditActions(ownerId)).toEqual(["account.upsert", "key.create"]);
    // Exactly one key was made, so the plan's one slot is taken once: a retry would be refused.
    expect((await kg.admin.getAccount({ ownerId })).account?.activeKeyCount).toBe(1);
    await expect(kg.admin.createKey({ ownerId, name: "second" })).rejects.toMatchObject({ code: 8 });
  }

  it("CreateKey with Redis stopped returns a working key and writes its audit row", async () => {
    await upsertAccount("outage-stopped", "single");
    await redis.stop();
    try {
      await expectOneWorkingKey("outage-stopped");
    } finally {
      await redis.start();
    }
  });

  it("CreateKey with Redis frozen returns a working key and writes its audit row", async () => {
    await upsertAccount("outage-frozen", "single");
    redis.freeze();
    try {
      await expectOneWorkingKey("outage-frozen");
    } finally {
      redis.thaw();
    }
  });

  it("RotateKey with Redis frozen returns the new secret, audits, refuses the old key here, and tells the others once Redis answers", async () => {
    await upsertAccount("outage-rotate", "business");
    const old = await kg.admin.createKey({ ownerId: "outage-rotate", name: "to rotate" });
    expect(await allowed(old.secret)).toBe(true);
    const logged = kg.logLines.length;
    redis.freeze();
    try {
      const rotated = await kg.admin.rotateKey({ id: old.key?.id ?? "", graceDays: 0 });
      expect(rotated.secret).toMatch(/^kg_live_/);
      expect(rotated.secret).not.toBe(old.secret);
      // The rotation on the old key, and the new key's own key.create.
      expect(await auditActions("outage-rotate")).toEqual(["account.upsert", "key.create", "key.rotate", "key.create"]);
      expect(await allowed(old.secret)).toBe(false);
      expect(await allowed(rotated.secret)).toBe(true);
    } finally {
      redis.thaw();
    }
    const delivered = (): boolean => kg.logLines.slice(logged).some((line) => line.includes("waiting invalidations reached the other replicas"));
    await until(delivered, 10_000, "the queued invalidation reaching Redis", POLL);
    expect(await allowed(old.secret)).toBe(false);
  });

  it("UpsertAccount with Redis stopped saves and audits the change, then answers UNAVAILABLE", async () => {
    const ownerId = "outage-upsert";
    await upsertAccount(ownerId, "single");
    await redis.stop();
    let answer: { code: Code; message: string };
    try {
      answer = await refusal(kg.admin.upsertAccount({ ownerId, plan: "business" }));
    } finally {
      await redis.start();
    }
    expect(answer).toEqual(UNTOLD);
    expect((await kg.admin.getAccount({ ownerId })).account?.plan).toBe("business");
    const events = (await kg.admin.listAuditEvents({ ownerId, pageSize: 100 })).events;
    expect(events.map((e) => [e.action, e.changes["plan"]])).toEqual([
      ["account.upsert", '"single"'],
      ["account.upsert", '"business"'],
    ]);
  });

  /** A rotation's new key changed with Redis stopped, and what the old key in grace must show for it. */
  const FOLLOWING: Array<{
    action: string;
    setUp?: (newId: string) => Promise<unknown>;
    change: (newId: string) => Promise<unknown>;
    audited: string;
    changes: Record<string, string>;
    check: { status: number; code: string | null };
  }> = [
    {
      action: "RevokeKey",
      change: (id) => kg.admin.revokeKey({ id, reason: "leaked" }),
      audited: "key.revoke",
      changes: { reason: '"its successor was revoked"' },
      check: { status: 401, code: "KEY_REVOKED" },
    },
    {
      action: "DisableKey",
      change: (id) => kg.admin.disableKey({ id, reason: "unpaid" }),
      audited: "key.disable",
      changes: { reason: '"unpaid"' },
      check: { status: 401, code: "KEY_DISABLED" },
    },
    {
      action: "EnableKey",
      setUp: (id) => kg.admin.disableKey({ id, reason: "unpaid" }),
      change: (id) => kg.admin.enableKey({ id }),
      audited: "key.enable",
      changes: {},
      check: { status: 200, code: null },
    },
    {
      action: "UpdateKey (scopes)",
      change: (id) => kg.admin.updateKey({ id, scopes: ["decks"] }),
      audited: "key.update",
      changes: { scopes: '["decks"]' },
      check: { status: 200, code: null },
    },
  ];

  for (const { action, setUp, change, audited, changes, check } of FOLLOWING) {
    it(`${action} on a rotation's new key with Redis stopped: the old key in grace follows it, both are audited, then UNAVAILABLE`, async () => {
      const ownerId = `outage-follow-${action.split(" ")[0]?.toLowerCase()}`;
      await upsertAccount(ownerId, "business");
      const old = await kg.admin.createKey({ ownerId, name: "old" });
      const oldId = old.key?.id ?? "";
      const rotated = await kg.admin.rotateKey({ id: oldId, graceDays: 7 });
      const newId = rotated.key?.id ?? "";
      await setUp?.(newId);
      const before = (await kg.admin.listAuditEvents({ ownerId, pageSize: 100 })).events.length;
      await redis.stop();
      let answer: { code: Code; message: string };
      try {
        answer = await refusal(change(newId));
      } finally {
        await redis.start();
      }
      expect(answer).toEqual(UNTOLD);
      expect(checkOutcome(await kg.check(checkInit({ "x-api-key": old.secret })))).toEqual(check);
      expect(checkOutcome(await kg.check(checkInit({ "x-api-key": rotated.secret })))).toEqual(check);
      if (action.startsWith("UpdateKey")) expect((await kg.admin.getKey({ id: oldId })).key?.scopes).toEqual(["decks"]);
      const events = (await kg.admin.listAuditEvents({ ownerId, pageSize: 100 })).events.slice(before);
      expect(events.map((e) => [e.action, e.keyId])).toEqual([
        [audited, newId],
        [audited, oldId],
      ]);
      expect(events[1]?.changes).toEqual({ ...changes, successor_id: JSON.stringify(newId) });
    });
  }

  it("AddCredits with Redis frozen succeeds once, and the live balance has the top-up once Redis answers", async () => {
    await upsertAccount("outage-credits", "metered");
    const key = await kg.admin.createKey({ ownerId: "outage-credits", name: "metered" });
    // A charged Check loads the balance into Redis: 10 - 1.
    expect(await allowed(key.secret)).toBe(true);
    expect((await kg.admin.getAccount({ ownerId: "outage-credits" })).account?.creditBalance).toBe(9n);
    redis.freeze();
    try {
      await kg.admin.addCredits({ ownerId: "outage-credits", amount: 100n, reason: "during a freeze" });
    } finally {
      redis.thaw();
    }
    await until(async () => (await kg.admin.getAccount({ ownerId: "outage-credits" })).account?.creditBalance === 109n, 10_000, "balance 109", POLL);
    expect(await auditActions("outage-credits")).toEqual(["account.upsert", "key.create", "credits.add"]);
  });
});
