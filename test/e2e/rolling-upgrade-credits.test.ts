import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { postJson } from "../harness/keygate.js";
import type { KeygateProcess } from "../harness/process.js";
import { redisCommand } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";
import { checkReplica, rollingUpgradeServers, startRollingUpgrade } from "../harness/rolling-upgrade.js";
import type { Answer, RollingUpgrade } from "../harness/rolling-upgrade.js";

// Credit balances across a rolling upgrade (README, "so a rolling upgrade keeps every credit
// balance and quota count"): a replica of the previous release and one of this keygate share
// MongoDB and Redis. The release loads a balance into kg:c:<owner> with period, monthly_used and
// topup, and no `seen`, the top-up total this version records beside them. This version adopts
// such a hash rather than reloading it from the store, which lacks what the old replicas spent
// since their last usage flush (usageFlushSeconds 60 here, so none of this suite's spend is
// flushed unless a replica stops): a reload would give those credits back.
const RELEASE = "1dffb08";

const servers = rollingUpgradeServers(RELEASE);

const check = (replica: KeygateProcess, secret: string): Promise<Answer> => checkReplica(replica, secret, "rolling-credits");

/** `count` Checks in a row through one replica. */
async function checks(replica: KeygateProcess, secret: string, count: number): Promise<Answer[]> {
  const answers: Answer[] = [];
  for (let i = 0; i < count; i++) answers.push(await check(replica, secret));
  return answers;
}

/** A metered account and a key of it, made through `replica`; returns the key's secret. */
async function meteredKey(replica: KeygateProcess, ownerId: string): Promise<string> {
  expect((await postJson(replica.ports.admin, "UpsertAccount", { ownerId, plan: "metered" })).status).toBe(200);
  const created = await postJson(replica.ports.admin, "CreateKey", { ownerId, name: "rolling credits" });
  expect(created.status, JSON.stringify(created.json)).toBe(200);
  return created.json["secret"] as string;
}

async function addCredits(replica: KeygateProcess, ownerId: string, amount: number): Promise<void> {
  const answer = await postJson(replica.ports.admin, "AddCredits", { ownerId, amount: String(amount), reason: "rolling upgrade" });
  expect(answer.status, JSON.stringify(answer.json)).toBe(200);
}

/** The credit hash's fields, as a record. */
async function creditHash(redis: RedisServer, ownerId: string): Promise<Record<string, string>> {
  const flat = (await redisCommand(redis.port, "HGETALL", `kg:c:${ownerId}`)) as string[];
  const fields: Record<string, string> = {};
  for (let i = 0; i + 1 < flat.length; i += 2) fields[String(flat[i])] = String(flat[i + 1]);
  return fields;
}

/** The UTC month before this one, as the credit hash spells a period ("YYYY-MM"). */
function lastMonth(): string {
  const now = new Date();
  return new Date(Date.UTC(now.getUTCFullYear(), now.getUTCMonth() - 1, 1)).toISOString().slice(0, 7);
}

const ALLOWANCE = 5;

const POLICY = `
defaultPlan: metered
plans:
  metered:
    maxActiveKeys: 5
    rateLimit: { limit: 1000, windowSeconds: 60 }
    dailyQuota: null
    monthlyCredits: ${ALLOWANCE}
scopes:
  catalog: [read]
  default: [read]
routes:
  - { method: "*", pathPrefix: /v1, requiredScopes: [read], cost: 1 }
limits:
  usageFlushSeconds: 60
`;

