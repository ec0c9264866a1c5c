import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { connect } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { create } from "@bufbuild/protobuf";
import { Client as GrpcClient, credentials } from "@grpc/grpc-js";
import type { ServiceError } from "@grpc/grpc-js";
import { stringify } from "yaml";
import { afterAll, describe, expect, it } from "vitest";
import { CheckRequestSchema } from "../../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import type { CheckResponse } from "../../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import { HealthCheckRequestSchema, HealthCheckResponse_ServingStatus } from "../../src/gen/grpc/health/v1/health_pb.js";
import type { HealthCheckResponse } from "../../src/gen/grpc/health/v1/health_pb.js";
import { authorizationDefinition, healthDefinition } from "../../src/server/grpc-authz.js";
import { ADMIN_TOKEN, TEST_POLICY, postJson } from "../harness/keygate.js";
import { spawnKeygate } from "../harness/process.js";
import type { KeygateProcess } from "../harness/process.js";

/** The error code of a TCP connect to 127.0.0.1:port, or "connected". */
function dial(port: number): Promise<string> {
  return new Promise((done) => {
    const socket = connect(port, "127.0.0.1");
    socket.once("connect", () => {
      socket.destroy();
      done("connected");
    });
    socket.once("error", (error: NodeJS.ErrnoException) => done(error.code ?? error.message));
  });
}

/** A UTC day as "YYYY-MM-DD", `offsetDays` from today. */
function utcDay(offsetDays: number): string {
  return new Date(Date.now() + offsetDays * 86_400_000).toISOString().slice(0, 10);
}

const dirs: string[] = [];
const running: KeygateProcess[] = [];
afterAll(async () => {
  await Promise.all(running.map((p) => p.stop("SIGKILL")));
  for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
});

async function start(dir: string): Promise<KeygateProcess> {
  const policy = join(dir, "policy.yaml");
  writeFileSync(policy, stringify({ ...TEST_POLICY, plans: { business: { maxActiveKeys: 100, rateLimit: { limit: 1_000_000, windowSeconds: 60 } } }, defaultPlan: "business" }));
  const started = await spawnKeygate({
    cwd: dir,
    env: {
      KEYGATE_DATA_DIR: join(dir, "data"),
      KEYGATE_CONFIG: policy,
      KEYGATE_ADMIN_TOKENS: ADMIN_TOKEN,
      KEYGATE_HOST: "127.0.0.1",
      KEYGATE_GRPC_PORT: "0",
      KEYGATE_HTTP_AUTHZ_PORT: "0",
      KEYGATE_ADMIN_PORT: "0",
      KEYGATE_SHUTDOWN_DELAY_SECONDS: "1",
      KEYGATE_LOG_LEVEL: "info",
    },
  });
  running.push(started);
  return started;
}

