import { spawn } from "node:child_process";
import type { ChildProcess } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { create } from "@bufbuild/protobuf";
import { Client as GrpcClient, credentials } from "@grpc/grpc-js";
import type { ServiceError } from "@grpc/grpc-js";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { z } from "zod";
import { CheckRequestSchema } from "../../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import type { CheckRequest, CheckResponse } from "../../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import { authorizationDefinition } from "../../src/server/grpc-authz.js";
import { KEYGATE_NODE_FLAGS } from "../../src/server/node-flags.js";
import { builtCli } from "../harness/built-cli.js";
import { listeningPorts, serveArgs, spawnKeygate } from "../harness/process.js";
import type { KeygateProcess } from "../harness/process.js";

/** Starts `keygate serve` as `npm start` would, in `cwd`, with no KEYGATE_* variable set. */
async function serve(cwd: string): Promise<KeygateProcess> {
  const started = await spawnKeygate({ cwd, env: {} });
  running.push(started);
  return started;
}

// A failed assertion must not leave a keygate holding the default ports.
const running: KeygateProcess[] = [];
afterAll(async () => {
  await Promise.all(running.map((p) => p.stop("SIGKILL")));
});

const dirs: string[] = [];
afterAll(() => {
  for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
});

describe("keygate serve with no environment (the Quick start)", () => {
  it("creates ./data with 0600 secrets, prints the token once, serves all three ports, and exits 0 on SIGTERM", async () => {
    const cwd = mkdtempSync(join(tmpdir(), "keygate-serve-"));
    dirs.push(cwd);
    const first = await serve(cwd);
    const dataDir = join(cwd, "data");
    expect(statSync(join(dataDir, "keygate.db")).isFile()).toBe(true);
    expect(statSync(join(dataDir, "pepper")).mode & 0o777).toBe(0o600);
    expect(statSync(join(dataDir, "admin-token")).mode & 0o777).toBe(0o600);
    expect(statSync(dataDir).mode & 0o777).toBe(0o700);
    const token = readFileSync(join(dataDir, "admin-token"), "utf8").trim();
    expect(first.stdout().split(token).length - 1).toBe(1);
    expect(first.stdout()).toContain("Use it: curl");

    // Admin port (default 8080): create a key over Connect JSON.
    const created = await fetch("http://127.0.0.1:8080/keygate.v1.KeyAdmin/CreateKey", {
      method: "POST",
      headers: { "content-type": "application/json", authorization: `Bearer ${token}` },
      body: JSON.stringify({ ownerId: "quickstart", name: "first" }),
    });
    expect(created.status).toBe(200);
    const { secret } = (await created.json()) as { secret: string };
    // The secret went to the HTTP client only, never to the log.
    expect(first.stdout()).not.toContain(secret);

    // HTTP authz port (default 8181).
    const allowed = await fetch("http://127.0.0.1:8181/check/v1/anything", { headers: { "x-api-key": secret } });
    expect(allowed.status).toBe(200);
    expect(allowed.headers.get("x-keygate-owner-id")).toBe("quickstart");

    // gRPC port (default 9191): a plain TCP connect proves it listens; Check itself is covered elsewhere.
    const { connect } = await import("node:net");
    await new Promise<void>((done, fail) => {
      const socket = connect(9191, "127.0.0.1", () => {
        socket.destroy();
        done();
      });
      socket.once("error", fail);
    });

    expect(await first.stop("SIGTERM")).toBe(0);

    // A second start reuses the data: the token is not printed again and the key still verifies.
    const second = await serve(cwd);
    expect(second.stdout()).not.toContain(token);
    const again = await fetch("http://127.0.0.1:8181/check", { headers: { authorization: `Bearer ${secret}` } });
    expect(again.status).toBe(200);
    expect(await second.stop("SIGTERM")).toBe(0);
  });

  it("refuses to start on a bad variable, naming it", async () => {
    const cwd = mkdtempSync(join(tmpdir(), "keygate-badenv-"));
    dirs.push(cwd);
    const child = spawn(process.execPath, serveArgs(), {
      cwd,
      env: { ...process.env, KEYGATE_GRPC_PORT: "not-a-port" },
      stdio: ["ignore", "pipe", "pipe"],
    });
    let err = "";
    child.stderr.on("data", (chunk: Buffer) => (err += chunk.toString()));
    const code = await new Promise<number | null>((done) => child.on("exit", done));
    expect(code).toBe(2);
    expect(err).toContain("KEYGATE_GRPC_PORT");
  });

  // An empty variable (compose's `${GRPC_PORT}` with GRPC_PORT unset) was read as 0: a port the
  // kernel picks, which no proxy is configured for, or a 0 s drain.
  it.each(["KEYGATE_GRPC_PORT", "KEYGATE_HTTP_AUTHZ_PORT", "KEYGATE_ADMIN_PORT", "KEYGATE_SHUTDOWN_GRACE_SECONDS"])(
    "refuses to start on an empty %s, naming it, exit 2",
    async (variable) => {
      const cwd = mkdtempSync(join(tmpdir(), "keygate-emptyenv-"));
      dirs.push(cwd);
      const env: NodeJS.ProcessEnv = {};
      for (const [name, value] of Object.entries(process.env)) if (!name.startsWith("KEYGATE_")) env[name] = value;
      // Ports the system picks for the other listeners: a keygate that starts anyway holds no default port.
      Object.assign(env, { KEYGATE_HOST: "127.0.0.1", KEYGATE_GRPC_PORT: "0", KEYGATE_HTTP_AUTHZ_PORT: "0", KEYGATE_ADMIN_PORT: "0", [variable]: "" });
      const child = spawn(process.execPath, serveArgs(), { cwd, env, stdio: ["ignore", "pipe", "pipe"] });
      let out = "";
      let err = "";
      // One that starts anyway is stopped at once, so it fails the test instead of outliving it.
      child.stdout.on("data", (chunk: Buffer) => {
        out += chunk.toString();
        if (out.includes("keygate listening")) child.kill("SIGKILL");
      });
      child.stderr.on("data", (chunk: Buffer) => (err += chunk.toString()));
      const stuck = setTimeout(() => child.kill("SIGKILL"), 20_000);
      // "close", not "exit": stderr is read to its end before the exact comparison.
      const code = await new Promise<number | null>((done) => child.on("close", done));
      clearTimeout(stuck);
      expect(out).not.toContain("keygate listening");
      expect(code).toBe(2);
      expect(err).toBe(`keygate: invalid environment: ${variable}: must not be empty\n`);
    },
  );
});

