import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { create } from "@bufbuild/protobuf";
import { Client as GrpcClient, credentials, status as GrpcStatus } from "@grpc/grpc-js";
import type { ServiceError } from "@grpc/grpc-js";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { CheckRequestSchema } from "../../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import type { CheckRequest, CheckResponse } from "../../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import { authorizationDefinition } from "../../src/server/grpc-authz.js";
import { ADMIN_TOKEN, TEST_POLICY, postJson } from "../harness/keygate.js";
import { mongoWireAvailable, startMongoWire } from "../harness/mongo-wire.js";
import type { MongoWire } from "../harness/mongo-wire.js";
import { until } from "../harness/poll.js";
import { sharedBackendEnv, spawnKeygate } from "../harness/process.js";
import type { KeygateProcess } from "../harness/process.js";
import { requireServer } from "../harness/ports.js";
import { redisAvailable, startRedis } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";
import { writeFileSync } from "node:fs";
import { stringify } from "yaml";

const ready =
  requireServer("MongoDB-wire server", mongoWireAvailable(), "run .ci/install-mongo-wire.sh") &&
  requireServer("redis-server", redisAvailable(), "apt-get install redis-server");

async function check(replica: KeygateProcess, key: string, path = "/v1/things"): Promise<number> {
  const res = await fetch(`http://127.0.0.1:${replica.ports.http}/check${path}`, { headers: { "x-api-key": key } });
  await res.arrayBuffer();
  return res.status;
}

/** One gRPC Check over grpc-js: resolves with the answer, rejects with the call's ServiceError. */
function grpcCheck(replica: KeygateProcess, key: string): Promise<CheckResponse> {
  const client = new GrpcClient(`127.0.0.1:${replica.ports.grpc}`, credentials.createInsecure());
  const def = authorizationDefinition.Check;
  const request = create(CheckRequestSchema, {
    attributes: { request: { http: { id: "req-replica", method: "GET", path: "/v1/things", host: "api.example.com", headers: { "x-api-key": key } } } },
  });
  return new Promise<CheckResponse>((done, fail) => {
    client.makeUnaryRequest<CheckRequest, CheckResponse>(def.path, def.requestSerialize, def.responseDeserialize, request, (error: ServiceError | null, response?: CheckResponse) => {
      if (error !== null) fail(error);
      else if (response === undefined) fail(new Error("empty Check response"));
      else done(response);
    });
  }).finally(() => client.close());
}

/** The secret a CreateKey or RotateKey JSON answer carries, with its key id. */
function issued(answer: { status: number; json: Record<string, unknown> }): { id: string; secret: string } {
  expect(answer.status, JSON.stringify(answer.json)).toBe(200);
  const key = answer.json["key"];
  const secret = answer.json["secret"];
  if (typeof secret !== "string" || typeof key !== "object" || key === null || !("id" in key) || typeof key.id !== "string") {
    throw new Error(`unexpected answer ${JSON.stringify(answer.json)}`);
  }
  return { id: key.id, secret };
}

async function createKey(replica: KeygateProcess, ownerId: string, scopes: string[] = []): Promise<{ id: string; secret: string }> {
  await postJson(replica.ports.admin, "UpsertAccount", { ownerId, plan: "business" });
  return issued(await postJson(replica.ports.admin, "CreateKey", { ownerId, name: "replica test", scopes }));
}

