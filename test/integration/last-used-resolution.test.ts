import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pino } from "pino";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { LifecycleService } from "../../src/admin/lifecycle.js";
import { RecordHeaders } from "../../src/authz/headers.js";
import { DecisionPipeline, recordUse } from "../../src/authz/pipeline.js";
import { DENIALS } from "../../src/authz/reasons.js";
import { RouteTable } from "../../src/authz/routes.js";
import { SnapshotLookup } from "../../src/cache/lookup.js";
import { LocalInvalidationBus, MemoryCache } from "../../src/cache/memory.js";
import { DEFAULT_POLICY_INPUT, parsePolicy } from "../../src/config.js";
import type { Policy } from "../../src/config.js";
import { KeyHasher } from "../../src/keys/hasher.js";
import { KeyFormat } from "../../src/keys/key-format.js";
import { LocalIdempotencyLedger } from "../../src/limits/idempotency.js";
import { MemoryMeter } from "../../src/limits/memory.js";
import { UsageRecorder } from "../../src/limits/usage.js";
import { LastUsedRecorder } from "../../src/store/last-used.js";
import { SqliteKeyStore } from "../../src/store/sqlite.js";
import type { CheckedKey } from "../../src/store/store.js";

const T0 = Date.UTC(2026, 5, 1, 12, 0, 0);
const HOUR_MS = 3_600_000;

describe("recordUse", () => {
  function key(lastUsedAtMs: number | null): CheckedKey {
    return {
      id: "key_1", ownerId: "acct_1", projectId: null, mode: "live", scopes: [], metadata: {}, expiresAtMs: null, revokedAtMs: null,
      graceEndsAtMs: null, rotatedToId: null, rateLimit: null, disabledAtMs: null, lastUsedAtMs,
    };
  }
  function recorded(k: CheckedKey, nowMs: number, resolutionMs: number): Array<[string, number]> {
    const calls: Array<[string, number]> = [];
    recordUse({ record: (id, atMs) => calls.push([id, atMs]) }, k, nowMs, resolutionMs);
    return calls;
  }

  it("records a key never used on record, and moves the snapshot's time on", () => {
    const k = key(null);
    expect(recorded(k, T0, 60_000)).toEqual([["key_1", T0]]);
    expect(k.lastUsedAtMs).toBe(T0);
  });

  it("skips a use less than the resolution after the time on record, records one at it", () => {
    const k = key(T0);
    expect(recorded(k, T0 + 59_999, 60_000)).toEqual([]);
    expect(k.lastUsedAtMs).toBe(T0);
    expect(recorded(k, T0 + 60_000, 60_000)).toEqual([["key_1", T0 + 60_000]]);
    expect(k.lastUsedAtMs).toBe(T0 + 60_000);
  });

  it("counts a time on record later than now (another replica's clock) as recent", () => {
    const k = key(T0 + 5_000);
    expect(recorded(k, T0, 60_000)).toEqual([]);
    expect(k.lastUsedAtMs).toBe(T0 + 5_000);
  });

  it("records every use at resolution 0", () => {
    const k = key(T0);
    expect(recorded(k, T0, 0)).toEqual([["key_1", T0]]);
    expect(recorded(k, T0, 0)).toEqual([["key_1", T0]]);
  });
});