const root = resolve(import.meta.dirname, "../..");

const packageScripts = z.object({ scripts: z.object({ start: z.string() }) });
/** Runs `node <keygate's node flags> dist/cli.js serve` with only the port variables set (to 0), until its listening line. */
async function serveBuilt(cwd: string): Promise<{ child: ChildProcess; ports: { grpc: number; http: number; admin: number }; stdout: () => string; stderr: () => string }> {
  const env: NodeJS.ProcessEnv = {};
  for (const [name, value] of Object.entries(process.env)) if (!name.startsWith("KEYGATE_")) env[name] = value;
  Object.assign(env, { KEYGATE_GRPC_PORT: "0", KEYGATE_HTTP_AUTHZ_PORT: "0", KEYGATE_ADMIN_PORT: "0" });
  const child = spawn(process.execPath, [...KEYGATE_NODE_FLAGS, builtCli(), "serve"], { cwd, env, stdio: ["ignore", "pipe", "pipe"] });
  builtRunning.push(child);
  let out = "";
  let err = "";
  child.stdout.on("data", (chunk: Buffer) => (out += chunk.toString()));
  child.stderr.on("data", (chunk: Buffer) => (err += chunk.toString()));
  const started = performance.now();
  for (;;) {
    const ports = listeningPorts(out);
    if (ports !== null) return { child, ports, stdout: () => out, stderr: () => err };
    if (child.exitCode !== null || child.signalCode !== null) throw new Error(`dist/cli.js serve exited with ${child.exitCode ?? child.signalCode}:\n${out}\n${err}`);
    if (performance.now() - started > 30_000) throw new Error(`dist/cli.js serve did not start within 30 s:\n${out}\n${err}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

const builtRunning: ChildProcess[] = [];
afterAll(() => {
  for (const child of builtRunning) if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
});

function grpcCheck(port: number, request: CheckRequest): Promise<CheckResponse> {
  const client = new GrpcClient(`127.0.0.1:${port}`, credentials.createInsecure());
  const def = authorizationDefinition.Check;
  return new Promise<CheckResponse>((done, fail) => {
    client.makeUnaryRequest<CheckRequest, CheckResponse>(def.path, def.requestSerialize, def.responseDeserialize, request, (error: ServiceError | null, response?: CheckResponse) => {
      if (error !== null) fail(error);
      else if (response === undefined) fail(new Error("empty Check response"));
      else done(response);
    });
  }).finally(() => client.close());
}

function checkRequest(headers: Record<string, string>): CheckRequest {
  return create(CheckRequestSchema, { attributes: { request: { http: { id: "req-built", method: "GET", path: "/v1/things", host: "api.example.com", headers } } } });
}

describe("npm start: the compiled dist/cli.js", () => {
  beforeAll(() => {
    // Fails by name when dist/ is missing or older than src/ (`npm run build` makes it).
    builtCli();
  });

  it("is what `npm start` runs", () => {
    const pkg = packageScripts.parse(JSON.parse(readFileSync(join(root, "package.json"), "utf8")));
    expect(pkg.scripts.start).toBe(["node", ...KEYGATE_NODE_FLAGS, "dist/cli.js", "serve"].join(" "));
  });

  it("serves a gRPC Check and a KeyAdmin JSON call with the token it printed, from an empty directory", async () => {
    const cwd = mkdtempSync(join(tmpdir(), "keygate-dist-"));
    dirs.push(cwd);
    const built = await serveBuilt(cwd);
    const { ports } = built;
    expect(ports.grpc).toBeGreaterThan(0);

    // The token is printed once, with a curl line aimed at the port actually bound.
    const printed = /admin token[^\n]*:\n\s+(kgadm_[A-Za-z0-9_-]+)\n/.exec(built.stdout());
    const token = printed?.[1];
    if (token === undefined) throw new Error(`no admin token printed:\n${built.stdout()}`);
    expect(token).toBe(readFileSync(join(cwd, "data", "admin-token"), "utf8").trim());
    expect(built.stdout()).toContain(`http://127.0.0.1:${ports.admin}/keygate.v1.KeyAdmin/CreateKey`);

    // gRPC Check with no key: a DENIED answer (UNAUTHENTICATED, 401), not a transport error.
    const denied = await grpcCheck(ports.grpc, checkRequest({}));
    expect(denied.status?.code).toBe(16);
    if (denied.httpResponse.case !== "deniedResponse") throw new Error(`expected a denial, got ${denied.httpResponse.case ?? "nothing"}`);
    expect(denied.httpResponse.value.status?.code).toBe(401);
    expect(JSON.parse(denied.httpResponse.value.body)).toMatchObject({ success: false, error: { code: "UNAUTHENTICATED", statusCode: 401 } });

    // KeyAdmin over Connect JSON, exactly as the printed curl line sends it.
    const created = await fetch(`http://127.0.0.1:${ports.admin}/keygate.v1.KeyAdmin/CreateKey`, {
      method: "POST",
      headers: { "content-type": "application/json", authorization: `Bearer ${token}` },
      body: JSON.stringify({ ownerId: "user_1", name: "first key" }),
    });
    expect(created.status).toBe(200);
    const { secret } = z.object({ secret: z.string().startsWith("kg_live_") }).parse(await created.json());
    const refused = await fetch(`http://127.0.0.1:${ports.admin}/keygate.v1.KeyAdmin/CreateKey`, {
      method: "POST",
      headers: { "content-type": "application/json", authorization: "Bearer kgadm_not_the_printed_token_0123456789" },
      body: JSON.stringify({ ownerId: "user_1", name: "second key" }),
    });
    await refused.arrayBuffer();
    expect(refused.status).toBe(401);

    // And the new key passes a real Check.
    const allowed = await grpcCheck(ports.grpc, checkRequest({ authorization: `Bearer ${secret}` }));
    expect(allowed.status?.code).toBe(0);
    expect(allowed.httpResponse.case).toBe("okResponse");
    // Nothing on stderr: no runtime warning (node:sqlite warns as experimental before Node 24.15).
    expect(built.stderr()).toBe("");

    const exited = new Promise<number | null>((done) => built.child.once("exit", (code) => done(code)));
    built.child.kill("SIGTERM");
    expect(await exited).toBe(0);
  });
});
