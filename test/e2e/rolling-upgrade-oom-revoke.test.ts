import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { postJson } from "../harness/keygate.js";
import { untilValue } from "../harness/poll.js";
import type { KeygateProcess } from "../harness/process.js";
import { redisCommand } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";
import { checkReplica, rollingUpgradeServers, startRollingUpgrade } from "../harness/rolling-upgrade.js";
import type { Answer, RollingUpgrade } from "../harness/rolling-upgrade.js";

/** Polls every 50 ms: each probe is a Check through a replica, and nothing here times the wait. */
const POLL = { intervalMs: 50 } as const;

// A Redis full under noeviction (OOM) during a rolling upgrade. This version drops a key's or an
// owner's L2 entries in a script that first writes the invalidation's generation and marker, and
// Redis refuses such a script whole under OOM; the change's `all` then clears every replica's L1.
// A 1dffb08 replica reads L2 without generations: with its own entry (plain JSON) left in place,
// its next Check read it and the revoked key passed for the entry's lifetime (30 s), where
// between two 1dffb08 replicas the revocation's plain DEL, which Redis allows under OOM, had
// dropped it. So the entries are deleted with plain DELs when the script is refused.
const RELEASE = "1dffb08";

const servers = rollingUpgradeServers(RELEASE);

const check = (replica: KeygateProcess, secret: string): Promise<Answer> => checkReplica(replica, secret, "oom");

async function createKey(replica: KeygateProcess, ownerId: string): Promise<{ id: string; secret: string }> {
  expect((await postJson(replica.ports.admin, "UpsertAccount", { ownerId, plan: "business", subscriptionStatus: "active" })).status).toBe(200);
  const answer = await postJson(replica.ports.admin, "CreateKey", { ownerId, name: "oom" });
  expect(answer.status, JSON.stringify(answer.json)).toBe(200);
  return { id: (answer.json["key"] as { id: string }).id, secret: answer.json["secret"] as string };
}

describe.runIf(servers)(`rolling upgrade from ${RELEASE}: a change made through this version while Redis is out of memory`, () => {
  let upgrade: RollingUpgrade;
  let redis: RedisServer;
  let old: KeygateProcess;
  let current: KeygateProcess;

  /** Has the old replica cache the key (L1, and L2 in its own format), then fills Redis. */
  async function cachedByOldThenFull(secret: string): Promise<string> {
    expect(await check(old, secret)).toBe("allow");
    const entries = (await redisCommand(redis.port, "KEYS", "kg:snap:*")) as string[];
    expect(entries.length).toBe(1);
    const entry = entries[0] ?? "";
    // Plain JSON: no "<generation>|" in front, which this version would read as not cached.
    expect(String(await redisCommand(redis.port, "GET", entry))).toMatch(/^\{/);
    expect(await redisCommand(redis.port, "CONFIG", "GET", "maxmemory-policy")).toEqual(["maxmemory-policy", "noeviction"]);
    await redisCommand(redis.port, "CONFIG", "SET", "maxmemory", "1");
    await expect(redisCommand(redis.port, "SET", "kg-test-probe", "x")).rejects.toThrow(/^OOM/);
    return entry;
  }

  /** The old replica's answers until it gives `expected`, within 5 s. */
  async function oldAnswers(secret: string, expected: Answer): Promise<Answer> {
    const seen: Answer[] = [];
    const { value } = await untilValue(
      async () => {
        const answer = await check(old, secret);
        seen.push(answer);
        return answer;
      },
      (answer) => answer === expected,
      5000,
      `the old replica answering ${expected}`,
      { ...POLL, detail: () => `; its answers: ${seen.filter((answer) => answer === "allow").length} allows of ${seen.length}` },
    );
    return value;
  }

  beforeAll(async () => {
    upgrade = await startRollingUpgrade(RELEASE, { tempPrefix: "keygate-rolling-oom-" });
    ({ redis, old, current } = upgrade);
  }, 180_000);

  afterEach(async () => {
    await redisCommand(redis.port, "CONFIG", "SET", "maxmemory", "0");
    await redisCommand(redis.port, "FLUSHALL");
  });

  afterAll(() => upgrade?.stop());

  it("a key revoked through this version is refused by the old replica within 5 s", async () => {
    const key = await createKey(current, "oom-revoke");
    const entry = await cachedByOldThenFull(key.secret);

    // UNAVAILABLE: the invalidation could not be written whole. The store has the key revoked.
    expect((await postJson(current.ports.admin, "RevokeKey", { id: key.id, reason: "leaked" })).status).toBe(503);
    const got = await postJson(current.ports.admin, "GetKey", { id: key.id });
    expect((got.json["key"] as { revokedAt?: string }).revokedAt).toEqual(expect.any(String));
    expect(await check(current, key.secret)).toBe(401);

    expect(await oldAnswers(key.secret, 401)).toBe(401);
    // Deleted, not only skipped by this version: the old replica reads it as valid.
    expect(await redisCommand(redis.port, "EXISTS", entry)).toBe(0);
  }, 60_000);

  it("an account cancelled through this version is refused by the old replica within 5 s", async () => {
    const key = await createKey(current, "oom-cancel");
    const entry = await cachedByOldThenFull(key.secret);

    expect((await postJson(current.ports.admin, "UpsertAccount", { ownerId: "oom-cancel", subscriptionStatus: "canceled" })).status).toBe(503);
    expect(await check(current, key.secret)).toBe(402);

    expect(await oldAnswers(key.secret, 402)).toBe(402);
    // Deleted, not only skipped by this version: the old replica reads it as valid.
    expect(await redisCommand(redis.port, "EXISTS", entry)).toBe(0);
  }, 60_000);
});
