import { execFile } from "node:child_process";
import { resolve } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { builtCli } from "../harness/built-cli.js";
import { ADMIN_TOKEN, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

// `--expires` and `--since` take an RFC 3339 time and send the instant it spells. Date.parse, which
// the CLI once used, rolls a day that does not exist over into the next month: the CLI then sent
// another instant than the operator typed, and keygate never saw the mistake (usage's
// `--from`/`--to`, by contrast, are sent as typed and refused by the server).

const root = resolve(import.meta.dirname, "../..");
let kg: TestKeygate;

interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs `keygate <args>` against the test keygate (inherited KEYGATE_* variables are dropped). */
function cli(args: readonly string[]): Promise<CliResult> {
  const env: NodeJS.ProcessEnv = {};
  for (const [name, value] of Object.entries(process.env)) if (!name.startsWith("KEYGATE_")) env[name] = value;
  Object.assign(env, { KEYGATE_URL: `http://127.0.0.1:${kg.ports.admin}`, KEYGATE_ADMIN_TOKEN: ADMIN_TOKEN });
  return new Promise((done, fail) => {
    const child = execFile(process.execPath, [builtCli(), ...args], { env, cwd: root, timeout: 20_000 }, (error, stdout, stderr) => {
      if (error === null) done({ code: 0, stdout, stderr });
      else if (typeof error.code === "number") done({ code: error.code, stdout, stderr });
      else fail(new Error(`keygate ${args.join(" ")} did not exit normally (${error.message}):\n${stdout}\n${stderr}`));
    });
    child.stdin?.end();
  });
}

/** The expiry of each of `ownerId`'s keys, as ISO 8601 UTC (null: never). */
async function expiries(ownerId: string): Promise<Array<string | null>> {
  const keys = (await kg.admin.listKeys({ ownerId })).keys;
  return keys.map((k) => (k.expiresAt === undefined ? null : new Date(Number(k.expiresAt.seconds) * 1000).toISOString()));
}

beforeAll(async () => {
  // Fails by name when dist/ is missing or older than src/ (`npm run build` makes it).
  builtCli();
  kg = await startKeygate();
  kg.clock.freeze("2026-11-22T10:00:00.000Z");
  for (const ownerId of ["cli-expiry", "cli-expiry-leap"]) await kg.admin.upsertAccount({ ownerId, plan: "business" });
});

afterAll(async () => {
  await kg.stop();
});

describe("keygate keys create --expires: happy", { timeout: 60_000 }, () => {
  it("a leap day in a leap year, with an offset, is the instant the text spells", async () => {
    const result = await cli(["keys", "create", "--owner", "cli-expiry-leap", "--name", "leap", "--expires", "2028-02-29T23:30:00-01:00", "--json"]);
    expect(result.code, result.stderr).toBe(0);
    expect(await expiries("cli-expiry-leap")).toEqual(["2028-03-01T00:30:00.000Z"]);
  });
});

describe("keygate keys create --expires and audit --since with a time that does not exist: error", { timeout: 60_000 }, () => {
  it("is refused as bad usage (exit 2) and issues no key, instead of expiring the key on another day", async () => {
    // 2027 is not a leap year: there is no 29 February.
    const result = await cli(["keys", "create", "--owner", "cli-expiry", "--name", "feb29", "--expires", "2027-02-29T00:00:00Z", "--json"]);
    // Before the fix: exit 0, and a key that expires 2027-03-01T00:00:00Z.
    expect({ code: result.code, issued: await expiries("cli-expiry") }).toEqual({ code: 2, issued: [] });
    expect(result.stderr).toMatch(/^keygate: option '--expires <time>' argument '2027-02-29T00:00:00Z' is invalid/);
    expect(result.stderr).toContain("there is no 2027-02-29: that month has 28 days");
  });

  it("audit --since 2027-04-31 is refused too, not read as 1 May", async () => {
    const result = await cli(["audit", "--since", "2027-04-31T00:00:00Z", "--json"]);
    // Before the fix: exit 0 with the events from 2027-05-01 on ({}).
    expect(result.code).toBe(2);
    expect(result.stdout).toBe("");
    expect(result.stderr).toMatch(/^keygate: option '--since <time>' argument '2027-04-31T00:00:00Z' is invalid\. there is no 2027-04-31: that month has 30 days/);
  });

  it("text that is not RFC 3339 is refused, not read as local time", async () => {
    const result = await cli(["keys", "create", "--owner", "cli-expiry", "--name", "local", "--expires", "1/2/2030"]);
    expect({ code: result.code, stdout: result.stdout, issued: await expiries("cli-expiry") }).toEqual({ code: 2, stdout: "", issued: [] });
    expect(result.stderr).toMatch(/^keygate: option '--expires <time>' argument '1\/2\/2030' is invalid\. must be an RFC 3339 time/);
  });
});
