import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { create } from "@bufbuild/protobuf";
import { Client as GrpcClient, credentials } from "@grpc/grpc-js";
import type { ServiceError } from "@grpc/grpc-js";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { CheckRequestSchema } from "../../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import type { CheckRequest, CheckResponse } from "../../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import { authorizationDefinition } from "../../src/server/grpc-authz.js";
import { ADMIN_TOKEN, postJson } from "../harness/keygate.js";
import { mongoWireAvailable, startMongoWire } from "../harness/mongo-wire.js";
import type { MongoWire } from "../harness/mongo-wire.js";
import { until } from "../harness/poll.js";
import { spawnKeygate } from "../harness/process.js";
import type { KeygateProcess } from "../harness/process.js";
import { requireServer } from "../harness/ports.js";
import { redisAvailable, startRedis } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";
import { installedRelease, releaseInstalled } from "../harness/release.js";
import type { BuiltRelease } from "../harness/release.js";

/** Polls every 20 ms: each probe is a request to a replica, and nothing here times the wait. */
const POLL = { intervalMs: 20 } as const;

// A rolling upgrade: a replica of the previous release and one of this keygate share MongoDB and
// Redis (each reads, or leaves be, what the other caches), then the old one is replaced. The old
// replica is the release's own code, built from its sources (test/fixtures/upgrade/<commit>) on its
// own dependency tree by .ci/install-release.sh. Every
// Check through either is answered, and answered right: no gRPC error, no wrong allow.
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
    attributes: { request: { http: { id: "rolling", method: "GET", path: "/v1/things", host: "api.example.com", headers: { "x-api-key": secret } } } },
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
  expect((await postJson(replica.ports.admin, "UpsertAccount", { ownerId, plan: "business" })).status).toBe(200);
  const answer = await postJson(replica.ports.admin, "CreateKey", { ownerId, name: "rolling upgrade" });
  expect(answer.status, JSON.stringify(answer.json)).toBe(200);
  return { id: (answer.json["key"] as { id: string }).id, secret: answer.json["secret"] as string };
}

describe.runIf(servers)(`rolling upgrade from ${RELEASE}: both versions on one MongoDB and one Redis`, () => {
  let mongo: MongoWire;
  let redis: RedisServer;
  let release: BuiltRelease;
  let old: KeygateProcess;
  let current: KeygateProcess;
  let dir: string;
  let env: Record<string, string>;
  /** Every answer of the suite, to count failed Checks at the end. */
  const answers: Answer[] = [];
  const checked = async (replica: KeygateProcess, secret: string): Promise<Answer> => {
    const answer = await check(replica, secret);
    answers.push(answer);
    return answer;
  };

  beforeAll(async () => {
    release = installedRelease(RELEASE);
    const [startedMongo, startedRedis] = await Promise.all([startMongoWire(), startRedis()]);
    if (startedRedis === null) throw new Error("redis-server is not on PATH");
    [mongo, redis] = [startedMongo, startedRedis];
    dir = mkdtempSync(join(tmpdir(), "keygate-rolling-"));
    env = {
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
    // The old replica runs first, as before an upgrade; the new one joins it.
    old = await spawnKeygate({ cwd: dir, env, args: release.serveArgs });
    current = await spawnKeygate({ cwd: dir, env });
  }, 180_000);

  afterAll(async () => {
    await Promise.allSettled([old?.stop("SIGKILL"), current?.stop("SIGKILL")]);
    await Promise.allSettled([mongo?.stop(), redis?.stop()]);
    if (dir !== undefined) rmSync(dir, { recursive: true, force: true });
  });

  it("keys made through either replica are allowed by both, Check after Check", async () => {
    const fromOld = await createKey(old, "rolling-old");
    const fromNew = await createKey(current, "rolling-new");
    const seen: Record<string, number> = {};
    for (let i = 0; i < 100; i++) {
      for (const replica of [old, current]) {
        for (const key of [fromOld, fromNew]) {
          const answer = await checked(replica, key.secret);
          seen[String(answer)] = (seen[String(answer)] ?? 0) + 1;
        }
      }
    }
    expect(seen).toEqual({ allow: 400 });
  });

  it("a key revoked through either replica is refused by both", async () => {
    const revokedByNew = await createKey(old, "rolling-revoke-1");
    const revokedByOld = await createKey(current, "rolling-revoke-2");
    for (const replica of [old, current]) for (const key of [revokedByNew, revokedByOld]) expect(await checked(replica, key.secret)).toBe("allow");
    expect((await postJson(current.ports.admin, "RevokeKey", { id: revokedByNew.id, reason: "rolling" })).status).toBe(200);
    expect((await postJson(old.ports.admin, "RevokeKey", { id: revokedByOld.id, reason: "rolling" })).status).toBe(200);
    for (const replica of [old, current]) {
      for (const key of [revokedByNew, revokedByOld]) {
        await until(async () => (await checked(replica, key.secret)) === 401, 5000, "the revoked key refused", POLL);
      }
    }
  });

  it("after the old replica is replaced by a new one, every key answers as before", async () => {
    const kept = await createKey(old, "rolling-kept");
    expect(await checked(current, kept.secret)).toBe("allow");
    expect(await old.stop("SIGTERM")).toBe(0);
    old = await spawnKeygate({ cwd: dir, env });
    for (const replica of [old, current]) expect(await checked(replica, kept.secret)).toBe("allow");
  });

  it("a replica of the release still starts on the store after this version recorded its pepper check there, and knows every key", async () => {
    const kept = await createKey(current, "rolling-after-check");
    const another = await spawnKeygate({ cwd: dir, env, args: release.serveArgs });
    try {
      for (const replica of [another, current]) expect(await checked(replica, kept.secret)).toBe("allow");
    } finally {
      expect(await another.stop("SIGTERM")).toBe(0);
    }
  });

  it("no Check failed along the way", () => {
    expect(answers.length).toBeGreaterThan(400);
    expect(answers.filter((answer) => typeof answer === "string" && answer.startsWith("grpc error"))).toEqual([]);
  });
});
