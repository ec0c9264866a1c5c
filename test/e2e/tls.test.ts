import { execFile } from "node:child_process";
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, renameSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { basename, join, resolve } from "node:path";
import { status as GrpcStatus } from "@grpc/grpc-js";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { checkInit } from "../harness/keygate.js";
import { fingerprintOf, makeCa, makeLeaf, opensslAvailable } from "../harness/certs.js";
import type { CertFiles } from "../harness/certs.js";
import { until } from "../harness/poll.js";
import { requireServer } from "../harness/ports.js";
import { embeddedEnv, spawnKeygate } from "../harness/process.js";
import type { KeygateProcess } from "../harness/process.js";
import { curl, grpcTlsCheckClient, handshakeFailures, httpsCall, servedFingerprint } from "../harness/tls-clients.js";
import type { ClientTls } from "../harness/tls-clients.js";

/**
 * Waits for a certificate reload or a counted handshake: 20 s, polling every 50 ms; a probe's
 * failed handshake or refused connection while the listener reloads counts as "not yet".
 */
const TLS_TIMEOUT_MS = 20_000;
const TLS_POLL = { intervalMs: 50, retryErrors: true } as const;

// TLS on every listener of a `keygate serve` process: Check with a grpc-js TLS client and curl
// against the HTTP mode and the admin API, client certificates (mTLS) required and refused, and
// a certificate replaced on disk (in place, or by a Secret volume's ..data swap) served to the
// next connection while a broken replacement keeps the one in force.

const ADMIN_TOKEN = "tls-suite-admin-token-0123456789abcdef";
const haveOpenssl = requireServer("openssl", opensslAvailable(), "install the openssl package (/usr/bin/openssl)");

function baseEnv(dir: string, extra: Record<string, string>): Record<string, string> {
  return embeddedEnv({ dataDir: join(dir, "data"), adminToken: ADMIN_TOKEN, extra: { KEYGATE_SHUTDOWN_GRACE_SECONDS: "2", ...extra } });
}

/** True when no line of the key's PEM body appears in `text` (asserted as a boolean, so a failure prints no key). */
function showsNoKey(text: string, keyFile: string): boolean {
  const lines = readFileSync(keyFile, "utf8").split("\n").filter((line) => line.length > 16 && !line.startsWith("-----"));
  return !text.includes("PRIVATE KEY") && lines.every((line) => !text.includes(line));
}

async function createKey(port: number, tls: ClientTls, owner: string): Promise<string> {
  const created = await httpsCall(port, "/keygate.v1.KeyAdmin/CreateKey", tls, {
    method: "POST",
    headers: { "content-type": "application/json", authorization: `Bearer ${ADMIN_TOKEN}` },
    body: JSON.stringify({ ownerId: owner, name: "tls" }),
  });
  expect(created.status).toBe(200);
  const secret = (JSON.parse(created.body) as { secret?: unknown }).secret;
  if (typeof secret !== "string") throw new Error("CreateKey answered without a secret");
  return secret;
}

