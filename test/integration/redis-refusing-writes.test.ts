import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Redis } from "ioredis";
import { afterAll, describe, expect, it } from "vitest";
import { TEST_POLICY, checkInit, checkOutcome, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { until } from "../harness/poll.js";
import { requireServer } from "../harness/ports.js";
import { redisAvailable, redisCommand, startRedis } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";
import { startTcpRelay } from "../harness/tcp-relay.js";
import type { TcpRelay } from "../harness/tcp-relay.js";

// A Redis that still answers reads and PUBLISH but refuses every write: a master demoted to a
// replica under a plain redis:// URL (READONLY), or one full under the noeviction policy README
// requires (OOM). A revocation's L2 invalidation then fails while L2 still holds the key's
// snapshot and heartbeats (a bare PUBLISH) kept coming back: the replica that took RevokeKey
// and every other one kept allowing the key from L2 or L1 for the entry's lifetime. Now a failed
// L2 invalidation makes every replica stop reading L2 (an `all` on the bus), and a heartbeat is a
// write, so such a Redis counts as lost.

const ready = requireServer("redis-server", redisAvailable(), "apt-get install redis-server") && (process.env["KEYGATE_TEST_REDIS_URL"] ?? "") === "";
const POLL = { intervalMs: 50, retryErrors: true } as const;

type Outcome = { status: number; code: string | null } | string;

async function outcome(kg: TestKeygate, secret: string): Promise<Outcome> {
  try {
    return checkOutcome(await kg.check(checkInit({ "x-api-key": secret })));
  } catch (error) {
    return `grpc ${(error as { code?: number }).code}`;
  }
}

async function replication(port: number): Promise<string> {
  return String(await redisCommand(port, "INFO", "replication"));
}

/** Replication without files: a full sync would otherwise write an RDB into the working directory. */
async function disklessReplication(...ports: number[]): Promise<void> {
  for (const port of ports) {
    await redisCommand(port, "CONFIG", "SET", "repl-diskless-load", "swapdb");
    await redisCommand(port, "CONFIG", "SET", "repl-diskless-sync", "yes");
    await redisCommand(port, "CONFIG", "SET", "repl-diskless-sync-delay", "0");
  }
}

/** `from` becomes `to`'s replica holding the same data; then `to` is promoted and `from` demoted. */
async function failOver(from: RedisServer, to: RedisServer): Promise<void> {
  await disklessReplication(from.port, to.port);
  await redisCommand(to.port, "REPLICAOF", "127.0.0.1", String(from.port));
  await until(async () => (await replication(to.port)).includes("master_link_status:up"), 20_000, "the new master in sync", POLL);
  await redisCommand(to.port, "REPLICAOF", "NO", "ONE");
  await redisCommand(from.port, "REPLICAOF", "127.0.0.1", String(to.port));
  await until(async () => (await replication(from.port)).includes("master_link_status:up"), 20_000, "the old master following the new one", POLL);
}

/** Two replicas on one store and one Redis; a key both have checked (their L1s and L2 hold it). */
async function twoReplicasWithACachedKey(redis: RedisServer, dataDir: string, ownerId: string): Promise<{ a: TestKeygate; b: TestKeygate; id: string; secret: string }> {
  const env = { KEYGATE_REDIS_URL: redis.url };
  const a = await startKeygate({ policy: TEST_POLICY, dataDir, env });
  const b = await startKeygate({ policy: TEST_POLICY, dataDir, env });
  await a.admin.upsertAccount({ ownerId, plan: "business" });
  const created = await a.admin.createKey({ ownerId, name: "k" });
  const secret = created.secret;
  expect(await outcome(a, secret)).toEqual({ status: 200, code: null });
  expect(await outcome(b, secret)).toEqual({ status: 200, code: null });
  await until(async () => ((await redisCommand(redis.port, "KEYS", "kg:snap:*")) as unknown[]).length === 1, 10_000, "the key's snapshot in L2", POLL);
  return { a, b, id: created.key?.id ?? "", secret };
}

/** Revokes through `a`; the store change is made whatever RevokeKey answers. */
async function revoke(a: TestKeygate, id: string): Promise<number | "OK"> {
  const answered = await a.admin.revokeKey({ id, reason: "leaked" }).then(
    () => "OK" as const,
    (error: unknown) => (error as { code: number }).code,
  );
  expect((await a.admin.getKey({ id })).key?.state).toBe("revoked");
  return answered;
}

/** Polls both replicas until each refuses the key (at most 15 s, as revocation-frozen-redis does). */
async function bothRefuse(a: TestKeygate, b: TestKeygate, secret: string): Promise<Outcome[]> {
  const last: Outcome[] = ["none", "none"];
  await until(
    async () => {
      last[0] = await outcome(a, secret);
      last[1] = await outcome(b, secret);
      return last.every((seen) => typeof seen !== "string" && seen.status === 401);
    },
    15_000,
    "both replicas refusing the revoked key",
    POLL,
  ).catch(() => undefined);
  return last;
}

async function heartbeatRefused(kg: TestKeygate, error: string): Promise<void> {
  await until(() => kg.logLines.some((line) => line.includes("heartbeats stopped coming back") && line.includes(`"heartbeatError":"${error}`)), 15_000, `a ${error} heartbeat logged`, POLL);
}

describe.runIf(ready)("a Redis that refuses writes but answers reads and PUBLISH", () => {
  const stops: Array<() => Promise<unknown>> = [];
  const dirs: string[] = [];

  afterAll(async () => {
    for (const stop of stops.reverse()) await stop().catch(() => undefined);
    for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
  });

  async function redisServer(): Promise<RedisServer> {
    const started = await startRedis();
    if (started === null) throw new Error("redis-server is not on PATH");
    stops.push(() => started.stop());
    return started;
  }

  function dataDir(): string {
    const dir = mkdtempSync(join(tmpdir(), "keygate-refusing-writes-"));
    dirs.push(dir);
    return dir;
  }

  it("a master demoted under a plain URL (READONLY): the revoked key is refused by both replicas, and the heartbeats count Redis lost", async () => {
    const first = await redisServer();
    const second = await redisServer();
    const { a, b, id, secret } = await twoReplicasWithACachedKey(first, dataDir(), "readonly-owner");
    stops.push(() => a.stop(), () => b.stop());

    await failOver(first, second);
    expect(((await redisCommand(first.port, "KEYS", "kg:snap:*")) as unknown[]).length).toBe(1);

    expect(await revoke(a, id)).toBe(14);
    expect(await bothRefuse(a, b, secret)).toEqual([
      { status: 401, code: "KEY_REVOKED" },
      { status: 401, code: "KEY_REVOKED" },
    ]);
    await heartbeatRefused(a, "READONLY");
    await heartbeatRefused(b, "READONLY");
  }, 90_000);

  it("a full Redis under noeviction (OOM): the revoked key is refused by both replicas, and the heartbeats count Redis lost", async () => {
    const redis = await redisServer();
    const { a, b, id, secret } = await twoReplicasWithACachedKey(redis, dataDir(), "oom-owner");
    stops.push(() => a.stop(), () => b.stop());

    expect(await redisCommand(redis.port, "CONFIG", "GET", "maxmemory-policy")).toEqual(["maxmemory-policy", "noeviction"]);
    await redisCommand(redis.port, "CONFIG", "SET", "maxmemory", "1");
    stops.push(() => redisCommand(redis.port, "CONFIG", "SET", "maxmemory", "0"));
    await expect(redisCommand(redis.port, "SET", "kg-test-probe", "x")).rejects.toThrow(/^OOM/);

    expect(await revoke(a, id)).toBe(14);
    expect(await bothRefuse(a, b, secret)).toEqual([
      { status: 401, code: "KEY_REVOKED" },
      { status: 401, code: "KEY_REVOKED" },
    ]);
    await heartbeatRefused(a, "OOM");
    await heartbeatRefused(b, "OOM");
  }, 90_000);

  it("a managed endpoint that moved to the new master: charged Checks are decided in Redis again (fail-closed)", async () => {
    const first = await redisServer();
    const second = await redisServer();
    // The endpoint's name: new connections go where it points, open ones stay where they are.
    const relay: TcpRelay = await startTcpRelay(first.port);
    stops.push(() => relay.close());
    const kg = await startKeygate({ policy: { ...TEST_POLICY, limits: { onRedisError: "fail-closed" } }, env: { KEYGATE_REDIS_URL: `redis://127.0.0.1:${relay.port}` } });
    stops.push(() => kg.stop());
    const ownerId = "endpoint-owner";
    await kg.admin.upsertAccount({ ownerId, plan: "business" });
    const { secret } = await kg.admin.createKey({ ownerId, name: "k" });
    expect(await outcome(kg, secret)).toEqual({ status: 200, code: null });

    await disklessReplication(first.port, second.port);
    await redisCommand(second.port, "REPLICAOF", "127.0.0.1", String(first.port));
    await until(async () => (await replication(second.port)).includes("master_link_status:up"), 20_000, "the new master in sync", POLL);
    await redisCommand(second.port, "REPLICAOF", "NO", "ONE");
    relay.retarget(second.port);
    await redisCommand(first.port, "REPLICAOF", "127.0.0.1", String(second.port));
    await until(async () => (await replication(first.port)).includes("master_link_status:up"), 20_000, "the old master following the new one", POLL);
    const direct = new Redis({ host: "127.0.0.1", port: relay.port, lazyConnect: true, maxRetriesPerRequest: 0 });
    await direct.connect();
    expect(await direct.set("kg-test-endpoint-probe", "1", "PX", 1000)).toBe("OK");
    direct.disconnect();

    // The first charge after the failover may meet READONLY (fail-closed: UNAVAILABLE); then the
    // connection follows the endpoint and every Check is decided, counted on the new master.
    let last: Outcome = "none";
    await until(
      async () => {
        last = await outcome(kg, secret);
        return typeof last !== "string";
      },
      15_000,
      "a charged Check decided again",
      POLL,
    ).catch(() => undefined);
    expect(last).toEqual({ status: 200, code: null });
    const before = ((await redisCommand(second.port, "KEYS", "kg:rl:*")) as unknown[]).length;
    expect(before).toBeGreaterThan(0);
    for (let i = 0; i < 5; i++) expect(await outcome(kg, secret)).toEqual({ status: 200, code: null });
  }, 90_000);
});