describe.runIf(servers)(`credits across a rolling upgrade from ${RELEASE}: both versions on one MongoDB and one Redis`, () => {
  let upgrade: RollingUpgrade;
  let redis: RedisServer;
  let old: KeygateProcess;
  let current: KeygateProcess;

  beforeAll(async () => {
    // The old replica runs first, as before an upgrade; the new one joins it.
    upgrade = await startRollingUpgrade(RELEASE, { tempPrefix: "keygate-rolling-credits-", policy: POLICY });
    ({ redis, old, current } = upgrade);
  }, 180_000);

  afterAll(() => upgrade?.stop());

  it("a balance an old replica spent to zero stays spent on the new replica", async () => {
    const ownerId = "credits-spent";
    const secret = await meteredKey(old, ownerId);
    expect(await checks(old, secret, ALLOWANCE + 1)).toEqual(["allow", "allow", "allow", "allow", "allow", 402]);
    expect(await creditHash(redis, ownerId)).toEqual({ period: expect.any(String), monthly_used: "5", topup: "0" });
    // The store has none of that spend yet: reloaded from it, the balance would be 5 again.
    expect(await checks(current, secret, 3)).toEqual([402, 402, 402]);
    // Marked adopted: this version's next top-up drops it for a reload (credits-adopted-late-topup).
    expect(await creditHash(redis, ownerId)).toEqual({ period: expect.any(String), monthly_used: "5", topup: "0", seen: "0", adopted: "1" });
  });

  it("after the new replica adopts the balance, both replicas charge it and see each other's top-ups", async () => {
    const ownerId = "credits-shared";
    const secret = await meteredKey(old, ownerId);
    expect(await checks(old, secret, 3)).toEqual(["allow", "allow", "allow"]);
    expect(await checks(current, secret, 1)).toEqual(["allow"]);
    expect(await creditHash(redis, ownerId)).toMatchObject({ monthly_used: "4", seen: "0" });
    // The release charges the adopted hash with its own script, and keeps `seen`.
    expect(await checks(old, secret, 1)).toEqual(["allow"]);
    expect([await check(current, secret), await check(old, secret)]).toEqual([402, 402]);
    // A top-up through the release adds to the hash and leaves the store's top-up total alone.
    await addCredits(old, ownerId, 2);
    expect([await check(current, secret), await check(old, secret)]).toEqual(["allow", "allow"]);
    expect([await check(current, secret), await check(old, secret)]).toEqual([402, 402]);
    expect(await creditHash(redis, ownerId)).toEqual({ period: expect.any(String), monthly_used: "5", topup: "0", seen: "0", adopted: "1" });
  });

  it("a balance an old replica left in an earlier month starts the new month's allowance when adopted", async () => {
    const ownerId = "credits-last-month";
    const secret = await meteredKey(old, ownerId);
    expect(await check(old, secret)).toBe("allow");
    // As the release leaves it when the account spent its whole allowance last month.
    await redisCommand(redis.port, "HSET", `kg:c:${ownerId}`, "period", lastMonth(), "monthly_used", ALLOWANCE, "topup", 0);
    expect(await checks(current, secret, ALLOWANCE + 1)).toEqual(["allow", "allow", "allow", "allow", "allow", 402]);
    expect(await check(old, secret)).toBe(402);
    expect(await creditHash(redis, ownerId)).toMatchObject({ monthly_used: "5", topup: "0", seen: "0" });
    expect((await creditHash(redis, ownerId))["period"]).not.toBe(lastMonth());
  });

  // Last: it stops the old replica, so that the store has its spend.
  it("a top-up through the new replica before it charged the account is not lost to the adoption", async () => {
    const ownerId = "credits-topup-first";
    const secret = await meteredKey(old, ownerId);
    expect(await checks(old, secret, ALLOWANCE + 1)).toEqual(["allow", "allow", "allow", "allow", "allow", 402]);
    // A stopping replica flushes its usage: the store then has all 5 spent.
    expect(await old.stop("SIGTERM")).toBe(0);
    // The total (3) tells this version's ADD neither whether the release's hash has the top-up
    // nor how much to add, so it drops the hash; the balance reloads from the store.
    await addCredits(current, ownerId, 3);
    expect(await redisCommand(redis.port, "EXISTS", `kg:c:${ownerId}`)).toBe(0);
    expect(await checks(current, secret, 4)).toEqual(["allow", "allow", "allow", 402]);
    expect(await creditHash(redis, ownerId)).toEqual({ period: expect.any(String), monthly_used: "5", topup: "0", seen: "3" });
  });
});
