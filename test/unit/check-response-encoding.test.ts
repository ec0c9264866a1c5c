import { fromBinary, toBinary } from "@bufbuild/protobuf";
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import type { Allow, Decision, Deny } from "../../src/authz/pipeline.js";
import { DENIALS } from "../../src/authz/reasons.js";
import type { DenyReason } from "../../src/authz/reasons.js";
import { clearIdentitySlots, encodeCheckResponse, toCheckResponse } from "../../src/authz/to-envoy.js";
import { newKeyRecord } from "../../src/store/store.js";
import { CheckResponseSchema } from "../../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import type { ChargeResult } from "../../src/limits/limits.js";
import type { KeySnapshot } from "../../src/store/store.js";
import { NO_REQUIREMENTS } from "../../src/authz/routes.js";

// The server sends encodeCheckResponse's bytes, assembled from parts encoded once per key and per
// reason. They must be exactly what protobuf-es makes of the whole message.

const text = fc.string({ maxLength: 24 });
// Any Unicode, lone surrogates too: a denial's message and request id go into its JSON body.
const unicode = fc.oneof(fc.string({ unit: "grapheme", maxLength: 40 }), fc.string({ unit: "binary", maxLength: 12 }));
const ident = fc.stringMatching(/^[a-z][a-z0-9_-]{0,15}$/);

const snapshotArb: fc.Arbitrary<KeySnapshot> = fc.record({
  key: fc.record({
    id: ident.map((s) => `key_${s}`),
    hash: fc.constant("not-on-the-wire"),
    ownerId: ident,
    projectId: fc.option(ident, { nil: null }),
    name: text,
    mode: fc.constantFrom("live" as const, "test" as const),
    start: fc.constant("kg_live_abcd"),
    last4: fc.constant("wxyz"),
    scopes: fc.array(ident, { maxLength: 4 }),
    metadata: fc.constant({}),
    createdAtMs: fc.constant(0),
    lastUsedAtMs: fc.constant(null),
    expiresAtMs: fc.constant(null),
    revokedAtMs: fc.constant(null),
    revokeReason: fc.constant(null),
    graceEndsAtMs: fc.constant(null),
    rotatedToId: fc.constant(null),
    rateLimit: fc.constant(null),
    disabledAtMs: fc.constant(null),
  }),
  account: fc.record({
    ownerId: ident,
    plan: ident,
    subscriptionStatus: fc.constant("active" as const),
    role: fc.constant("standard"),
    createdAtMs: fc.constant(0),
    updatedAtMs: fc.constant(0),
  }),
});

// Mostly counts; now and then a number String() writes otherwise (the encoder's general path).
const count = fc.oneof({ weight: 8, arbitrary: fc.integer({ min: 0, max: 2_000_000_000 }) }, { weight: 1, arbitrary: fc.constantFrom(-1, 1.5, 2 ** 53, 1e21, Number.NaN) });
const limitsArb: fc.Arbitrary<ChargeResult> = fc.record({
  allowed: fc.boolean(),
  reason: fc.constantFrom(null, "RATE_LIMITED" as const, "QUOTA_EXCEEDED" as const, "INSUFFICIENT_CREDITS" as const),
  rate: fc.record({ limit: count, windowSeconds: fc.constantFrom(1, 60, 3600, 86_400, 17), remaining: count, resetSeconds: count }),
  retryAfterSeconds: fc.option(count, { nil: null }),
  // "minute" and null ("day") share a name with a rate window: both encoders rename the rate entry.
  quota: fc.option(fc.record({ name: fc.constantFrom(null, "messages", "minute", "nachrichtenü"), limit: count, remaining: count, resetAtMs: count }), { nil: null }),
  credits: fc.option(fc.record({ balance: count }), { nil: null }),
  spent: fc.constant(null),
  replayed: fc.constant(false),
});

const allowArb: fc.Arbitrary<Allow> = fc.record({
  allow: fc.constant(true as const),
  snapshot: snapshotArb,
  credentialHeaders: fc.constantFrom([], ["authorization"], ["x-api-key"], ["authorization", "x-api-key"]),
  route: fc.constant(NO_REQUIREMENTS),
  limits: fc.option(limitsArb, { nil: null }),
  forwarded: fc.array(fc.tuple(fc.constantFrom("x-keygate-meta-team", "x-keygate-meta-tier"), text), { maxLength: 2 }),
});

const reasons = Object.keys(DENIALS) as DenyReason[];
const denyArb: fc.Arbitrary<Deny> = fc
  .record({
    reason: fc.constantFrom(...reasons),
    custom: fc.option(fc.oneof(text, unicode), { nil: undefined }),
    retryAfterSeconds: fc.option(count, { nil: undefined }),
    limits: fc.option(limitsArb, { nil: undefined }),
  })
  .map(({ reason, custom, retryAfterSeconds, limits }) => {
    const deny: Deny = { allow: false, reason, message: custom ?? DENIALS[reason].message };
    if (retryAfterSeconds !== undefined) deny.retryAfterSeconds = retryAfterSeconds;
    if (limits !== undefined) deny.limits = limits;
    return deny;
  });