describe("last_used_at through Checks, the write-behind and SQLite", () => {
  let dir: string;
  let store: SqliteKeyStore;
  let lastUsed: LastUsedRecorder;
  let usage: UsageRecorder;
  let nowMs = T0;

  beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), "keygate-last-used-"));
    store = new SqliteKeyStore(join(dir, "keygate.db"));
    nowMs = T0;
  });

  afterEach(async () => {
    await lastUsed.stop();
    await usage.stop();
    await store.close();
    rmSync(dir, { recursive: true, force: true });
  });

  /** A pipeline over the store as buildKeygate wires the embedded mode, on this test's clock; the flushes run only when called. */
  async function setUp(policyInput: Record<string, unknown>): Promise<{
    check: () => Promise<void>;
    verify: (options?: { requiredScopes?: string[]; cost?: number }) => Promise<string>;
    storedMs: () => Promise<number | null>;
    unflushedMs: () => Promise<number | null>;
  }> {
    const logger = pino({ level: "silent" });
    const policy: Policy = parsePolicy({ ...DEFAULT_POLICY_INPUT, ...policyInput });
    const format = new KeyFormat("kg");
    const hasher = new KeyHasher("a-pepper-for-the-last-used-test-0123456789abcdef");
    usage = new UsageRecorder(store, logger, HOUR_MS);
    lastUsed = new LastUsedRecorder(store, logger, HOUR_MS);
    const meter = new MemoryMeter(store, usage);
    const lookup = new SnapshotLookup({ local: new MemoryCache(policy.cache), store, shared: undefined, bus: new LocalInvalidationBus(), logger, storeSystem: store.kind });
    const routes = new RouteTable(policy.routes, policy.routeMatching);
    const pipeline = new DecisionPipeline({ format, hasher, lookup, routes, credentialHeaders: policy.credentialHeaders, lastUsed, meter, usage, policy, nowMs: () => nowMs });
    const lifecycle = new LifecycleService({ store, lookup, pipeline, format, hasher, policy, meter, usage, idempotency: new LocalIdempotencyLedger(), nowMs: () => nowMs, logger });
    const issued = await lifecycle.createKey({ ownerId: "acct_last_used", name: "k", scopes: [], mode: "live", expiresAtMs: null, metadata: {} });
    const id = issued.key.id;
    return {
      async check() {
        const decision = await pipeline.decide({ method: "GET", path: "/v1/things", headers: new RecordHeaders({ "x-api-key": issued.secret }), contextExtensions: undefined });
        expect(decision.allow).toBe(true);
      },
      /** VerifyKey's code as KeyAdmin answers it: "OK" for valid, else the denial's or the refused charge's. */
      async verify(options = {}) {
        const charge = options.cost === undefined ? undefined : { cost: options.cost, idempotencyKey: `charge-${nowMs}-${options.cost}` };
        const { decision, charge: charged } = await lifecycle.verifyKey({ secret: issued.secret, requiredScopes: options.requiredScopes ?? [], charge });
        if (!decision.allow) return DENIALS[decision.reason].code;
        return charged === null || charged.charge.reason === null ? "OK" : DENIALS[charged.charge.reason].code;
      },
      async storedMs() {
        await lastUsed.flush();
        return (await store.getKey(id))?.lastUsedAtMs ?? null;
      },
      /** The store's time without a flush: a call that wrote it itself shows here. */
      async unflushedMs() {
        return (await store.getKey(id))?.lastUsedAtMs ?? null;
      },
    };
  }

  it("writes the first use, not a use within the minute after it, and the next one a minute on (the default)", async () => {
    const { check, storedMs } = await setUp({});
    expect(await storedMs()).toBeNull();
    await check();
    expect(await storedMs()).toBe(T0);
    nowMs = T0 + 10_000;
    await check();
    expect(lastUsed.pendingCount).toBe(0);
    expect(await storedMs()).toBe(T0);
    nowMs = T0 + 60_000;
    await check();
    expect(lastUsed.pendingCount).toBe(1);
    expect(await storedMs()).toBe(T0 + 60_000);
  });

  it("a VerifyKey that answers valid records the use as a Check does: through the write-behind, at the same resolution, with or without a charge", async () => {
    const { verify, storedMs, unflushedMs } = await setUp({});
    expect(await verify()).toBe("OK");
    expect(lastUsed.pendingCount).toBe(1);
    expect(await unflushedMs()).toBeNull();
    expect(await storedMs()).toBe(T0);
    nowMs = T0 + 10_000;
    expect(await verify({ cost: 1 })).toBe("OK");
    expect(lastUsed.pendingCount).toBe(0);
    expect(await storedMs()).toBe(T0);
    nowMs = T0 + 60_000;
    expect(await verify({ cost: 1 })).toBe("OK");
    expect(lastUsed.pendingCount).toBe(1);
    expect(await unflushedMs()).toBe(T0);
    expect(await storedMs()).toBe(T0 + 60_000);
  });

  it("a VerifyKey that answers valid: false records nothing: a refused key, a refused charge", async () => {
    const basic = { maxActiveKeys: 1, rateLimit: { limit: 100, windowSeconds: 60 }, dailyQuota: null, monthlyCredits: 10 };
    const { verify, storedMs } = await setUp({ plans: { basic }, scopes: { catalog: ["tutor", "decks"], default: ["tutor"] }, lastUsedResolutionSeconds: 0 });
    expect(await verify({ requiredScopes: ["decks"] })).toBe("FORBIDDEN");
    expect(await verify({ cost: 11 })).toBe("INSUFFICIENT_CREDITS");
    expect(lastUsed.pendingCount).toBe(0);
    expect(await storedMs()).toBeNull();
    expect(await verify({ cost: 10 })).toBe("OK");
    expect(await storedMs()).toBe(T0);
  });

  it("writes every use with lastUsedResolutionSeconds: 0", async () => {
    const { check, storedMs } = await setUp({ lastUsedResolutionSeconds: 0 });
    await check();
    expect(await storedMs()).toBe(T0);
    nowMs = T0 + 1_000;
    await check();
    expect(await storedMs()).toBe(T0 + 1_000);
  });
});
