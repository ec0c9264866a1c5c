import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { stringify } from "yaml";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { postJson } from "../harness/keygate.js";
import { until } from "../harness/poll.js";
import { serveUntilExit, spawnedKeygates, spawnKeygate } from "../harness/process.js";
import type { KeygateProcess } from "../harness/process.js";

// README (Operations): a broken tokens file fails the start or the reload with one line "naming
// the file and the problem, never a token". In the flow style the README shows
// (`- { name: …, token: "…", permissions: […] }`), a ";" typed for ":" (the same key without
// shift), a "," or a "=" makes the token part of a field's name, and zod's own message for an
// unknown field quotes that name. Schema problems are told by their code and place only. The
// token is new (in no redaction list), so only the message itself can keep it out.

const FULL_TOKEN = "typo-leak-full-token-0123456789abcdefgh";
const OPS = { name: "ops", token: "typo-leak-ops-token-0123456789abcdefghij", permissions: ["keys:read"] };
// A password-generator style token (no kgadm_ prefix for the scrubber's pattern to catch).
const NEW_TOKEN = "Zq8Vw3Lp6Rt1Xy4Mn7Bc2Df5Gh9Jk0";
const typoFile = (sep: string): string =>
  `tokens:\n  - { name: ops, token: "${OPS.token}", permissions: [keys:read] }\n  - { name: billing, token${sep} "${NEW_TOKEN}", permissions: [verify] }\n`;
/** The problem every typo above makes: the entry has no token, and a field keygate does not know. */
const TYPO_PROBLEM = "tokens.1.token: expected string; tokens.1: unknown field (allowed: name, token, permissions, owners)";
const RELOAD_TIMEOUT_MS = 15_000;

const listeners = { KEYGATE_HOST: "127.0.0.1", KEYGATE_GRPC_PORT: "0", KEYGATE_HTTP_AUTHZ_PORT: "0", KEYGATE_ADMIN_PORT: "0" };

const { children, tempDir } = spawnedKeygates("keygate-tokens-typo-");

describe("a tokens file with a one-character typo in a flow-style entry.security", { timeout: 90_000 }, () => {
  it.each([[";"], [","], ["="]])("at start ('token%s'): exits 2 with one line naming the file and the field, never the token", async (sep) => {
    const dir = tempDir();
    const tokensFile = join(dir, "admin-tokens.yaml");
    writeFileSync(tokensFile, typoFile(sep), { mode: 0o600 });
    const env = { KEYGATE_DATA_DIR: join(dir, "data"), KEYGATE_ADMIN_TOKENS: FULL_TOKEN, KEYGATE_ADMIN_TOKENS_FILE: tokensFile, ...listeners };
    const result = await serveUntilExit(dir, env, children);
    expect(result.code).toBe(2);
    expect(result.stderr).toBe(`keygate: KEYGATE_ADMIN_TOKENS_FILE (${tokensFile}): ${TYPO_PROBLEM}\n`);
    expect(result.stdout).not.toContain(NEW_TOKEN);
  });

  describe("on reload", () => {
    let tokensFile: string;
    let kg: KeygateProcess;
    beforeAll(async () => {
      const dir = tempDir();
      tokensFile = join(dir, "admin-tokens.yaml");
      writeFileSync(tokensFile, stringify({ tokens: [OPS] }), { mode: 0o600 });
      kg = await spawnKeygate({ cwd: dir, env: { KEYGATE_DATA_DIR: join(dir, "data"), KEYGATE_ADMIN_TOKENS: FULL_TOKEN, KEYGATE_ADMIN_TOKENS_FILE: tokensFile, KEYGATE_LOG_LEVEL: "info", ...listeners } });
    });
    afterAll(async () => {
      await kg?.stop("SIGTERM");
    });

    it("fails the reload with one line naming the file and the field, never the token, and the tokens in force stay", async () => {
      const failed = (): Array<Record<string, unknown>> =>
        kg
          .stdout()
          .split("\n")
          .filter((line) => line.includes("admin tokens reload failed"))
          .map((line) => JSON.parse(line) as Record<string, unknown>);
      writeFileSync(tokensFile, typoFile(";"));
      kg.child.kill("SIGHUP");
      await until(() => failed().length > 0, RELOAD_TIMEOUT_MS, "the failed reload's log line", { intervalMs: 50 });
      expect(failed().map(({ file, problem }) => ({ file, problem }))).toEqual([{ file: tokensFile, problem: `KEYGATE_ADMIN_TOKENS_FILE (${tokensFile}): ${TYPO_PROBLEM}` }]);
      expect({ inStdout: kg.stdout().includes(NEW_TOKEN), inStderr: kg.stderr().includes(NEW_TOKEN) }).toEqual({ inStdout: false, inStderr: false });
      expect((await postJson(kg.ports.admin, "ListKeys", { ownerId: "nobody" }, OPS.token)).status).toBe(200);
    });
  });
});
