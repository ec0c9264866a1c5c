import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { connect } from "node:http2";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { stringify } from "yaml";
import { Writable } from "node:stream";
import { create } from "@bufbuild/protobuf";
import type { MessageInitShape } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import type { Client, Interceptor } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { Client as GrpcClient, credentials } from "@grpc/grpc-js";
import type { ServiceError } from "@grpc/grpc-js";
import { DEFAULT_POLICY_INPUT, loadConfig } from "../../src/config.js";
import type { HttpAuthzProxy } from "../../src/config.js";
import { CheckRequestSchema } from "../../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import type { CheckRequest, CheckResponse } from "../../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import { KeyAdmin } from "../../src/gen/keygate/v1/key_admin_pb.js";
import { authorizationDefinition } from "../../src/server/grpc-authz.js";
import { buildKeygate } from "../../src/server/app.js";
import type { BoundPorts, Keygate } from "../../src/server/app.js";
import { createLogger } from "../../src/server/logger.js";
import { TestClock } from "./clock.js";

/** The admin token every test instance accepts. */
export const ADMIN_TOKEN = "kgadm_test_token_0123456789abcdefghij";

/** The policy the integration tests run with: the built-in plans plus scopes and routes to test. */
export const TEST_POLICY = {
  ...DEFAULT_POLICY_INPUT,
  scopes: { catalog: ["tutor", "decks", "progress", "webhooks"], default: ["tutor"] },
  routes: [
    { method: "*", pathPrefix: "/v1/decks", requiredScopes: ["decks"] },
    { method: "POST", pathPrefix: "/v1/webhooks", requiredScopes: ["webhooks"] },
    { method: "*", pathPrefix: "/v1/projects/alpha", projectId: "alpha" },
  ],
};

/** A keygate running on port 0 in a fresh data directory, with clients for every entry point. */
export interface TestKeygate {
  app: Keygate;
  ports: BoundPorts;
  clock: TestClock;
  dataDir: string;
  logLines: string[];
  admin: Client<typeof KeyAdmin>;
  check(init: MessageInitShape<typeof CheckRequestSchema>): Promise<CheckResponse>;
  checkRaw(request: CheckRequest): Promise<CheckResponse>;
  /** Stops the instance; keeps the data directory when `keepData` is set (for restarts). */
  stop(options?: { keepData?: boolean }): Promise<void>;
}

/**
 * Starts keygate with the test policy. Pass `dataDir` to reuse one (restart tests), and
 * `httpAuthzProxy` for the proxy in front of the HTTP mode (KEYGATE_HTTP_AUTHZ_PROXY; default envoy).
 */
export async function startKeygate(
  options: { dataDir?: string; policy?: unknown; clock?: TestClock; env?: Record<string, string>; httpAuthzProxy?: HttpAuthzProxy } = {},
): Promise<TestKeygate> {
  const dataDir = options.dataDir ?? mkdtempSync(join(tmpdir(), "keygate-test-"));
  const policyPath = join(dataDir, "policy.yaml");
  writeFileSync(policyPath, stringify(options.policy ?? TEST_POLICY));
  const config = loadConfig({
    KEYGATE_DATA_DIR: dataDir,
    KEYGATE_CONFIG: policyPath,
    KEYGATE_ADMIN_TOKENS: ADMIN_TOKEN,
    KEYGATE_HOST: "127.0.0.1",
    KEYGATE_GRPC_PORT: "0",
    KEYGATE_HTTP_AUTHZ_PORT: "0",
    KEYGATE_ADMIN_PORT: "0",
    KEYGATE_SHUTDOWN_GRACE_SECONDS: "2",
    // Test machines are shared and loaded: a budget as short as production's would turn a slow
    // test run into UNAVAILABLE answers. Tests of the budget set their own.
    KEYGATE_CHECK_BUDGET_MS: "5000",
    // A backend that does not answer fails the start at once, as the tests of a failed start
    // expect; tests of the start's wait for one set their own.
    KEYGATE_STARTUP_WAIT_SECONDS: "0",
    ...(options.httpAuthzProxy === undefined ? {} : { KEYGATE_HTTP_AUTHZ_PROXY: options.httpAuthzProxy }),
    ...options.env,
  });
  const logLines: string[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _encoding, callback) {
      logLines.push(chunk.toString("utf8"));
      callback();
    },
  });
  const clock = options.clock ?? new TestClock();
  const app = await buildKeygate(config, { logger: createLogger("debug", sink), nowMs: clock.now, defaultMetrics: false });
  const ports = await app.start();

  const auth: Interceptor = (next) => (req) => {
    req.header.set("authorization", `Bearer ${ADMIN_TOKEN}`);
    return next(req);
  };
  const transport = createGrpcTransport({ baseUrl: `http://127.0.0.1:${ports.admin}`, interceptors: [auth] });
  const admin = createClient(KeyAdmin, transport);

  const grpcClient = new GrpcClient(`127.0.0.1:${ports.grpc}`, credentials.createInsecure());
  const checkDef = authorizationDefinition.Check;
  const checkRaw = (request: CheckRequest): Promise<CheckResponse> =>
    new Promise((resolve, reject) => {
      grpcClient.makeUnaryRequest<CheckRequest, CheckResponse>(
        checkDef.path,
        checkDef.requestSerialize,
        checkDef.responseDeserialize,
        request,
        (error: ServiceError | null, response?: CheckResponse) => {
          if (error !== null) reject(error);
          else if (response === undefined) reject(new Error("empty Check response"));
          else resolve(response);
        },
      );
    });

  return {
    app,
    ports,
    clock,
    dataDir,
    logLines,
    admin,
    checkRaw,
    check: (init) => checkRaw(create(CheckRequestSchema, init)),
    async stop(stopOptions = {}) {
      grpcClient.close();
      await app.stop();
      if (stopOptions.keepData !== true && options.dataDir === undefined) rmSync(dataDir, { recursive: true, force: true });
    },
  };
}

