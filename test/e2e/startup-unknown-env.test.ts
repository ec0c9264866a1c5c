import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { stringify } from "yaml";
import { afterAll, describe, expect, it } from "vitest";
import { DEFAULT_POLICY_INPUT } from "../../src/config.js";
import { postJson } from "../harness/keygate.js";
import { spawnKeygate } from "../harness/process.js";
import type { KeygateProcess } from "../harness/process.js";

// The policy and tokens files are read strictly, the environment is not: Kubernetes injects
// KEYGATE_* service links for a Service named keygate or keygate-*, and the CLI, CI and children
// share names. A KEYGATE_* variable keygate does not read (a misspelling: KEYGATE_CONFIG_FILE for
// KEYGATE_CONFIG) is named in one warn line at start, with the name it may have meant, and the
// "keygate listening" line says which policy is in force.

const TOKEN = "unknown-env-admin-token-0123456789abcdef";
const WARN_LEVEL = 40;
const IGNORED = "environment variables keygate does not read are ignored";

/** What Kubernetes sets for Services named keygate and keygate-redis, and the CLI's own variable. */
const NOT_MISTAKES = {
  KEYGATE_SERVICE_HOST: "10.96.0.10",
  KEYGATE_SERVICE_PORT: "8080",
  KEYGATE_SERVICE_PORT_ADMIN: "8080",
  KEYGATE_PORT: "tcp://10.96.0.10:8080",
  KEYGATE_PORT_8080_TCP: "tcp://10.96.0.10:8080",
  KEYGATE_PORT_8080_TCP_ADDR: "10.96.0.10",
  KEYGATE_PORT_8080_TCP_PORT: "8080",
  KEYGATE_PORT_8080_TCP_PROTO: "tcp",
  KEYGATE_REDIS_SERVICE_PORT: "6379",
  KEYGATE_URL: "http://127.0.0.1:8080",
};

const dir = mkdtempSync(join(tmpdir(), "keygate-unknown-env-"));
const running: KeygateProcess[] = [];
afterAll(async () => {
  await Promise.all(running.map((kg) => kg.stop("SIGTERM")));
  rmSync(dir, { recursive: true, force: true });
});

/** The JSON log lines of a process's stdout. */
function logLines(kg: KeygateProcess): Record<string, unknown>[] {
  return kg
    .stdout()
    .split("\n")
    .filter((line) => line.startsWith("{"))
    .map((line) => JSON.parse(line) as Record<string, unknown>);
}

/** A policy whose only route asks for the admin scope on /v1/admin. */
function adminRoutePolicy(): string {
  const policyFile = join(dir, "policy.yaml");
  writeFileSync(policyFile, stringify({ ...DEFAULT_POLICY_INPUT, routes: [{ method: "*", pathPrefix: "/v1/admin", requiredScopes: ["admin"] }] }));
  return policyFile;
}

async function start(name: string, env: Record<string, string>): Promise<KeygateProcess> {
  const kg = await spawnKeygate({
    cwd: dir,
    env: { KEYGATE_DATA_DIR: join(dir, name), KEYGATE_ADMIN_TOKENS: TOKEN, KEYGATE_HOST: "127.0.0.1", KEYGATE_GRPC_PORT: "0", KEYGATE_HTTP_AUTHZ_PORT: "0", KEYGATE_ADMIN_PORT: "0", ...env },
  });
  running.push(kg);
  return kg;
}

/** The status a read-only key gets on /v1/admin through the HTTP authorization port. */
async function readOnlyKeyOnAdminRoute(kg: KeygateProcess): Promise<number> {
  const created = await postJson(kg.ports.admin, "CreateKey", { ownerId: "env-owner", name: "k", scopes: ["read"] }, TOKEN);
  const secret = String(created.json["secret"]);
  return (await fetch(`http://127.0.0.1:${kg.ports.http}/check/v1/admin/users`, { headers: { "x-api-key": secret } })).status;
}

describe("KEYGATE_* variables keygate does not read.error", { timeout: 60_000 }, () => {
  it("a misspelled KEYGATE_CONFIG is named with the known name, and the listening line says the built-in policy is in force", async () => {
    const kg = await start("typo", { KEYGATE_CONFIG_FILE: adminRoutePolicy(), ...NOT_MISTAKES });
    const lines = logLines(kg);
    const warnings = lines.filter((line) => line["msg"] === IGNORED);
    expect(warnings).toHaveLength(1);
    expect(warnings[0]?.["level"]).toBe(WARN_LEVEL);
    expect(warnings[0]?.["variables"]).toEqual(["KEYGATE_CONFIG_FILE (did you mean KEYGATE_CONFIG?)"]);
    for (const name of Object.keys(NOT_MISTAKES)) expect(kg.stdout() + kg.stderr()).not.toContain(name);
    expect(lines.find((line) => line["msg"] === "keygate listening")?.["policy"]).toBe("built-in");
    // The variable is ignored, not refused: the built-in policy (no routes) judges the key.
    expect(await readOnlyKeyOnAdminRoute(kg)).toBe(200);
  });
});

describe("KEYGATE_* variables keygate reads happy", { timeout: 60_000 }, () => {
  it("no warning beside service links, and the listening line names the policy file", async () => {
    const policyFile = adminRoutePolicy();
    const kg = await start("known", { KEYGATE_CONFIG: policyFile, ...NOT_MISTAKES });
    const lines = logLines(kg);
    expect(lines.filter((line) => line["msg"] === IGNORED)).toEqual([]);
    expect(lines.find((line) => line["msg"] === "keygate listening")?.["policy"]).toBe(policyFile);
    expect(await readOnlyKeyOnAdminRoute(kg)).toBe(403);
  });
});
