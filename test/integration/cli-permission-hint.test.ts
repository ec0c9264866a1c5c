import { execFile } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { stringify } from "yaml";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { builtCli } from "../harness/built-cli.js";
import { TEST_POLICY, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

// The CLI's advice on PERMISSION_DENIED matches the refusal: keygate answers an API key used as an
// admin token with UNAUTHENTICATED, so PERMISSION_DENIED means a named token lacks a permission
// (or an owner).

const READER = { name: "reader", token: "tmp-probe-reader-token-0123456789abc", permissions: ["keys:read"] };

describe("keygate CLI advice on a permission refusal", { timeout: 60_000 }, () => {
  let kg: TestKeygate;
  let dir: string;
  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), "keygate-tmp-cli-"));
    const file = join(dir, "admin-tokens.yaml");
    writeFileSync(file, stringify({ tokens: [READER] }));
    kg = await startKeygate({ policy: TEST_POLICY, env: { KEYGATE_ADMIN_TOKENS_FILE: file } });
  });
  afterAll(async () => {
    await kg?.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  it("a keys:read token refused keys:write is not told it is an API key", async () => {
    const env: NodeJS.ProcessEnv = {};
    for (const [name, value] of Object.entries(process.env)) if (!name.startsWith("KEYGATE_")) env[name] = value;
    Object.assign(env, { KEYGATE_URL: `http://127.0.0.1:${kg.ports.admin}`, KEYGATE_ADMIN_TOKEN: READER.token });
    const result = await new Promise<{ code: number; stderr: string }>((done) => {
      execFile(process.execPath, [builtCli(), "keys", "create", "--owner", "probe", "--name", "k"], { env, cwd: resolve(import.meta.dirname, "../.."), timeout: 20_000 }, (error, _stdout, stderr) =>
        done({ code: error === null ? 0 : Number(error.code), stderr }),
      );
    });
    expect(result.code).toBe(1);
    expect(result.stderr).toMatch(/permission_denied: .*keys:write/);
    expect(result.stderr).not.toContain(READER.token);
    expect(result.stderr).not.toMatch(/not an API key/);
    expect(result.stderr).toContain("use an admin token that has that permission");
  });
});
