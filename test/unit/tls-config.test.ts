import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ConfigError, loadConfig } from "../../src/config.js";
import { loadTlsMaterial, redisTlsOptions } from "../../src/server/tls.js";
import { OPENSSL, makeCa, makeLeaf, opensslAvailable } from "../harness/certs.js";
import type { CertFiles } from "../harness/certs.js";
import { requireServer } from "../harness/ports.js";

// The TLS variables' pairing rules, and the checks a certificate, key and CA pass before they
// are served: each problem names its variable and file and never repeats key material.

describe("TLS environment", () => {
  const tls = { KEYGATE_TLS_CERT_FILE: "/certs/tls.crt", KEYGATE_TLS_KEY_FILE: "/certs/tls.key" };

  it("is off without a certificate, and on for every listener with one", () => {
    expect(loadConfig({}).tls).toBeNull();
    const on = loadConfig(tls).tls;
    expect(on === null ? null : { listeners: [...on.listeners], clientAuth: [...on.clientAuthListeners], ca: on.clientCaFile }).toEqual({
      listeners: ["grpc", "http", "admin"],
      clientAuth: [],
      ca: undefined,
    });
  });

  it("asks client certificates on every TLS listener with a CA, or on the ones named", () => {
    const all = loadConfig({ ...tls, KEYGATE_TLS_CLIENT_CA_FILE: "/certs/ca.crt" }).tls;
    expect([...(all?.clientAuthListeners ?? [])]).toEqual(["grpc", "http", "admin"]);
    const split = loadConfig({ ...tls, KEYGATE_TLS_CLIENT_CA_FILE: "/certs/ca.crt", KEYGATE_TLS_LISTENERS: "grpc, admin", KEYGATE_TLS_CLIENT_AUTH_LISTENERS: "admin" }).tls;
    expect([...(split?.listeners ?? [])]).toEqual(["grpc", "admin"]);
    expect([...(split?.clientAuthListeners ?? [])]).toEqual(["admin"]);
  });

  it("refuses half a pair, settings with nothing to act on, and unknown listeners, naming the variable", () => {
    const cases: Array<[Record<string, string>, string]> = [
      [{ KEYGATE_TLS_CERT_FILE: "/c" }, "invalid environment: KEYGATE_TLS_KEY_FILE: must be set with KEYGATE_TLS_CERT_FILE (the private key of that certificate)"],
      [{ KEYGATE_TLS_KEY_FILE: "/k" }, "invalid environment: KEYGATE_TLS_CERT_FILE: must be set with KEYGATE_TLS_KEY_FILE (the certificate of that key)"],
      [{ KEYGATE_TLS_CLIENT_CA_FILE: "/ca" }, "invalid environment: KEYGATE_TLS_CLIENT_CA_FILE: needs KEYGATE_TLS_CERT_FILE and KEYGATE_TLS_KEY_FILE (the listeners' certificate and key)"],
      [{ ...tls, KEYGATE_TLS_CLIENT_AUTH_LISTENERS: "admin" }, "invalid environment: KEYGATE_TLS_CLIENT_AUTH_LISTENERS: needs KEYGATE_TLS_CLIENT_CA_FILE (the CA client certificates are checked against)"],
      [
        { ...tls, KEYGATE_TLS_CLIENT_CA_FILE: "/ca", KEYGATE_TLS_LISTENERS: "grpc", KEYGATE_TLS_CLIENT_AUTH_LISTENERS: "grpc,admin" },
        "invalid environment: KEYGATE_TLS_CLIENT_AUTH_LISTENERS: admin is not in KEYGATE_TLS_LISTENERS (client certificates need TLS)",
      ],
      [{ ...tls, KEYGATE_TLS_LISTENERS: "grpc,metrics" }, "invalid environment: KEYGATE_TLS_LISTENERS.1: each listener must be one of grpc, http, admin"],
      [{ ...tls, KEYGATE_TLS_LISTENERS: " , " }, "invalid environment: KEYGATE_TLS_LISTENERS: name at least one of grpc, http, admin"],
      [{ KEYGATE_REDIS_URL: "redis://r:6379", KEYGATE_REDIS_TLS_CA_FILE: "/ca" }, "invalid environment: KEYGATE_REDIS_TLS_CA_FILE: needs KEYGATE_REDIS_URL to start with rediss://, rediss+cluster:// or rediss+sentinel:// (TLS)"],
      [{ KEYGATE_REDIS_URL: "redis+cluster://r:7000", KEYGATE_REDIS_TLS_CA_FILE: "/ca" }, "invalid environment: KEYGATE_REDIS_TLS_CA_FILE: needs KEYGATE_REDIS_URL to start with rediss://, rediss+cluster:// or rediss+sentinel:// (TLS)"],
      [{ KEYGATE_REDIS_URL: "rediss://r:6379", KEYGATE_REDIS_TLS_CERT_FILE: "/c" }, "invalid environment: KEYGATE_REDIS_TLS_KEY_FILE: must be set with KEYGATE_REDIS_TLS_CERT_FILE"],
    ];
    for (const [env, message] of cases) {
      let thrown: unknown = null;
      try {
        loadConfig(env);
      } catch (error) {
        thrown = error;
      }
      expect(thrown).toBeInstanceOf(ConfigError);
      expect(thrown instanceof Error ? thrown.message : "").toBe(message);
    }
  });
});

