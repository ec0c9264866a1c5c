import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { Agent, request } from "node:http";
import { connect } from "node:http2";
import type { ClientHttp2Session } from "node:http2";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { parseAllDocuments, stringify } from "yaml";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { z } from "zod";
import { Authorization, CheckRequestSchema, CheckResponseSchema } from "../../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import { HealthCheckRequestSchema, HealthCheckResponseSchema, HealthCheckResponse_ServingStatus } from "../../src/gen/grpc/health/v1/health_pb.js";
import { authorizationDefinition, healthDefinition } from "../../src/server/grpc-authz.js";
import { ADMIN_TOKEN, TEST_POLICY, postJson } from "../harness/keygate.js";
import { untilValue } from "../harness/poll.js";
import { embeddedEnv, spawnKeygate } from "../harness/process.js";
import type { KeygateProcess } from "../harness/process.js";

// A rollout with the shipped Deployment, seen from the proxy's open connections. The
// keygate-authz Service is a ClusterIP, so the preStop sleep (endpoint withdrawn) does not move
// the HTTP/2 connection Envoy already has to this pod; keygate's GOAWAY does, and a Check Envoy
// sent as that GOAWAY crossed it is refused (REFUSED_STREAM) and answered 503 to the client,
// without a retry (envoyproxy/envoy#36450). Node's http2 has no two-step GOAWAY, so the
// Deployment sets KEYGATE_SHUTDOWN_DELAY_SECONDS: from SIGTERM keygate reports NOT_SERVING,
// which Envoy's health check sees, and keeps answering on the connections it has until the
// proxy has moved away. This runs keygate with the Deployment's drain settings and checks that,
// after SIGTERM, health says NOT_SERVING while Checks on the open gRPC connection, and on the
// HTTP authorization port's keep-alive connection, are still answered. That the delay outlasts
// envoy.yaml's health checks is test/unit/deploy-manifests.test.ts's; this test does not wait the
// delay out (afterAll kills keygate).

const deploymentSchema = z.object({
  spec: z.object({
    template: z.object({
      spec: z.object({ containers: z.array(z.object({ env: z.array(z.object({ name: z.string(), value: z.string().optional() })) })).min(1) }),
    }),
  }),
});

/** The drain variables of deploy/k8s/base/deployment.yaml, as its pods get them. */
function manifestDrainEnv(): Record<string, string> {
  const text = readFileSync(resolve(import.meta.dirname, "../../deploy/k8s/base/deployment.yaml"), "utf8");
  const [container] = deploymentSchema.parse(parseAllDocuments(text)[0]?.toJS()).spec.template.spec.containers;
  const drain: Record<string, string> = {};
  for (const { name, value } of container?.env ?? []) {
    if ((name === "KEYGATE_SHUTDOWN_DELAY_SECONDS" || name === "KEYGATE_SHUTDOWN_GRACE_SECONDS") && value !== undefined) drain[name] = value;
  }
  return drain;
}

interface UnaryOutcome {
  grpcStatus: string | null;
  message: Uint8Array | null;
  error: string | null;
}

/** One gRPC unary call on the session: its grpc-status and message, or how the stream failed. */
function unary(session: ClientHttp2Session, path: string, body: Uint8Array): Promise<UnaryOutcome> {
  return new Promise((done) => {
    const frame = Buffer.alloc(5 + body.length);
    frame.writeUInt32BE(body.length, 1);
    frame.set(body, 5);
    let stream;
    try {
      stream = session.request({ ":method": "POST", ":path": path, "content-type": "application/grpc", te: "trailers" });
    } catch (error) {
      // After a GOAWAY node refuses new streams on the session at once.
      return done({ grpcStatus: null, message: null, error: error instanceof Error ? error.message : String(error) });
    }
    const chunks: Buffer[] = [];
    let grpcStatus: string | null = null;
    let error: string | null = null;
    stream.on("response", (h) => {
      if (h["grpc-status"] !== undefined) grpcStatus = String(h["grpc-status"]);
    });
    stream.on("trailers", (t) => (grpcStatus = String(t["grpc-status"])));
    stream.on("data", (c: Buffer) => chunks.push(c));
    stream.on("error", (e: Error) => (error = e.message));
    stream.on("close", () => {
      const data = Buffer.concat(chunks);
      const message = data.length >= 5 ? data.subarray(5, 5 + data.readUInt32BE(1)) : null;
      done({ grpcStatus, message, error: error ?? (grpcStatus === null ? `stream closed with RST code ${stream.rstCode}` : null) });
    });
    stream.end(frame);
  });
}

