import { Code, ConnectError } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { TestClock } from "../harness/clock.js";
import { startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

let kg: TestKeygate;
const clock = new TestClock();
beforeAll(async () => {
  clock.freeze("2026-12-03T12:00:00.000Z");
  kg = await startKeygate({ clock });
});
afterAll(async () => kg.stop());

// What the proto, the README and the CLI's help say of GetUsage's range and ChargeUsage's codes.
describe("documented edges", () => {
  it("GetUsage takes `to` up to 366 days after `from`, and refuses one day more naming the bound", async () => {
    await kg.admin.upsertAccount({ ownerId: "span-owner" });
    const report = await kg.admin.getUsage({ ownerId: "span-owner", from: "2025-01-01", to: "2026-01-02" });
    expect(report.totals?.allowed).toBe(0n);
    const refused = await kg.admin.getUsage({ ownerId: "span-owner", from: "2025-01-01", to: "2026-01-03" }).then(
      () => null,
      (error: unknown) => (error instanceof ConnectError ? [error.code, error.rawMessage] : error),
    );
    expect(refused).toEqual([Code.InvalidArgument, "to: must be at most 366 days after from"]);
  });

  it("ChargeUsage of a rotated key whose grace ended answers KEY_REVOKED, as a Check would", async () => {
    const created = await kg.admin.createKey({ ownerId: "rot-owner", name: "r" });
    await kg.admin.rotateKey({ id: created.key?.id ?? "", graceDays: 1 });
    clock.advanceMs(2 * 86_400_000);
    const answer = await kg.admin.chargeUsage({ keyId: created.key?.id ?? "", cost: 0n, idempotencyKey: "after-grace" });
    expect([answer.charged, answer.code]).toEqual([false, "KEY_REVOKED"]);
  });
});
