import { toBinary } from "@bufbuild/protobuf";
import fc from "fast-check";
import { LRUCache } from "lru-cache";
import { describe, expect, it } from "vitest";
import type { Allow } from "../../src/authz/pipeline.js";
import { encodeCheckResponse, toCheckResponse } from "../../src/authz/to-envoy.js";
import { MemoryCache } from "../../src/cache/memory.js";
import { CheckResponseSchema } from "../../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import { RecentMap } from "../../src/limits/memory.js";
import type { KeySnapshot } from "../../src/store/store.js";
import { newKeyRecord } from "../../src/store/store.js";
import { NO_REQUIREMENTS } from "../../src/authz/routes.js";

// What keygate keeps per cached key is cut to what Check reads: the limiter's tables grow with
// use instead of being preallocated, L1 keeps only the fields a Check reads, and an allow is
// encoded from them without protobuf-es. Each replacement is held to what it replaces.

type Op = { kind: "get" | "has"; key: number } | { kind: "set"; key: number; value: number } | { kind: "clear" };

const opArb: fc.Arbitrary<Op> = fc.oneof(
  { weight: 4, arbitrary: fc.record({ kind: fc.constant("set" as const), key: fc.integer({ min: 0, max: 12 }), value: fc.integer() }) },
  { weight: 4, arbitrary: fc.record({ kind: fc.constant("get" as const), key: fc.integer({ min: 0, max: 12 }) }) },
  { weight: 2, arbitrary: fc.record({ kind: fc.constant("has" as const), key: fc.integer({ min: 0, max: 12 }) }) },
  { weight: 1, arbitrary: fc.constant({ kind: "clear" as const }) },
);

describe("RecentMap happy", () => {
  it("answers every get, has and size as lru-cache with the same bound does", () => {
    fc.assert(
      fc.property(fc.integer({ min: 1, max: 6 }), fc.array(opArb, { maxLength: 80 }), (max, ops) => {
        const reference = new LRUCache<number, number>({ max });
        const recent = new RecentMap<number, number>(max);
        for (const op of ops) {
          switch (op.kind) {
            case "set":
              reference.set(op.key, op.value);
              recent.set(op.key, op.value);
              break;
            case "get":
              expect(recent.get(op.key)).toBe(reference.get(op.key));
              break;
            case "has":
              expect(recent.has(op.key)).toBe(reference.has(op.key));
              break;
            case "clear":
              reference.clear();
              recent.clear();
              break;
          }
          expect(recent.size).toBe(reference.size);
        }
        for (let key = 0; key <= 12; key++) expect(recent.has(key)).toBe(reference.has(key));
      }),
      { seed: 1313, numRuns: 1000 },
    );
  });

  it("holds at most its bound, dropping the least recently used", () => {
    const recent = new RecentMap<string, number>(3);
    recent.set("a", 1);
    recent.set("b", 2);
    recent.set("c", 3);
    expect(recent.get("a")).toBe(1);
    recent.set("d", 4);
    expect([recent.has("a"), recent.has("b"), recent.has("c"), recent.has("d")]).toStrictEqual([true, false, true, true]);
    expect(recent.size).toBe(3);
  });
});

function snapshot(overrides: { id: string; ownerId: string; projectId: string | null; scopes: string[]; plan: string }): KeySnapshot {
  return {
    key: newKeyRecord({
      id: overrides.id,
      hash: "0".repeat(64),
      ownerId: overrides.ownerId,
      projectId: overrides.projectId,
      name: "n",
      mode: "live",
      start: "kg_live_abcd",
      last4: "wxyz",
      scopes: overrides.scopes,
      createdAtMs: 0,
    }),
    account: { ownerId: overrides.ownerId, plan: overrides.plan, subscriptionStatus: "active", role: "standard", createdAtMs: 0, updatedAtMs: 0 },
  };
}

describe("cached allow bytes happy", () => {
  // Any UTF-8 a key's fields hold (lone surrogates too), and lengths whose varints take two or
  // three bytes, must come out as protobuf-es writes them.
  it("encodes allows with non-ASCII and long identity values byte for byte as protobuf-es does", () => {
    const value = fc.oneof(fc.string({ maxLength: 20 }), fc.string({ unit: "binary", maxLength: 20 }), fc.string({ minLength: 100, maxLength: 9000 }));
    const forwarded = fc.array(fc.tuple(fc.constantFrom("x-keygate-meta-team", "x-keygate-meta-tier"), value), { maxLength: 2 });
    fc.assert(
      fc.property(value, value, fc.option(value, { nil: null }), fc.array(value, { maxLength: 3 }), value, forwarded, (id, ownerId, projectId, scopes, plan, extra) => {
        const full = snapshot({ id, ownerId, projectId, scopes, plan });
        const allow: Allow = {
          allow: true,
          snapshot: full,
          credentialHeaders: ["x-api-key"],
          route: NO_REQUIREMENTS,
          limits: null,
          forwarded: extra,
        };
        const expected = Buffer.from(toBinary(CheckResponseSchema, toCheckResponse(allow, ["x-api-key", "x-keygate-plan"], "r", 0))).toString("hex");
        expect(Buffer.from(encodeCheckResponse(allow, ["x-api-key", "x-keygate-plan"], "r", 0)).toString("hex")).toBe(expected);
        // And from what L1 keeps of the same snapshot.
        const cache = new MemoryCache({ maxEntries: 1, ttlSeconds: 60, negativeMaxEntries: 1, negativeTtlSeconds: 5 });
        cache.set("h", full);
        const kept = cache.get("h");
        if (kept === null || kept === undefined) throw new Error("L1 did not keep the snapshot");
        expect(Buffer.from(encodeCheckResponse({ ...allow, snapshot: kept }, ["x-api-key", "x-keygate-plan"], "r", 0)).toString("hex")).toBe(expected);
      }),
      { seed: 1313, numRuns: 300 },
    );
  });
});

