import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { create } from "@bufbuild/protobuf";
import { Client as GrpcClient, credentials } from "@grpc/grpc-js";
import type { ServiceError } from "@grpc/grpc-js";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { CheckRequestSchema } from "../../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import type { CheckRequest, CheckResponse } from "../../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import { authorizationDefinition } from "../../src/server/grpc-authz.js";
import { ADMIN_TOKEN, postJson } from "../harness/keygate.js";
import { mongoWireAvailable, startMongoWire } from "../harness/mongo-wire.js";
import type { MongoWire } from "../harness/mongo-wire.js";
import { untilValue } from "../harness/poll.js";
import { spawnKeygate } from "../harness/process.js";
import type { KeygateProcess } from "../harness/process.js";
import { requireServer } from "../harness/ports.js";
import { redisAvailable, redisCommand, startRedis } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";
import { installedRelease, releaseInstalled } from "../harness/release.js";

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

const servers =
  requireServer("MongoDB-wire server", mongoWireAvailable(), "run .ci/install-mongo-wire.sh") &&
  requireServer("redis-server", redisAvailable(), "apt-get install redis-server") &&
  requireServer(`keygate release ${RELEASE}`, releaseInstalled(RELEASE), `run bash .ci/install-release.sh ${RELEASE}`);

/** What a replica answered: "allow", a denial's HTTP status, or the gRPC error that failed the Check. */
type Answer = "allow" | number | `grpc error ${number}`;

async function check(replica: KeygateProcess, secret: string): Promise<Answer> {
  const client = new GrpcClient(`127.0.0.1:${replica.ports.grpc}`, credentials.createInsecure());
  const def = authorizationDefinition.Check;
  const request = create(CheckRequestSchema, {
    attributes: { request: { http: { id: "oom", method: "GET", path: "/v1/things", host: "api.example.com", headers: { "x-api-key": secret } } } },
  });
  return new Promise<Answer>((done) => {
    client.makeUnaryRequest<CheckRequest, CheckResponse>(def.path, def.requestSerialize, def.responseDeserialize, request, (error: ServiceError | null, response?: CheckResponse) => {
      if (error !== null || response === undefined) done(`grpc error ${error?.code ?? -1}`);
      else if (response.httpResponse.case === "okResponse") done("allow");
      else done(response.httpResponse.case === "deniedResponse" ? (response.httpResponse.value.status?.code ?? 0) : 0);
    });
  }).finally(() => client.close());
}

async function createKey(replica: KeygateProcess, ownerId: string): Promise<{ id: string; secret: string }> {
  expect((await postJson(replica.ports.admin, "UpsertAccount", { ownerId, plan: "business", subscriptionStatus: "active" })).status).toBe(200);
  const answer = await postJson(replica.ports.admin, "CreateKey", { ownerId, name: "oom" });
  expect(answer.status, JSON.stringify(answer.json)).toBe(200);
  return { id: (answer.json["key"] as { id: string }).id, secret: answer.json["secret"] as string };
}

describe.runIf(servers)(`rolling upgrade from ${RELEASE}: a change made through this version while Redis is out of memory`, () => {
  let mongo: MongoWire;
  let redis: RedisServer;
  let old: KeygateProcess;
  let current: KeygateProcess;
  let dir: string;

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
    const release = installedRelease(RELEASE);
    const [startedMongo, startedRedis] = await Promise.all([startMongoWire(), startRedis()]);
    if (startedRedis === null) throw new Error("redis-server is not on PATH");
    [mongo, redis] = [startedMongo, startedRedis];
    dir = mkdtempSync(join(tmpdir(), "keygate-rolling-oom-"));
    const env = {
      KEYGATE_MONGODB_URI: mongo.uri,
      KEYGATE_REDIS_URL: redis.url,
      KEYGATE_PEPPER: "rolling-upgrade-pepper-0123456789abcdefghij",
      KEYGATE_ADMIN_TOKENS: ADMIN_TOKEN,
      KEYGATE_HOST: "127.0.0.1",
      KEYGATE_GRPC_PORT: "0",
      KEYGATE_HTTP_AUTHZ_PORT: "0",
      KEYGATE_ADMIN_PORT: "0",
      KEYGATE_SHUTDOWN_GRACE_SECONDS: "5",
    };
    old = await spawnKeygate({ cwd: dir, env, args: release.serveArgs });
    current = await spawnKeygate({ cwd: dir, env });
  }, 180_000);

  afterEach(async () => {
    await redisCommand(redis.port, "CONFIG", "SET", "maxmemory", "0");
    await redisCommand(redis.port, "FLUSHALL");
  });

  afterAll(async () => {
    await Promise.allSettled([old?.stop("SIGKILL"), current?.stop("SIGKILL")]);
    await Promise.allSettled([mongo?.stop(), redis?.stop()]);
    if (dir !== undefined) rmSync(dir, { recursive: true, force: true });
  });

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