// Known names, and identity spellings with any suffix (any Unicode, lone surrogates too: they are
// removed, so encoded).
const clientHeaders = fc.array(
  fc.oneof(
    fc.constantFrom("authorization", "x-api-key", "accept", "x-keygate-key-id", "x-keygate-spoof", "X-Keygate-Plan", "x-keygate-project-id", "x_keygate_owner_id", "X_KEYGATE-Scopes"),
    fc.string({ unit: "grapheme", maxLength: 12 }).map((suffix) => `x-keygate-${suffix}`),
    fc.string({ unit: "binary", maxLength: 12 }).map((suffix) => `x_keygate_${suffix}`),
  ),
  { maxLength: 8 },
);

function same(decision: Decision, names: string[], requestId: string, nowMs: number): void {
  const encoded = encodeCheckResponse(decision, names, requestId, nowMs);
  expect(Buffer.from(encoded).toString("hex")).toBe(Buffer.from(toBinary(CheckResponseSchema, toCheckResponse(decision, names, requestId, nowMs))).toString("hex"));
  // Framed for the h2 engine: flag 0, the length big-endian, then the same bytes.
  const framed = Buffer.from(encodeCheckResponse(decision, names, requestId, nowMs, true));
  expect([framed[0], framed.readUInt32BE(1)]).toStrictEqual([0, encoded.length]);
  expect(framed.subarray(5).toString("hex")).toBe(Buffer.from(encoded).toString("hex"));
}

describe("Check response encoding happy", () => {
  it("encodes every allow byte for byte as protobuf-es encodes the message", () => {
    fc.assert(
      fc.property(allowArb, clientHeaders, text, count, (allow, names, requestId, nowMs) => {
        same(allow, names, requestId, nowMs);
        // Twice more for the same snapshot: its slot keeps its identity on the second answer
        // and copies it on the third.
        same(allow, names, requestId, nowMs + 1000);
        same(allow, names, requestId, nowMs + 2000);
      }),
      { numRuns: 300 },
    );
  });

  it("encodes every denial byte for byte as protobuf-es encodes the message", () => {
    fc.assert(
      fc.property(denyArb, fc.oneof(text, unicode), count, (deny, requestId, nowMs) => {
        same(deny, [], requestId, nowMs);
      }),
      { numRuns: 300 },
    );
  });

  it("two keys answered in turn keep their own identity", () => {
    const base = fc.sample(allowArb, { numRuns: 2, seed: 42 });
    const [a, b] = base;
    if (a === undefined || b === undefined) throw new Error("no sample");
    a.snapshot.key.id = "key_first";
    b.snapshot.key.id = "key_second";
    for (const allow of [a, b, a, b]) {
      const decoded = fromBinary(CheckResponseSchema, encodeCheckResponse(allow, [], "r", 0));
      expect(decoded.dynamicMetadata?.["key_id"]).toBe(allow.snapshot.key.id);
      expect(decoded.httpResponse.case).toBe("okResponse");
    }
  });
});

describe("Check response encoding: identities kept for keys that keep coming", () => {
  const sample = (seed: number): Allow => {
    const [allow] = fc.sample(allowArb, { numRuns: 1, seed });
    if (allow === undefined) throw new Error("no sample");
    return allow;
  };
  const identityOf = (allow: Allow) => {
    const decoded = fromBinary(CheckResponseSchema, encodeCheckResponse(allow, [], "r", 0));
    if (decoded.httpResponse.case !== "okResponse") throw new Error("expected an allow");
    return { headers: decoded.httpResponse.value.headers.map((h) => `${h.header?.key}=${h.header?.value}`), metadata: decoded.dynamicMetadata };
  };

  it("answers a key changed in L1 (a new snapshot, same id) with its new identity at once", () => {
    clearIdentitySlots();
    const sampled = sample(7);
    const before: Allow = {
      ...sampled,
      snapshot: { key: { ...sampled.snapshot.key, id: "key_01JCHANGED0000000000000000", scopes: ["read"] }, account: { ...sampled.snapshot.account, plan: "free" } },
    };
    for (let i = 0; i < 3; i++) same(before, [], "r", 0);
    // Rescoped and moved to another plan: L1 holds a new snapshot object for the key.
    const after: Allow = { ...before, snapshot: { key: { ...before.snapshot.key, scopes: ["read", "write"] }, account: { ...before.snapshot.account, plan: "pro" } } };
    expect(identityOf(after).metadata?.["scopes"]).toBe("read,write");
    expect(identityOf(after).metadata?.["plan"]).toBe("pro");
    expect(identityOf(after).headers).toContain("x-keygate-scopes=read,write");
    for (const allow of [after, after, before, after]) same(allow, [], "r", 0);
  });

  it("keeps two keys of one slot apart however they alternate", () => {
    clearIdentitySlots();
    const a = sample(11);
    const b = sample(12);
    // The same last three characters: the same slot.
    a.snapshot.key.id = "key_01JAAAAAAAAAAAAAAAAAAAAXYZ";
    b.snapshot.key.id = "key_01JBBBBBBBBBBBBBBBBBBBBXYZ";
    for (const allow of [a, a, a, b, b, b, a, b, a, a, b, b]) {
      same(allow, ["x-keygate-key-id"], "r", 5);
      expect(identityOf(allow).metadata?.["key_id"]).toBe(allow.snapshot.key.id);
    }
  });
});

