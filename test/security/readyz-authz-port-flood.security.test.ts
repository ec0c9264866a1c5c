import { afterAll, beforeAll, describe, expect, it, vi } from "vitest";
import { SqliteKeyStore } from "../../src/store/sqlite.js";
import { startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

// /readyz on the HTTP authorization port pings the store. An unauthenticated flood of
// /readyz there must cost the store at most one ping per freshness window (sharedPing), not one
// per request.
describe("8181/readyz flood and store pings", { timeout: 120_000 }, () => {
  let kg: TestKeygate;
  const ping = vi.spyOn(SqliteKeyStore.prototype, "ping");

  beforeAll(async () => {
    kg = await startKeygate();
  }, 120_000);

  afterAll(async () => {
    await kg?.stop().catch(() => undefined);
    ping.mockRestore();
  });

  it("1,000 concurrent /readyz on the authorization port cost at most 2 store pings", async () => {
    ping.mockClear();
    const started = performance.now();
    const statuses = await Promise.all(
      Array.from({ length: 1000 }, async () => {
        const res = await fetch(`http://127.0.0.1:${kg.ports.http}/readyz`);
        await res.text();
        return res.status;
      }),
    );
    const elapsedMs = performance.now() - started;
    expect(statuses.filter((s) => s !== 200)).toEqual([]);
    // One ping per READINESS_PING_FRESH_MS (1 s) at most while they run.
    expect(ping.mock.calls.length).toBeLessThanOrEqual(Math.ceil(elapsedMs / 1000) + 1);
    expect(ping.mock.calls.length).toBeGreaterThanOrEqual(1);
    console.log(`pings=${ping.mock.calls.length} elapsedMs=${Math.round(elapsedMs)}`);
  });
});
