import { describe, expect, it } from "vitest";
import { TEST_POLICY, checkInit, checkOutcome, startKeygate } from "../harness/keygate.js";

// cache.ttlSeconds / negativeTtlSeconds take any positive number, and README says they may hold
// fractions of a second. The in-process L1 passed ttlSeconds * 1000 to lru-cache, which throws
// unless a TTL is a positive whole number: 16.1 s is 16100.000000000002 ms in floats, 2.01 s
// 2009.9999999999998 ms, 0.0005 s 0.5 ms, so keygate did not start ("ttl must be a positive
// integer if specified", naming no field), and a reload that took such a value broke the next
// restart. L1 now rounds to whole ms, at least 1, as the Redis L2 does
// (test/integration/redis-l2-fractional-ttl.test.ts).
describe.each([
  ["ttlSeconds", 16.1],
  ["ttlSeconds", 2.01],
  ["negativeTtlSeconds", 0.0005],
])("cache.%s: %s", (field, value) => {
  it("keygate starts (embedded, no Redis) and judges a Check through its cache", async () => {
    const kg = await startKeygate({ policy: { ...TEST_POLICY, cache: { [field]: value } } });
    try {
      const { secret } = await kg.admin.createKey({ ownerId: "l1-ttl", name: "k" });
      const outcomes = [];
      // The second Check is answered from L1.
      for (let i = 0; i < 2; i++) outcomes.push(checkOutcome(await kg.check(checkInit({ "x-api-key": secret }))).status);
      expect(outcomes).toEqual([200, 200]);
    } finally {
      await kg.stop();
    }
  });
});