describe("L1 happy", () => {
  it("finds a snapshot by a different copy of its hash, and invalidates it by either", () => {
    const cache = new MemoryCache({ maxEntries: 10, ttlSeconds: 60, negativeMaxEntries: 10, negativeTtlSeconds: 5 });
    const stored = snapshot({ id: "key_a", ownerId: "o", projectId: null, scopes: [], plan: "basic" });
    const requestCopy = ["0".repeat(32), "0".repeat(32)].join("");
    cache.set(requestCopy, stored);
    expect(cache.get("0".repeat(64))?.key.id).toBe("key_a");
    cache.invalidate({ kind: "key", hash: requestCopy });
    expect(cache.get("0".repeat(64))).toBeUndefined();
    expect(cache.size).toBe(0);
  });

  it("keeps exactly the fields a Check reads, with their values", () => {
    const cache = new MemoryCache({ maxEntries: 10, ttlSeconds: 60, negativeMaxEntries: 10, negativeTtlSeconds: 5 });
    const stored = snapshot({ id: "key_a", ownerId: "owner_a", projectId: "proj_a", scopes: ["decks:read", "chat:write"], plan: "pro" });
    stored.key.expiresAtMs = 1_900_000_000_000;
    stored.key.graceEndsAtMs = 1_800_000_000_000;
    stored.key.rotatedToId = "key_b";
    stored.key.rateLimit = { limit: 5, windowSeconds: 60 };
    stored.key.metadata = { team: "billing" };
    stored.key.lastUsedAtMs = 1_700_000_000_000;
    const kept = cache.set("h", stored);
    expect(cache.get("h")).toBe(kept);
    expect(cache.get("h")).toStrictEqual({
      // L1's own: the read epoch in which the entry last moved up its order (the first epoch, 0).
      readEpoch: 0,
      key: {
        id: "key_a",
        ownerId: "owner_a",
        projectId: "proj_a",
        mode: "live",
        scopes: ["decks:read", "chat:write"],
        expiresAtMs: 1_900_000_000_000,
        revokedAtMs: null,
        graceEndsAtMs: 1_800_000_000_000,
        rotatedToId: "key_b",
        rateLimit: { limit: 5, windowSeconds: 60 },
        disabledAtMs: null,
        // What a Check's use is measured against (recordUse).
        lastUsedAtMs: 1_700_000_000_000,
        // Only the entries the policy forwards (none here).
        metadata: {},
      },
      account: { ownerId: "owner_a", plan: "pro", subscriptionStatus: "active", role: "standard" },
    });
  });

  it("keeps only the metadata entries the policy forwards", () => {
    const cache = new MemoryCache({ maxEntries: 10, ttlSeconds: 60, negativeMaxEntries: 10, negativeTtlSeconds: 5, forwardMetadata: ["team", "tier"] });
    const stored = snapshot({ id: "key_a", ownerId: "o", projectId: null, scopes: [], plan: "pro" });
    stored.key.metadata = { team: "billing", internal: "not forwarded" };
    const bare = snapshot({ id: "key_b", ownerId: "o", projectId: null, scopes: [], plan: "pro" });
    bare.key.metadata = { internal: "not forwarded" };
    cache.set("a", stored);
    cache.set("b", bare);
    expect(cache.get("a")?.key.metadata).toStrictEqual({ team: "billing" });
    expect(cache.get("b")?.key.metadata).toStrictEqual({});
  });

  it("shares one frozen scope list between keys with the same scopes, and none with the store's records", () => {
    const cache = new MemoryCache({ maxEntries: 10, ttlSeconds: 60, negativeMaxEntries: 10, negativeTtlSeconds: 5 });
    const first = snapshot({ id: "key_a", ownerId: "a", projectId: null, scopes: ["decks:read", "chat:write"], plan: "pro" });
    const second = snapshot({ id: "key_b", ownerId: "b", projectId: null, scopes: ["decks:read", "chat:write"], plan: "pro" });
    const other = snapshot({ id: "key_c", ownerId: "c", projectId: null, scopes: ["chat:write", "decks:read"], plan: "pro" });
    cache.set("1", first);
    cache.set("2", second);
    cache.set("3", other);
    const [a, b, c] = ["1", "2", "3"].map((hash) => cache.get(hash)?.key.scopes);
    expect(a).toBe(b);
    expect(a).not.toBe(first.key.scopes);
    expect(Object.isFrozen(a)).toBe(true);
    expect(c).toStrictEqual(["chat:write", "decks:read"]);
    first.key.scopes.push("admin");
    expect(cache.get("1")?.key.scopes).toStrictEqual(["decks:read", "chat:write"]);
  });
  // L1's order: a hit moves its entry up at most once per read epoch (maxEntries hits).
  const held = (cache: MemoryCache, hashes: readonly string[]): string[] => hashes.filter((h) => cache.get(h) !== undefined);

  it("moves a key up on its first hit of a read epoch only, and evicts the least recently moved", () => {
    const cache = new MemoryCache({ maxEntries: 4, ttlSeconds: 60, negativeMaxEntries: 4, negativeTtlSeconds: 5 });
    for (const h of ["a", "b", "c", "d"]) cache.set(h, snapshot({ id: `key_${h}`, ownerId: "o", projectId: null, scopes: [], plan: "pro" }));
    // Hits 1 to 3, epoch 0: a moves, c moves, a's second hit does not move it. Order: b d a c.
    for (const h of ["a", "c", "a"]) expect(cache.get(h)?.key.id).toBe(`key_${h}`);
    cache.set("e", snapshot({ id: "key_e", ownerId: "o", projectId: null, scopes: [], plan: "pro" }));
    cache.set("f", snapshot({ id: "key_f", ownerId: "o", projectId: null, scopes: [], plan: "pro" }));
    cache.set("g", snapshot({ id: "key_g", ownerId: "o", projectId: null, scopes: [], plan: "pro" }));
    // b, d, then a went (an exact LRU would have kept a, read last, and let c go).
    const all = ["a", "b", "c", "d", "e", "f", "g"];
    expect(cache.size).toBe(4);
    // The reads below are hits 4 to 7, epoch 1: each held key's first hit moves it again.
    expect(held(cache, all)).toStrictEqual(["c", "e", "f", "g"]);
    cache.set("h", snapshot({ id: "key_h", ownerId: "o", projectId: null, scopes: [], plan: "pro" }));
    // c was read first in epoch 1, so it is the least recently moved.
    expect(held(cache, all.concat("h"))).toStrictEqual(["e", "f", "g", "h"]);
  });

  it("keeps and evicts as an LRU whose hits move an entry once per epoch of maxEntries hits", () => {
    type L1Op = { kind: "set" | "get" | "invalidate"; key: number };
    const l1Op: fc.Arbitrary<L1Op> = fc.record({ kind: fc.constantFrom("set", "set", "get", "get", "get", "invalidate"), key: fc.integer({ min: 0, max: 7 }) }) as fc.Arbitrary<L1Op>;
    fc.assert(
      fc.property(fc.integer({ min: 1, max: 6 }), fc.array(l1Op, { minLength: 40, maxLength: 160 }), (max, ops) => {
        const cache = new MemoryCache({ maxEntries: max, ttlSeconds: 600, negativeMaxEntries: max, negativeTtlSeconds: 5 });
        // The reference: keys in order, least recently moved first, with the epoch of each one's last move.
        const order: number[] = [];
        const movedIn = new Map<number, number>();
        let hits = 0;
        let epoch = 0;
        const moveToEnd = (key: number): void => {
          const at = order.indexOf(key);
          if (at !== -1) order.splice(at, 1);
          order.push(key);
        };
        for (const op of ops) {
          const hash = `h${op.key}`;
          if (op.kind === "set") {
            cache.set(hash, snapshot({ id: `key_${op.key}`, ownerId: "o", projectId: null, scopes: [], plan: "pro" }));
            moveToEnd(op.key);
            movedIn.set(op.key, epoch - 1);
            if (order.length > max) movedIn.delete(order.shift() as number);
          } else if (op.kind === "invalidate") {
            cache.invalidate({ kind: "key", hash });
            const at = order.indexOf(op.key);
            if (at !== -1) order.splice(at, 1);
            movedIn.delete(op.key);
          } else {
            const found = cache.get(hash);
            expect(found?.key.id).toBe(movedIn.has(op.key) ? `key_${op.key}` : undefined);
            if (found !== undefined && found !== null) {
              if (++hits === max) {
                hits = 0;
                epoch++;
              }
              if (movedIn.get(op.key) !== epoch) {
                movedIn.set(op.key, epoch);
                moveToEnd(op.key);
              }
            }
          }
          expect(cache.size).toBe(order.length);
        }
      }),
      { seed: 1313, numRuns: 1000 },
    );
  });
});