describe.runIf(requireServer("openssl", opensslAvailable(), "install the openssl package"))("TLS files", () => {
  let dir: string;
  let ca: CertFiles;
  let server: CertFiles;
  let other: CertFiles;

  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), "keygate-tls-unit-"));
    ca = makeCa(dir, "ca");
    server = makeLeaf(dir, "server", ca, "server");
    other = makeLeaf(dir, "other", ca, "server");
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  /** The ConfigError message of loading these files, asserted to show no key line. */
  function problem(files: { certFile: string; keyFile: string; clientCaFile?: string }): string {
    try {
      loadTlsMaterial({ clientCaFile: undefined, ...files });
    } catch (error) {
      expect(error).toBeInstanceOf(ConfigError);
      const message = error instanceof Error ? error.message : "";
      const keyLines = [server.key, other.key].flatMap((file) => readFileSync(file, "utf8").split("\n").filter((line) => line.length > 16 && !line.startsWith("-----")));
      expect(keyLines.some((line) => message.includes(line)) || message.includes("PRIVATE KEY")).toBe(false);
      return message;
    }
    return "loaded";
  }

  it("loads a certificate, its key and a client CA", () => {
    const material = loadTlsMaterial({ certFile: server.cert, keyFile: server.key, clientCaFile: ca.cert });
    expect(material.fingerprint).toMatch(/^([0-9A-F]{2}:){31}[0-9A-F]{2}$/);
    expect(material.clientCa?.equals(readFileSync(ca.cert))).toBe(true);
  });

  it("names the variable and file of each problem", () => {
    const encrypted = join(dir, "encrypted.key");
    execFileSync(OPENSSL, ["pkey", "-in", server.key, "-aes256", "-passout", "pass:secret-pass", "-out", encrypted], { stdio: ["ignore", "pipe", "pipe"] });
    const garbage = join(dir, "garbage.pem");
    writeFileSync(garbage, "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n");
    expect(problem({ certFile: join(dir, "missing.crt"), keyFile: server.key })).toBe(`KEYGATE_TLS_CERT_FILE: cannot read ${join(dir, "missing.crt")} (ENOENT)`);
    expect(problem({ certFile: garbage, keyFile: server.key })).toBe(`KEYGATE_TLS_CERT_FILE: certificate 1 in ${garbage} is not a valid X.509 certificate`);
    expect(problem({ certFile: server.cert, keyFile: encrypted })).toBe(`KEYGATE_TLS_KEY_FILE: ${encrypted} holds no unencrypted PEM private key`);
    expect(problem({ certFile: server.cert, keyFile: server.cert })).toBe(`KEYGATE_TLS_KEY_FILE: ${server.cert} holds no unencrypted PEM private key`);
    expect(problem({ certFile: server.cert, keyFile: other.key })).toBe(
      `KEYGATE_TLS_KEY_FILE: the private key in ${other.key} does not belong to the certificate in ${server.cert} (KEYGATE_TLS_CERT_FILE)`,
    );
    expect(problem({ certFile: server.cert, keyFile: server.key, clientCaFile: server.key })).toBe(
      `KEYGATE_TLS_CLIENT_CA_FILE: ${server.key} holds no PEM certificate (-----BEGIN CERTIFICATE-----)`,
    );
  });

  it("reads the Redis CA and client certificate, refusing a key that is not the certificate's", () => {
    expect(redisTlsOptions({ caFile: ca.cert, certFile: undefined, keyFile: undefined }).ca?.equals(readFileSync(ca.cert))).toBe(true);
    expect(() => redisTlsOptions({ caFile: undefined, certFile: server.cert, keyFile: other.key })).toThrow(
      `KEYGATE_REDIS_TLS_KEY_FILE: the private key in ${other.key} does not belong to the certificate in ${server.cert}`,
    );
    expect(() => redisTlsOptions({ caFile: join(dir, "nope.crt"), certFile: undefined, keyFile: undefined })).toThrow(`KEYGATE_REDIS_TLS_CA_FILE: cannot read ${join(dir, "nope.crt")} (ENOENT)`);
  });
});

describe("Redis TLS files with every topology", () => {
  it("are taken with rediss://, rediss+cluster:// and rediss+sentinel:// URLs", () => {
    for (const url of ["rediss://r:6379", "rediss+cluster://r1:7000,r2:7001", "rediss+sentinel://s1:26379,s2:26379/mymaster"]) {
      expect(loadConfig({ KEYGATE_REDIS_URL: url, KEYGATE_REDIS_TLS_CA_FILE: "/ca" }).redisTls, url).toEqual({ caFile: "/ca", certFile: undefined, keyFile: undefined });
    }
  });
});
