import { execFile } from "node:child_process";
import { resolve } from "node:path";
import { describe, expect, it } from "vitest";
import { builtCli } from "../harness/built-cli.js";

// The CLI never prints the admin token it was given. A token an Authorization header cannot carry
// (two tokens from a file, one per line, as during a rotation; a pasted value with an inner CR)
// is refused before any call, naming where it came from and what is wrong with it, never quoting
// it: sent, Headers.set would throw a TypeError quoting the whole header, token included.

const FIRST = "cli-token-echo-first-token-0123456789";
const SECOND = "cli-token-echo-second-token-012345678";
const ADVICE = "which an Authorization header cannot carry; an admin token is printable ASCII without spaces (see: keygate keys get --help)";

interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs `keygate [options] keys get <id>` with only `env` of the KEYGATE_* variables. */
function keysGet(options: readonly string[], env: Record<string, string>): Promise<CliResult> {
  const childEnv: NodeJS.ProcessEnv = {};
  for (const [name, value] of Object.entries(process.env)) if (!name.startsWith("KEYGATE_")) childEnv[name] = value;
  // Nothing listens there: the token is refused before any connection is made.
  Object.assign(childEnv, { KEYGATE_URL: "http://127.0.0.1:9" }, env);
  const args = [builtCli(), ...options, "keys", "get", "key_01ARZ3NDEKTSV4RRFFQ69G5FAV"];
  return new Promise((done, fail) => {
    execFile(process.execPath, args, { env: childEnv, cwd: resolve(import.meta.dirname, "../.."), timeout: 20_000 }, (error, stdout, stderr) => {
      if (error === null) done({ code: 0, stdout, stderr });
      else if (typeof error.code === "number") done({ code: error.code, stdout, stderr });
      else fail(new Error(`keygate did not exit normally (${error.message}):\n${stdout}\n${stderr}`));
    });
  });
}

describe("keygate CLI with an admin token a header cannot carry: security", { timeout: 60_000 }, () => {
  const cases: Array<[string, readonly string[], Record<string, string>, string]> = [
    ["two tokens on two lines in KEYGATE_ADMIN_TOKEN", [], { KEYGATE_ADMIN_TOKEN: `${FIRST}\n${SECOND}` }, "KEYGATE_ADMIN_TOKEN contains a line break"],
    ["a token with a trailing CRLF in KEYGATE_ADMIN_TOKEN", [], { KEYGATE_ADMIN_TOKEN: `${FIRST}\r\n` }, "KEYGATE_ADMIN_TOKEN contains a line break"],
    ["a CR inside --token (which wins over a good KEYGATE_ADMIN_TOKEN)", ["--token", `${FIRST}\r${SECOND}`], { KEYGATE_ADMIN_TOKEN: "kgadm_a_good_token_0123456789abcdef" }, "--token contains a line break"],
    ["two tokens separated by a space", [], { KEYGATE_ADMIN_TOKEN: `${FIRST} ${SECOND}` }, "KEYGATE_ADMIN_TOKEN contains a space or tab"],
    ["a control character", [], { KEYGATE_ADMIN_TOKEN: `${FIRST}\u0001${SECOND}` }, "KEYGATE_ADMIN_TOKEN contains a control character"],
    ["a character outside ASCII", [], { KEYGATE_ADMIN_TOKEN: `${FIRST}\u00e9${SECOND}` }, "KEYGATE_ADMIN_TOKEN contains a character outside ASCII"],
  ];

  it.each(cases)("%s: exit 2, one line naming the source and the problem, the token nowhere", async (_label, options, env, problem) => {
    const result = await keysGet(options, env);
    expect({ code: result.code, stdout: result.stdout, stderr: result.stderr }).toEqual({ code: 2, stdout: "", stderr: `keygate: ${problem}, ${ADVICE}\n` });
    for (const part of [FIRST, SECOND]) expect(result.stdout + result.stderr).not.toContain(part);
  });
});
