import { spawn } from "node:child_process";
import type { ChildProcess } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { stringify } from "yaml";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { DEFAULT_POLICY_INPUT } from "../../src/config.js";
import { postJson } from "../harness/keygate.js";
import { until } from "../harness/poll.js";
import { requireServer } from "../harness/ports.js";
import { embeddedEnv, listeningPorts, serveArgs } from "../harness/process.js";
import { redisAvailable, startRedis } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";
import { startTcpRelay } from "../harness/tcp-relay.js";
import type { TcpRelay } from "../harness/tcp-relay.js";

// keygate reads the policy file first, then its start may wait a long while (Redis, MongoDB,
// schema steps). An edit or a SIGHUP in that wait is held and put in force once keygate listens:
// never lost (a looser policy served with no sign), and a SIGHUP never ends the process.
// Redis is reached through a frozen relay, so each start waits for as long as a case needs.

const TOKEN = "policy-start-window-token-0123456789abcdef";
const ADMIN_ROUTE = { method: "*", pathPrefix: "/v1/admin", requiredScopes: ["admin"] };
const OPEN_POLICY = { ...DEFAULT_POLICY_INPUT, routes: [] };
const CLOSED_POLICY = { ...DEFAULT_POLICY_INPUT, scopes: { catalog: ["read", "write", "admin"], default: ["read"] }, routes: [ADMIN_ROUTE] };
const WAIT_MS = 20_000;
const POLL = { intervalMs: 20 } as const;
const HELD = "configuration reload held until keygate has started";

/** A `keygate serve` child watched from its first byte, before it listens. */
interface Serving {
  child: ChildProcess;
  stdout(): string;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  /** The JSON log lines with this message. */
  lines(msg: string): Array<Record<string, unknown>>;
}

const servers = requireServer("redis-server", redisAvailable(), "apt-get install redis-server");