describe("SIGTERM during steady load", () => {
  it("completes every in-flight Check, answers until the balancer has moved away, flushes last use and usage, exits 0, and refuses connections after", async () => {
    const dir = mkdtempSync(join(tmpdir(), "keygate-shutdown-"));
    dirs.push(dir);
    const first = await start(dir);
    const keys: Array<{ id: string; secret: string; owner: string }> = [];
    for (let i = 0; i < 20; i++) {
      const owner = `shutdown-${i % 4}`;
      const created = await postJson(first.ports.admin, "CreateKey", { ownerId: owner, name: `k${i}` });
      const key = created.json["key"];
      const secret = created.json["secret"];
      if (typeof secret !== "string" || typeof key !== "object" || key === null || !("id" in key) || typeof key.id !== "string") throw new Error("CreateKey failed");
      keys.push({ id: key.id, secret, owner });
    }
    const okByOwner = new Map(keys.map((key) => [key.owner, 0]));

    // The load generator behaves like a proxy with active health checks: it stops sending new
    // Checks to this replica once health says NOT_SERVING.
    const health = new GrpcClient(`127.0.0.1:${first.ports.grpc}`, credentials.createInsecure());
    let serving = true;
    const watch = health.makeServerStreamRequest<ReturnType<typeof create<typeof HealthCheckRequestSchema>>, HealthCheckResponse>(
      healthDefinition.Watch.path,
      healthDefinition.Watch.requestSerialize,
      healthDefinition.Watch.responseDeserialize,
      create(HealthCheckRequestSchema, { service: "" }),
    );
    watch.on("data", (answer: HealthCheckResponse) => {
      if (answer.status !== HealthCheckResponse_ServingStatus.SERVING) serving = false;
    });
    watch.on("error", () => undefined);

    const channels = Array.from({ length: 4 }, () => new GrpcClient(`127.0.0.1:${first.ports.grpc}`, credentials.createInsecure()));
    let ok = 0;
    let okAfterSignal = 0;
    let signalled = false;
    const failures: string[] = [];
    const checkOnce = (channel: GrpcClient, secret: string, owner: string): Promise<void> =>
      new Promise((done) => {
        channel.makeUnaryRequest<ReturnType<typeof create<typeof CheckRequestSchema>>, CheckResponse>(
          authorizationDefinition.Check.path,
          authorizationDefinition.Check.requestSerialize,
          authorizationDefinition.Check.responseDeserialize,
          create(CheckRequestSchema, { attributes: { request: { http: { method: "GET", path: "/v1/x", headers: { authorization: `Bearer ${secret}` } } } } }),
          (error: ServiceError | null, response?: CheckResponse) => {
            if (error !== null) failures.push(`${error.code} ${error.details}`);
            else if (response?.status?.code !== 0) failures.push(`denied ${response?.status?.code}`);
            else {
              ok += 1;
              if (signalled) okAfterSignal += 1;
              okByOwner.set(owner, (okByOwner.get(owner) ?? 0) + 1);
            }
            done();
          },
        );
      });
    const loops = Array.from({ length: 32 }, async (_, i) => {
      const channel = channels[i % channels.length];
      if (channel === undefined) return;
      for (let n = i; serving; n++) {
        const key = keys[n % keys.length];
        if (key !== undefined) await checkOnce(channel, key.secret, key.owner);
      }
    });

    await new Promise((resolve) => setTimeout(resolve, 1000));
    signalled = true;
    const exitCode = first.stop("SIGTERM");
    await Promise.all(loops);
    expect(await exitCode).toBe(0);
    for (const channel of channels) channel.close();
    health.close();

    // The process is gone: a new connection is refused, not accepted and left hanging.
    expect(await dial(first.ports.grpc)).toBe("ECONNREFUSED");

    console.log(`shutdown under load: ${ok} Checks answered, ${okAfterSignal} after SIGTERM, ${failures.length} failed`);
    expect(failures).toEqual([]);
    expect(ok - okAfterSignal).toBeGreaterThan(0);
    expect(okAfterSignal).toBeGreaterThan(0);

    // Write-behind state reached the store before exit.
    const second = await start(dir);
    for (const key of keys) {
      const got = await postJson(second.ports.admin, "GetKey", { id: key.id });
      expect(typeof (got.json["key"] as { lastUsedAt?: unknown }).lastUsedAt, key.id).toBe("string");
    }
    // Every allowed Check the load generator saw was counted, and the count reached the store.
    // The range spans yesterday to tomorrow so that a run across UTC midnight still adds up.
    const usageByOwner = new Map<string, number>();
    for (const owner of okByOwner.keys()) {
      const usage = await postJson(second.ports.admin, "GetUsage", { ownerId: owner, from: utcDay(-1), to: utcDay(1) });
      expect(usage.status, JSON.stringify(usage.json)).toBe(200);
      const totals = usage.json["totals"];
      const allowed = typeof totals === "object" && totals !== null && "allowed" in totals ? Number(totals.allowed) : 0;
      usageByOwner.set(owner, allowed);
    }
    expect(usageByOwner).toEqual(okByOwner);
    await second.stop("SIGTERM");
  });
});