describe.runIf(ready)("two replicas sharing MongoDB and Redis", () => {
  let mongo: MongoWire;
  let redis: RedisServer;
  let a: KeygateProcess;
  let b: KeygateProcess;
  let dir: string;

  beforeAll(async () => {
    const [startedMongo, startedRedis] = await Promise.all([startMongoWire(), startRedis()]);
    if (startedRedis === null) throw new Error("redis-server is not on PATH");
    [mongo, redis] = [startedMongo, startedRedis];
    dir = mkdtempSync(join(tmpdir(), "keygate-replicas-"));
    const policy = join(dir, "policy.yaml");
    // Last-use times are flushed only on shutdown (a day is the longest interval a Node timer
    // holds), so the SIGTERM test below cannot pass through the periodic flush.
    writeFileSync(policy, stringify({ ...TEST_POLICY, lastUsedFlushSeconds: 86_400 }));
    const env = sharedBackendEnv({
      mongoUri: mongo.uri,
      redisUrl: redis.url,
      pepper: "replica-test-pepper-0123456789abcdefghijkl",
      policyFile: policy,
      adminToken: ADMIN_TOKEN,
      extra: {
        KEYGATE_SHUTDOWN_GRACE_SECONDS: "5",
        // A paused MongoDB costs each uncached Check its whole budget: 1 s keeps the test short.
        KEYGATE_CHECK_BUDGET_MS: "1000",
      },
    });
    [a, b] = await Promise.all([spawnKeygate({ cwd: dir, env }), spawnKeygate({ cwd: dir, env })]);
  }, 120_000);

  afterAll(async () => {
    await Promise.allSettled([a?.stop("SIGKILL"), b?.stop("SIGKILL")]);
    await Promise.allSettled([mongo?.stop(), redis?.stop()]);
    if (dir !== undefined) rmSync(dir, { recursive: true, force: true });
  });

  it("a key revoked through replica A is refused by replica B within 1 s", async () => {
    const key = await createKey(a, "rep-revoke");
    expect(await check(b, key.secret)).toBe(200);
    expect(await check(a, key.secret)).toBe(200);
    const revoked = await postJson(a.ports.admin, "RevokeKey", { id: key.id });
    expect(revoked.status).toBe(200);
    const revokedAt = performance.now();
    const elapsedMs = await until(async () => (await check(b, key.secret)) === 401, 1000, "replica B refusing the revoked key");
    console.log(`revocation propagation A -> B: ${(performance.now() - revokedAt).toFixed(1)} ms (poll loop ${elapsedMs.toFixed(1)} ms)`);
    expect(await check(a, key.secret)).toBe(401);
  });

  it("a key disabled through replica A is refused by replica B within 1 s, and passes again once enabled", async () => {
    const key = await createKey(a, "rep-disable");
    expect(await check(b, key.secret)).toBe(200);
    expect((await postJson(a.ports.admin, "DisableKey", { id: key.id, reason: "paused" })).status).toBe(200);
    const disabledAt = performance.now();
    await until(async () => (await check(b, key.secret)) === 401, 1000, "replica B refusing the disabled key");
    console.log(`disable propagation A -> B: ${(performance.now() - disabledAt).toFixed(1)} ms`);
    expect(await check(a, key.secret)).toBe(401);
    expect((await postJson(b.ports.admin, "EnableKey", { id: key.id })).status).toBe(200);
    await until(async () => (await check(a, key.secret)) === 200, 1000, "replica A allowing the enabled key");
    expect(await check(b, key.secret)).toBe(200);
  });

  it("a key rotated with grace 0 through replica A is refused by replica B within 1 s, and its successor passes", async () => {
    const key = await createKey(a, "rep-rotate");
    expect(await check(b, key.secret)).toBe(200);
    const rotated = issued(await postJson(a.ports.admin, "RotateKey", { id: key.id, graceDays: 0 }));
    const rotatedAt = performance.now();
    await until(async () => (await check(b, key.secret)) === 401, 1000, "replica B refusing the rotated key");
    console.log(`rotation (grace 0) propagation A -> B: ${(performance.now() - rotatedAt).toFixed(1)} ms`);
    expect(await check(b, rotated.secret)).toBe(200);
    expect(await check(a, key.secret)).toBe(401);
  });

  it("a rescope through replica A that drops a route's scope is refused 403 by replica B within 1 s", async () => {
    const key = await createKey(a, "rep-rescope", ["tutor", "decks"]);
    expect(await check(b, key.secret, "/v1/decks/1")).toBe(200);
    const updated = await postJson(a.ports.admin, "UpdateKey", { id: key.id, scopes: ["tutor"] });
    expect(updated.status, JSON.stringify(updated.json)).toBe(200);
    const rescopedAt = performance.now();
    await until(async () => (await check(b, key.secret, "/v1/decks/1")) === 403, 1000, "replica B refusing the lost scope");
    console.log(`rescope propagation A -> B: ${(performance.now() - rescopedAt).toFixed(1)} ms`);
    // The scope it kept still works.
    expect(await check(b, key.secret, "/v1/things")).toBe(200);
  });

  it("an account set past_due through replica A is refused 402 by replica B within 1 s", async () => {
    const key = await createKey(a, "rep-account");
    expect(await check(b, key.secret)).toBe(200);
    const changed = await postJson(a.ports.admin, "UpsertAccount", { ownerId: "rep-account", subscriptionStatus: "past_due" });
    expect(changed.status, JSON.stringify(changed.json)).toBe(200);
    const changedAt = performance.now();
    await until(async () => (await check(b, key.secret)) === 402, 1000, "replica B refusing the past_due account");
    console.log(`account change propagation A -> B: ${(performance.now() - changedAt).toFixed(1)} ms`);
  });

  it("keeps answering from L1 and the store while Redis is down, and reconnects when it returns", async () => {
    const warm = await createKey(a, "rep-redis-warm");
    const cold = await createKey(a, "rep-redis-cold");
    expect(await check(b, warm.secret)).toBe(200);
    await redis.stop();
    const statuses: number[] = [];
    for (let i = 0; i < 50; i++) statuses.push(await check(b, warm.secret), await check(b, cold.secret));
    expect(statuses.filter((s) => s !== 200)).toEqual([]);
    await redis.start();
    // Until A's connection is back, changes answer UNAVAILABLE (the caches could not be told).
    await until(async () => (await postJson(a.ports.admin, "UpsertAccount", { ownerId: "rep-redis-after" })).status === 200, 10_000, "A reconnected");
    // Back: invalidations flow again, so a revoke through A reaches B's L1 within 1 s.
    const key = await createKey(a, "rep-redis-after");
    await until(async () => (await check(b, key.secret)) === 200, 5000, "B serving after Redis returned");
    await until(async () => (await postJson(a.ports.admin, "RevokeKey", { id: key.id })).status === 200, 10_000, "A revoking after Redis returned");
    await until(async () => (await check(b, key.secret)) === 401, 1000, "B refusing after Redis returned");
  });

  it("200 checks then SIGTERM: last_used_at persisted in MongoDB by the shutdown flush", async () => {
    const key = await createKey(a, "rep-last-used");
    const checksStartedMs = Date.now();
    for (let i = 0; i < 200; i++) expect(await check(a, key.secret)).toBe(200);
    const checksEndedMs = Date.now();
    // Nothing reached MongoDB yet: only the shutdown flush can write it.
    const before = await postJson(b.ports.admin, "GetKey", { id: key.id });
    expect((before.json["key"] as { lastUsedAt?: unknown }).lastUsedAt).toBeUndefined();
    expect(await a.stop("SIGTERM")).toBe(0);
    const got = await postJson(b.ports.admin, "GetKey", { id: key.id });
    const lastUsedAt = (got.json["key"] as { lastUsedAt?: unknown }).lastUsedAt;
    if (typeof lastUsedAt !== "string") throw new Error(`no lastUsedAt after SIGTERM: ${JSON.stringify(got.json)}`);
    const lastUsedMs = Date.parse(lastUsedAt);
    expect(lastUsedMs).toBeGreaterThanOrEqual(checksStartedMs);
    expect(lastUsedMs).toBeLessThanOrEqual(checksEndedMs);
  });

  it("MongoDB down: cached keys pass, every answer for an uncached key is 503/UNAVAILABLE, readiness drops, and it recovers", async () => {
    const cached = await createKey(b, "rep-mongo-cached");
    const uncached = await createKey(b, "rep-mongo-uncached");
    const uncachedGrpc = await createKey(b, "rep-mongo-uncached-grpc");
    expect(await check(b, cached.secret)).toBe(200);
    await mongo.pause();
    // Every answer between the pause and the restart is recorded: an early 200 or 401 (a store
    // error read as "no such key") is as wrong as a late one.
    const uncachedAnswers: number[] = [];
    const cachedAnswers: number[] = [];
    let notReady = false;
    const pausedAt = performance.now();
    while (!notReady || uncachedAnswers.length < 20) {
      if (performance.now() - pausedAt > 15_000) throw new Error(`readyz still 200 after 15 s; uncached answers ${JSON.stringify(uncachedAnswers)}`);
      uncachedAnswers.push(await check(b, uncached.secret));
      cachedAnswers.push(await check(b, cached.secret));
      if (!notReady) notReady = (await fetch(`http://127.0.0.1:${b.ports.admin}/readyz`)).status === 503;
    }
    await expect(grpcCheck(b, uncachedGrpc.secret)).rejects.toMatchObject({ code: GrpcStatus.UNAVAILABLE });
    uncachedAnswers.push(await check(b, uncached.secret));
    cachedAnswers.push(await check(b, cached.secret));
    console.log(`MongoDB paused: ${uncachedAnswers.length} uncached answers over ${(performance.now() - pausedAt).toFixed(0)} ms`);
    expect(uncachedAnswers.filter((s) => s !== 503)).toEqual([]);
    expect(cachedAnswers.filter((s) => s !== 200)).toEqual([]);
    await mongo.start();
    await until(async () => (await fetch(`http://127.0.0.1:${b.ports.admin}/readyz`)).status === 200, 30_000, "readyz 200 again");
    // The test server keeps data in memory, so it comes back empty: a new key proves recovery.
    const fresh = await until(async () => (await postJson(b.ports.admin, "CreateKey", { ownerId: "rep-mongo-after", name: "after" })).status === 200, 10_000, "CreateKey after recovery");
    expect(fresh).toBeGreaterThanOrEqual(0);
  });
});
