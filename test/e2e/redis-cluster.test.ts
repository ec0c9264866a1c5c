import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Cluster } from "ioredis";
import { stringify } from "yaml";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ADMIN_TOKEN, postJson } from "../harness/keygate.js";
import { LIMITS_POLICY } from "../harness/limits-policy.js";
import { mongoWireAvailable, startMongoWire } from "../harness/mongo-wire.js";
import type { MongoWire } from "../harness/mongo-wire.js";
import { until } from "../harness/poll.js";
import { requireServer } from "../harness/ports.js";
import { sharedBackendEnv, spawnKeygate } from "../harness/process.js";
import type { KeygateProcess } from "../harness/process.js";
import { redisCommand, redisTopologyAvailable, startRedisCluster } from "../harness/redis-server.js";
import type { RedisClusterSet } from "../harness/redis-server.js";

// Two keygate replicas on one MongoDB and a real three-master Redis Cluster: every limit is one
// atomic script on one slot (no CROSSSLOT), so the limits hold across replicas exactly, and a
// revocation on one replica reaches the other's L1 through cluster-wide PUBLISH.

const ready =
  requireServer("redis-server and redis-cli", redisTopologyAvailable(), "apt-get install redis-server (it ships redis-cli)") &&
  requireServer("MongoDB-wire server", mongoWireAvailable(), "run .ci/install-mongo-wire.sh");

/** The bound DESIGN.md sets: a revoked key is refused by every replica within 1 s. */
const REVOCATION_BOUND_MS = 1000;

async function check(replica: KeygateProcess, secret: string, path = "/v1"): Promise<{ status: number; headers: Headers; body: string }> {
  const res = await fetch(`http://127.0.0.1:${replica.ports.http}/check${path}`, { headers: { "x-api-key": secret } });
  return { status: res.status, headers: res.headers, body: await res.text() };
}

async function issue(replica: KeygateProcess, ownerId: string, plan: string): Promise<{ id: string; secret: string }> {
  const upserted = await postJson(replica.ports.admin, "UpsertAccount", { ownerId, plan });
  // On a failure, what the replica logged says which Cluster command failed.
  expect(upserted.status, `${JSON.stringify(upserted.json)}\n${replica.stdout().slice(-3000)}`).toBe(200);
  const created = await postJson(replica.ports.admin, "CreateKey", { ownerId, name: "cluster" });
  expect(created.status, JSON.stringify(created.json)).toBe(200);
  const key = created.json["key"];
  const secret = created.json["secret"];
  if (typeof secret !== "string" || typeof key !== "object" || key === null || !("id" in key) || typeof key.id !== "string") {
    throw new Error(`unexpected CreateKey answer ${JSON.stringify(created.json)}`);
  }
  return { id: key.id, secret };
}

