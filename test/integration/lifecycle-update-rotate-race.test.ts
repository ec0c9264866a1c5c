import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pino } from "pino";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { LifecycleService } from "../../src/admin/lifecycle.js";
import { DecisionPipeline } from "../../src/authz/pipeline.js";
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

// UpdateKey refuses scopes for a rotation's old key. Decided on its read alone, with a write of no
// condition, a RotateKey landing between the read and the write left the old secret (in grace)
// wider than the new one, an outcome no order of the two calls gives: the write now holds the
// same conditions (KeyUpdateGuard).
describe("UpdateKey racing RotateKey of the same key", () => {
  let dir: string;
  let store: SqliteKeyStore;
  let usage: UsageRecorder;
  let lastUsed: LastUsedRecorder;
  beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), "keygate-update-rotate-race-"));
    store = new SqliteKeyStore(join(dir, "keygate.db"));
  });
  afterEach(async () => {
    await lastUsed.stop();
    await usage.stop();
    await store.close();
    rmSync(dir, { recursive: true, force: true });
  });

  it("never leaves the old key in grace with scopes its successor lacks", async () => {
    const nowMs = () => Date.now();
    const logger = pino({ level: "silent" });
    const policy = parsePolicy({ ...DEFAULT_POLICY_INPUT });
    const format = new KeyFormat("kg");
    const hasher = new KeyHasher("a-pepper-for-the-update-rotate-race-0123456789ab");
    usage = new UsageRecorder(store, logger, 3_600_000);
    lastUsed = new LastUsedRecorder(store, logger, 3_600_000);
    const meter = new MemoryMeter(store, usage);
    const lookup = new SnapshotLookup({ local: new MemoryCache(policy.cache), store, shared: undefined, bus: new LocalInvalidationBus(), logger, storeSystem: store.kind });
    const routes = new RouteTable(policy.routes, policy.routeMatching);
    const pipeline = new DecisionPipeline({ format, hasher, lookup, routes, credentialHeaders: policy.credentialHeaders, lastUsed, meter, usage, policy, nowMs });
    // The store as UpdateKey sees it: the rotation commits between UpdateKey's read and its write.
    let rotation: Promise<unknown> | null = null;
    let lifecycle: LifecycleService;
    let targetId = "";
    const racing = new Proxy(store, {
      get(target, prop, receiver) {
        if (prop === "updateKey") {
          return async (id: string, ...rest: unknown[]) => {
            if (id === targetId && rotation === null) {
              rotation = lifecycle.rotateKey({ id, graceDays: 7 });
              await rotation;
            }
            return (target.updateKey as (i: string, ...r: unknown[]) => Promise<unknown>).call(target, id, ...rest);
          };
        }
        const value = Reflect.get(target, prop, receiver) as unknown;
        return typeof value === "function" ? (value as (...a: unknown[]) => unknown).bind(target) : value;
      },
    });
    lifecycle = new LifecycleService({ store: racing, lookup, pipeline, format, hasher, policy, meter, usage, idempotency: new LocalIdempotencyLedger(), nowMs, logger });
    const issued = await lifecycle.createKey({ ownerId: "acct_update_race", name: "k", scopes: ["read"], mode: "live", expiresAtMs: null, metadata: {} });
    targetId = issued.key.id;
    const outcome = await lifecycle.updateKey({ id: targetId, scopes: ["read", "admin"] }).then(() => "OK", (e: unknown) => String(e));
    const { key: successor } = (await rotation) as unknown as { key: { id: string } };
    const old = await store.getKey(targetId);
    const next = await store.getKey(successor.id);
    // Update then rotate: both ["read","admin"]; rotate then update: refused, both ["read"].
    expect({ outcome, old: old?.scopes, next: next?.scopes, oldRotatedTo: old?.rotatedToId }).toEqual(
      outcome === "OK" ? { outcome, old: ["read", "admin"], next: ["read", "admin"], oldRotatedTo: successor.id } : { outcome, old: ["read"], next: ["read"], oldRotatedTo: successor.id },
    );
  });
});
