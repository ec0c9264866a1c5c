import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pino } from "pino";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { LifecycleService } from "../../src/admin/lifecycle.js";
import { CheckBudgetExceededError } from "../../src/authz/budget.js";
import { RecordHeaders } from "../../src/authz/headers.js";
import { DecisionPipeline } from "../../src/authz/pipeline.js";
import type { Decision } from "../../src/authz/pipeline.js";
import { RouteTable } from "../../src/authz/routes.js";
import { SnapshotLookup } from "../../src/cache/lookup.js";
import { LocalInvalidationBus, MemoryCache } from "../../src/cache/memory.js";
import { DEFAULT_POLICY_INPUT, parsePolicy } from "../../src/config.js";
import { KeyHasher } from "../../src/keys/hasher.js";
import { KeyFormat } from "../../src/keys/key-format.js";
import { LocalIdempotencyLedger } from "../../src/limits/idempotency.js";
import { MemoryMeter } from "../../src/limits/memory.js";
import { UsageRecorder } from "../../src/limits/usage.js";
import { LastUsedRecorder } from "../../src/store/last-used.js";
import { SqliteKeyStore } from "../../src/store/sqlite.js";
import type { KeySnapshot, SnapshotStore } from "../../src/store/store.js";

// A Check whose lookup answers after its budget is answered UNAVAILABLE; the late answer must not
// then be judged, charged or counted, since the client was refused.

const HOUR_MS = 3_600_000;
const BUDGET_MS = 20;

describe("a Check past its budget is never charged", () => {
  let dir: string;
  let store: SqliteKeyStore;
  let lastUsed: LastUsedRecorder;
  let usage: UsageRecorder;

  beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), "keygate-budget-charge-"));
    store = new SqliteKeyStore(join(dir, "keygate.db"));
  });

  afterEach(async () => {
    await lastUsed.stop();
    await usage.stop();
    await store.close();
    rmSync(dir, { recursive: true, force: true });
  });

  it("a lookup that answers after the budget: UNAVAILABLE, and the next Check finds one charge only (its own)", async () => {
    const logger = pino({ level: "silent" });
    const policy = parsePolicy(DEFAULT_POLICY_INPUT);
    const format = new KeyFormat("kg");
    const hasher = new KeyHasher("a-pepper-for-the-budget-test-0123456789abcdef");
    usage = new UsageRecorder(store, logger, HOUR_MS);
    lastUsed = new LastUsedRecorder(store, logger, HOUR_MS);
    const meter = new MemoryMeter(store, usage);
    // A store that waits (as MongoDB does) until the test lets its first read through.
    let release: () => void = () => undefined;
    const gate = new Promise<void>((resolve) => (release = resolve));
    let lateRead: Promise<KeySnapshot | null> | null = null;
    const slowStore: SnapshotStore = {
      findSnapshotByHash: (hash) => {
        lateRead ??= gate.then(() => store.findSnapshotByHash(hash));
        return lateRead;
      },
    };
    const lookup = new SnapshotLookup({ local: new MemoryCache(policy.cache), store: slowStore, shared: undefined, bus: new LocalInvalidationBus(), logger, storeSystem: "test" });
    const routes = new RouteTable(policy.routes, policy.routeMatching);
    const pipeline = new DecisionPipeline({ format, hasher, lookup, routes, credentialHeaders: policy.credentialHeaders, lastUsed, meter, usage, policy, nowMs: () => Date.now(), checkBudgetMs: BUDGET_MS });
    const lifecycle = new LifecycleService({ store, lookup, pipeline, format, hasher, policy, meter, usage, idempotency: new LocalIdempotencyLedger(), nowMs: () => Date.now(), logger });
    const issued = await lifecycle.createKey({ ownerId: "acct_budget", name: "k", scopes: [], mode: "live", expiresAtMs: null, metadata: {} });
    const decide = (): Decision | Promise<Decision> => pipeline.decide({ method: "GET", path: "/v1/things", headers: new RecordHeaders({ "x-api-key": issued.secret }), contextExtensions: undefined });

    await expect(Promise.resolve(decide())).rejects.toBeInstanceOf(CheckBudgetExceededError);
    release();
    await lateRead;
    // Let the late answer's reactions run (microtasks, then one turn) before the next Check.
    await new Promise((resolve) => setImmediate(resolve));
    const next = await decide();
    if (!next.allow) throw new Error(`expected an allow, got ${next.reason}`);
    const limit = next.limits?.rate.limit ?? 0;
    expect(limit).toBeGreaterThan(1);
    expect(next.limits?.rate.remaining).toBe(limit - 1);
    expect(lastUsed.pendingCount).toBe(1);
  });
});