// A fixed allow whose answer was captured from the encoder before credential removal covered
// every credential header: with one credential header present, the bytes must not change.
const GOLDEN_SNAPSHOT: KeySnapshot = {
  key: newKeyRecord({
    id: "key_golden",
    hash: "h",
    ownerId: "owner-golden",
    projectId: "alpha",
    name: "n",
    mode: "live",
    start: "kg_live_abcd",
    last4: "wxyz",
    scopes: ["read", "decks"],
    createdAtMs: 0,
  }),
  account: { ownerId: "owner-golden", plan: "pro", subscriptionStatus: "active", role: "standard", createdAtMs: 0, updatedAtMs: 0 },
};
const GOLDEN_LIMITS: ChargeResult = {
  allowed: true,
  reason: null,
  rate: { limit: 100, windowSeconds: 60, remaining: 99, resetSeconds: 60 },
  retryAfterSeconds: null,
  quota: null,
  credits: null,
  spent: null,
  replayed: false,
};
const GOLDEN_NAMES = ["authorization", "accept", "x-keygate-owner-id", "x-keygate-tenant", "X-Keygate-Tier", "x-keygate-tenant"];
const GOLDEN_HEX =
  "0a001ac90312220a1e0a10782d6b6579676174652d6b65792d6964120a6b65795f676f6c64656e180212260a220a12782d6b6579676174652d6f776e65722d6964120c6f776e65722d676f6c64656e180212210a1d0a14782d6b6579676174652d70726f6a6563742d69641205616c706861180212220a1e0a10782d6b6579676174652d73636f706573120a726561642c6465636b73180212190a150a0e782d6b6579676174652d706c616e120370726f1802121e0a1a0a0e782d6b6579676174652d726f6c6512087374616e646172641802121a0a160a0e782d6b6579676174652d6d6f646512046c69766518022a0d617574686f72697a6174696f6e2a10782d6b6579676174652d74656e616e742a0e782d6b6579676174652d74696572321c0a180a11782d726174656c696d69742d6c696d697412033130301802321f0a1b0a15782d726174656c696d69742d72656d61696e696e67120239391802321b0a170a11782d726174656c696d69742d7265736574120236301802322b0a270a10726174656c696d69742d706f6c6963791213226d696e757465223b713d3130303b773d3630180232230a1f0a09726174656c696d69741212226d696e757465223b723d39393b743d363018022296010a160a066b65795f6964120c1a0a6b65795f676f6c64656e0a1a0a086f776e65725f6964120e1a0c6f776e65722d676f6c64656e0a150a0a70726f6a6563745f696412071a05616c7068610a0d0a04706c616e12051a0370726f0a120a04726f6c65120a1a087374616e646172640a0e0a046d6f646512061a046c6976650a160a0673636f706573120c1a0a726561642c6465636b73";

function goldenAllow(credentialHeaders: string[]): Allow {
  return { allow: true, snapshot: GOLDEN_SNAPSHOT, credentialHeaders, route: NO_REQUIREMENTS, limits: GOLDEN_LIMITS, forwarded: [] };
}

function removalOf(bytes: Uint8Array): string[] {
  const decoded = fromBinary(CheckResponseSchema, bytes);
  if (decoded.httpResponse.case !== "okResponse") throw new Error(`expected ok, got ${decoded.httpResponse.case ?? "nothing"}`);
  return decoded.httpResponse.value.headersToRemove;
}

describe("Check response encoding: what is removed upstream", () => {
  it("is byte for byte the recorded answer when one credential header is present", () => {
    const bytes = encodeCheckResponse(goldenAllow(["authorization"]), GOLDEN_NAMES, "req-golden", 1_700_000_000_000);
    expect(Buffer.from(bytes).toString("hex")).toBe(GOLDEN_HEX);
  });

  it("lists every credential header present, then every identity spelling the allow does not overwrite, once each", () => {
    const names = ["authorization", "x-api-key", "x_keygate_owner_id", "X-KEYGATE-Owner-Id", "x-keygate-owner-id", "X_Keygate_Tenant", "x-keygate_tenant", "x-keygateway", "xkeygate-x"];
    const bytes = encodeCheckResponse(goldenAllow(["authorization", "x-api-key"]), names, "r", 0);
    same(goldenAllow(["authorization", "x-api-key"]), names, "r", 0);
    // X-KEYGATE-Owner-Id is x-keygate-owner-id to Envoy, which the allow overwrites; the
    // underscore spellings are other names to Envoy, and the same name to a WSGI or PHP upstream.
    expect(removalOf(bytes)).toEqual(["authorization", "x-api-key", "x_keygate_owner_id", "x_keygate_tenant", "x-keygate_tenant"]);
  });
});