describe.skipIf(!haveOpenssl)("TLS listeners", { timeout: 180_000 }, () => {
  let dir: string;
  let ca: CertFiles;
  let rogueCa: CertFiles;
  let client: CertFiles;
  let rogueClient: CertFiles;
  let trust: ClientTls;

  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), "keygate-tls-"));
    ca = makeCa(dir, "ca");
    rogueCa = makeCa(dir, "rogue-ca");
    client = makeLeaf(dir, "client", ca, "client");
    rogueClient = makeLeaf(dir, "rogue-client", rogueCa, "client");
    trust = { ca: readFileSync(ca.cert) };
  });
  afterAll(() => {
    rmSync(dir, { recursive: true, force: true });
  });

  describe("server TLS, and certificates reloaded from disk", () => {
    let kg: KeygateProcess;
    let secretDir: string;
    let secret = "";
    const served: CertFiles[] = [];

    // The layout of a Kubernetes Secret volume: tls.crt -> ..data/tls.crt, ..data -> a dated dir.
    const publish = (name: string, files: CertFiles): void => {
      const target = join(secretDir, name);
      mkdirSync(target);
      copyFileSync(files.cert, join(target, "tls.crt"));
      copyFileSync(files.key, join(target, "tls.key"));
    };

    beforeAll(async () => {
      secretDir = join(dir, "secret");
      mkdirSync(secretDir);
      served.push(makeLeaf(dir, "server-1", ca, "server"), makeLeaf(dir, "server-2", ca, "server"), makeLeaf(dir, "server-3", ca, "server"));
      publish("..2026_01", served[0] as CertFiles);
      symlinkSync("..2026_01", join(secretDir, "..data"));
      symlinkSync("..data/tls.crt", join(secretDir, "tls.crt"));
      symlinkSync("..data/tls.key", join(secretDir, "tls.key"));
      kg = await spawnKeygate({
        cwd: dir,
        env: baseEnv(join(dir, "plain"), { KEYGATE_TLS_CERT_FILE: join(secretDir, "tls.crt"), KEYGATE_TLS_KEY_FILE: join(secretDir, "tls.key") }),
      });
      secret = await createKey(kg.ports.admin, trust, "tls-owner");
    });
    afterAll(async () => {
      await kg?.stop("SIGTERM");
    });

    it("allows a Check from a grpc-js client with TLS credentials (h2 engine)", async () => {
      const grpc = grpcTlsCheckClient(kg.ports.grpc, trust);
      try {
        const allowed = await grpc.check(checkInit({ "x-api-key": secret }));
        expect(allowed.status?.code).toBe(0);
        const denied = await grpc.check(checkInit({}));
        expect(denied.status?.code).toBe(16);
      } finally {
        grpc.close();
      }
    });

    it("answers curl over HTTPS on the HTTP authorization port and the admin port, HTTP/1.1 and HTTP/2", async () => {
      const allowed = await curl(["--cacert", ca.cert, "-H", `x-api-key: ${secret}`, `https://127.0.0.1:${kg.ports.http}/check/v1/things`]);
      expect([allowed.exitCode, allowed.status]).toEqual([0, "200"]);
      const denied = await curl(["--cacert", ca.cert, `https://127.0.0.1:${kg.ports.http}/check/v1/things`]);
      expect([denied.exitCode, denied.status]).toEqual([0, "401"]);
      expect(JSON.parse(denied.body)).toMatchObject({ error: { code: "UNAUTHENTICATED" } });
      for (const version of ["--http1.1", "--http2"]) {
        const listed = await curl([
          version,
          "--cacert", ca.cert,
          "-H", `authorization: Bearer ${ADMIN_TOKEN}`,
          "-H", "content-type: application/json",
          "-d", JSON.stringify({ ownerId: "tls-owner" }),
          `https://127.0.0.1:${kg.ports.admin}/keygate.v1.KeyAdmin/ListKeys`,
        ]);
        expect([listed.exitCode, listed.status]).toEqual([0, "200"]);
        expect((JSON.parse(listed.body) as { keys: unknown[] }).keys).toHaveLength(1);
      }
      const health = await curl(["--cacert", ca.cert, `https://127.0.0.1:${kg.ports.admin}/readyz`]);
      expect([health.exitCode, health.status, health.body]).toEqual([0, "200", "ready\n"]);
    });

    it("speaks no plaintext on a TLS listener, and a client that does not trust the CA is refused", async () => {
      const plain = await curl([`http://127.0.0.1:${kg.ports.http}/healthz`]);
      expect(plain.status).toBe("000");
      expect(plain.exitCode).toBe(52);
      const untrusted = await curl(["--cacert", rogueCa.cert, `https://127.0.0.1:${kg.ports.admin}/healthz`]);
      expect([untrusted.exitCode, untrusted.status]).toEqual([60, "000"]);
    });

    it("serves a certificate rewritten in place to the next connection, keeps the old one when the new file is broken, and follows a ..data swap", async () => {
      const [first, second, third] = served;
      if (first === undefined || second === undefined || third === undefined) throw new Error("certificates missing");
      const listeners: Array<[number, string[]]> = [
        [kg.ports.grpc, ["h2"]],
        [kg.ports.http, ["http/1.1"]],
        [kg.ports.admin, ["h2", "http/1.1"]],
      ];
      const allServe = async (fingerprint: string): Promise<boolean> => {
        for (const [port, alpn] of listeners) if ((await servedFingerprint(port, trust, alpn)) !== fingerprint) return false;
        return true;
      };
      const metrics = async (): Promise<string> => (await httpsCall(kg.ports.admin, "/metrics", trust)).body;
      const sample = (text: string, series: string): number => Number(new RegExp(`^${series.replace(/[{}]/g, "\\$&")} (\\S+)$`, "m").exec(text)?.[1] ?? "NaN");

      expect(await allServe(fingerprintOf(first.cert))).toBe(true);

      // In place: the files the links point at are rewritten (key first, as a careless writer might).
      writeFileSync(join(secretDir, "..2026_01", "tls.key"), readFileSync(second.key));
      writeFileSync(join(secretDir, "..2026_01", "tls.crt"), readFileSync(second.cert));
      await until(() => allServe(fingerprintOf(second.cert)), TLS_TIMEOUT_MS, "the rewritten certificate on every listener", TLS_POLL);
      const grpc = grpcTlsCheckClient(kg.ports.grpc, trust);
      try {
        expect((await grpc.check(checkInit({ "x-api-key": secret }))).status?.code).toBe(0);
      } finally {
        grpc.close();
      }

      // A reload between the two writes above would have failed once (key and certificate
      // disagreeing for a moment): counts from here on are relative.
      // (A counter's series appears with its first increment.)
      const failedSoFar = sample(await metrics(), 'keygate_config_reloads_total{file="tls",result="failed"}');
      const failedBefore = Number.isNaN(failedSoFar) ? 0 : failedSoFar;
      const failureLines = (): number => kg.stdout().split("TLS certificate reload failed; the certificate in force stays").length - 1;
      // Log lines arrive in order: once the reload's own line is here, so is any failure before it.
      await until(async () => kg.stdout().includes(`"fingerprint":"${fingerprintOf(second.cert)}"`), TLS_TIMEOUT_MS, "the reload's log line", TLS_POLL);
      const linesBefore = failureLines();

      // Broken: the certificate file is replaced (atomically, so it is read once) by one cut
      // short. The one in force stays, and says so once.
      const cut = join(secretDir, "..2026_01", ".tls.crt.tmp");
      writeFileSync(cut, readFileSync(third.cert, "utf8").slice(0, 200));
      renameSync(cut, join(secretDir, "..2026_01", "tls.crt"));
      await until(async () => sample(await metrics(), 'keygate_config_reload_failing{file="tls"}') === 1, TLS_TIMEOUT_MS, "the failed TLS reload to show", TLS_POLL);
      expect(await allServe(fingerprintOf(second.cert))).toBe(true);
      // The log line travels through a pipe of its own: it may arrive after the metric's answer.
      await until(async () => failureLines() === linesBefore + 1, TLS_TIMEOUT_MS, "the failed reload's log line", TLS_POLL);
      expect(sample(await metrics(), 'keygate_config_reloads_total{file="tls",result="failed"}')).toBe(failedBefore + 1);
      const text = kg.stdout() + kg.stderr();
      for (const cert of served) expect(showsNoKey(text, cert.key)).toBe(true);

      // A Secret update: a new dated directory, then ..data swapped to it in one rename.
      publish("..2026_02", third);
      symlinkSync("..2026_02", join(secretDir, "..data_tmp"));
      renameSync(join(secretDir, "..data_tmp"), join(secretDir, "..data"));
      await until(() => allServe(fingerprintOf(third.cert)), TLS_TIMEOUT_MS, "the swapped-in certificate on every listener", TLS_POLL);
      const after = await metrics();
      expect(sample(after, 'keygate_config_reload_failing{file="tls"}')).toBe(0);
      expect(sample(after, 'keygate_config_reloads_total{file="tls",result="applied"}')).toBe(2);
      expect(sample(after, 'keygate_config_reloads_total{file="tls",result="failed"}')).toBe(failedBefore + 1);
    });
  });

  describe("client certificates required (mTLS), grpc-js engine", () => {
    let kg: KeygateProcess;
    let server: CertFiles;
    let secret = "";
    let withCert: ClientTls;
    let withRogueCert: ClientTls;

    beforeAll(async () => {
      server = makeLeaf(dir, "mtls-server", ca, "server");
      withCert = { ca: readFileSync(ca.cert), cert: readFileSync(client.cert), key: readFileSync(client.key) };
      withRogueCert = { ca: readFileSync(ca.cert), cert: readFileSync(rogueClient.cert), key: readFileSync(rogueClient.key) };
      kg = await spawnKeygate({
        cwd: dir,
        env: baseEnv(join(dir, "mtls"), {
          KEYGATE_GRPC_ENGINE: "grpc-js",
          KEYGATE_TLS_CERT_FILE: server.cert,
          KEYGATE_TLS_KEY_FILE: server.key,
          KEYGATE_TLS_CLIENT_CA_FILE: ca.cert,
        }),
      });
      secret = await createKey(kg.ports.admin, withCert, "mtls-owner");
    });
    afterAll(async () => {
      await kg?.stop("SIGTERM");
    });

    it("allows a Check from a grpc-js client presenting a certificate signed by the CA", async () => {
      const grpc = grpcTlsCheckClient(kg.ports.grpc, withCert);
      try {
        expect((await grpc.check(checkInit({ "x-api-key": secret }))).status?.code).toBe(0);
      } finally {
        grpc.close();
      }
    });

    it("refuses a grpc-js client without a certificate and one whose certificate another CA signed", async () => {
      for (const tls of [trust, withRogueCert]) {
        const grpc = grpcTlsCheckClient(kg.ports.grpc, tls);
        try {
          await expect(grpc.check(checkInit({ "x-api-key": secret }))).rejects.toMatchObject({ code: GrpcStatus.UNAVAILABLE });
        } finally {
          grpc.close();
        }
      }
      // grpc-js reconnects with backoff until the deadline, so there is at least one refusal per client.
      expect(await handshakeFailures(kg.ports.admin, withCert, "grpc")).toBeGreaterThanOrEqual(2);
    });

    it("answers curl with a client certificate, and refuses curl without one or with another CA's", async () => {
      const url = `https://127.0.0.1:${kg.ports.http}/check/v1/things`;
      const allowed = await curl(["--cacert", ca.cert, "--cert", client.cert, "--key", client.key, "-H", `x-api-key: ${secret}`, url]);
      expect([allowed.exitCode, allowed.status]).toEqual([0, "200"]);
      const admin = await curl(["--cacert", ca.cert, "--cert", client.cert, "--key", client.key, `https://127.0.0.1:${kg.ports.admin}/healthz`]);
      expect([admin.exitCode, admin.status, admin.body]).toEqual([0, "200", "ok\n"]);
      const before = { http: await handshakeFailures(kg.ports.admin, withCert, "http"), admin: await handshakeFailures(kg.ports.admin, withCert, "admin") };
      for (const extra of [[], ["--cert", rogueClient.cert, "--key", rogueClient.key]]) {
        for (const target of [url, `https://127.0.0.1:${kg.ports.admin}/healthz`]) {
          const refused = await curl(["--cacert", ca.cert, ...extra, "-H", `x-api-key: ${secret}`, target]);
          // No HTTP answer at all. curl's exit code depends on when it meets the server's alert
          // (TLS 1.3 ends the client's side of the handshake before the server checks the
          // certificate), so the server's count of refused handshakes is what is asserted exactly.
          expect(refused.status).toBe("000");
          expect(refused.exitCode).not.toBe(0);
        }
      }
      await until(async () => (await handshakeFailures(kg.ports.admin, withCert, "http")) === before.http + 2, TLS_TIMEOUT_MS, "two refused handshakes on the HTTP port", TLS_POLL);
      expect(await handshakeFailures(kg.ports.admin, withCert, "admin")).toBe(before.admin + 2);
    });
  });

  describe("per-listener TLS: admin requires client certificates, Check does not, the HTTP mode stays plaintext", () => {
    let kg: KeygateProcess;

    beforeAll(async () => {
      const server = makeLeaf(dir, "split-server", ca, "server");
      kg = await spawnKeygate({
        cwd: dir,
        env: baseEnv(join(dir, "split"), {
          KEYGATE_TLS_CERT_FILE: server.cert,
          KEYGATE_TLS_KEY_FILE: server.key,
          KEYGATE_TLS_CLIENT_CA_FILE: ca.cert,
          KEYGATE_TLS_LISTENERS: "grpc,admin",
          KEYGATE_TLS_CLIENT_AUTH_LISTENERS: "admin",
        }),
      });
    });
    afterAll(async () => {
      await kg?.stop("SIGTERM");
    });

    it("applies each listener's setting", async () => {
      const grpc = grpcTlsCheckClient(kg.ports.grpc, trust);
      try {
        expect((await grpc.check(checkInit({}))).status?.code).toBe(16);
      } finally {
        grpc.close();
      }
      const plain = await curl([`http://127.0.0.1:${kg.ports.http}/healthz`]);
      expect([plain.exitCode, plain.status]).toEqual([0, "200"]);
      const mtls = { ca: readFileSync(ca.cert), cert: readFileSync(client.cert), key: readFileSync(client.key) };
      const before = await handshakeFailures(kg.ports.admin, mtls, "admin");
      const noCert = await curl(["--cacert", ca.cert, `https://127.0.0.1:${kg.ports.admin}/healthz`]);
      expect(noCert.status).toBe("000");
      expect(noCert.exitCode).not.toBe(0);
      await until(async () => (await handshakeFailures(kg.ports.admin, mtls, "admin")) === before + 1, TLS_TIMEOUT_MS, "the refused handshake on the admin port", TLS_POLL);
      expect(await handshakeFailures(kg.ports.admin, mtls, "grpc")).toBe(0);
      const withCert = await curl(["--cacert", ca.cert, "--cert", client.cert, "--key", client.key, `https://127.0.0.1:${kg.ports.admin}/healthz`]);
      expect([withCert.exitCode, withCert.status]).toEqual([0, "200"]);
    });
  });

  describe("the README's TLS section, run as written", () => {
    // Its first block is how keygate is started; its second, the shell checks. Only the file
    // paths (mapped by name to the generated files), the ports, $KEY and $ADMIN_TOKEN differ.
    const readme = readFileSync(resolve(import.meta.dirname, "../../README.md"), "utf8");
    const section = readme.slice(readme.indexOf("\n## TLS\n"), readme.indexOf("\n## ", readme.indexOf("\n## TLS\n") + 1));
    const blocks = [...section.matchAll(/```sh\n([\s\S]*?)```/g)].map((m) =>
      (m[1] ?? "")
        .replace(/\s*\\\n\s*/g, " ")
        .split("\n")
        .map((line) => line.trim())
        .filter((line) => line !== "" && !line.startsWith("#")),
    );
    let kg: KeygateProcess;
    let workDir: string;
    let secret = "";

    beforeAll(async () => {
      workDir = join(dir, "readme");
      mkdirSync(workDir);
      const server = makeLeaf(dir, "readme-server", ca, "server");
      const byName: Record<string, string> = { "tls.crt": server.cert, "tls.key": server.key, "ca.crt": ca.cert };
      const start = blocks[0]?.[0] ?? "";
      expect(start).toMatch(/npx keygate serve$/);
      const env: Record<string, string> = {};
      for (const [, name, value] of start.matchAll(/(KEYGATE_\w+)=(\S+)/g)) {
        if (name === undefined || value === undefined) continue;
        env[name] = value.startsWith("/") ? (byName[basename(value)] ?? value) : value;
      }
      expect(Object.keys(env).sort()).toEqual(["KEYGATE_TLS_CERT_FILE", "KEYGATE_TLS_CLIENT_AUTH_LISTENERS", "KEYGATE_TLS_CLIENT_CA_FILE", "KEYGATE_TLS_KEY_FILE"]);
      kg = await spawnKeygate({ cwd: dir, env: baseEnv(join(dir, "readme-data"), env) });
      copyFileSync(ca.cert, join(workDir, "ca.crt"));
      copyFileSync(client.cert, join(workDir, "client.crt"));
      copyFileSync(client.key, join(workDir, "client.key"));
      secret = await createKey(kg.ports.admin, trust, "user_1");
    });
    afterAll(async () => {
      await kg?.stop("SIGTERM");
    });

    const run = (command: string): Promise<{ code: number; stdout: string }> =>
      new Promise((done) => {
        const ported = command
          .replaceAll("127.0.0.1:9191", `127.0.0.1:${kg.ports.grpc}`)
          .replaceAll("127.0.0.1:8181", `127.0.0.1:${kg.ports.http}`)
          .replaceAll("127.0.0.1:8080", `127.0.0.1:${kg.ports.admin}`)
          // The status, so each answer is asserted exactly.
          .replace(/^curl /, "curl -sS -w '\\n%{http_code}' ");
        execFile("bash", ["-o", "pipefail", "-c", ported], { cwd: workDir, env: { ...process.env, KEY: secret, ADMIN_TOKEN } }, (error, stdout) =>
          done({ code: error === null ? 0 : typeof error.code === "number" ? error.code : -1, stdout: String(stdout) }),
        );
      });

    it("shows the served certificate, gRPC health, a Check and the admin API, each as the README says", async () => {
      const checks = blocks[1] ?? [];
      expect(checks).toHaveLength(5);
      const [served, health, check, ready, list] = await Promise.all(checks.map(run));
      expect(served?.code).toBe(0);
      expect(served?.stdout).toContain(`sha256 Fingerprint=${fingerprintOf(join(dir, "readme-server.crt"))}`);
      expect(health).toEqual({ code: 0, stdout: " 00 00 00 00 02 08 01\n" });
      expect(check).toEqual({ code: 0, stdout: "\n200" });
      expect(ready).toEqual({ code: 0, stdout: "ready\n\n200" });
      expect(list?.code).toBe(0);
      expect(list?.stdout.endsWith("\n200")).toBe(true);
      expect(list?.stdout).toContain('"keys"');
    });

    it("refuses the Check without the client certificate, as KEYGATE_TLS_CLIENT_AUTH_LISTENERS says, and still drains on SIGTERM", async () => {
      const check = (blocks[1] ?? []).find((c) => c.includes("/check/")) ?? "";
      const before = await handshakeFailures(kg.ports.admin, trust, "http");
      const refused = await run(check.replace("--cert client.crt --key client.key ", ""));
      expect(refused.stdout).toBe("\n000");
      expect(refused.code).not.toBe(0);
      await until(async () => (await handshakeFailures(kg.ports.admin, trust, "http")) === before + 1, TLS_TIMEOUT_MS, "the refused handshake on the HTTP port", TLS_POLL);
      // An open TLS gRPC connection does not hold up the drain.
      const grpc = grpcTlsCheckClient(kg.ports.grpc, { ca: readFileSync(ca.cert), cert: readFileSync(client.cert), key: readFileSync(client.key) });
      try {
        expect((await grpc.check(checkInit({ "x-api-key": secret }))).status?.code).toBe(0);
        expect(await kg.stop("SIGTERM")).toBe(0);
      } finally {
        grpc.close();
      }
    });
  });

  describe("startup errors", () => {
    it("refuses to start on a key that is not PEM, or not the certificate's, naming the variable and showing no key", async () => {
      const server = makeLeaf(dir, "startup-server", ca, "server");
      const other = makeLeaf(dir, "startup-other", ca, "server");
      const notPem = join(dir, "not-a-key.pem");
      // Key material in the wrong shape: base64 of the real key without its PEM armour.
      writeFileSync(notPem, readFileSync(server.key, "utf8").replace(/-----[A-Z ]+-----/g, ""));
      const cases: Array<[Record<string, string>, RegExp]> = [
        [{ KEYGATE_TLS_CERT_FILE: server.cert }, /KEYGATE_TLS_KEY_FILE: must be set with KEYGATE_TLS_CERT_FILE/],
        [{ KEYGATE_TLS_CERT_FILE: server.cert, KEYGATE_TLS_KEY_FILE: notPem }, /KEYGATE_TLS_KEY_FILE: .*not-a-key\.pem holds no unencrypted PEM private key/],
        [{ KEYGATE_TLS_CERT_FILE: server.cert, KEYGATE_TLS_KEY_FILE: other.key }, /KEYGATE_TLS_KEY_FILE: the private key in .* does not belong to the certificate/],
        [{ KEYGATE_TLS_CERT_FILE: server.key, KEYGATE_TLS_KEY_FILE: server.key }, /KEYGATE_TLS_CERT_FILE: .* holds no PEM certificate/],
      ];
      for (const [env, message] of cases) {
        const failure = await spawnKeygate({ cwd: dir, env: baseEnv(join(dir, "startup"), env) }).then(
          async (kg) => {
            await kg.stop("SIGKILL");
            return "started";
          },
          (error: unknown) => (error instanceof Error ? error.message : String(error)),
        );
        expect(failure).toMatch(/^keygate exited with 2:/);
        expect(failure).toMatch(message);
        expect(showsNoKey(failure, server.key)).toBe(true);
        expect(showsNoKey(failure, other.key)).toBe(true);
      }
    });
  });
});
