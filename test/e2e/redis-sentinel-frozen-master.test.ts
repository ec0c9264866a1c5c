import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { stringify } from "yaml";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { DEFAULT_POLICY_INPUT } from "../../src/config.js";
import { ADMIN_TOKEN, TEST_POLICY, postJson } from "../harness/keygate.js";
import { mongoWireAvailable, startMongoWire } from "../harness/mongo-wire.js";
import type { MongoWire } from "../harness/mongo-wire.js";
import { requireServer } from "../harness/ports.js";
import { sharedBackendEnv, spawnKeygate } from "../harness/process.js";
import type { KeygateProcess } from "../harness/process.js";
import { redisAvailable, redisCommand, startRedisSentinel, waitFor } from "../harness/redis-server.js";
import type { RedisSentinelSet } from "../harness/redis-server.js";

// Two keygate replicas on a Sentinel-managed Redis whose master is frozen (SIGSTOP: as a hung VM,
// or a partition that drops packets, it keeps every socket open and answers nothing). The
// Sentinels promote the replica; keygate must follow them to it although the old master never
// closes its connections: its changes reach Redis again (RevokeKey 200), the other replica hears
// them on its subscriber, and limits are counted in Redis on the new master, all while the old
// master stays frozen.

const ready =
  requireServer("redis-server", redisAvailable(), "apt-get install redis-server") &&
  requireServer("MongoDB-wire server", mongoWireAvailable(), "run .ci/install-mongo-wire.sh");

/** The bound DESIGN.md sets: a revoked key is refused by every replica within 1 s. */
const REVOCATION_BOUND_MS = 1000;
/**
 * How long after the promotion keygate may take to be on the new master: 2 s of heartbeat
 * silence (the subscriber) or 3 s of a socket with no answer while a command waits (the other
 * connections), a reconnect (its back-off reaches 2 s) and a master asked of the Sentinels; with
 * room for a busy machine.
 */
const FOLLOW_BOUND_MS = 15_000;
const OWNER = "frozen-owner";

/** A roomy rate limit and daily quota: the daily count in Redis shows where a Check was charged. */
const POLICY = {
  ...TEST_POLICY,
  plans: { ...DEFAULT_POLICY_INPUT.plans, business: { maxActiveKeys: 10, rateLimit: { limit: 1_000_000, windowSeconds: 60 }, dailyQuota: 1_000_000, monthlyCredits: null } },
};

async function check(replica: KeygateProcess, secret: string): Promise<number> {
  try {
    const res = await fetch(`http://127.0.0.1:${replica.ports.http}/check/v1/things`, { headers: { "x-api-key": secret }, signal: AbortSignal.timeout(10_000) });
    await res.arrayBuffer();
    return res.status;
  } catch {
    return -1;
  }
}

async function issue(replica: KeygateProcess, name: string): Promise<{ id: string; secret: string }> {
  const created = await postJson(replica.ports.admin, "CreateKey", { ownerId: OWNER, name });
  expect(created.status, JSON.stringify(created.json)).toBe(200);
  const key = created.json["key"];
  const secret = created.json["secret"];
  if (typeof secret !== "string" || typeof key !== "object" || key === null || !("id" in key) || typeof key.id !== "string") {
    throw new Error(`unexpected CreateKey answer ${JSON.stringify(created.json)}`);
  }
  return { id: key.id, secret };
}

/** The owner's daily count on one Redis node (every quota counter of the owner, summed). */
async function dailyCount(port: number): Promise<number> {
  const keys = await redisCommand(port, "KEYS", `kg:q:${OWNER}:*`);
  if (!Array.isArray(keys)) throw new Error(`unexpected KEYS reply ${JSON.stringify(keys)}`);
  let total = 0;
  for (const key of keys) total += Number(await redisCommand(port, "GET", String(key)) ?? 0);
  return total;
}

