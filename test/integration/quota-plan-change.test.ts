import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { TestClock } from "../harness/clock.js";
import { httpCheck, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { LIMITS_POLICY } from "../harness/limits-policy.js";
import { requireServer } from "../harness/ports.js";
import { redisAvailable, startRedis } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";

/**
 * A plan change mid-day: the daily quota is "requests to metered routes per UTC day". Requests
 * made today while the plan was unlimited are stored as ALLOWED usage rows (GetUsage reports
 * them, and the embedded meter loads today's count from them after a restart), and both live
 * meters count them too, so a downgrade later in the day does not hand out a fresh quota.
 */
const POLICY = {
  ...LIMITS_POLICY,
  plans: { ...LIMITS_POLICY.plans, tiny: { maxActiveKeys: 5, rateLimit: { limit: 100, windowSeconds: 60 }, dailyQuota: 2, monthlyCredits: null } },
};
const T0 = "2026-11-22T12:00:00.000Z";

const ready = requireServer("redis-server", redisAvailable(), "apt-get install redis-server");

let redis: RedisServer | null = null;
beforeAll(async () => {
  if (ready) redis = await startRedis();
});
afterAll(async () => {
  await redis?.stop();
});

async function scenario(kg: TestKeygate, ownerId: string, startPlan: string): Promise<number[]> {
  await kg.admin.upsertAccount({ ownerId, plan: startPlan });
  const { secret } = await kg.admin.createKey({ ownerId, name: "k" });
  const get = async (): Promise<number> => (await httpCheck(kg.ports.http, "/check/v1/x", { "x-api-key": secret })).status;
  const statuses: number[] = [];
  if (startPlan === "tiny") statuses.push(await get()); // 1 of 2 used; the count is loaded
  await kg.admin.upsertAccount({ ownerId, plan: "small" }); // upgrade: no daily quota
  for (let i = 0; i < 3; i++) statuses.push(await get());
  await kg.admin.upsertAccount({ ownerId, plan: "tiny" }); // downgrade: 2 a day
  statuses.push(await get());
  const usage = await kg.admin.getUsage({ ownerId, from: "2026-11-22", to: "2026-11-22" });
  // GetUsage counts the same requests the meter did.
  expect(Number(usage.totals?.allowed ?? 0)).toBe(statuses.filter((s) => s === 200).length);
  return statuses;
}

describe.skipIf(!ready)("a downgrade mid-day counts the day's requests made while unlimited", () => {
  it("with Redis: the request after the downgrade is refused (QUOTA_EXCEEDED)", async () => {
    const dataDir = mkdtempSync(join(tmpdir(), "kg-billing-"));
    const clock = new TestClock();
    clock.freeze(T0);
    if (redis === null) throw new Error("redis-server did not start");
    const kg = await startKeygate({ dataDir, policy: POLICY, clock, env: { KEYGATE_REDIS_URL: redis.url } });
    try {
      const statuses = await scenario(kg, "down-redis", "small");
      // 3 metered requests today, and the plan now allows 2.
      expect(statuses).toEqual([200, 200, 200, 402]);
    } finally {
      await kg.stop();
      rmSync(dataDir, { recursive: true, force: true });
    }
  });

  it("embedded, count loaded before the upgrade: the request after the downgrade is refused", async () => {
    const clock = new TestClock();
    clock.freeze(T0);
    const kg = await startKeygate({ policy: POLICY, clock });
    try {
      const statuses = await scenario(kg, "down-embedded", "tiny");
      // 4 metered requests today, and the plan now allows 2.
      expect(statuses).toEqual([200, 200, 200, 200, 402]);
    } finally {
      await kg.stop();
    }
  });

  it("control: embedded, count first loaded after the downgrade (as after any restart): refused", async () => {
    const clock = new TestClock();
    clock.freeze(T0);
    const kg = await startKeygate({ policy: POLICY, clock });
    try {
      expect(await scenario(kg, "down-embedded-fresh", "small")).toEqual([200, 200, 200, 402]);
    } finally {
      await kg.stop();
    }
  });
});