describe.runIf(servers)("policy edits and SIGHUP while keygate starts", { timeout: 90_000 }, () => {
  let redis: RedisServer;
  let relay: TcpRelay;
  let dir: string | undefined;
  let policyFile = "";
  let serving: Serving | undefined;

  beforeAll(async () => {
    const started = await startRedis();
    if (started === null) throw new Error("redis-server did not start");
    redis = started;
  });
  afterEach(async () => {
    const child = serving?.child;
    if (child !== undefined && child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
    await serving?.exited;
    serving = undefined;
    await relay?.close();
    if (dir !== undefined) rmSync(dir, { recursive: true, force: true });
    dir = undefined;
  });
  afterAll(async () => {
    await redis?.stop();
  });

  /** Starts keygate with OPEN_POLICY behind a frozen Redis relay, and waits until its start waits for Redis. */
  async function startWaiting(extra: Record<string, string> = {}): Promise<Serving> {
    const home = mkdtempSync(join(tmpdir(), "keygate-reload-start-"));
    dir = home;
    policyFile = join(home, "policy.yaml");
    writeFileSync(policyFile, stringify(OPEN_POLICY));
    relay = await startTcpRelay(redis.port);
    relay.freeze();
    const env: NodeJS.ProcessEnv = {};
    for (const [name, value] of Object.entries(process.env)) if (!name.startsWith("KEYGATE_")) env[name] = value;
    Object.assign(env, embeddedEnv({ dataDir: join(home, "data"), adminToken: TOKEN, policyFile, extra: { KEYGATE_REDIS_URL: `redis://127.0.0.1:${relay.port}`, ...extra } }));
    const child = spawn(process.execPath, serveArgs(), { cwd: home, env, stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    child.stdout.on("data", (chunk: Buffer) => (out += chunk.toString()));
    const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((done) => child.on("exit", (code, signal) => done({ code, signal })));
    const lines = (msg: string): Array<Record<string, unknown>> =>
      out
        .split("\n")
        .filter((line) => line.startsWith("{"))
        .map((line) => JSON.parse(line) as Record<string, unknown>)
        .filter((entry) => entry["msg"] === msg);
    serving = { child, stdout: () => out, exited, lines };
    // Its first Redis command is held: the policy file has been read, the start is waiting.
    await until(() => relay.heldChunks >= 1, WAIT_MS, "keygate's first Redis command", POLL);
    return serving;
  }

  /** Waits for a line with this message, or for the process to end (which fails the wait at once). */
  async function logged(kg: Serving, msg: string): Promise<Array<Record<string, unknown>>> {
    let ended = false;
    void kg.exited.then(() => (ended = true));
    await until(() => ended || kg.lines(msg).length > 0, WAIT_MS, `the log line "${msg}"`, POLL);
    if (kg.lines(msg).length === 0) throw new Error(`keygate ended before logging "${msg}": ${JSON.stringify(await kg.exited)}\n${kg.stdout()}`);
    return kg.lines(msg);
  }

  async function listening(kg: Serving): Promise<{ grpc: number; http: number; admin: number }> {
    await logged(kg, "keygate listening");
    const ports = listeningPorts(kg.stdout());
    if (ports === null) throw new Error("no ports in the listening line");
    return ports;
  }

  it("happy: an edit made while the start waits for Redis is in force as soon as keygate listens", async () => {
    const kg = await startWaiting();
    // The operator's edit: /v1/admin now needs the admin scope.
    writeFileSync(policyFile, stringify(CLOSED_POLICY));
    expect((await logged(kg, HELD)).map((entry) => entry["why"])).toEqual(["file changed"]);
    relay.thaw();
    const ports = await listening(kg);
    const reloads = await logged(kg, "configuration reload");
    expect(reloads.map(({ why, policyFile: policy, adminTokensFile, tlsFiles }) => ({ why, policy, adminTokensFile, tlsFiles }))).toEqual([
      { why: "file changed, held during the start", policy: "applied", adminTokensFile: "unchanged", tlsFiles: "unchanged" },
    ]);

    const created = await postJson(ports.admin, "CreateKey", { ownerId: "start-window", name: "k", scopes: ["read"] }, TOKEN);
    expect(created.status).toBe(200);
    const adminRoute = await fetch(`http://127.0.0.1:${ports.http}/check/v1/admin/users`, { headers: { "x-api-key": String(created.json["secret"]) } });
    expect(adminRoute.status).toBe(403);
    const metrics = await (await fetch(`http://127.0.0.1:${ports.admin}/metrics`)).text();
    expect(metrics).toContain('keygate_config_reloads_total{file="policy",result="applied"} 1\n');
    expect(metrics).toContain('keygate_config_reload_failing{file="policy"} 0\n');
  });

  it("error: a SIGHUP while the start waits for Redis does not end the process; the reload runs once keygate listens", async () => {
    const kg = await startWaiting();
    kg.child.kill("SIGHUP");
    expect((await logged(kg, HELD)).map((entry) => entry["why"])).toEqual(["SIGHUP"]);
    relay.thaw();
    await listening(kg);
    const reloads = await logged(kg, "configuration reload");
    expect(reloads.map(({ why, policyFile: policy }) => ({ why, policy }))).toEqual([{ why: "SIGHUP, held during the start", policy: "unchanged" }]);
    kg.child.kill("SIGTERM");
    expect(await kg.exited).toEqual({ code: 0, signal: null });
  });

  it("error: a SIGTERM while the start waits for Redis still ends the process (as Node's default does: nothing listens yet)", async () => {
    const kg = await startWaiting();
    kg.child.kill("SIGTERM");
    expect(await kg.exited).toEqual({ code: null, signal: "SIGTERM" });
    expect(kg.lines("keygate listening")).toEqual([]);
  });

  it("error: a SIGHUP or an edit during the drain is ignored: the drain ends with exit 0 and nothing is reloaded", async () => {
    const kg = await startWaiting({ KEYGATE_SHUTDOWN_DELAY_SECONDS: "1" });
    relay.thaw();
    await listening(kg);
    kg.child.kill("SIGTERM");
    await logged(kg, "draining");
    kg.child.kill("SIGHUP");
    writeFileSync(policyFile, stringify(CLOSED_POLICY));
    expect(await kg.exited).toEqual({ code: 0, signal: null });
    expect([kg.lines(HELD), kg.lines("configuration reload")]).toEqual([[], []]);
  });
});
