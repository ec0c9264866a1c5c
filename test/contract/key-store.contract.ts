import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ulid } from "ulid";
import { newEventId, newKeyId } from "../../src/keys/ids.js";
import { pepperCheck } from "../../src/keys/pepper-check.js";
import { CapExceededError, ConflictError, DuplicateError, IdempotencyKeyReusedError, TopUpKeysExhaustedError } from "../../src/store/errors.js";
import { CHAIN_GRACE_ENDED, MAX_KEYED_TOPUPS, TOPUP_KEY_RETENTION_MS } from "../../src/store/store.js";
import type { CreateLimits, KeyRecord, KeyStore } from "../../src/store/store.js";
import { testKeyRecord } from "../harness/records.js";

const CAPS: Record<string, number> = { basic: 1, pro: 3, business: 5 };
const NOW = 1_800_000_000_000;
const DAY = 86_400_000;

function limits(nowMs = NOW): CreateLimits {
  return {
    maxActiveKeysFor: (plan) => CAPS[plan] ?? 0,
    accountDefaults: { plan: "basic", subscriptionStatus: "active", role: "standard" },
    nowMs,
  };
}

function record(ownerId: string, overrides: Partial<KeyRecord> = {}): KeyRecord {
  return testKeyRecord(ownerId, NOW, overrides);
}

/** The error `attempt` rejects with, or "fulfilled" when it does not reject. */
async function refusal(attempt: Promise<unknown>): Promise<unknown> {
  return attempt.then(
    () => "fulfilled",
    (error: unknown) => error,
  );
}

/** Checks that `attempt` was refused by the one-key cap of the default "basic" plan. */
async function expectBasicCapRefusal(attempt: Promise<unknown>): Promise<void> {
  const error = await refusal(attempt);
  expect(error).toBeInstanceOf(CapExceededError);
  expect(error).toMatchObject({ plan: "basic", maxActiveKeys: 1, message: 'plan "basic" allows at most 1 active key' });
}

/** Checks that `attempt` was refused because the key's hash (or id) is taken. */
async function expectDuplicateRefusal(attempt: Promise<unknown>): Promise<void> {
  const error = await refusal(attempt);
  expect(error).toBeInstanceOf(DuplicateError);
  expect(error).toMatchObject({ message: "a key with this id or hash already exists" });
}

/** A store the contract runs on, and how to close it. */
export interface OpenedStore {
  store: KeyStore;
  close(): Promise<void>;
}

/** What a contract run opens: its store, and how to open others. */
export interface ContractStores extends OpenedStore {
  /** Another store on the same database, as another process or replica would open it. */
  twin(): Promise<OpenedStore>;
  /** A new, empty database of its own: each call of the function returned opens another store on it. */
  empty(): () => Promise<OpenedStore>;
}