/** A Check of `secret` on the session: the decision's code (0: allowed), or how the call failed. */
async function check(session: ClientHttp2Session, secret: string): Promise<{ grpcStatus: string | null; decision: number | null; error: string | null }> {
  const request = create(CheckRequestSchema, { attributes: { request: { http: { id: "drain", method: "GET", path: "/v1/things", host: "api.example.com", headers: { "x-api-key": secret } } } } });
  const outcome = await unary(session, authorizationDefinition.Check.path, toBinary(CheckRequestSchema, request));
  const decision = outcome.message === null ? null : (fromBinary(CheckResponseSchema, outcome.message).status?.code ?? 0);
  return { grpcStatus: outcome.grpcStatus, decision, error: outcome.error };
}

/** What gRPC health says for the service Envoy's health check names, or how the call failed. */
async function health(session: ClientHttp2Session): Promise<{ status: HealthCheckResponse_ServingStatus | null; error: string | null }> {
  const outcome = await unary(session, healthDefinition.Check.path, toBinary(HealthCheckRequestSchema, create(HealthCheckRequestSchema, { service: Authorization.typeName })));
  return { status: outcome.message === null ? null : fromBinary(HealthCheckResponseSchema, outcome.message).status, error: outcome.error };
}

/** A Check on the HTTP authorization port through `agent`: status, Connection header, and whether it reused a kept-alive socket. */
function httpCheck(port: number, agent: Agent, secret: string): Promise<{ status: number; connection: string | undefined; reusedSocket: boolean }> {
  return new Promise((done, fail) => {
    const req = request({ host: "127.0.0.1", port, path: "/check/v1/things", agent, headers: { "x-api-key": secret } }, (res) => {
      res.resume();
      res.on("end", () => done({ status: res.statusCode ?? 0, connection: res.headers.connection, reusedSocket: req.reusedSocket }));
    });
    req.on("error", fail);
    req.end();
  });
}

describe("rollout with the shipped Deployment: SIGTERM with a proxy's connections open", () => {
  const agent = new Agent({ keepAlive: true, maxSockets: 1 });
  let dir = "";
  let kg: KeygateProcess | undefined;
  let session: ClientHttp2Session | undefined;

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), "keygate-drain-manifest-"));
    const policy = join(dir, "policy.yaml");
    writeFileSync(policy, stringify(TEST_POLICY));
    kg = await spawnKeygate({
      cwd: dir,
      env: embeddedEnv({ dataDir: join(dir, "data"), adminToken: ADMIN_TOKEN, policyFile: policy, extra: { ...manifestDrainEnv(), KEYGATE_LOG_LEVEL: "info" } }),
    });
  });

  afterAll(async () => {
    session?.destroy();
    agent.destroy();
    // The drain delay is still running: no need to wait it out.
    await kg?.stop("SIGKILL");
    if (dir !== "") rmSync(dir, { recursive: true, force: true });
  });

  it("reports NOT_SERVING and still answers Checks on the open connections", async () => {
    if (kg === undefined) throw new Error("keygate did not start");
    const created = await postJson(kg.ports.admin, "CreateKey", { ownerId: "drain-owner", name: "k" });
    const secret = z.string().parse(created.json["secret"]);
    const grpc = connect(`http://127.0.0.1:${kg.ports.grpc}`);
    session = grpc;
    grpc.on("error", () => undefined);

    // The proxy's connections, busy before SIGTERM.
    expect(await check(grpc, secret)).toEqual({ grpcStatus: "0", decision: 0, error: null });
    expect(await health(grpc)).toEqual({ status: HealthCheckResponse_ServingStatus.SERVING, error: null });
    expect(await httpCheck(kg.ports.http, agent, secret)).toEqual({ status: 200, connection: "keep-alive", reusedSocket: false });

    // The preStop sleep is over: SIGTERM. Until its health check has seen NOT_SERVING the proxy
    // keeps sending on the connection it has.
    kg.child.kill("SIGTERM");
    const { value: draining } = await untilValue(
      () => health(grpc),
      (h) => h.status !== HealthCheckResponse_ServingStatus.SERVING,
      10_000,
      "gRPC health not SERVING after SIGTERM",
      { intervalMs: 20 },
    );
    // Without a delay this is the GOAWAY instead: the session takes no new stream.
    expect(draining).toEqual({ status: HealthCheckResponse_ServingStatus.NOT_SERVING, error: null });
    expect(await check(grpc, secret)).toEqual({ grpcStatus: "0", decision: 0, error: null });
    // The HTTP authorization port keeps its idle keep-alive connections open through the delay too.
    expect(await httpCheck(kg.ports.http, agent, secret)).toEqual({ status: 200, connection: "keep-alive", reusedSocket: true });
    expect(kg.child.exitCode).toBeNull();
  });
});