/** A CheckRequest for an HTTP request with these headers, path and context extensions. */
export function checkInit(
  headers: Record<string, string>,
  path = "/v1/things",
  method = "GET",
  contextExtensions: Record<string, string> = {},
): MessageInitShape<typeof CheckRequestSchema> {
  return { attributes: { request: { http: { id: "req-1", method, path, host: "api.example.com", headers } }, contextExtensions } };
}

/** The HTTP status Envoy would answer a Check with, and keygate's error code for a denial (null on an allow). */
export function checkOutcome(response: CheckResponse): { status: number; code: string | null } {
  if (response.httpResponse.case === "okResponse") return { status: 200, code: null };
  if (response.httpResponse.case !== "deniedResponse") throw new Error("a Check answered neither allow nor deny");
  const body = JSON.parse(response.httpResponse.value.body) as { error: { code: string } };
  return { status: response.httpResponse.value.status?.code ?? 0, code: body.error.code };
}

/** A POST of Connect JSON to KeyAdmin, exactly what `curl -d` sends. */
export async function postJson(port: number, method: string, body: unknown, token: string | null = ADMIN_TOKEN): Promise<{ status: number; json: Record<string, unknown> }> {
  const headers: Record<string, string> = { "content-type": "application/json" };
  if (token !== null) headers["authorization"] = `Bearer ${token}`;
  const res = await fetch(`http://127.0.0.1:${port}/keygate.v1.KeyAdmin/${method}`, {
    method: "POST",
    headers,
    body: typeof body === "string" ? body : JSON.stringify(body),
  });
  return { status: res.status, json: (await res.json()) as Record<string, unknown> };
}

/** A gRPC or gRPC-Web message frame of `json`: flag 0, its length, then the bytes. */
export function grpcFrame(json: string): Buffer {
  const data = Buffer.from(json);
  const head = Buffer.alloc(5);
  head.writeUInt32BE(data.length, 1);
  return Buffer.concat([head, data]);
}

/** A KeyAdmin call over gRPC with the JSON codec: the grpc-status and the decoded grpc-message it ended with. */
export async function grpcJsonCall(port: number, method: string, json: string): Promise<{ status: string; message: string }> {
  const session = connect(`http://127.0.0.1:${port}`);
  try {
    return await new Promise<{ status: string; message: string }>((resolve, reject) => {
      const stream = session.request({
        ":method": "POST",
        ":path": `/keygate.v1.KeyAdmin/${method}`,
        "content-type": "application/grpc+json",
        te: "trailers",
        authorization: `Bearer ${ADMIN_TOKEN}`,
      });
      let headers: Record<string, unknown> = {};
      stream.on("response", (h) => (headers = h));
      stream.on("trailers", (t) => (headers = { ...headers, ...t }));
      stream.on("data", () => undefined);
      stream.on("error", reject);
      stream.on("close", () => resolve({ status: String(headers["grpc-status"]), message: decodeURIComponent(String(headers["grpc-message"])) }));
      stream.end(grpcFrame(json));
    });
  } finally {
    session.close();
  }
}

/** A KeyAdmin call over gRPC-Web with the JSON codec: the whole response body, frames and all. */
export async function grpcWebJsonCall(port: number, method: string, json: string): Promise<Buffer> {
  const res = await fetch(`http://127.0.0.1:${port}/keygate.v1.KeyAdmin/${method}`, {
    method: "POST",
    headers: { "content-type": "application/grpc-web+json", authorization: `Bearer ${ADMIN_TOKEN}` },
    body: grpcFrame(json),
  });
  return Buffer.from(await res.arrayBuffer());
}

/** A GET to the HTTP authz port's /check, as nginx or Caddy would send it. */
export async function httpCheck(port: number, path: string, headers: Record<string, string>): Promise<{ status: number; headers: Headers; body: string }> {
  const res = await fetch(`http://127.0.0.1:${port}${path}`, { headers });
  return { status: res.status, headers: res.headers, body: await res.text() };
}

/** The code and message a KeyAdmin call was refused with; throws if it succeeded or failed otherwise. */
export async function adminRefusal(call: Promise<unknown>): Promise<{ code: Code; message: string }> {
  try {
    await call;
  } catch (error) {
    if (error instanceof ConnectError) return { code: error.code, message: error.rawMessage };
    throw error;
  }
  throw new Error("the call succeeded");
}