/** The KeyStore contract: every implementation must pass these same cases. */
export function runKeyStoreContract(name: string, open: () => Promise<ContractStores | null>): void {
  describe(`KeyStore contract: ${name}`, () => {
    let store: KeyStore;
    let close: (() => Promise<void>) | undefined;
    let twin: () => Promise<OpenedStore> = () => Promise.reject(new Error("the store did not open"));
    let empty: () => () => Promise<OpenedStore> = () => () => Promise.reject(new Error("the store did not open"));
    let owner = 0;
    const nextOwner = (): string => `${name}-owner-${++owner}-${Date.now()}`;

    beforeAll(async () => {
      const opened = await open();
      if (opened === null) throw new Error(`${name}: store could not be opened`);
      store = opened.store;
      close = opened.close;
      twin = opened.twin;
      empty = opened.empty;
    });
    afterAll(async () => {
      await close?.();
    });

    it("creates the account on first key and reads the snapshot back by hash", async () => {
      const ownerId = nextOwner();
      const key = record(ownerId, { projectId: "p1", expiresAtMs: NOW + DAY });
      await store.createKey(key, limits());
      const snapshot = await store.findSnapshotByHash(key.hash);
      expect(snapshot?.key).toEqual(key);
      expect(snapshot?.account).toMatchObject({ ownerId, plan: "basic", subscriptionStatus: "active", role: "standard" });
      expect(await store.getKey(key.id)).toEqual(key);
      expect(await store.findSnapshotByHash("no-such-hash")).toBeNull();
      expect(await store.getKey(newKeyId())).toBeNull();
    });

    it("reads the snapshot by hash as the by-id reads give the key and its account, in every key state", async () => {
      const ownerId = nextOwner();
      await store.upsertAccount({ ownerId, plan: "business", subscriptionStatus: "past_due", role: "premium" }, limits().accountDefaults, NOW);
      const old = record(ownerId, { scopes: [], metadata: {} });
      await store.createKey(old, limits());
      await store.updateKey(old.id, { rateLimit: { limit: 7, windowSeconds: 30 } });
      await store.touchLastUsed(new Map([[old.id, NOW + 11]]));
      const next = record(ownerId, { projectId: "p2", expiresAtMs: NOW + DAY });
      await store.rotateKey(old.id, next, NOW + DAY, NOW);
      const revoked = record(ownerId);
      await store.createKey(revoked, limits());
      await store.revokeKey(revoked.id, NOW + 5, "leaked");
      const account = await store.getAccount(ownerId);
      expect(account).toMatchObject({ plan: "business", subscriptionStatus: "past_due", role: "premium" });
      for (const key of [old, next, revoked]) {
        expect(await store.findSnapshotByHash(key.hash)).toEqual({ key: await store.getKey(key.id), account });
      }
      expect((await store.findSnapshotByHash(old.hash))?.key).toMatchObject({ rotatedToId: next.id, rateLimit: { limit: 7, windowSeconds: 30 }, lastUsedAtMs: NOW + 11 });
    });

    it("createKey answers the account it created for an unknown owner, and null once the account exists", async () => {
      const ownerId = nextOwner();
      const first = record(ownerId);
      expect(await store.createKey(first, limits())).toEqual({
        key: first,
        createdAccount: { ownerId, plan: "basic", subscriptionStatus: "active", role: "standard", createdAtMs: NOW, updatedAtMs: NOW },
      });
      await store.upsertAccount({ ownerId, plan: "pro" }, limits().accountDefaults, NOW);
      const second = record(ownerId);
      expect(await store.createKey(second, limits())).toEqual({ key: second, createdAccount: null });
    });

    it("upserts accounts partially", async () => {
      const ownerId = nextOwner();
      const defaults = limits().accountDefaults;
      const created = await store.upsertAccount({ ownerId, plan: "pro" }, defaults, NOW);
      expect(created).toEqual({ account: { ownerId, plan: "pro", subscriptionStatus: "active", role: "standard", createdAtMs: NOW, updatedAtMs: NOW }, before: null });
      const updated = await store.upsertAccount({ ownerId, role: "admin" }, defaults, NOW + 5);
      expect(updated).toEqual({ account: { ...created.account, role: "admin", updatedAtMs: NOW + 5 }, before: created.account });
      expect(await store.getAccount(ownerId)).toEqual(updated.account);
      expect(await store.getAccount(nextOwner())).toBeNull();
    });

    it("upserts answer the account as each write found it: of the same change made twice at once, one finds it made", async () => {
      const ownerId = nextOwner();
      const defaults = limits().accountDefaults;
      await store.upsertAccount({ ownerId, plan: "basic" }, defaults, NOW);
      const { store: other, close: closeOther } = await twin();
      try {
        const both = await Promise.all([store.upsertAccount({ ownerId, plan: "pro" }, defaults, NOW + 1), other.upsertAccount({ ownerId, plan: "pro" }, defaults, NOW + 1)]);
        expect(both.map((answer) => answer.before?.plan).sort()).toEqual(["basic", "pro"]);
        expect(both.map((answer) => answer.account.plan)).toEqual(["pro", "pro"]);
      } finally {
        await closeOther();
      }
    });

    it("enables a disabled key once: of two enables at once, one made the change", async () => {
      const ownerId = nextOwner();
      const key = record(ownerId);
      await store.createKey(key, limits());
      await store.redisableKey(key.id, NOW + 1);
      const { store: other, close: closeOther } = await twin();
      try {
        const both = await Promise.all([store.enableKey(key.id, []), other.enableKey(key.id, [])]);
        expect(both.map((answer) => answer?.changed).sort()).toEqual([false, true]);
        expect(both.map((answer) => answer?.key.disabledAtMs)).toEqual([null, null]);
        expect((await store.enableKey(key.id, []))?.changed).toBe(false);
      } finally {
        await closeOther();
      }
    });

    it("refuses a duplicate hash", async () => {
      const ownerId = nextOwner();
      await store.upsertAccount({ ownerId, plan: "business" }, limits().accountDefaults, NOW);
      const key = record(ownerId);
      await store.createKey(key, limits());
      await expect(store.createKey(record(ownerId, { hash: key.hash }), limits())).rejects.toBeInstanceOf(DuplicateError);
      expect(await store.countActiveKeys(ownerId, NOW)).toBe(1);
    });

    it("lists with paging, project filter and revoked filter", async () => {
      const ownerId = nextOwner();
      await store.upsertAccount({ ownerId, plan: "business" }, limits().accountDefaults, NOW);
      const keys: KeyRecord[] = [];
      for (let i = 0; i < 5; i++) {
        const key = record(ownerId, { projectId: i < 2 ? "p1" : null });
        keys.push(key);
        await store.createKey(key, limits());
      }
      const ids = keys.map((k) => k.id).sort();
      const page1 = await store.listKeys({ ownerId, includeRevoked: false, limit: 2, nowMs: NOW });
      expect(page1.map((k) => k.id)).toEqual(ids.slice(0, 2));
      const page2 = await store.listKeys({ ownerId, includeRevoked: false, limit: 2, afterId: page1[1]?.id, nowMs: NOW });
      expect(page2.map((k) => k.id)).toEqual(ids.slice(2, 4));
      expect(await store.listKeys({ ownerId, projectId: "p1", includeRevoked: false, limit: 10, nowMs: NOW })).toHaveLength(2);
      await store.revokeKey(ids[0] ?? "", NOW, "test");
      expect(await store.listKeys({ ownerId, includeRevoked: false, limit: 10, nowMs: NOW })).toHaveLength(4);
      expect(await store.listKeys({ ownerId, includeRevoked: true, limit: 10, nowMs: NOW })).toHaveLength(5);
    });

    it("renames and rescopes", async () => {
      const ownerId = nextOwner();
      const key = record(ownerId);
      await store.createKey(key, limits());
      expect((await store.updateKey(key.id, { name: "renamed" }))?.name).toBe("renamed");
      const rescoped = await store.updateKey(key.id, { scopes: ["read", "write"] });
      expect(rescoped).toMatchObject({ name: "renamed", scopes: ["read", "write"] });
      expect((await store.findSnapshotByHash(key.hash))?.key.scopes).toEqual(["read", "write"]);
      expect(await store.updateKey(newKeyId(), { name: "x" })).toBeNull();
    });

    it("updates under a guard only a key still unrevoked (and unrotated when asked), in the same write", async () => {
      const ownerId = nextOwner();
      const revoked = record(ownerId, { scopes: ["read"] });
      await store.createKey(revoked, limits());
      await store.revokeKey(revoked.id, NOW + 1, "leaked");
      const refused = await store.updateKey(revoked.id, { name: "renamed", scopes: ["read", "write"] }, { unrevoked: true });
      expect({ name: refused?.name, scopes: refused?.scopes, revoked: refused?.revokedAtMs }).toEqual({ name: revoked.name, scopes: ["read"], revoked: NOW + 1 });
      const old = record(ownerId, { scopes: ["read"] });
      await store.createKey(old, limits());
      const next = record(ownerId, { scopes: ["read"] });
      await store.rotateKey(old.id, next, NOW + DAY, NOW);
      const unrotated = await store.updateKey(old.id, { scopes: ["read", "write"] }, { unrevoked: true, unrotated: true });
      expect({ scopes: unrotated?.scopes, rotatedTo: unrotated?.rotatedToId }).toEqual({ scopes: ["read"], rotatedTo: next.id });
      // A rename asks only for an unrevoked key: a key in grace takes it.
      expect((await store.updateKey(old.id, { name: "old one" }, { unrevoked: true }))?.name).toBe("old one");
      expect(await store.updateKey(newKeyId(), { name: "x" }, { unrevoked: true })).toBeNull();
    });

    it("revokes idempotently and gives the slot back once", async () => {
      const ownerId = nextOwner();
      const key = record(ownerId);
      await store.createKey(key, limits());
      await expect(store.createKey(record(ownerId), limits())).rejects.toBeInstanceOf(CapExceededError);
      const first = await store.revokeKey(key.id, NOW + 1, "leaked");
      const second = await store.revokeKey(key.id, NOW + 2, "again");
      expect(first).toMatchObject({ revokedAtMs: NOW + 1, revokeReason: "leaked" });
      expect(second).toMatchObject({ revokedAtMs: NOW + 1, revokeReason: "leaked" });
      expect(await store.countActiveKeys(ownerId, NOW)).toBe(0);
      await store.createKey(record(ownerId), limits());
      await expect(store.createKey(record(ownerId), limits())).rejects.toBeInstanceOf(CapExceededError);
    });

    it("rotates with grace: the slot passes to the new key, and a rotated key cannot rotate again", async () => {
      const ownerId = nextOwner();
      const key = record(ownerId);
      await store.createKey(key, limits());
      const next = record(ownerId);
      const rotation = await store.rotateKey(key.id, next, NOW + 7 * DAY, NOW);
      expect(rotation.previous).toMatchObject({ rotatedToId: next.id, graceEndsAtMs: NOW + 7 * DAY, revokedAtMs: null });
      expect(rotation.next).toEqual(next);
      expect(await store.countActiveKeys(ownerId, NOW)).toBe(1);
      await expect(store.rotateKey(key.id, record(ownerId), NOW + DAY, NOW)).rejects.toBeInstanceOf(ConflictError);
      const immediate = await store.rotateKey(next.id, record(ownerId), NOW, NOW);
      expect(immediate.previous).toMatchObject({ revokedAtMs: NOW, revokeReason: "rotated" });
      expect(await store.countActiveKeys(ownerId, NOW)).toBe(1);
    });

    it("test-mode keys hold slots of their own: neither cap counts the other's keys, and a revoke gives back the right one", async () => {
      const ownerId = nextOwner();
      const live = record(ownerId);
      await store.createKey(live, limits());
      const tests = [record(ownerId, { mode: "test" })];
      await store.createKey(tests[0] as KeyRecord, limits());
      const error = await refusal(store.createKey(record(ownerId, { mode: "test" }), limits()));
      expect(error).toMatchObject({ plan: "basic", maxActiveKeys: 1, mode: "test", message: 'plan "basic" allows at most 1 active test-mode key' });
      await expectBasicCapRefusal(store.createKey(record(ownerId), limits()));
      expect([await store.countActiveKeys(ownerId, NOW), await store.countActiveKeys(ownerId, NOW, "live"), await store.countActiveKeys(ownerId, NOW, "test")]).toEqual([1, 1, 1]);
      // The test key's revoke frees a test slot, not a live one.
      await store.revokeKey((tests[0] as KeyRecord).id, NOW, null);
      await expectBasicCapRefusal(store.createKey(record(ownerId), limits()));
      await store.createKey(record(ownerId, { mode: "test" }), limits());
      expect(await store.countActiveKeys(ownerId, NOW, "test")).toBe(1);
      // And the live key's revoke frees a live slot.
      await store.revokeKey(live.id, NOW, null);
      await store.createKey(record(ownerId), limits());
      await expect(store.createKey(record(ownerId, { mode: "test" }), limits())).rejects.toBeInstanceOf(CapExceededError);
    });

    it("expired keys do not count against the cap", async () => {
      const ownerId = nextOwner();
      await store.createKey(record(ownerId, { expiresAtMs: NOW + 10 }), limits());
      await expect(store.createKey(record(ownerId), limits(NOW + 5))).rejects.toBeInstanceOf(CapExceededError);
      await store.createKey(record(ownerId), limits(NOW + 10));
      expect(await store.countActiveKeys(ownerId, NOW + 10)).toBe(1);
    });

    it("holds the cap under 50 concurrent creates", async () => {
      const ownerId = nextOwner();
      await store.upsertAccount({ ownerId, plan: "pro" }, limits().accountDefaults, NOW);
      const results = await Promise.allSettled(Array.from({ length: 50 }, () => store.createKey(record(ownerId), limits())));
      expect(results.filter((r) => r.status === "fulfilled")).toHaveLength(3);
      const refused = results.filter((r): r is PromiseRejectedResult => r.status === "rejected");
      expect(refused).toHaveLength(47);
      expect(refused.every((r) => r.reason instanceof CapExceededError)).toBe(true);
      expect(await store.countActiveKeys(ownerId, NOW)).toBe(3);
      expect(await store.listKeys({ ownerId, includeRevoked: true, limit: 100, nowMs: NOW })).toHaveLength(3);
    });

    // Cap 1 makes every leaked or double-released slot visible as a wrong create outcome. MongoDB
    // enforces the cap on a per-account counter, which countActiveKeys (a document count) does not
    // read, so these cases probe the counter through createKey itself.
    describe("active-key cap of a one-key plan", () => {
      it("a create refused for a duplicate hash gives its slot back", async () => {
        const taken = record(nextOwner());
        await store.createKey(taken, limits());
        const ownerId = nextOwner();
        await expectDuplicateRefusal(store.createKey(record(ownerId, { hash: taken.hash }), limits()));
        await expect(store.createKey(record(ownerId), limits())).resolves.toMatchObject({ key: { ownerId } });
        await expectBasicCapRefusal(store.createKey(record(ownerId), limits()));
      });

      it("a rotation refused for a duplicate hash leaves the old key holding its slot", async () => {
        const taken = record(nextOwner());
        await store.createKey(taken, limits());
        const ownerId = nextOwner();
        const key = record(ownerId);
        await store.createKey(key, limits());
        await expectDuplicateRefusal(store.rotateKey(key.id, record(ownerId, { hash: taken.hash }), NOW + DAY, NOW));
        expect(await store.getKey(key.id)).toEqual(key);
        await expectBasicCapRefusal(store.createKey(record(ownerId), limits(NOW + 1)));
        // The restored key must still give its slot back when revoked.
        await store.revokeKey(key.id, NOW + 2, "test");
        await store.createKey(record(ownerId), limits(NOW + 3));
        await expectBasicCapRefusal(store.createKey(record(ownerId), limits(NOW + 4)));
      });

      it("after a rotation with grace the new key holds the only slot; the old key in grace holds none", async () => {
        const ownerId = nextOwner();
        const key = record(ownerId);
        await store.createKey(key, limits());
        const next = record(ownerId);
        await store.rotateKey(key.id, next, NOW + 7 * DAY, NOW);
        await expectBasicCapRefusal(store.createKey(record(ownerId), limits(NOW + 1)));
        // Once the new key is gone a create fits, which it would not if the key in grace still counted.
        await store.revokeKey(next.id, NOW + 2, "test");
        const listed = await store.listKeys({ ownerId, includeRevoked: false, limit: 10, nowMs: NOW + 3 });
        expect(listed.map((k) => k.id)).toEqual([key.id]);
        await store.createKey(record(ownerId), limits(NOW + 3));
        await expectBasicCapRefusal(store.createKey(record(ownerId), limits(NOW + 4)));
      });

      it("revoking the old key while it is in grace frees no slot", async () => {
        const ownerId = nextOwner();
        const key = record(ownerId);
        await store.createKey(key, limits());
        await store.rotateKey(key.id, record(ownerId), NOW + 7 * DAY, NOW);
        const revoked = await store.revokeKey(key.id, NOW + 1, "leaked");
        expect(revoked).toMatchObject({ revokedAtMs: NOW + 1, revokeReason: "leaked" });
        await expectBasicCapRefusal(store.createKey(record(ownerId), limits(NOW + 2)));
        expect(await store.countActiveKeys(ownerId, NOW + 2)).toBe(1);
      });

      it("revoking the active key frees exactly one slot, however often it is revoked", async () => {
        const ownerId = nextOwner();
        const key = record(ownerId);
        await store.createKey(key, limits());
        await store.revokeKey(key.id, NOW + 1, "leaked");
        await store.revokeKey(key.id, NOW + 2, "again");
        await store.createKey(record(ownerId), limits(NOW + 3));
        await expectBasicCapRefusal(store.createKey(record(ownerId), limits(NOW + 4)));
      });

      it("the end of a rotation's grace frees no slot: the slot passed to the new key at rotation", async () => {
        const ownerId = nextOwner();
        const key = record(ownerId);
        await store.createKey(key, limits());
        const next = record(ownerId);
        await store.rotateKey(key.id, next, NOW + 10, NOW);
        const afterGrace = NOW + 11;
        expect(await store.listKeys({ ownerId, includeRevoked: false, limit: 10, nowMs: afterGrace })).toEqual([next]);
        await expectBasicCapRefusal(store.createKey(record(ownerId), limits(afterGrace)));
        await expectBasicCapRefusal(store.createKey(record(ownerId), limits(afterGrace + 1)));
        await store.revokeKey(next.id, afterGrace + 2, "test");
        await store.createKey(record(ownerId), limits(afterGrace + 3));
        await expectBasicCapRefusal(store.createKey(record(ownerId), limits(afterGrace + 4)));
      });

      it("an expired key gives its slot back exactly once, also when it is revoked afterwards", async () => {
        const ownerId = nextOwner();
        const expiring = record(ownerId, { expiresAtMs: NOW + 10 });
        await store.createKey(expiring, limits());
        await store.createKey(record(ownerId), limits(NOW + 10));
        await expectBasicCapRefusal(store.createKey(record(ownerId), limits(NOW + 11)));
        await store.revokeKey(expiring.id, NOW + 12, "cleanup");
        await expectBasicCapRefusal(store.createKey(record(ownerId), limits(NOW + 13)));
      });
    });

    it("adds usage counters from several flushes and lists them by day range", async () => {
      const ownerId = nextOwner();
      await store.upsertAccount({ ownerId }, limits().accountDefaults, NOW);
      const row = { ownerId, keyId: "key_A", day: "2026-11-22", outcome: "ALLOWED", count: 3, credits: 6 };
      await store.applyUsage([row, { ...row, outcome: "RATE_LIMITED", count: 2, credits: 0 }], []);
      await store.applyUsage([{ ...row, count: 1, credits: 2 }, { ...row, day: "2026-11-23", keyId: "key_B" }, { ...row, day: "2026-12-01" }], []);
      const rows = await store.listUsage(ownerId, "2026-11-22", "2026-11-30");
      expect(rows).toEqual([
        { keyId: "key_A", day: "2026-11-22", outcome: "ALLOWED", count: 4, credits: 8 },
        { keyId: "key_A", day: "2026-11-22", outcome: "RATE_LIMITED", count: 2, credits: 0 },
        { keyId: "key_B", day: "2026-11-23", outcome: "ALLOWED", count: 3, credits: 6 },
      ]);
      expect(await store.listUsage(nextOwner(), "2026-11-22", "2026-11-30")).toEqual([]);
    });

    it("keeps credits: top-ups add, spending follows the period rule", async () => {
      const ownerId = nextOwner();
      await store.upsertAccount({ ownerId }, limits().accountDefaults, NOW);
      expect(await store.getCredits(ownerId)).toEqual({ period: "", monthlyUsed: 0, topupBalance: 0, topupTotal: 0 });
      await store.addCredits(ownerId, 10);
      expect(await store.addCredits(ownerId, 5)).toEqual({ period: "", monthlyUsed: 0, topupBalance: 15, topupTotal: 15 });
      await store.applyUsage([], [{ ownerId, period: "2026-11", monthlyUsed: 4, topupUsed: 1 }]);
      await store.applyUsage([], [{ ownerId, period: "2026-11", monthlyUsed: 2, topupUsed: 0 }]);
      // Spending lowers the balance; the total counts only what was ever added.
      expect(await store.getCredits(ownerId)).toEqual({ period: "2026-11", monthlyUsed: 6, topupBalance: 14, topupTotal: 15 });
      // A later month starts over; a late flush for an older month only spends top-up.
      await store.applyUsage([], [{ ownerId, period: "2026-12", monthlyUsed: 1, topupUsed: 0 }]);
      await store.applyUsage([], [{ ownerId, period: "2026-11", monthlyUsed: 3, topupUsed: 2 }]);
      expect(await store.getCredits(ownerId)).toEqual({ period: "2026-12", monthlyUsed: 1, topupBalance: 12, topupTotal: 15 });
    });

    it("moves the top-up balance and total together under concurrent top-ups and flushes", async () => {
      const ownerId = nextOwner();
      await store.upsertAccount({ ownerId }, limits().accountDefaults, NOW);
      const answers = await Promise.all([
        ...Array.from({ length: 20 }, (_, i) => store.addCredits(ownerId, i + 1)),
        ...Array.from({ length: 10 }, () => store.applyUsage([], [{ ownerId, period: "2026-11", monthlyUsed: 0, topupUsed: 2 }])),
      ]);
      // Each top-up's answer includes at least its own increment (a later one's too, at most all).
      answers.slice(0, 20).forEach((answer, i) => {
        expect(answer?.topupTotal).toBeGreaterThanOrEqual(i + 1);
        expect(answer?.topupTotal).toBeLessThanOrEqual(210);
      });
      expect(await store.getCredits(ownerId)).toEqual({ period: "2026-11", monthlyUsed: 0, topupBalance: 210 - 20, topupTotal: 210 });
    });

    it("loses no spend when two replicas flush a new month's first credits at once", async () => {
      // Both flushes find the stored period older than theirs; only one may start the month, and
      // the other's spend must still be added to it.
      const owners = Array.from({ length: 20 }, () => nextOwner());
      for (const ownerId of owners) await store.upsertAccount({ ownerId }, limits().accountDefaults, NOW);
      await Promise.all(
        owners.flatMap((ownerId) => [
          store.applyUsage([], [{ ownerId, period: "2026-11", monthlyUsed: 3, topupUsed: 0 }]),
          store.applyUsage([], [{ ownerId, period: "2026-11", monthlyUsed: 4, topupUsed: 1 }]),
        ]),
      );
      for (const ownerId of owners) {
        expect(await store.getCredits(ownerId)).toEqual({ period: "2026-11", monthlyUsed: 7, topupBalance: -1, topupTotal: 0 });
      }
    });

    describe("keyed top-ups (addCreditsOnce)", () => {
      const topUp = (ownerId: string, idempotencyKey: string, amount: number, topupTotal: number, atMs = NOW) => ({ ownerId, idempotencyKey, amount, topupTotal, atMs });
      const credits = (topup: number) => ({ period: "", monthlyUsed: 0, topupBalance: topup, topupTotal: topup });
      const newAccount = async (): Promise<string> => {
        const ownerId = nextOwner();
        await store.upsertAccount({ ownerId }, limits().accountDefaults, NOW);
        return ownerId;
      };

      it("happy: adds once per key and owner; a repeat adds nothing and gets the first top-up back, whatever was added since", async () => {
        const ownerId = await newAccount();
        expect(await store.addCreditsOnce(ownerId, 100, "order-1", NOW)).toEqual({ topUp: topUp(ownerId, "order-1", 100, 100), replayed: false, credits: credits(100) });
        await store.addCredits(ownerId, 5);
        await store.applyUsage([], [{ ownerId, period: "2026-11", monthlyUsed: 0, topupUsed: 1 }]);
        expect(await store.addCreditsOnce(ownerId, 100, "order-1", NOW + 60_000)).toEqual({
          topUp: topUp(ownerId, "order-1", 100, 100),
          replayed: true,
          credits: { period: "2026-11", monthlyUsed: 0, topupBalance: 104, topupTotal: 105 },
        });
        expect(await store.addCreditsOnce(ownerId, 7, "order 2 (card)", NOW + 1)).toEqual({
          topUp: topUp(ownerId, "order 2 (card)", 7, 112, NOW + 1),
          replayed: false,
          credits: { period: "2026-11", monthlyUsed: 0, topupBalance: 111, topupTotal: 112 },
        });
        // The key is the owner's own: another owner's same key is another top-up.
        const other = await newAccount();
        expect(await store.addCreditsOnce(other, 100, "order-1", NOW)).toMatchObject({ replayed: false, credits: credits(100) });
        expect(await store.getCredits(ownerId)).toEqual({ period: "2026-11", monthlyUsed: 0, topupBalance: 111, topupTotal: 112 });
      });

      it("happy: a key is kept for 24 hours: a repeat a millisecond before adds nothing, one at 24 hours adds again", async () => {
        const ownerId = await newAccount();
        await store.addCreditsOnce(ownerId, 10, "order-24h", NOW);
        expect(await store.addCreditsOnce(ownerId, 10, "order-24h", NOW + TOPUP_KEY_RETENTION_MS - 1)).toMatchObject({ replayed: true, credits: credits(10) });
        expect(await store.addCreditsOnce(ownerId, 10, "order-24h", NOW + TOPUP_KEY_RETENTION_MS)).toEqual({
          topUp: topUp(ownerId, "order-24h", 10, 20, NOW + TOPUP_KEY_RETENTION_MS),
          replayed: false,
          credits: credits(20),
        });
        // The new record is kept for 24 hours of its own.
        expect(await store.addCreditsOnce(ownerId, 10, "order-24h", NOW + 2 * TOPUP_KEY_RETENTION_MS - 1)).toMatchObject({ replayed: true, credits: credits(20) });
      });

      it("happy: 20 keys and 10 repeats of one more, all at once, add each key exactly once", async () => {
        const ownerId = await newAccount();
        const answers = await Promise.all([
          ...Array.from({ length: 20 }, (_, i) => store.addCreditsOnce(ownerId, i + 1, `order-${i}`, NOW)),
          ...Array.from({ length: 10 }, () => store.addCreditsOnce(ownerId, 1000, "order-once", NOW)),
        ]);
        expect(answers.slice(0, 20).map((a) => a?.replayed)).toEqual(Array.from({ length: 20 }, () => false));
        expect(answers.slice(20).filter((a) => a?.replayed === false).length).toBe(1);
        // Every repeat got the one top-up that was made.
        const made = answers.slice(20).map((a) => a?.topUp);
        expect(new Set(made.map((t) => JSON.stringify(t))).size).toBe(1);
        expect(await store.getCredits(ownerId)).toEqual(credits(210 + 1000));
      });

      it("error: a repeat for another amount is refused and writes nothing", async () => {
        const ownerId = await newAccount();
        await store.addCreditsOnce(ownerId, 100, "order-9", NOW);
        const error = await refusal(store.addCreditsOnce(ownerId, 50, "order-9", NOW + 1));
        expect(error).toBeInstanceOf(IdempotencyKeyReusedError);
        expect(error).toMatchObject({ firstAmount: 100, amount: 50 });
        expect(await store.getCredits(ownerId)).toEqual(credits(100));
        expect(await store.addCreditsOnce(ownerId, 100, "order-9", NOW + 2)).toMatchObject({ topUp: topUp(ownerId, "order-9", 100, 100), replayed: true });
      });

      it("error: an account that does not exist gets null, and nothing is recorded for it", async () => {
        const ownerId = nextOwner();
        expect(await store.addCreditsOnce(ownerId, 5, "order-ghost", NOW)).toBeNull();
        await store.upsertAccount({ ownerId }, limits().accountDefaults, NOW);
        expect(await store.addCreditsOnce(ownerId, 5, "order-ghost", NOW + 1)).toMatchObject({ replayed: false, credits: credits(5) });
      });

      it(`error: an account holding ${MAX_KEYED_TOPUPS} keyed top-ups is refused another until the oldest is 24 hours old`, async () => {
        const ownerId = await newAccount();
        for (let i = 0; i < MAX_KEYED_TOPUPS; i++) await store.addCreditsOnce(ownerId, 1, `bulk-${i}`, NOW + i);
        const error = await refusal(store.addCreditsOnce(ownerId, 1, "one-too-many", NOW + MAX_KEYED_TOPUPS));
        expect(error).toBeInstanceOf(TopUpKeysExhaustedError);
        expect(error).toMatchObject({ maxKeyedTopUps: MAX_KEYED_TOPUPS, freeAtMs: NOW + TOPUP_KEY_RETENTION_MS });
        expect(await store.getCredits(ownerId)).toEqual(credits(MAX_KEYED_TOPUPS));
        // Repeats of the keys held still answer; once the oldest has gone, one more fits.
        expect(await store.addCreditsOnce(ownerId, 1, "bulk-0", NOW + TOPUP_KEY_RETENTION_MS - 1)).toMatchObject({ replayed: true });
        expect(await store.addCreditsOnce(ownerId, 1, "one-too-many", NOW + TOPUP_KEY_RETENTION_MS)).toMatchObject({ replayed: false, credits: credits(MAX_KEYED_TOPUPS + 1) });
      });
    });

    it("stores a key's own rate limit and clears it", async () => {
      const ownerId = nextOwner();
      const key = record(ownerId, { rateLimit: { limit: 7, windowSeconds: 30 } });
      await store.createKey(key, limits());
      expect((await store.findSnapshotByHash(key.hash))?.key.rateLimit).toEqual({ limit: 7, windowSeconds: 30 });
      expect((await store.updateKey(key.id, { rateLimit: null }))?.rateLimit).toBeNull();
    });

    it("disables a key (keeping the first time), enables it, and the snapshot carries it; a disabled key keeps its slot", async () => {
      const ownerId = nextOwner();
      const key = record(ownerId);
      await store.createKey(key, limits());
      expect((await store.findSnapshotByHash(key.hash))?.key.disabledAtMs).toBeNull();
      expect((await store.updateKey(key.id, { disabledAtMs: NOW + 1000 }))?.disabledAtMs).toBe(NOW + 1000);
      expect((await store.updateKey(key.id, { disabledAtMs: NOW + 5000 }))?.disabledAtMs).toBe(NOW + 1000);
      expect((await store.findSnapshotByHash(key.hash))?.key.disabledAtMs).toBe(NOW + 1000);
      expect((await store.getKey(key.id))?.disabledAtMs).toBe(NOW + 1000);
      expect(await store.countActiveKeys(ownerId, NOW)).toBe(1);
      expect((await store.updateKey(key.id, { disabledAtMs: null }))?.disabledAtMs).toBeNull();
      expect((await store.findSnapshotByHash(key.hash))?.key.disabledAtMs).toBeNull();
    });

    it("redisables a key: moves the time of a disabled key, disables an enabled one, and leaves a revoked one as it is", async () => {
      const ownerId = nextOwner();
      const key = record(ownerId);
      await store.createKey(key, limits());
      await store.updateKey(key.id, { disabledAtMs: NOW + 1000 });
      expect((await store.redisableKey(key.id, NOW + 5000))?.disabledAtMs).toBe(NOW + 5000);
      expect((await store.findSnapshotByHash(key.hash))?.key.disabledAtMs).toBe(NOW + 5000);
      await store.updateKey(key.id, { disabledAtMs: null });
      expect((await store.redisableKey(key.id, NOW + 6000))?.disabledAtMs).toBe(NOW + 6000);
      await store.revokeKey(key.id, NOW + 7000, "leaked");
      expect(await store.redisableKey(key.id, NOW + 8000)).toMatchObject({ revokedAtMs: NOW + 7000, disabledAtMs: NOW + 6000 });
      expect(await store.redisableKey(newKeyId(), NOW)).toBeNull();
    });

    it("redisables a key only while its time is the one given: null for an enabled key; a key whose time changed is left as it is", async () => {
      const ownerId = nextOwner();
      const key = record(ownerId);
      await store.createKey(key, limits());
      expect((await store.redisableKey(key.id, NOW + 1000, NOW + 500))?.disabledAtMs).toBeNull();
      expect((await store.redisableKey(key.id, NOW + 1000, null))?.disabledAtMs).toBe(NOW + 1000);
      expect((await store.redisableKey(key.id, NOW + 2000, null))?.disabledAtMs).toBe(NOW + 1000);
      expect((await store.redisableKey(key.id, NOW + 3000, NOW + 1000))?.disabledAtMs).toBe(NOW + 3000);
      expect((await store.findSnapshotByHash(key.hash))?.key.disabledAtMs).toBe(NOW + 3000);
      await store.revokeKey(key.id, NOW + 4000, "leaked");
      expect(await store.redisableKey(key.id, NOW + 5000, NOW + 3000)).toMatchObject({ revokedAtMs: NOW + 4000, disabledAtMs: NOW + 3000 });
      expect(await store.redisableKey(newKeyId(), NOW, null)).toBeNull();
    });

    /** A key of a new owner rotated, with 7 days of grace, to a new key issued at NOW + 10. */
    async function inGraceFor(): Promise<{ old: KeyRecord; next: KeyRecord }> {
      const ownerId = nextOwner();
      const old = record(ownerId);
      await store.createKey(old, limits());
      const next = record(ownerId, { createdAtMs: NOW + 10 });
      await store.rotateKey(old.id, next, NOW + 7 * DAY, NOW + 10);
      return { old, next };
    }

    it("enables a key and, first, the keys in grace for it paused with it (its time, after its issue); others stay as they are", async () => {
      const paused = await inGraceFor();
      await store.updateKey(paused.next.id, { disabledAtMs: NOW + 100 });
      await store.updateKey(paused.old.id, { disabledAtMs: NOW + 100 });
      const enabled = await store.enableKey(paused.next.id, [paused.old.id]);
      expect({ key: enabled?.key.disabledAtMs, resumed: enabled?.resumed.map((key) => [key.id, key.disabledAtMs]) }).toEqual({ key: null, resumed: [[paused.old.id, null]] });
      expect((await store.findSnapshotByHash(paused.old.hash))?.key.disabledAtMs).toBeNull();

      // Disabled on its own (another time), revoked, or with a time not after the successor's issue
      // (releases before this one gave a disabled key's successor that key's time): left disabled.
      const own = await inGraceFor();
      await store.updateKey(own.next.id, { disabledAtMs: NOW + 100 });
      await store.updateKey(own.old.id, { disabledAtMs: NOW + 99 });
      const revoked = await inGraceFor();
      await store.updateKey(revoked.next.id, { disabledAtMs: NOW + 100 });
      await store.updateKey(revoked.old.id, { disabledAtMs: NOW + 100 });
      await store.revokeKey(revoked.old.id, NOW + 200, "leaked");
      const legacy = await inGraceFor();
      await store.updateKey(legacy.next.id, { disabledAtMs: NOW + 10 });
      await store.updateKey(legacy.old.id, { disabledAtMs: NOW + 10 });
      for (const pair of [own, revoked, legacy]) {
        const after = await store.enableKey(pair.next.id, [pair.old.id]);
        expect({ key: after?.key.disabledAtMs, resumed: after?.resumed }).toEqual({ key: null, resumed: [] });
      }
      expect([(await store.getKey(own.old.id))?.disabledAtMs, (await store.getKey(revoked.old.id))?.disabledAtMs, (await store.getKey(legacy.old.id))?.disabledAtMs]).toEqual([NOW + 99, NOW + 100, NOW + 10]);

      // Only keys rotated to it come back, an enabled key changes nothing, a revoked one is left as it is.
      const stranger = record(nextOwner(), { disabledAtMs: NOW + 100 });
      await store.createKey(stranger, limits());
      const plain = record(nextOwner());
      await store.createKey(plain, limits());
      await store.updateKey(plain.id, { disabledAtMs: NOW + 100 });
      expect((await store.enableKey(plain.id, [stranger.id]))?.resumed).toEqual([]);
      expect((await store.getKey(stranger.id))?.disabledAtMs).toBe(NOW + 100);
      expect(await store.enableKey(plain.id, [])).toMatchObject({ key: { id: plain.id, disabledAtMs: null }, resumed: [] });
      await store.updateKey(plain.id, { disabledAtMs: NOW + 300 });
      await store.revokeKey(plain.id, NOW + 400, "leaked");
      expect(await store.enableKey(plain.id, [])).toMatchObject({ key: { revokedAtMs: NOW + 400, disabledAtMs: NOW + 300 }, resumed: [] });
      expect(await store.enableKey(newKeyId(), [])).toBeNull();
    });

    it("pauses the enabled keys in grace for a disabled key with its time as it stands, and nothing once it is enabled", async () => {
      const pair = await inGraceFor();
      expect(await store.pauseKeysInGrace(pair.next.id, [pair.old.id])).toEqual([]);
      await store.updateKey(pair.next.id, { disabledAtMs: NOW + 100 });
      const paused = await store.pauseKeysInGrace(pair.next.id, [pair.old.id]);
      expect(paused.map((key) => [key.id, key.disabledAtMs])).toEqual([[pair.old.id, NOW + 100]]);
      expect((await store.findSnapshotByHash(pair.old.hash))?.key.disabledAtMs).toBe(NOW + 100);
      // A key disabled already keeps its time; a revoked one and one not rotated to it are left as they are.
      await store.redisableKey(pair.old.id, NOW + 99);
      expect(await store.pauseKeysInGrace(pair.next.id, [pair.old.id])).toEqual([]);
      expect((await store.getKey(pair.old.id))?.disabledAtMs).toBe(NOW + 99);
      const revoked = await inGraceFor();
      await store.revokeKey(revoked.old.id, NOW + 200, "leaked");
      await store.updateKey(revoked.next.id, { disabledAtMs: NOW + 100 });
      const stranger = record(nextOwner());
      await store.createKey(stranger, limits());
      expect(await store.pauseKeysInGrace(revoked.next.id, [revoked.old.id, stranger.id])).toEqual([]);
      expect([(await store.getKey(revoked.old.id))?.disabledAtMs, (await store.getKey(stranger.id))?.disabledAtMs]).toEqual([null, null]);
    });

    it("a rotation revokes the keys still in grace from rotating to the old key, so a chain keeps one key in grace", async () => {
      const ownerId = nextOwner();
      const first = record(ownerId);
      await store.createKey(first, limits());
      const second = record(ownerId);
      expect((await store.rotateKey(first.id, second, NOW + 7 * DAY, NOW)).ended).toEqual([]);
      const third = record(ownerId);
      const rotation = await store.rotateKey(second.id, third, NOW + 7 * DAY, NOW + 50);
      expect(rotation.ended.map((key) => [key.id, key.revokedAtMs, key.revokeReason])).toEqual([[first.id, NOW + 50, CHAIN_GRACE_ENDED]]);
      expect(await store.getKey(first.id)).toMatchObject({ revokedAtMs: NOW + 50, revokeReason: CHAIN_GRACE_ENDED });
      expect(rotation.previous).toMatchObject({ id: second.id, rotatedToId: third.id, revokedAtMs: null });
      expect(await store.countActiveKeys(ownerId, NOW + 50)).toBe(1);
      // A key whose grace is over is left as it is (rotated, refused already).
      const fourth = record(ownerId);
      expect((await store.rotateKey(third.id, fourth, NOW + 7 * DAY, NOW + 8 * DAY)).ended).toEqual([]);
      expect((await store.getKey(second.id))?.revokedAtMs).toBeNull();
    });

    it("appends audit records and lists them by owner, key, time and page", async () => {
      const ownerId = nextOwner();
      const keyId = newKeyId();
      // Ids of each record's time, as EventIds makes them: `since` bounds the id too.
      const make = (i: number, key: string | null) => ({
        id: newEventId(NOW + i),
        atMs: NOW + i,
        actor: "tok_test",
        action: `action.${i}`,
        keyId: key,
        ownerId,
        changes: { n: i, list: ["a"], nothing: null },
        source: "127.0.0.1",
      });
      const records = [make(0, null), make(1, keyId), make(2, keyId), make(3, null)];
      for (const record of records) await store.appendAudit(record);
      expect(await store.listAudit({ ownerId, limit: 10 })).toEqual(records);
      expect((await store.listAudit({ keyId, limit: 10 })).map((r) => r.action)).toEqual(["action.1", "action.2"]);
      expect((await store.listAudit({ ownerId, sinceMs: NOW + 2, limit: 10 })).map((r) => r.action)).toEqual(["action.2", "action.3"]);
      expect((await store.listAudit({ ownerId, afterId: records[1]?.id, limit: 1 })).map((r) => r.action)).toEqual(["action.2"]);
    });

    it("lists by since a record whose id is a little earlier than its time (the first release took them apart), and the trail's newest id", async () => {
      const { store: fresh, close: closeFresh } = await empty()();
      try {
        expect(await fresh.lastAuditId()).toBeNull();
        const ownerId = nextOwner();
        const base = { actor: "tok_test", action: "key.create", keyId: null, ownerId, changes: {}, source: "127.0.0.1" };
        const early = { ...base, id: `evt_${ulid(NOW + 9)}`, atMs: NOW + 10 };
        const before = { ...base, id: `evt_${ulid(NOW + 5)}`, atMs: NOW + 5 };
        for (const record of [before, early]) await fresh.appendAudit(record);
        expect((await fresh.listAudit({ ownerId, sinceMs: NOW + 10, limit: 10 })).map((r) => r.id)).toEqual([early.id]);
        expect((await fresh.listAudit({ sinceMs: NOW + 6, limit: 10 })).map((r) => r.id)).toEqual([early.id]);
        expect(await fresh.lastAuditId()).toBe(early.id);
      } finally {
        await closeFresh();
      }
    });

    it("keeps the first audit record of an id: appending the id again (a retry recording the same change) writes nothing and is no error", async () => {
      const ownerId = nextOwner();
      const first = { id: newEventId(NOW), atMs: NOW, actor: "tok_first", action: "key.revoke", keyId: newKeyId(), ownerId, changes: { reason: "leaked" }, source: "10.0.0.1" };
      await store.appendAudit(first);
      await store.appendAudit(first);
      await store.appendAudit({ ...first, actor: "tok_retry", source: "10.0.0.2", changes: { reason: "leaked", again: true } });
      expect(await store.listAudit({ ownerId, limit: 10 })).toEqual([first]);
    });

    it("records one pepper check: claims at once through two connections agree, and every later claim gets it back", async () => {
      const [mine, theirs, later] = [pepperCheck("pepper-of-this-start-0123456789abcdef"), pepperCheck("pepper-of-a-replica-0123456789abcdef"), pepperCheck("a-later-pepper-0123456789abcdefghij")];
      const other = await twin();
      let recorded: string;
      try {
        const [first, second] = await Promise.all([store.claimPepperCheck(mine), other.store.claimPepperCheck(theirs)]);
        expect(second).toBe(first);
        expect([mine, theirs]).toContain(first);
        recorded = first;
        expect(await store.claimPepperCheck(later)).toBe(recorded);
        expect(await other.store.claimPepperCheck(recorded)).toBe(recorded);
      } finally {
        await other.close();
      }
      // Kept: a connection opened afterwards (the next start) finds it.
      const next = await twin();
      try {
        expect(await next.store.claimPepperCheck(later)).toBe(recorded);
      } finally {
        await next.close();
      }
    });

    it("records one key prefix on a store with no keys: claims at once through two connections agree, and every later claim gets it back", async () => {
      const connect = empty();
      const [one, two] = await Promise.all([connect(), connect()]);
      let recorded: string;
      try {
        const [first, second] = await Promise.all([one.store.claimKeyPrefix("kg"), two.store.claimKeyPrefix("acme")]);
        expect(second).toBe(first);
        expect(["kg", "acme"]).toContain(first);
        recorded = first;
        // Keys issued afterwards, under any prefix, do not move it.
        await one.store.createKey(record(nextOwner(), { start: "zeta_live_abcd" }), limits());
        expect(await one.store.claimKeyPrefix("zeta")).toBe(recorded);
      } finally {
        await Promise.all([one.close(), two.close()]);
      }
      // Kept: a connection opened afterwards (the next start) finds it.
      const next = await connect();
      try {
        expect(await next.store.claimKeyPrefix("zeta")).toBe(recorded);
      } finally {
        await next.close();
      }
    });

    it("a store with keys and no recorded prefix (written by a release before the record) records the prefix of its newest key's start, not the claimed one", async () => {
      const connect = empty();
      const opened = await connect();
      try {
        const ownerId = nextOwner();
        await opened.store.createKey(record(ownerId, { start: "old_live_abcd" }), limits());
        await opened.store.createKey(record(ownerId, { start: "acme_test_Zz09", mode: "test" }), limits());
        expect(await opened.store.claimKeyPrefix("kg")).toBe("acme");
        expect(await opened.store.claimKeyPrefix("acme")).toBe("acme");
      } finally {
        await opened.close();
      }
      const next = await connect();
      try {
        expect(await next.store.claimKeyPrefix("kg")).toBe("acme");
      } finally {
        await next.close();
      }
    });

    it("writes last use behind; a later time wins", async () => {
      const ownerId = nextOwner();
      const key = record(ownerId);
      await store.createKey(key, limits());
      await store.touchLastUsed(new Map([[key.id, NOW + 100]]));
      await store.touchLastUsed(new Map([[key.id, NOW + 50]]));
      expect((await store.getKey(key.id))?.lastUsedAtMs).toBe(NOW + 100);
    });
  });
}
