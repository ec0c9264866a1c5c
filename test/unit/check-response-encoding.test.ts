import { fromBinary, toBinary } from "@bufbuild/protobuf";
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import type { Allow, Decision, Deny } from "../../src/authz/pipeline.js";
import { DENIALS } from "../../src/authz/reasons.js";
import type { DenyReason } from "../../src/authz/reasons.js";
import { encodeCheckResponse, toCheckResponse } from "../../src/authz/to-envoy.js";
import { CheckResponseSchema } from "../../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import type { ChargeResult } from "../../src/limits/limits.js";
import type { KeySnapshot } from "../../src/store/store.js";

// The server sends encodeCheckResponse's bytes, assembled from parts encoded once per key and per
// reason. They must be exactly what protobuf-es makes of the whole message.

const text = fc.string({ maxLength: 24 });
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

const count = fc.integer({ min: 0, max: 2_000_000_000 });
const limitsArb: fc.Arbitrary<ChargeResult> = fc.record({
  allowed: fc.boolean(),
  reason: fc.constantFrom(null, "RATE_LIMITED" as const, "QUOTA_EXCEEDED" as const, "INSUFFICIENT_CREDITS" as const),
  rate: fc.record({ limit: count, windowSeconds: fc.constantFrom(1, 60, 3600, 86_400, 17), remaining: count, resetSeconds: count }),
  retryAfterSeconds: fc.option(count, { nil: null }),
  quota: fc.option(fc.record({ limit: count, remaining: count, resetAtMs: count }), { nil: null }),
  credits: fc.option(fc.record({ balance: count }), { nil: null }),
  spent: fc.constant(null),
});

const allowArb: fc.Arbitrary<Allow> = fc.record({
  allow: fc.constant(true as const),
  snapshot: snapshotArb,
  credentialHeader: fc.constantFrom("authorization", "x-api-key", ""),
  route: fc.constant({ requiredScopes: [], projectId: null, cost: 1 }),
  limits: fc.option(limitsArb, { nil: null }),
});

const reasons = Object.keys(DENIALS) as DenyReason[];
const denyArb: fc.Arbitrary<Deny> = fc
  .record({
    reason: fc.constantFrom(...reasons),
    custom: fc.option(text, { nil: undefined }),
    retryAfterSeconds: fc.option(count, { nil: undefined }),
    limits: fc.option(limitsArb, { nil: undefined }),
  })
  .map(({ reason, custom, retryAfterSeconds, limits }) => {
    const deny: Deny = { allow: false, reason, message: custom ?? DENIALS[reason].message };
    if (retryAfterSeconds !== undefined) deny.retryAfterSeconds = retryAfterSeconds;
    if (limits !== undefined) deny.limits = limits;
    return deny;
  });

const clientHeaders = fc.array(fc.constantFrom("authorization", "x-api-key", "accept", "x-keygate-key-id", "x-keygate-spoof", "X-Keygate-Plan", "x-keygate-project-id"), { maxLength: 6 });

function same(decision: Decision, names: string[], requestId: string, nowMs: number): void {
  const encoded = encodeCheckResponse(decision, names, requestId, nowMs);
  expect(Buffer.from(encoded).toString("hex")).toBe(Buffer.from(toBinary(CheckResponseSchema, toCheckResponse(decision, names, requestId, nowMs))).toString("hex"));
}

describe("Check response encoding happy", () => {
  it("encodes every allow byte for byte as protobuf-es encodes the message", () => {
    fc.assert(
      fc.property(allowArb, clientHeaders, text, count, (allow, names, requestId, nowMs) => {
        same(allow, names, requestId, nowMs);
        // Again for the same snapshot: now from the parts kept for it.
        same(allow, names, requestId, nowMs + 1000);
      }),
      { numRuns: 300 },
    );
  });

  it("encodes every denial byte for byte as protobuf-es encodes the message", () => {
    fc.assert(
      fc.property(denyArb, text, count, (deny, requestId, nowMs) => {
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
