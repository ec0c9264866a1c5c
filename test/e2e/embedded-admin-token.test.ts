import { existsSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { stringify } from "yaml";
import { describe, expect, it } from "vitest";
import { postJson } from "../harness/keygate.js";
import { serveUntilExit, spawnedKeygates, spawnKeygate } from "../harness/process.js";

// The embedded store's data/admin-token is a token that may do everything. With
// KEYGATE_ADMIN_TOKENS_FILE alone, the file's scoped tokens are the only admin tokens, as with
// MongoDB: none is generated or printed, and one already in the data directory is ignored with a
// warning naming it (a token no reload of the tokens file could remove). A hand-written file is
// held to the 24 characters every other admin token needs, and one that group or others may read
// is reported as the pepper file is. Messages name the file, never the token.

const LISTENERS = { KEYGATE_HOST: "127.0.0.1", KEYGATE_GRPC_PORT: "0", KEYGATE_HTTP_AUTHZ_PORT: "0", KEYGATE_ADMIN_PORT: "0", KEYGATE_LOG_LEVEL: "info" };
const SCOPED = { name: "dashboard", token: "dashboard-token-0123456789abcdefghij", permissions: ["keys:read"], owners: ["acme"] };
const GENERATED_MSG = "keygate generated an admin token";
const IGNORED_MSG = "the admin token file is ignored: with KEYGATE_ADMIN_TOKENS_FILE and no KEYGATE_ADMIN_TOKENS, that file's scoped tokens are the only admin tokens; delete it";
const WEAK_MSG = "the admin token file is weaker than a generated one; keygate uses it";

const { running, children, tempDataDir } = spawnedKeygates("keygate-admin-token-file-");

/** A tokens file holding only the scoped dashboard token. */
function scopedTokensFile(dir: string): string {
  const file = join(dir, "admin-tokens.yaml");
  writeFileSync(file, stringify({ tokens: [SCOPED] }), { mode: 0o600 });
  return file;
}

/** The JSON log lines at `level` or above, with the fields these tests look at; read before any call, the start's. */
function linesFrom(stdout: string, level: number): Array<Record<string, unknown>> {
  return stdout
    .split("\n")
    .filter((line) => line.startsWith("{"))
    .map((line) => JSON.parse(line) as Record<string, unknown>)
    .filter((line) => typeof line["level"] === "number" && line["level"] >= level)
    .map(({ level: at, file, problems, msg }) => ({ level: at, file, problems, msg }));
}

describe("embedded keygate with KEYGATE_ADMIN_TOKENS_FILE alone: happy", { timeout: 60_000 }, () => {
  it("generates and prints no admin token: the file's scoped tokens are the only ones", async () => {
    const { dir, dataDir } = tempDataDir();
    const kg = await spawnKeygate({ cwd: dir, env: { KEYGATE_DATA_DIR: dataDir, KEYGATE_ADMIN_TOKENS_FILE: scopedTokensFile(dir), ...LISTENERS } });
    running.push(kg);
    expect({
      adminTokenFile: existsSync(join(dataDir, "admin-token")),
      unshownMarker: existsSync(join(dataDir, "admin-token.unshown")),
      printed: kg.stdout().includes(GENERATED_MSG),
      warnings: linesFrom(kg.stdout(), 40),
    }).toEqual({ adminTokenFile: false, unshownMarker: false, printed: false, warnings: [] });
    expect((await postJson(kg.ports.admin, "ListKeys", { ownerId: "acme" }, SCOPED.token)).status).toBe(200);
    expect((await postJson(kg.ports.admin, "CreateKey", { ownerId: "acme", name: "k" }, SCOPED.token)).status).toBe(403);
    expect(await kg.stop("SIGTERM")).toBe(0);
  });
});

describe("embedded keygate with KEYGATE_ADMIN_TOKENS_FILE alone: security", { timeout: 60_000 }, () => {
  it("ignores a data/admin-token already there, with one warning naming the file and not the token", async () => {
    const { dir, dataDir } = tempDataDir();
    const earlier = "written-by-an-earlier-start-0123456789";
    const tokenFile = join(dataDir, "admin-token");
    writeFileSync(tokenFile, `${earlier}\n`, { mode: 0o600 });
    const kg = await spawnKeygate({ cwd: dir, env: { KEYGATE_DATA_DIR: dataDir, KEYGATE_ADMIN_TOKENS_FILE: scopedTokensFile(dir), ...LISTENERS } });
    running.push(kg);
    expect(linesFrom(kg.stdout(), 40)).toEqual([{ level: 40, file: tokenFile, problems: undefined, msg: IGNORED_MSG }]);
    expect((await postJson(kg.ports.admin, "CreateKey", { ownerId: "globex", name: "k" }, earlier)).status).toBe(401);
    expect((await postJson(kg.ports.admin, "ListKeys", { ownerId: "acme" }, SCOPED.token)).status).toBe(200);
    expect(await kg.stop("SIGTERM")).toBe(0);
    expect(kg.stdout() + kg.stderr()).not.toContain(earlier);
    expect(kg.stdout()).not.toContain(GENERATED_MSG);
  });
});

describe("embedded keygate with KEYGATE_ADMIN_TOKENS_FILE alone: error", { timeout: 60_000 }, () => {
  it("refuses a tokens file with no tokens (exit 2), since nothing else would admit a call", async () => {
    const { dir, dataDir } = tempDataDir();
    const tokensFile = join(dir, "admin-tokens.yaml");
    writeFileSync(tokensFile, "tokens: []\n", { mode: 0o600 });
    const result = await serveUntilExit(dir, { KEYGATE_DATA_DIR: dataDir, KEYGATE_ADMIN_TOKENS_FILE: tokensFile, ...LISTENERS }, children);
    expect(result.code).toBe(2);
    expect(result.stderr).toBe(`keygate: KEYGATE_ADMIN_TOKENS_FILE (${tokensFile}) lists no tokens and KEYGATE_ADMIN_TOKENS is unset: keygate needs at least one admin token\n`);
    expect(existsSync(join(dataDir, "admin-token"))).toBe(false);
  });
});

describe("embedded keygate with a hand-written data/admin-token: happy", { timeout: 60_000 }, () => {
  it("uses one of exactly 24 characters that group or others may read, with one error-level line naming the file and its mode", async () => {
    const { dir, dataDir } = tempDataDir();
    const token = "handwritten-admin-tok-24";
    expect(token).toHaveLength(24);
    const tokenFile = join(dataDir, "admin-token");
    writeFileSync(tokenFile, `${token}\n`, { mode: 0o644 });
    const kg = await spawnKeygate({ cwd: dir, env: { KEYGATE_DATA_DIR: dataDir, ...LISTENERS } });
    running.push(kg);
    expect(linesFrom(kg.stdout(), 40)).toEqual([{ level: 50, file: tokenFile, problems: ["readable by group or others (mode 0644; chmod 600 it)"], msg: WEAK_MSG }]);
    expect((await postJson(kg.ports.admin, "CreateKey", { ownerId: "anyone", name: "k" }, token)).status).toBe(200);
    expect(await kg.stop("SIGTERM")).toBe(0);
    expect(kg.stdout() + kg.stderr()).not.toContain(token);
  });
});

describe("embedded keygate with a hand-written data/admin-token: error", { timeout: 60_000 }, () => {
  it("refuses one of 23 characters (exit 2), naming the file and the rule, not the token", async () => {
    const { dir, dataDir } = tempDataDir();
    const weak = "handwritten-admin-tok23";
    expect(weak).toHaveLength(23);
    const tokenFile = join(dataDir, "admin-token");
    writeFileSync(tokenFile, `${weak}\n`, { mode: 0o600 });
    const result = await serveUntilExit(dir, { KEYGATE_DATA_DIR: dataDir, ...LISTENERS }, children);
    expect(result.code).toBe(2);
    expect(result.stderr).toBe(`keygate: ${tokenFile} holds an admin token shorter than 24 characters; delete it to generate a new one\n`);
    expect(result.stdout).not.toContain(weak);
  });
});