describe.runIf(ready)("Sentinel: a frozen master is failed over", () => {
  let sentinel: RedisSentinelSet;
  let mongo: MongoWire;
  let a: KeygateProcess;
  let b: KeygateProcess;
  let dir: string;
  let frozenPid = 0;

  beforeAll(async () => {
    const [startedSentinel, startedMongo] = await Promise.all([startRedisSentinel(), startMongoWire()]);
    if (startedSentinel === null) throw new Error("redis-server is not on PATH");
    [sentinel, mongo] = [startedSentinel, startedMongo];
    dir = mkdtempSync(join(tmpdir(), "keygate-sentinel-frozen-"));
    const policy = join(dir, "policy.yaml");
    writeFileSync(policy, stringify(POLICY));
    const env = sharedBackendEnv({ mongoUri: mongo.uri, redisUrl: sentinel.url, pepper: "sentinel-test-pepper-0123456789abcdefghijkl", policyFile: policy, adminToken: ADMIN_TOKEN });
    [a, b] = await Promise.all([spawnKeygate({ cwd: dir, env }), spawnKeygate({ cwd: dir, env })]);
  }, 120_000);

  afterAll(async () => {
    if (frozenPid !== 0) {
      try {
        process.kill(frozenPid, "SIGCONT");
      } catch {
        // Already gone.
      }
    }
    await Promise.allSettled([a?.stop("SIGKILL"), b?.stop("SIGKILL")]);
    await Promise.allSettled([sentinel?.stop(), mongo?.stop()]);
    if (dir !== undefined) rmSync(dir, { recursive: true, force: true });
  });

  describe("error", () => {
    it("both replicas move to the promoted master while the old one stays frozen: changes answer 200, reach the other replica, and limits count in Redis", async () => {
      expect((await postJson(a.ports.admin, "UpsertAccount", { ownerId: OWNER, plan: "business" })).status).toBe(200);
      const revoked = await issue(a, "revoked");
      const valid = await issue(a, "valid");
      for (const replica of [a, b]) for (const key of [revoked, valid]) expect(await check(replica, key.secret)).toBe(200);

      const before = await sentinel.masterPort();
      frozenPid = Number(/process_id:(\d+)/.exec(String(await redisCommand(before, "INFO", "server")))?.[1] ?? "0");
      expect(frozenPid).toBeGreaterThan(0);
      process.kill(frozenPid, "SIGSTOP");
      const after = await sentinel.awaitNewMaster(before);
      const promotedAt = performance.now();

      // A change is saved and told to every replica once keygate writes on the new master;
      // until then it is saved and answered 503, and sent again.
      const answers: number[] = [];
      await waitFor(
        async () => {
          const answer = await postJson(a.ports.admin, "UpsertAccount", { ownerId: OWNER, plan: "business" });
          answers.push(answer.status);
          return answer.status === 200;
        },
        FOLLOW_BOUND_MS,
        "UpsertAccount answering 200 with the old master frozen",
      );
      expect(answers.filter((status) => status !== 200 && status !== 503)).toEqual([]);

      // Each replica's charges land on the new master: a Check adds exactly 1 to the daily count
      // there (the in-process fallback would add nothing). Checks of a valid key pass throughout.
      const checks: number[] = [];
      for (const replica of [a, b]) {
        await waitFor(
          async () => {
            const counted = await dailyCount(after);
            checks.push(await check(replica, valid.secret));
            return (await dailyCount(after)) === counted + 1;
          },
          FOLLOW_BOUND_MS,
          "a Check charged in Redis on the new master",
        );
      }
      expect(checks.filter((status) => status !== 200)).toEqual([]);
      const followedMs = performance.now() - promotedAt;

      // B's subscriber listens on the new master: with its invalidation bus live, B keeps the key
      // in L1 for the cache TTL (30 s), so only the invalidation can make it refuse within 1 s.
      expect(await check(b, revoked.secret)).toBe(200);
      const revoke = await postJson(a.ports.admin, "RevokeKey", { id: revoked.id });
      expect(revoke.status, JSON.stringify(revoke.json)).toBe(200);
      const ackMs = performance.now();
      await waitFor(async () => (await check(b, revoked.secret)) === 401, REVOCATION_BOUND_MS, "replica B refusing the revoked key");
      expect(await check(a, revoked.secret)).toBe(401);
      expect(await check(b, valid.secret)).toBe(200);
      console.log(`frozen master: on the new master ${(followedMs / 1000).toFixed(1)} s after the promotion (UpsertAccount answered ${JSON.stringify(answers)}); revocation A -> B ${(performance.now() - ackMs).toFixed(0)} ms`);

      // Still frozen: nothing above came from the old master thawing.
      expect(String(await redisCommand(sentinel.sentinelPorts[0] ?? 0, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", sentinel.masterName))).toContain(String(after));
      expect(readFileSync(`/proc/${frozenPid}/stat`, "utf8").split(") ")[1]?.[0]).toBe("T");

      // Connection errors are logged once per distinct error and connection (main, subscriber,
      // invalidator) until it is ready again, not once per reconnect attempt.
      for (const replica of [a, b]) {
        const errors = replica.stdout().split("\n").filter((line) => line.includes('"msg":"Redis connection error"')).map((line) => String(JSON.parse(line).err?.message));
        const counts = new Map<string, number>();
        for (const message of errors) counts.set(message, (counts.get(message) ?? 0) + 1);
        expect([...counts.values()].every((n) => n <= 3), JSON.stringify([...counts])).toBe(true);
      }
    }, 90_000);
  });
});
