/**
 * CPU of the two ends of a cached Check, in process: decoding the bench's CheckRequest (433 bytes,
 * ten headers; bench/data.ts) and encoding an allow for keys held as L1 holds them, one key again
 * and again or many in turn (the identity table then misses, as under the bench's 20,000 hot
 * keys). Each figure is the best of five rounds of 500,000 calls, GC included. Run it on a core of
 * its own; not part of `npm test`.
 *
 *   taskset -c 1 npx tsx scripts/measure-check-codec.ts [keys ...]    (default: 1 20000)
 */
import { toBinary } from "@bufbuild/protobuf";
import { checkRequest } from "../bench/data.js";
import { decodeCheckRequest } from "../src/authz/check-request.js";
import type { Allow } from "../src/authz/pipeline.js";
import { NO_REQUIREMENTS } from "../src/authz/routes.js";
import { encodeCheckResponse } from "../src/authz/to-envoy.js";
import { MemoryCache } from "../src/cache/memory.js";
import { CheckRequestSchema } from "../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import { newKeyId } from "../src/keys/ids.js";
import type { ChargeResult } from "../src/limits/limits.js";
import type { KeySnapshot } from "../src/store/store.js";

const CALLS = 500_000;
const ROUNDS = 5;
// The header names of bench/data.ts's request, which an allow scans for spoofed identity headers.
const CLIENT_HEADER_NAMES = [":authority", ":method", ":path", ":scheme", "accept", "accept-encoding", "user-agent", "x-forwarded-proto", "x-request-id", "authorization"];

/** Nanoseconds a call of `call(i)`, the best of ROUNDS rounds. */
function measure(call: (i: number) => number): number {
  let best = Number.POSITIVE_INFINITY;
  let sink = 0;
  for (let round = 0; round < ROUNDS; round++) {
    const started = process.hrtime.bigint();
    for (let i = 0; i < CALLS; i++) sink += call(i);
    best = Math.min(best, Number(process.hrtime.bigint() - started) / CALLS);
  }
  if (sink === 0) throw new Error("nothing measured");
  return best;
}

/** `count` allows for distinct keys (10,000 accounts, two scopes, one plan), their snapshots as L1 keeps them. */
function allows(count: number): Allow[] {
  const cache = new MemoryCache({ maxEntries: count, ttlSeconds: 3600, negativeMaxEntries: 1, negativeTtlSeconds: 1 });
  return Array.from({ length: count }, (_, i): Allow => {
    const ownerId = `acct_${String(i % 10_000).padStart(6, "0")}`;
    const snapshot: KeySnapshot = {
      key: {
        id: newKeyId(), hash: `hash-${i}`, ownerId, projectId: null, name: "bench", mode: "live", start: "kg_live_abcd", last4: "wxyz",
        scopes: ["read", "write"], metadata: {}, createdAtMs: 0, lastUsedAtMs: null, expiresAtMs: null, revokedAtMs: null,
        revokeReason: null, graceEndsAtMs: null, rotatedToId: null, rateLimit: null, disabledAtMs: null,
      },
      account: { ownerId, plan: "pro", subscriptionStatus: "active", role: "standard", createdAtMs: 0, updatedAtMs: 0 },
    };
    cache.set(snapshot.key.hash, snapshot);
    const cached = cache.get(snapshot.key.hash);
    if (cached === undefined || cached === null) throw new Error("L1 did not keep the snapshot");
    const limits: ChargeResult = {
      allowed: true, reason: null, rate: { limit: 6000, windowSeconds: 60, remaining: 5000 + (i % 900), resetSeconds: 31 },
      retryAfterSeconds: null, quota: null, credits: null, spent: null, replayed: false,
    };
    return { allow: true, snapshot: cached, credentialHeaders: ["authorization"], route: NO_REQUIREMENTS, limits, forwarded: [] };
  });
}

const keyCounts = process.argv.slice(2).map(Number);
const requests = Array.from({ length: 64 }, (_, i) => Buffer.from(toBinary(CheckRequestSchema, checkRequest(`kg_live_${"x".repeat(40)}${i}`, i))));
console.log(`decode: ${measure((i) => decodeCheckRequest(requests[i & 63] as Buffer).attributes?.request?.http?.path.length ?? 0).toFixed(0)} ns a request (${(requests[0] as Buffer).length} bytes)`);
const nowMs = Date.now();
for (const count of keyCounts.length > 0 ? keyCounts : [1, 20_000]) {
  const decisions = allows(count);
  const ns = measure((i) => encodeCheckResponse(decisions[i % count] as Allow, CLIENT_HEADER_NAMES, "req", nowMs, true).length);
  console.log(`encode an allow, ${count} key${count === 1 ? "" : "s"} in turn: ${ns.toFixed(0)} ns`);
}
