import { execFile } from "node:child_process";
import { createServer } from "node:net";
import type { Server } from "node:net";
import { resolve } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { builtCli } from "../harness/built-cli.js";

// keygate scrubs the passwords of KEYGATE_REDIS_URL and KEYGATE_MONGODB_URI from every start error
// (test/e2e/startup-secret-urls.test.ts). The CLI's own URL gets the same care: a KEYGATE_URL or
// --url with user:password (basic auth at an ingress in front of the admin port) was quoted whole
// in the "is keygate running at …?" and "is … keygate's admin port?" hints, so it landed in CI
// logs. Every URL the CLI prints now shows its userinfo as `***`.

const PASSWORD = "cli-url-pw-9f8e7d6c5b4a";
const TOKEN = "kgadm_a_good_token_0123456789abcdef";

interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs `keygate <args>` with only `env` of the KEYGATE_* variables (and a well-formed admin token). */
function cli(args: readonly string[], env: Record<string, string>): Promise<CliResult> {
  const childEnv: NodeJS.ProcessEnv = {};
  for (const [name, value] of Object.entries(process.env)) if (!name.startsWith("KEYGATE_")) childEnv[name] = value;
  Object.assign(childEnv, { KEYGATE_ADMIN_TOKEN: TOKEN }, env);
  return new Promise((done, fail) => {
    execFile(process.execPath, [builtCli(), ...args], { env: childEnv, cwd: resolve(import.meta.dirname, "../.."), timeout: 20_000 }, (error, stdout, stderr) => {
      if (error === null) done({ code: 0, stdout, stderr });
      else if (typeof error.code === "number") done({ code: error.code, stdout, stderr });
      else fail(new Error(`keygate ${args.join(" ")} did not exit normally (${error.message}):\n${stdout}\n${stderr}`));
    });
  });
}

async function listening(server: Server): Promise<number> {
  await new Promise<void>((ready) => server.listen(0, "127.0.0.1", ready));
  const address = server.address();
  if (address === null || typeof address === "string") throw new Error("no port");
  return address.port;
}

async function closedPort(): Promise<number> {
  const server = createServer();
  const port = await listening(server);
  await new Promise<void>((closed) => server.close(() => closed()));
  return port;
}

// Not keygate: a listener that resets each connection once the request arrives, as a port speaking another protocol may.
const resetting = createServer((socket) => socket.once("data", () => socket.resetAndDestroy()));
let resettingPort: number;

beforeAll(async () => {
  // Fails by name when dist/ is missing or older than src/ (`npm run build` makes it).
  builtCli();
  resettingPort = await listening(resetting);
});

afterAll(async () => {
  await new Promise<void>((closed) => resetting.close(() => closed()));
});

describe("keygate CLI with a password in its URL: security", { timeout: 60_000 }, () => {
  it("keygate not reachable: exits 1 with the hint, and the password nowhere in its output", async () => {
    const port = await closedPort();
    const result = await cli(["keys", "list", "--owner", "u1"], { KEYGATE_URL: `http://ops:${PASSWORD}@127.0.0.1:${port}` });
    expect(result.code).toBe(1);
    expect(result.stderr).toMatch(/^keygate: unavailable: .*is keygate running at /);
    // Before the fix: "… is keygate running at http://ops:<password>@127.0.0.1:<port>? …".
    expect(result.stdout + result.stderr).not.toContain(PASSWORD);
    expect(result.stderr).toContain(`is keygate running at http://***@127.0.0.1:${port}? (set --url or KEYGATE_URL)`);
  });

  it("a connection that breaks: the hint shows the URL without the password", async () => {
    const result = await cli(["--url", `http://ops:${PASSWORD}@127.0.0.1:${resettingPort}`, "keys", "get", "key_01ARZ3NDEKTSV4RRFFQ69G5FAV"], {});
    expect(result.code).toBe(1);
    expect(result.stdout + result.stderr).not.toContain(PASSWORD);
    expect(result.stderr).toContain(`the connection to http://***@127.0.0.1:${resettingPort} failed: is it keygate's admin port? (set --url or KEYGATE_URL)`);
  });

  it.each([
    ["a scheme other than http(s)", `ftp://ops:${PASSWORD}@127.0.0.1:8080`, "--url must start with http:// or https://; got \"ftp://***@127.0.0.1:8080\""],
    ["no scheme at all", `ops:${PASSWORD}@127.0.0.1:8080`, "--url must start with http:// or https://; got \"***@127.0.0.1:8080\""],
    ["a URL the parser refuses", `http://ops:${PASSWORD}@127.0.0.1:80800`, "--url must be an http(s) URL such as http://127.0.0.1:8080; got \"http://***@127.0.0.1:80800\""],
  ])("a URL refused as bad usage (%s): exit 2, the password nowhere", async (_label, url, message) => {
    const result = await cli(["keys", "list", "--owner", "u1"], { KEYGATE_URL: url });
    expect({ code: result.code, stdout: result.stdout, stderr: result.stderr }).toEqual({ code: 2, stdout: "", stderr: `keygate: ${message} (see: keygate keys list --help)\n` });
  });
});
