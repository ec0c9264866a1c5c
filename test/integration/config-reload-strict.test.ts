import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { stringify } from "yaml";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { DEFAULT_POLICY_INPUT } from "../../src/config.js";
import { ADMIN_TOKEN, httpCheck, postJson, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

// Live reload never loosens on a file keygate does not fully understand: a policy or tokens file
// with a field it does not know is a failed reload (the version in force stays), and a token
// removed from the file stops working, the last one too.

const ADMIN_ROUTE = { method: "*", pathPrefix: "/v1/admin", requiredScopes: ["admin"] };
const policy = (routes: unknown[]): string => stringify({ ...DEFAULT_POLICY_INPUT, routes });

const ACME = { name: "acme-only", token: "tmp-probe-acme-only-token-0123456789", permissions: ["keys:read", "accounts:read"], owners: ["acme"] };
const OPS = { name: "ops", token: "tmp-probe-ops-token-0123456789abcdefg", permissions: ["keys:read"] };

describe("live reload never loosens on a file it does not fully understand", { timeout: 60_000 }, () => {
  let kg: TestKeygate;
  let dir: string;
  let tokensFile: string;
  let secret = "";

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), "keygate-tmp-probe-"));
    tokensFile = join(dir, "admin-tokens.yaml");
    writeFileSync(tokensFile, stringify({ tokens: [ACME] }));
    kg = await startKeygate({ policy: { ...DEFAULT_POLICY_INPUT, routes: [ADMIN_ROUTE] }, env: { KEYGATE_ADMIN_TOKENS_FILE: tokensFile } });
    const created = await postJson(kg.ports.admin, "CreateKey", { ownerId: "globex", name: "k", scopes: ["read"] }, ADMIN_TOKEN);
    secret = String(created.json["secret"]);
  });
  afterAll(async () => {
    await kg?.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  const adminRoute = async (): Promise<number> => (await httpCheck(kg.ports.http, "/check/v1/admin/users", { "x-api-key": secret })).status;

  it("a policy edit that misspells requiredScopes is a failed reload; the admin route stays closed to a read-only key", async () => {
    expect(await adminRoute()).toBe(403);
    writeFileSync(join(kg.dataDir, "policy.yaml"), policy([{ method: "*", pathPrefix: "/v1/admin", requiredScope: ["admin"] }]));
    const outcome = kg.app.reload();
    const status = await adminRoute();
    expect({ policy: outcome.policy, status }).toEqual({ policy: "failed", status: 403 });
  });

  it("a tokens-file entry that misspells owners is a failed reload, not a token for every owner", async () => {
    writeFileSync(tokensFile, stringify({ tokens: [{ name: ACME.name, token: ACME.token, permissions: ACME.permissions, owner: ["acme"] }] }));
    const outcome = kg.app.reload();
    const other = await postJson(kg.ports.admin, "GetAccount", { ownerId: "globex" }, ACME.token);
    expect({ adminTokens: outcome.adminTokens, status: other.status }).toEqual({ adminTokens: "failed", status: 403 });
  });

  it("removing the last named token from the file revokes it (the break-glass token remains)", async () => {
    writeFileSync(tokensFile, stringify({ tokens: [OPS] }));
    expect(kg.app.reload().adminTokens).toBe("applied");
    expect((await postJson(kg.ports.admin, "ListKeys", { ownerId: "globex" }, OPS.token)).status).toBe(200);
    writeFileSync(tokensFile, stringify({ tokens: [] }));
    const outcome = kg.app.reload();
    const after = await postJson(kg.ports.admin, "ListKeys", { ownerId: "globex" }, OPS.token);
    expect({ adminTokens: outcome.adminTokens, status: after.status }).toEqual({ adminTokens: "applied", status: 401 });
  });
});
