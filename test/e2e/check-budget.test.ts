import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { create } from "@bufbuild/protobuf";
import { Client as GrpcClient, credentials, status as GrpcStatus } from "@grpc/grpc-js";
import type { ServiceError } from "@grpc/grpc-js";
import { stringify } from "yaml";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { CheckRequestSchema } from "../../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import type { CheckRequest, CheckResponse } from "../../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import { authorizationDefinition } from "../../src/server/grpc-authz.js";
import { ADMIN_TOKEN, TEST_POLICY, postJson } from "../harness/keygate.js";
import { mongoWireAvailable, startMongoWire } from "../harness/mongo-wire.js";
import type { MongoWire } from "../harness/mongo-wire.js";
import { requireServer } from "../harness/ports.js";
import { sharedBackendEnv, spawnKeygate } from "../harness/process.js";
import type { KeygateProcess } from "../harness/process.js";
import { redisAvailable, startRedis } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";

// One budget per Check (KEYGATE_CHECK_BUDGET_MS): when a backend stalls, keygate answers
// UNAVAILABLE (503) within the budget, while the proxy still waits, instead of after the
// backend's own timeout (a MongoDB lookup's 1 s, a Redis command's 1 s) when the proxy has long
// given up. Each call below carries a client deadline of CLIENT_DEADLINE_MS, shorter than those
// timeouts and far longer than the budget: keygate must answer before the client gives up.

const ready =
  requireServer("MongoDB-wire server", mongoWireAvailable(), "run .ci/install-mongo-wire.sh") &&
  requireServer("redis-server", redisAvailable(), "apt-get install redis-server");

const BUDGET_MS = 150;
/** The proxy's timeout in these tests: under the backends' own timeouts (1 s), over the budget. */
const CLIENT_DEADLINE_MS = 900;

interface GrpcAnswer {
  code: number;
  allowed: boolean | null;
}

/** One Check over grpc-js with a deadline: the status code, and for OK whether it allowed. */
function grpcCheck(replica: KeygateProcess, key: string): Promise<GrpcAnswer> {
  const client = new GrpcClient(`127.0.0.1:${replica.ports.grpc}`, credentials.createInsecure());
  const def = authorizationDefinition.Check;
  const request = create(CheckRequestSchema, {
    attributes: { request: { http: { id: "req-budget", method: "GET", path: "/v1/things", host: "api.example.com", headers: { "x-api-key": key } } } },
  });
  // Connect first, so the deadline covers the Check and not a connection on a busy machine.
  return new Promise<void>((connected, failed) => client.waitForReady(Date.now() + 10_000, (error) => (error ? failed(error) : connected())))
    .then(
      () =>
        new Promise<GrpcAnswer>((done) => {
          client.makeUnaryRequest<CheckRequest, CheckResponse>(
            def.path,
            def.requestSerialize,
            def.responseDeserialize,
            request,
            { deadline: Date.now() + CLIENT_DEADLINE_MS },
            (error: ServiceError | null, response?: CheckResponse) => {
              if (error !== null) done({ code: error.code, allowed: null });
              else done({ code: GrpcStatus.OK, allowed: response?.status?.code === 0 });
            },
          );
        }),
    )
    .finally(() => client.close());
}

/** One HTTP-mode Check that gives up after CLIENT_DEADLINE_MS: the status, or "timeout". */
async function httpCheck(replica: KeygateProcess, key: string): Promise<number | "timeout"> {
  try {
    const res = await fetch(`http://127.0.0.1:${replica.ports.http}/check/v1/things`, {
      headers: { "x-api-key": key },
      signal: AbortSignal.timeout(CLIENT_DEADLINE_MS),
    });
    await res.arrayBuffer();
    return res.status;
  } catch (error) {
    if (error instanceof Error && (error.name === "TimeoutError" || error.name === "AbortError")) return "timeout";
    throw error;
  }
}

