import { execFile } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { makeCa, makeLeaf, opensslAvailable } from "../harness/certs.js";
import { requireServer } from "../harness/ports.js";
import { spawnKeygate } from "../harness/process.js";
import type { KeygateProcess } from "../harness/process.js";

// README "Quick start": "The first start creates ./data ... prints the admin token once with a
// `curl` line to use it". The line must work as pasted, wherever keygate listens (one address,
// IPv6 loopback, TLS on the admin port) and whatever the data directory's name holds.

const servers: KeygateProcess[] = [];
const dirs: string[] = [];

afterAll(async () => {
  await Promise.all(servers.map((s) => s.stop("SIGTERM")));
  for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
});

function tempDir(): string {
  const dir = mkdtempSync(join(tmpdir(), "keygate-qs-curl-"));
  dirs.push(dir);
  return dir;
}

function bash(cwd: string, script: string): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((done) => {
    execFile("bash", ["-c", script], { cwd, timeout: 30_000 }, (error, stdout, stderr) => {
      done({ code: error === null ? 0 : typeof error.code === "number" ? error.code : -1, stdout, stderr });
    });
  });
}

/** Starts a fresh embedded keygate in `cwd` that generates its admin token, and runs the curl line it printed there. */
async function runPrintedCurl(cwd: string, env: Record<string, string>): Promise<{ line: string; stdout: string; status: string; body: string }> {
  const server = await spawnKeygate({
    cwd,
    env: { KEYGATE_GRPC_PORT: "0", KEYGATE_HTTP_AUTHZ_PORT: "0", KEYGATE_ADMIN_PORT: "0", ...env },
  });
  servers.push(server);
  const line = /^Use it: (curl .*)$/m.exec(server.stdout())?.[1] ?? "";
  expect(line, server.stdout()).not.toBe("");
  // As a user pastes it, with curl told to print the status on a line of its own.
  const run = await bash(cwd, `${line} -s -w '\\n%{http_code}'`);
  const out = run.stdout.trimEnd();
  const cut = out.lastIndexOf("\n");
  return { line, stdout: server.stdout(), status: out.slice(cut + 1), body: out.slice(0, cut) };
}

describe("Quick start: the printed curl line creates a key.happy", { timeout: 60_000 }, () => {
  it("with KEYGATE_HOST=127.0.0.2 (a keygate bound to one address)", async () => {
    const { line, status, body } = await runPrintedCurl(tempDir(), { KEYGATE_HOST: "127.0.0.2", KEYGATE_DATA_DIR: "./data" });
    expect(line).toContain("http://127.0.0.2:");
    expect(status).toBe("200");
    expect(body).toMatch(/"secret":"kg_live_/);
  });

  it("with KEYGATE_HOST=::1 (IPv6 loopback only)", async () => {
    const { line, status, body } = await runPrintedCurl(tempDir(), { KEYGATE_HOST: "::1", KEYGATE_DATA_DIR: "./data" });
    expect(line).toContain("http://[::1]:");
    expect(status).toBe("200");
    expect(body).toMatch(/"secret":"kg_live_/);
  });

  it("with KEYGATE_HOST=0.0.0.0 (every address): loopback", async () => {
    const { line, status } = await runPrintedCurl(tempDir(), { KEYGATE_HOST: "0.0.0.0", KEYGATE_DATA_DIR: "./data" });
    expect(line).toContain("http://127.0.0.1:");
    expect(status).toBe("200");
  });

  it.each(["./key data", "./it's data", "./$HOME data"])("with KEYGATE_DATA_DIR=%s (a space, a quote, a $ in the path)", async (dataDir) => {
    const { line, status, body } = await runPrintedCurl(tempDir(), { KEYGATE_HOST: "127.0.0.1", KEYGATE_DATA_DIR: dataDir });
    expect(line).toContain("$(cat '");
    expect(status).toBe("200");
    expect(body).toMatch(/"secret":"kg_live_/);
  });
});

const haveOpenssl = requireServer("openssl", opensslAvailable(), "install the openssl package (/usr/bin/openssl)");

describe.skipIf(!haveOpenssl)("Quick start: the printed curl line with TLS on the admin port.happy", { timeout: 60_000 }, () => {
  it("names https:// and the listener's certificate with --cacert, and says so", async () => {
    const cwd = tempDir();
    const ca = makeCa(cwd, "ca");
    const server = makeLeaf(cwd, "server", ca, "server");
    const { line, stdout, status, body } = await runPrintedCurl(cwd, {
      KEYGATE_HOST: "127.0.0.1",
      KEYGATE_DATA_DIR: "./data",
      KEYGATE_TLS_CERT_FILE: server.cert,
      KEYGATE_TLS_KEY_FILE: server.key,
      KEYGATE_TLS_LISTENERS: "admin",
    });
    expect(line).toMatch(/^curl --cacert '[^']+server\.crt' .* https:\/\/127\.0\.0\.1:\d+\/keygate\.v1\.KeyAdmin\/CreateKey$/);
    expect(stdout).toContain("the admin port serves TLS: --cacert names its certificate, KEYGATE_TLS_CERT_FILE");
    expect(status).toBe("200");
    expect(body).toMatch(/"secret":"kg_live_/);
  });

  it("notes a client certificate when the admin port asks for one", async () => {
    const cwd = tempDir();
    const ca = makeCa(cwd, "ca");
    const server = makeLeaf(cwd, "server", ca, "server");
    const keygate = await spawnKeygate({
      cwd,
      env: {
        KEYGATE_HOST: "127.0.0.1",
        KEYGATE_GRPC_PORT: "0",
        KEYGATE_HTTP_AUTHZ_PORT: "0",
        KEYGATE_ADMIN_PORT: "0",
        KEYGATE_DATA_DIR: "./data",
        KEYGATE_TLS_CERT_FILE: server.cert,
        KEYGATE_TLS_KEY_FILE: server.key,
        KEYGATE_TLS_CLIENT_CA_FILE: ca.cert,
        KEYGATE_TLS_CLIENT_AUTH_LISTENERS: "admin",
      },
    });
    servers.push(keygate);
    expect(keygate.stdout()).toMatch(/^Use it: curl --cacert .* https:\/\/127\.0\.0\.1:/m);
    expect(keygate.stdout()).toContain("the admin port asks for a client certificate, KEYGATE_TLS_CLIENT_AUTH_LISTENERS: add --cert and --key");
  });
});
