import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { create } from "@bufbuild/protobuf";
import { Client as GrpcClient, credentials } from "@grpc/grpc-js";
import type { ServiceError } from "@grpc/grpc-js";
import { CheckRequestSchema } from "../../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import type { CheckRequest, CheckResponse } from "../../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import { authorizationDefinition } from "../../src/server/grpc-authz.js";
import { ADMIN_TOKEN } from "./keygate.js";
import { mongoWireAvailable, startMongoWire } from "./mongo-wire.js";
import type { MongoWire } from "./mongo-wire.js";
import { requireServer } from "./ports.js";
import { spawnKeygate } from "./process.js";
import type { KeygateProcess } from "./process.js";
import { redisAvailable, startRedis } from "./redis-server.js";
import type { RedisServer } from "./redis-server.js";
import { installedRelease, releaseInstalled } from "./release.js";

/**
 * Whether a rolling upgrade from `commit` can run here: a MongoDB-wire server, redis-server and
 * the release built by .ci/install-release.sh. A missing one fails in CI and skips loudly elsewhere.
 */
export function rollingUpgradeServers(commit: string): boolean {
  return (
    requireServer("MongoDB-wire server", mongoWireAvailable(), "run .ci/install-mongo-wire.sh") &&
    requireServer("redis-server", redisAvailable(), "apt-get install redis-server") &&
    requireServer(`keygate release ${commit}`, releaseInstalled(commit), `run bash .ci/install-release.sh ${commit}`)
  );
}

/** What a replica answered: "allow", a denial's HTTP status, or the gRPC error that failed the Check. */
export type Answer = "allow" | number | `grpc error ${number}`;

/** One gRPC Check of GET /v1/things with `secret` as its x-api-key through `replica`; `requestId` names it in the replica's log. */
export async function checkReplica(replica: KeygateProcess, secret: string, requestId: string): Promise<Answer> {
  const client = new GrpcClient(`127.0.0.1:${replica.ports.grpc}`, credentials.createInsecure());
  const def = authorizationDefinition.Check;
  const request = create(CheckRequestSchema, {
    attributes: { request: { http: { id: requestId, method: "GET", path: "/v1/things", host: "api.example.com", headers: { "x-api-key": secret } } } },
  });
  return new Promise<Answer>((done) => {
    client.makeUnaryRequest<CheckRequest, CheckResponse>(def.path, def.requestSerialize, def.responseDeserialize, request, (error: ServiceError | null, response?: CheckResponse) => {
      if (error !== null || response === undefined) done(`grpc error ${error?.code ?? -1}`);
      else if (response.httpResponse.case === "okResponse") done("allow");
      else done(response.httpResponse.case === "deniedResponse" ? (response.httpResponse.value.status?.code ?? 0) : 0);
    });
  }).finally(() => client.close());
}

/** A replica of an earlier release and one of this keygate, sharing one MongoDB, one Redis and one environment. */
export interface RollingUpgrade {
  redis: RedisServer;
  /** The release's replica, started first, as before an upgrade. */
  old: KeygateProcess;
  /** This version's replica, which joined it. */
  current: KeygateProcess;
  /** Starts another replica of the release beside them; stop() kills it too. */
  startRelease(): Promise<KeygateProcess>;
  /** Starts another replica of this version beside them; stop() kills it too. */
  startThisVersion(): Promise<KeygateProcess>;
  /** Kills every replica started here (SIGKILL), stops the servers and removes the replicas' directory. */
  stop(): Promise<void>;
}

/**
 * Starts a MongoDB-wire server and a redis-server, then a replica of release `commit` and one of
 * this version on both, in a fresh directory named from `tempPrefix`. With `policy`, that
 * directory's policy.yaml holds it and both replicas read it (KEYGATE_CONFIG). A start that fails
 * midway stops what it started.
 */
export async function startRollingUpgrade(commit: string, options: { tempPrefix: string; policy?: string }): Promise<RollingUpgrade> {
  const release = installedRelease(commit);
  const replicas: KeygateProcess[] = [];
  let mongo: MongoWire | undefined;
  let redis: RedisServer | null | undefined;
  let dir: string | undefined;
  const stop = async (): Promise<void> => {
    await Promise.allSettled(replicas.map((replica) => replica.stop("SIGKILL")));
    await Promise.allSettled([mongo?.stop(), redis?.stop()]);
    if (dir !== undefined) rmSync(dir, { recursive: true, force: true });
  };
  try {
    [mongo, redis] = await Promise.all([startMongoWire(), startRedis()]);
    if (redis === null) throw new Error("redis-server is not on PATH");
    const cwd = mkdtempSync(join(tmpdir(), options.tempPrefix));
    dir = cwd;
    const env: Record<string, string> = {
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
    if (options.policy !== undefined) {
      writeFileSync(join(cwd, "policy.yaml"), options.policy);
      env["KEYGATE_CONFIG"] = join(cwd, "policy.yaml");
    }
    const start = async (args?: readonly string[]): Promise<KeygateProcess> => {
      const replica = await spawnKeygate({ cwd, env, args });
      replicas.push(replica);
      return replica;
    };
    const startRelease = (): Promise<KeygateProcess> => start(release.serveArgs);
    const startThisVersion = (): Promise<KeygateProcess> => start();
    const old = await startRelease();
    const current = await startThisVersion();
    return { redis, old, current, startRelease, startThisVersion, stop };
  } catch (error) {
    await stop();
    throw error;
  }
}
