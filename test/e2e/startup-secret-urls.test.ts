import type { ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { serveUntilExit } from "../harness/process.js";
import type { ExitedServe } from "../harness/process.js";

// Passwords from `openssl rand -base64` hold "/" and "+", and hand-made ones "#" or "%". Left
// unescaped in KEYGATE_REDIS_URL, ioredis's new URL() threw a TypeError quoting the whole URL,
// which keygate logged whole and reported as "could not start: Invalid URL", exit 1. A URL that
// does not parse is a bad setting: exit 2, one line naming the variable, the password nowhere.

const PEPPER = "p".repeat(40);
const ADMIN = `kgadm_${"t".repeat(30)}`;
const NOT_A_URL = "is not a valid URL; percent-encode / ? # @ % in the user name and password";

const children = new Set<ChildProcess>();
const dirs: string[] = [];
afterAll(() => {
  for (const child of children) child.kill("SIGKILL");
  for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
});

/** Runs `keygate serve` in a new temporary directory, with exactly `env` for KEYGATE_* (ports 0), until it exits by itself. */
function serveInTempDir(env: Record<string, string>): Promise<ExitedServe> {
  const cwd = mkdtempSync(join(tmpdir(), "keygate-secret-urls-"));
  dirs.push(cwd);
  const base = { KEYGATE_DATA_DIR: join(cwd, "data"), KEYGATE_HOST: "127.0.0.1", KEYGATE_GRPC_PORT: "0", KEYGATE_HTTP_AUTHZ_PORT: "0", KEYGATE_ADMIN_PORT: "0" };
  return serveUntilExit(cwd, { ...base, ...env }, children);
}

/** A password unique to the test, around the character that breaks the URL. */
function passwordWith(character: string): string {
  return `Zk9${character}${randomBytes(9).toString("base64url")}xQ`;
}

const BREAKING_CHARACTERS = [
  ["an unescaped /", "/"],
  ["an unescaped #", "#"],
  ["a % that starts no escape", "%zz"],
] as const;

describe("start-up with a secret URL that does not parse.security", () => {
  it.each(BREAKING_CHARACTERS)("KEYGATE_REDIS_URL (redis://) with %s in the password: exit 2, one line naming the variable, the password nowhere", async (_title, character) => {
    const password = passwordWith(character);
    const result = await serveInTempDir({ KEYGATE_REDIS_URL: `redis://:${password}@127.0.0.1:6379/0` });
    expect(result.stdout).not.toContain(password);
    expect(result.stderr).not.toContain(password);
    expect(result.stderr).toBe(`keygate: invalid environment: KEYGATE_REDIS_URL: ${NOT_A_URL}\n`);
    expect(result.code).toBe(2);
  });

  it.each(BREAKING_CHARACTERS)("KEYGATE_REDIS_URL (rediss://, user and password) with %s in the password: the same line, the password nowhere", async (_title, character) => {
    const password = passwordWith(character);
    const result = await serveInTempDir({ KEYGATE_REDIS_URL: `rediss://default:${password}@127.0.0.1:6380` });
    expect(result.stdout + result.stderr).not.toContain(password);
    expect(result.stderr).toBe(`keygate: invalid environment: KEYGATE_REDIS_URL: ${NOT_A_URL}\n`);
    expect(result.code).toBe(2);
  });

  it.each([
    ["redis+cluster", "/", "each seed node is host:port (port 1-65535), separated by commas"],
    ["redis+cluster", "#", "must start with redis://, rediss://, redis+cluster://, rediss+cluster://, redis+sentinel:// or rediss+sentinel:// (one host:port list, no fragment)"],
    ["redis+cluster", "%zz", "the user name and password must be percent-encoded (user:password@)"],
    ["redis+sentinel", "/", "each Sentinel is host:port (port 1-65535), separated by commas"],
    ["redis+sentinel", "%zz", "the user name and password must be percent-encoded (user:password@)"],
  ])("KEYGATE_REDIS_URL (%s://) with %s in the password: one line naming the variable, the password nowhere", async (scheme, character, problem) => {
    const password = passwordWith(character);
    const path = scheme === "redis+sentinel" ? "/mymaster" : "";
    const result = await serveInTempDir({ KEYGATE_REDIS_URL: `${scheme}://:${password}@127.0.0.1:7000${path}` });
    expect(result.stdout + result.stderr).not.toContain(password);
    expect(result.stderr).toBe(`keygate: invalid environment: KEYGATE_REDIS_URL: ${problem}\n`);
    expect(result.code).toBe(2);
  });

  // The MongoDB driver parses the URI before it connects, and its errors never quote the password.
  it.each([
    ["an unescaped /", "/", "Password contains unescaped characters"],
    ["an unescaped #", "#", "Password contains unescaped characters"],
    ["a % that starts no escape", "%zz", "URI malformed"],
  ])("KEYGATE_MONGODB_URI with %s in the password: one line naming the variable, the password nowhere", async (_title, character, problem) => {
    const password = passwordWith(character);
    const result = await serveInTempDir({ KEYGATE_MONGODB_URI: `mongodb://keygate:${password}@127.0.0.1:27017/keygate`, KEYGATE_PEPPER: PEPPER, KEYGATE_ADMIN_TOKENS: ADMIN });
    expect(result.stdout + result.stderr).not.toContain(password);
    expect(result.stderr).toBe(`keygate: KEYGATE_MONGODB_URI: MongoDB could not be opened (${problem})\n`);
    expect(result.code).toBe(2);
  });
});
