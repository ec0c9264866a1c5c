import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { stringify } from "yaml";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { DEFAULT_POLICY_INPUT } from "../../src/config.js";
import { postJson } from "../harness/keygate.js";
import { until } from "../harness/poll.js";
import { spawnKeygate } from "../harness/process.js";
import type { KeygateProcess } from "../harness/process.js";

/** A reload is noticed by a file watcher; 15 s is generous, and polling every 50 ms keeps the probes light. */
const RELOAD_TIMEOUT_MS = 15_000;
const POLL = { intervalMs: 50 } as const;

// The policy file and the admin tokens file are reloaded on a running keygate (file watch and
// SIGHUP): a valid edit takes effect, a broken one keeps the version in force.

const FULL_TOKEN = "live-reload-full-token-0123456789abcdef";
const OPS = { name: "ops", token: "live-reload-ops-token-0123456789abcdef", permissions: ["keys:read"] };
const LATE = { name: "late", token: "live-reload-late-token-0123456789abcdef", permissions: ["keys:read"] };
const ADMIN_ROUTE = { method: "*", pathPrefix: "/v1/admin", requiredScopes: ["admin"] };

describe("live reload", { timeout: 120_000 }, () => {
  let dir: string;
  let policyFile: string;
  let tokensFile: string;
  let kg: KeygateProcess;
  let secret = "";

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), "keygate-reload-"));
    policyFile = join(dir, "policy.yaml");
    tokensFile = join(dir, "admin-tokens.yaml");
    writeFileSync(policyFile, stringify({ ...DEFAULT_POLICY_INPUT, routes: [ADMIN_ROUTE] }));
    writeFileSync(tokensFile, stringify({ tokens: [OPS] }));
    kg = await spawnKeygate({
      cwd: dir,
      env: {
        KEYGATE_DATA_DIR: join(dir, "data"),
        KEYGATE_CONFIG: policyFile,
        KEYGATE_ADMIN_TOKENS: FULL_TOKEN,
        KEYGATE_ADMIN_TOKENS_FILE: tokensFile,
        KEYGATE_HOST: "127.0.0.1",
        KEYGATE_GRPC_PORT: "0",
        KEYGATE_HTTP_AUTHZ_PORT: "0",
        KEYGATE_ADMIN_PORT: "0",
      },
    });
    const created = await postJson(kg.ports.admin, "CreateKey", { ownerId: "reload-owner", name: "k", scopes: ["read"] }, FULL_TOKEN);
    secret = String(created.json["secret"]);
  });
  afterAll(async () => {
    await kg?.stop("SIGTERM");
    rmSync(dir, { recursive: true, force: true });
  });

  const adminRoute = async (): Promise<number> => (await fetch(`http://127.0.0.1:${kg.ports.http}/check/v1/admin/users`, { headers: { "x-api-key": secret } })).status;
  const metrics = async (): Promise<string> => (await fetch(`http://127.0.0.1:${kg.ports.admin}/metrics`)).text();
  const sample = (text: string, name: string, labels: string): number => Number(new RegExp(`^${name}\\{${labels}\\} (\\S+)$`, "m").exec(text)?.[1] ?? "NaN");
  const listAs = async (token: string): Promise<number> => (await postJson(kg.ports.admin, "ListKeys", { ownerId: "reload-owner" }, token)).status;

  it("a policy edit takes effect on the running process; a broken edit does not, and says so", async () => {
    expect(await adminRoute()).toBe(403);
    writeFileSync(policyFile, stringify({ ...DEFAULT_POLICY_INPUT, routes: [] }));
    await until(async () => (await adminRoute()) === 200, RELOAD_TIMEOUT_MS, "the route's scope requirement to go", POLL);
    expect(sample(await metrics(), "keygate_config_reloads_total", 'file="policy",result="applied"')).toBeGreaterThanOrEqual(1);

    writeFileSync(policyFile, "plans: [this is not a policy\n");
    await until(async () => sample(await metrics(), "keygate_config_reload_failing", 'file="policy"') === 1, RELOAD_TIMEOUT_MS, "the failed reload to show", POLL);
    // The log line comes over the child's stdout pipe, which can trail the metrics answer.
    await until(() => kg.stdout().includes("policy reload failed; the policy in force stays"), RELOAD_TIMEOUT_MS, "the failed reload's log line", POLL);
    expect(await adminRoute()).toBe(200);

    writeFileSync(policyFile, stringify({ ...DEFAULT_POLICY_INPUT, routes: [ADMIN_ROUTE] }));
    await until(async () => (await adminRoute()) === 403, RELOAD_TIMEOUT_MS, "the route to come back", POLL);
    expect(sample(await metrics(), "keygate_config_reload_failing", 'file="policy"')).toBe(0);
  });

  it("an admin tokens edit takes effect; a broken one keeps the tokens in force", async () => {
    expect([await listAs(OPS.token), await listAs(LATE.token)]).toEqual([200, 401]);
    writeFileSync(tokensFile, stringify({ tokens: [OPS, LATE] }));
    await until(async () => (await listAs(LATE.token)) === 200, RELOAD_TIMEOUT_MS, "the new token to work", POLL);
    writeFileSync(tokensFile, stringify({ tokens: [{ ...LATE, token: "short" }] }));
    await until(async () => sample(await metrics(), "keygate_config_reload_failing", 'file="admin_tokens"') === 1, RELOAD_TIMEOUT_MS, "the failed reload to show", POLL);
    expect([await listAs(OPS.token), await listAs(LATE.token)]).toEqual([200, 200]);
    expect(kg.stdout()).not.toContain(LATE.token);
    expect(kg.stdout()).not.toContain(OPS.token);
    writeFileSync(tokensFile, stringify({ tokens: [LATE] }));
    await until(async () => (await listAs(OPS.token)) === 401, RELOAD_TIMEOUT_MS, "the removed token to stop working", POLL);
    expect(await listAs(LATE.token)).toBe(200);
  });

  it("SIGHUP reloads both files", async () => {
    // A file watcher's settled reload from the edits above may still land now and moves the same
    // counter, so the SIGHUP's own log line is what is awaited: it names the outcome per file.
    const sighupLines = (): Array<Record<string, unknown>> =>
      kg
        .stdout()
        .split("\n")
        .filter((line) => line.includes('"why":"SIGHUP"'))
        .map((line) => JSON.parse(line) as Record<string, unknown>);
    const before = sample(await metrics(), "keygate_config_reloads_total", 'file="policy",result="unchanged"');
    expect(sighupLines()).toEqual([]);
    kg.child.kill("SIGHUP");
    await until(() => sighupLines().length === 1, RELOAD_TIMEOUT_MS, "the SIGHUP reload's log line", POLL);
    expect(sighupLines()[0]).toMatchObject({ msg: "configuration reload", policyFile: "unchanged", adminTokensFile: "unchanged", tlsFiles: "unchanged" });
    expect(sample(await metrics(), "keygate_config_reloads_total", 'file="policy",result="unchanged"')).toBeGreaterThanOrEqual(Number.isNaN(before) ? 1 : before + 1);
  });
});
