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

type Hook = (prop: string, args: unknown[]) => Promise<void>;

// Two orders of UpdateKey and RotateKey the guarded UpdateKey write does not cover:
// - an UpdateKey landing between RotateKey's read and its write: the new key was built from that
//   read, and kept a scope the update had just taken away (the update answered OK). The new key now
//   takes the scopes and rate limit the old key had when the rotation's write found it;
// - a successor's change followed onto its old key in grace, with the old key revoked between: the
//   revoked record's scopes were rewritten. The follow's write is guarded too.
describe("UpdateKey racing RotateKey and RevokeKey", () => {
  let dir: string;
  let store: SqliteKeyStore;
  let usage: UsageRecorder;
  let lastUsed: LastUsedRecorder;
  beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), "keygate-rotate-update-races-"));
    store = new SqliteKeyStore(join(dir, "keygate.db"));
  });
  afterEach(async () => {
    await lastUsed.stop();
    await usage.stop();
    await store.close();
    rmSync(dir, { recursive: true, force: true });
  });

  function build(hook: { fn: Hook | null }): LifecycleService {
    const nowMs = () => Date.now();
    const logger = pino({ level: "silent" });
    const policy = parsePolicy({ ...DEFAULT_POLICY_INPUT });
    const format = new KeyFormat("kg");
    const hasher = new KeyHasher("a-pepper-for-the-rotate-update-races-0123456789a");
    usage = new UsageRecorder(store, logger, 3_600_000);
    lastUsed = new LastUsedRecorder(store, logger, 3_600_000);
    const meter = new MemoryMeter(store, usage);
    const lookup = new SnapshotLookup({ local: new MemoryCache(policy.cache), store, shared: undefined, bus: new LocalInvalidationBus(), logger, storeSystem: store.kind });
    const routes = new RouteTable(policy.routes, policy.routeMatching);
    const pipeline = new DecisionPipeline({ format, hasher, lookup, routes, credentialHeaders: policy.credentialHeaders, lastUsed, meter, usage, policy, nowMs });
    const racing = new Proxy(store, {
      get(target, prop, receiver) {
        const value = Reflect.get(target, prop, receiver) as unknown;
        if (typeof value !== "function") return value;
        return async (...args: unknown[]) => {
          const fn = hook.fn;
          if (fn !== null) await fn(String(prop), args);
          return (value as (...a: unknown[]) => unknown).apply(target, args);
        };
      },
    });
    return new LifecycleService({ store: racing, lookup, pipeline, format, hasher, policy, meter, usage, idempotency: new LocalIdempotencyLedger(), nowMs, logger });
  }

  it("an UpdateKey answered OK between RotateKey's read and its write is not lost on the new key", async () => {
    const hook: { fn: Hook | null } = { fn: null };
    const lifecycle = build(hook);
    const issued = await lifecycle.createKey({ ownerId: "acct_race_a", name: "k", scopes: ["read", "admin"], mode: "live", expiresAtMs: null, metadata: {} });
    let outcome = "";
    hook.fn = async (prop) => {
      if (prop !== "rotateKey") return;
      hook.fn = null;
      // Narrow the key after RotateKey read it, before its store write.
      outcome = await lifecycle.updateKey({ id: issued.key.id, scopes: ["read"] }).then(() => "OK", (e: unknown) => String(e));
    };
    const rotated = await lifecycle.rotateKey({ id: issued.key.id, graceDays: 7 });
    const next = await store.getKey(rotated.key.id);
    expect(outcome).toBe("OK");
    // Update then rotate would give the new key ["read"]; the new key keeps the removed scope.
    expect(next?.scopes).toEqual(["read"]);
  });

  it("the follow of a successor's new scopes does not rewrite a key revoked meanwhile", async () => {
    const hook: { fn: Hook | null } = { fn: null };
    const lifecycle = build(hook);
    const issued = await lifecycle.createKey({ ownerId: "acct_race_b", name: "k", scopes: ["read"], mode: "live", expiresAtMs: null, metadata: {} });
    const rotated = await lifecycle.rotateKey({ id: issued.key.id, graceDays: 7 });
    const oldId = issued.key.id;
    let armed = false;
    hook.fn = async (prop, args) => {
      if (prop === "updateKey" && args[0] === rotated.key.id) armed = true;
      // #inGraceFor has listed the old key; a RevokeKey of it commits before the follow's write.
      if (prop === "updateKey" && args[0] === oldId && armed) {
        hook.fn = null;
        await lifecycle.revokeKey({ id: oldId, reason: "compromised" });
      }
    };
    await lifecycle.updateKey({ id: rotated.key.id, scopes: ["read", "admin"] });
    const old = await store.getKey(oldId);
    expect(old?.revokedAtMs).not.toBeNull();
    // A revoke is final: the record keeps what the key held when it was revoked.
    expect(old?.scopes).toEqual(["read"]);
  });

  // The order the guarded write covers: a RotateKey committing between UpdateKey's read and its
  // write left the old secret (in grace) wider than the new one, an outcome no order of the two
  // calls gives.
  it("an UpdateKey whose read comes before a RotateKey's write never leaves the old key in grace with scopes its successor lacks", async () => {
    const hook: { fn: Hook | null } = { fn: null };
    const lifecycle = build(hook);
    const issued = await lifecycle.createKey({ ownerId: "acct_update_race", name: "k", scopes: ["read"], mode: "live", expiresAtMs: null, metadata: {} });
    const targetId = issued.key.id;
    let rotation: Promise<unknown> | null = null;
    hook.fn = async (prop, args) => {
      if (prop === "updateKey" && args[0] === targetId && rotation === null) {
        rotation = lifecycle.rotateKey({ id: targetId, graceDays: 7 });
        await rotation;
      }
    };
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
