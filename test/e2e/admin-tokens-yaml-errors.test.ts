import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { stringify } from "yaml";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { DEFAULT_POLICY_INPUT } from "../../src/config.js";
import { postJson } from "../harness/keygate.js";
import { until } from "../harness/poll.js";
import { serveUntilExit, spawnedKeygates, spawnKeygate } from "../harness/process.js";
import type { KeygateProcess } from "../harness/process.js";

// README (Operations): a broken edit of the admin tokens file "logs one line (... naming the file
// and the problem, never a token)". A token written unquoted that starts with a YAML indicator
// ("*" reads as an alias, "!" as a tag) is quoted by the yaml library: in its error message, and
// in a YAMLWarning that Node prints to stderr outside the log. A token new in the file is in no
// redaction list yet, so the problem must be told without the file's text.

const FULL_TOKEN = "ops-yaml-full-token-0123456789abcdefgh";
const OPS = { name: "ops", token: "ops-yaml-ops-token-0123456789abcdefghij", permissions: ["keys:read"] };
// Password-generator style tokens (symbols allowed), new in the edited file.
const ALIAS_TOKEN = "*Qv7Lm2Xs9Pk4Rt8Wz3Nb6Hc1Jd5Fg";
const TAG_TOKEN = "!Ye4Tu8Io2Pa6Sd1Fg9Hj3Kl7Zx5Cv";
const RELOAD_TIMEOUT_MS = 15_000;
const POLL = { intervalMs: 50 } as const;

/** The tokens file with the ops token and a second one, written unquoted as an operator might. */
const withUnquotedToken = (token: string): string =>
  `tokens:\n  - name: ops\n    token: ${OPS.token}\n    permissions: [keys:read]\n  - name: billing\n    token: ${token}\n    permissions: [verify]\n`;

const { children, tempDir } = spawnedKeygates("keygate-tokens-yaml-");

describe("a broken admin tokens file on reload.security", { timeout: 90_000 }, () => {
  let dir: string;
  let tokensFile: string;
  let kg: KeygateProcess;

  beforeAll(async () => {
    dir = tempDir();
    const policyFile = join(dir, "policy.yaml");
    tokensFile = join(dir, "admin-tokens.yaml");
    writeFileSync(policyFile, stringify(DEFAULT_POLICY_INPUT));
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
  });
  afterAll(async () => {
    await kg?.stop("SIGTERM");
  });

  const failedReloads = (): string[] => kg.stdout().split("\n").filter((line) => line.includes("admin tokens reload failed"));

  /** Writes the file, sends SIGHUP and returns the new failed-reload line. */
  async function failedReload(text: string): Promise<string> {
    const before = failedReloads().length;
    writeFileSync(tokensFile, text);
    kg.child.kill("SIGHUP");
    await until(() => failedReloads().length > before, RELOAD_TIMEOUT_MS, "the failed reload's log line", POLL);
    // Node writes a process warning in the turn after the parse; a negative check needs the pipe to carry it.
    await new Promise((resolve) => setTimeout(resolve, 300));
    return failedReloads()[before] ?? "";
  }

  it.each([
    ["'*' (a YAML alias)", ALIAS_TOKEN, "BAD_ALIAS"],
    ["'!' (a YAML tag)", TAG_TOKEN, "TAG_RESOLVE_FAILED"],
  ])("a new token written unquoted after %s fails the reload by code and place, and is written nowhere", async (_what, token, code) => {
    const line = await failedReload(withUnquotedToken(token));
    const problem = String((JSON.parse(line) as Record<string, unknown>)["problem"]);
    expect(problem).toContain(tokensFile);
    expect(problem).toContain(`${code} at line 6, column 12`);
    const secretPart = token.slice(1);
    expect({ inStdout: kg.stdout().includes(secretPart), inStderr: kg.stderr().includes(secretPart) }).toEqual({ inStdout: false, inStderr: false });
    expect(kg.stderr()).not.toContain("YAMLWarning");
    // The tokens in force stay.
    expect((await postJson(kg.ports.admin, "ListKeys", { ownerId: "nobody" }, OPS.token)).status).toBe(200);
  });
});

describe("a broken admin tokens file at start.security", { timeout: 60_000 }, () => {
  it("exits 2 with one line naming the file and the problem, never the token", async () => {
    const dir = tempDir();
    const tokensFile = join(dir, "admin-tokens.yaml");
    writeFileSync(tokensFile, withUnquotedToken(TAG_TOKEN));
    const env = { KEYGATE_DATA_DIR: join(dir, "data"), KEYGATE_ADMIN_TOKENS_FILE: tokensFile, KEYGATE_HOST: "127.0.0.1", KEYGATE_GRPC_PORT: "0", KEYGATE_HTTP_AUTHZ_PORT: "0", KEYGATE_ADMIN_PORT: "0" };
    const result = await serveUntilExit(dir, env, children);
    expect(result.code).toBe(2);
    expect(result.stderr.trimEnd().split("\n")).toEqual([`keygate: KEYGATE_ADMIN_TOKENS_FILE: cannot read ${tokensFile} as YAML: TAG_RESOLVE_FAILED at line 6, column 12 (quote a value that starts with "*" or "!")`]);
    expect(result.stdout + result.stderr).not.toContain(TAG_TOKEN.slice(1));
  });
});