describe.runIf(ready)("two replicas on a three-master Redis Cluster", () => {
  let cluster: RedisClusterSet;
  let mongo: MongoWire;
  let a: KeygateProcess;
  let b: KeygateProcess;
  let probe: Cluster;
  let dir: string;

  beforeAll(async () => {
    const [startedCluster, startedMongo] = await Promise.all([startRedisCluster(), startMongoWire()]);
    if (startedCluster === null) throw new Error("redis-server or redis-cli is not on PATH");
    [cluster, mongo] = [startedCluster, startedMongo];
    dir = mkdtempSync(join(tmpdir(), "keygate-redis-cluster-"));
    const policy = join(dir, "policy.yaml");
    writeFileSync(policy, stringify(LIMITS_POLICY));
    const env = sharedBackendEnv({ mongoUri: mongo.uri, redisUrl: cluster.url, pepper: "cluster-test-pepper-0123456789abcdefghijklmn", policyFile: policy, adminToken: ADMIN_TOKEN });
    [a, b] = await Promise.all([spawnKeygate({ cwd: dir, env }), spawnKeygate({ cwd: dir, env })]);
    // Each replica ready, and its first account change told to the Cluster and the other replica:
    // on a loaded machine a replica's connections to the Cluster's nodes can still be settling
    // when it starts listening, and a change made then answers UNAVAILABLE (saved, told later).
    for (const replica of [a, b]) {
      await until(async () => (await fetch(`http://127.0.0.1:${replica.ports.admin}/readyz`)).status === 200, 30_000, "the replica ready");
      await until(async () => (await postJson(replica.ports.admin, "UpsertAccount", { ownerId: "cluster-warm-up", plan: "small" })).status === 200, 30_000, "an account change told to the Cluster");
    }
    probe = new Cluster(
      cluster.nodes.map((node) => ({ host: "127.0.0.1", port: node.port })),
      { lazyConnect: true, redisOptions: { maxRetriesPerRequest: 1 } },
    );
    await probe.connect();
  }, 180_000);

  afterAll(async () => {
    probe?.disconnect();
    await Promise.allSettled([a?.stop("SIGKILL"), b?.stop("SIGKILL")]);
    await Promise.allSettled([cluster?.stop(), mongo?.stop()]);
    if (dir !== undefined) rmSync(dir, { recursive: true, force: true });
  });

  describe("happy", () => {
    it("rate limit: exactly `limit` of 3 x limit concurrent Checks pass across both replicas", async () => {
      const { secret } = await issue(a, "cluster-rate", "small");
      const answers = await Promise.all(Array.from({ length: 30 }, (_, i) => check(i % 2 === 0 ? a : b, secret)));
      expect(answers.filter((x) => x.status === 200)).toHaveLength(10);
      const limited = answers.filter((x) => x.status === 429);
      expect(limited).toHaveLength(20);
      for (const answer of limited) expect(JSON.parse(answer.body).error.code).toBe("RATE_LIMITED");
    });

    it("rate limit of an owner whose id starts with '}' (an empty hash tag): exactly `limit` pass too, with no CROSSSLOT", async () => {
      const { secret } = await issue(b, "}cluster-brace", "small");
      const answers = await Promise.all(Array.from({ length: 30 }, (_, i) => check(i % 2 === 0 ? a : b, secret)));
      expect(answers.filter((x) => x.status === 200)).toHaveLength(10);
      expect(answers.filter((x) => x.status === 429)).toHaveLength(20);
      const slots = await Promise.all(
        ["kg:rl:{ }cluster-brace}:a:}cluster-brace", "kg:q:{ }cluster-brace}:2026-01-01", "kg:c:{ }cluster-brace}"].map((name) => redisCommand(cluster.nodes[0]?.port ?? 0, "CLUSTER", "KEYSLOT", name)),
      );
      expect(new Set(slots).size).toBe(1);
      expect(await probe.exists("kg:rl:{ }cluster-brace}:a:}cluster-brace")).toBe(1);
    });

    it("daily quota: exactly 5 of 20 concurrent Checks pass across both replicas", async () => {
      const { secret } = await issue(b, "cluster-quota", "quota");
      const answers = await Promise.all(Array.from({ length: 20 }, (_, i) => check(i % 2 === 0 ? a : b, secret)));
      expect(answers.filter((x) => x.status === 200)).toHaveLength(5);
      const refused = answers.filter((x) => x.status === 402);
      expect(refused).toHaveLength(15);
      for (const answer of refused) expect(JSON.parse(answer.body).error.code).toBe("QUOTA_EXCEEDED");
    });

    it("credits: with a balance of 7, exactly 7 of 20 concurrent Checks pass, each seeing its own balance", async () => {
      const ownerId = "cluster-credits";
      const { secret } = await issue(a, ownerId, "metered");
      const topped = await postJson(b.ports.admin, "AddCredits", { ownerId, amount: "4", reason: "test" });
      expect(topped.json["account"]).toMatchObject({ creditBalance: "7" });
      const answers = await Promise.all(Array.from({ length: 20 }, (_, i) => check(i % 2 === 0 ? a : b, secret)));
      const allowed = answers.filter((x) => x.status === 200);
      expect(allowed).toHaveLength(7);
      expect(allowed.map((x) => Number(x.headers.get("x-credits-remaining"))).sort((p, q) => p - q)).toEqual([0, 1, 2, 3, 4, 5, 6]);
      const refused = answers.filter((x) => x.status === 402);
      expect(refused).toHaveLength(13);
      for (const answer of refused) expect(JSON.parse(answer.body).error.code).toBe("INSUFFICIENT_CREDITS");
      // A top-up through the other replica reaches the Cluster's copy of the balance.
      expect((await postJson(a.ports.admin, "AddCredits", { ownerId, amount: "1", reason: "more" })).status).toBe(200);
      expect((await check(b, secret)).status).toBe(200);
      expect((await check(a, secret)).status).toBe(402);
    });

    it("ChargeUsage with one idempotency key, sent to both replicas at once, charges once", async () => {
      const ownerId = "cluster-charge-usage";
      await issue(a, ownerId, "metered");
      expect((await postJson(a.ports.admin, "AddCredits", { ownerId, amount: "10", reason: "test" })).status).toBe(200);
      const body = { ownerId, cost: "4", idempotencyKey: "order-cluster-1" };
      const answers = await Promise.all([a, b, a, b].map((replica) => postJson(replica.ports.admin, "ChargeUsage", body)));
      // One runs; a repeat answers the first answer, or asks to retry while the first still runs.
      const replayed = answers.filter((x) => x.status === 200 && x.json["replayed"] === true);
      const first = answers.filter((x) => x.status === 200 && x.json["replayed"] !== true);
      expect(first).toHaveLength(1);
      const inProgress = answers.filter((x) => x.status !== 200);
      // Connect maps ABORTED to HTTP 409.
      for (const answer of inProgress) expect([answer.status, answer.json["code"]]).toEqual([409, "aborted"]);
      expect(replayed.length + inProgress.length).toBe(3);
      const account = await postJson(b.ports.admin, "GetAccount", { ownerId });
      expect(account.json["account"]).toMatchObject({ creditBalance: "9" });
      const again = await postJson(b.ports.admin, "ChargeUsage", body);
      expect([again.status, again.json["replayed"]]).toEqual([200, true]);
      expect((await postJson(a.ports.admin, "GetAccount", { ownerId })).json["account"]).toMatchObject({ creditBalance: "9" });
    });

    it("the counts live in the Cluster under one owner's hash tag, and nothing fell back to in-process limits", async () => {
      for (const owner of ["cluster-rate", "cluster-quota", "cluster-credits"]) {
        const slots = await Promise.all(
          [`kg:rl:{${owner}}:a:${owner}`, `kg:q:{${owner}}:2026-01-01`, `kg:c:{${owner}}`].map((name) => redisCommand(cluster.nodes[0]?.port ?? 0, "CLUSTER", "KEYSLOT", name)),
        );
        expect(new Set(slots).size).toBe(1);
      }
      const today = new Date().toISOString().slice(0, 10);
      expect(await probe.get(`kg:q:{cluster-quota}:${today}`)).toBe("5");
      expect(await probe.exists("kg:rl:{cluster-rate}:a:cluster-rate")).toBe(1);
      expect(await probe.hget("kg:c:{cluster-credits}", "topup")).toBe("0");
      // The three owners' keys are spread over the masters by their tags, not piled on one.
      const slotOwners = await Promise.all(["cluster-rate", "cluster-quota", "cluster-credits"].map((owner) => probe.cluster("KEYSLOT", `{${owner}}`)));
      expect(slotOwners.every((slot) => typeof slot === "number")).toBe(true);
      for (const replica of [a, b]) {
        const out = replica.stdout();
        expect(out.includes("Redis limits failed"), out.slice(-2000)).toBe(false);
        expect(out.includes("CROSSSLOT")).toBe(false);
        expect(out.includes("L2 cache read failed")).toBe(false);
        expect(out.includes("L2 cache write failed")).toBe(false);
        // The bus stayed subscribed and answering: revocations came by PUBLISH, not by L1 expiry.
        expect(out.includes("invalidation subscription lost")).toBe(false);
        expect(out.includes("stopped answering on the invalidation channel")).toBe(false);
      }
    });

    it(`a key revoked through replica A is refused by replica B within ${REVOCATION_BOUND_MS} ms`, async () => {
      const key = await issue(a, "cluster-revoke", "small");
      expect((await check(b, key.secret)).status).toBe(200);
      expect((await check(a, key.secret)).status).toBe(200);
      const genBefore = Number((await probe.get("kg:{l2}:l2:gen")) ?? "0");
      const revoked = await postJson(a.ports.admin, "RevokeKey", { id: key.id });
      expect(revoked.status, JSON.stringify(revoked.json)).toBe(200);
      const elapsedMs = await until(async () => (await check(b, key.secret)).status === 401, REVOCATION_BOUND_MS, "replica B refusing the revoked key");
      console.log(`cluster revocation A -> B: ${elapsedMs.toFixed(1)} ms`);
      expect((await check(a, key.secret)).status).toBe(401);
      // The L2 invalidation ran as one script on the {l2} slot.
      expect(Number(await probe.get("kg:{l2}:l2:gen"))).toBeGreaterThan(genBefore);
    });

    it(`an account set past_due through replica B is refused 402 by replica A within ${REVOCATION_BOUND_MS} ms`, async () => {
      const key = await issue(b, "cluster-account", "small");
      expect((await check(a, key.secret)).status).toBe(200);
      const changed = await postJson(b.ports.admin, "UpsertAccount", { ownerId: "cluster-account", subscriptionStatus: "past_due" });
      expect(changed.status, JSON.stringify(changed.json)).toBe(200);
      const elapsedMs = await until(async () => (await check(a, key.secret)).status === 402, REVOCATION_BOUND_MS, "replica A refusing the past_due account");
      console.log(`cluster account change B -> A: ${elapsedMs.toFixed(1)} ms`);
    });
  });

  describe("error", () => {
    it("a subscriber whose node connection is killed moves to a node again, clears L1, and hears the next revocation", async () => {
      const key = await issue(a, "cluster-resubscribe", "small");
      expect((await check(b, key.secret)).status).toBe(200);
      const killed = await Promise.all(cluster.nodes.map((node) => redisCommand(node.port, "CLIENT", "KILL", "TYPE", "pubsub")));
      expect(killed.reduce((sum: number, n) => sum + Number(n), 0)).toBeGreaterThanOrEqual(2);
      for (const replica of [a, b]) {
        await until(async () => replica.stdout().includes("the invalidation subscriber lost its Cluster node"), 10_000, "the subscriber noticing its node is gone");
        await until(async () => replica.stdout().includes("invalidation channel answering again"), 10_000, "the subscriber back on a node");
      }
      expect((await check(b, key.secret)).status).toBe(200);
      expect((await postJson(a.ports.admin, "RevokeKey", { id: key.id })).status).toBe(200);
      await until(async () => (await check(b, key.secret)).status === 401, REVOCATION_BOUND_MS, "replica B refusing the key revoked after the move");
    });
  });
});