async function createKey(replica: KeygateProcess, ownerId: string): Promise<string> {
  await postJson(replica.ports.admin, "UpsertAccount", { ownerId, plan: "business" });
  const answer = await postJson(replica.ports.admin, "CreateKey", { ownerId, name: ownerId });
  const secret = answer.json["secret"];
  if (answer.status !== 200 || typeof secret !== "string") throw new Error(`CreateKey answered ${answer.status}`);
  return secret;
}

describe.runIf(ready)("the Check budget", () => {
  let mongo: MongoWire;
  let redis: RedisServer;
  let keygate: KeygateProcess;
  let dir: string;

  beforeAll(async () => {
    const [startedMongo, startedRedis] = await Promise.all([startMongoWire(), startRedis()]);
    if (startedRedis === null) throw new Error("redis-server did not start");
    [mongo, redis] = [startedMongo, startedRedis];
    dir = mkdtempSync(join(tmpdir(), "keygate-budget-"));
    const policy = join(dir, "policy.yaml");
    writeFileSync(policy, stringify(TEST_POLICY));
    keygate = await spawnKeygate({
      cwd: dir,
      env: sharedBackendEnv({
        mongoUri: mongo.uri,
        redisUrl: redis.url,
        pepper: "budget-test-pepper-0123456789abcdefghijklm",
        policyFile: policy,
        adminToken: ADMIN_TOKEN,
        extra: { KEYGATE_CHECK_BUDGET_MS: String(BUDGET_MS) },
      }),
    });
  }, 120_000);

  afterAll(async () => {
    await keygate?.stop();
    await Promise.all([mongo?.stop(), redis?.stop()]);
    if (dir !== undefined) rmSync(dir, { recursive: true, force: true });
  }, 60_000);

  it("answers UNAVAILABLE within the budget while Redis is frozen, never an allow, and allows again after", async () => {
    const key = await createKey(keygate, "budget-redis");
    expect(await grpcCheck(keygate, key)).toEqual({ code: GrpcStatus.OK, allowed: true });
    redis.freeze();
    try {
      // The key is in L1; its rate-limit call to Redis cannot answer.
      for (let i = 0; i < 3; i++) {
        expect(await grpcCheck(keygate, key)).toEqual({ code: GrpcStatus.UNAVAILABLE, allowed: null });
        expect(await httpCheck(keygate, key)).toBe(503);
      }
    } finally {
      redis.thaw();
    }
    // Redis answers again: the key is allowed again (the first Checks may still see a reconnect).
    let last: GrpcAnswer | null = null;
    for (let i = 0; i < 100 && !(last?.allowed === true); i++) last = await grpcCheck(keygate, key);
    expect(last).toEqual({ code: GrpcStatus.OK, allowed: true });
  }, 60_000);

  it("answers UNAVAILABLE within the budget for a key no cache holds while MongoDB is down", async () => {
    const cached = await createKey(keygate, "budget-mongo-cached");
    const uncached = await createKey(keygate, "budget-mongo-uncached");
    expect(await httpCheck(keygate, cached)).toBe(200);
    await mongo.pause();
    try {
      for (let i = 0; i < 3; i++) {
        expect(await grpcCheck(keygate, uncached)).toEqual({ code: GrpcStatus.UNAVAILABLE, allowed: null });
        expect(await httpCheck(keygate, uncached)).toBe(503);
      }
      // A cached key needs no store.
      expect(await httpCheck(keygate, cached)).toBe(200);
    } finally {
      await mongo.start();
    }
  }, 60_000);

  it("counts each budget-exceeded Check as UNAVAILABLE in keygate_checks_total", async () => {
    const metrics = await (await fetch(`http://127.0.0.1:${keygate.ports.admin}/metrics`)).text();
    const count = (mode: string) =>
      Number(new RegExp(`^keygate_checks_total\\{decision="error",reason="UNAVAILABLE",mode="${mode}"\\} (\\d+)$`, "m").exec(metrics)?.[1] ?? "0");
    expect(count("grpc")).toBeGreaterThanOrEqual(6);
    expect(count("http")).toBeGreaterThanOrEqual(6);
  });
});
