import { execFileSync } from "node:child_process";
import { X509Certificate } from "node:crypto";
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";

/** The openssl CLI the certificates are made with. */
export const OPENSSL = "/usr/bin/openssl";

/** True when the openssl CLI is present. */
export function opensslAvailable(): boolean {
  return existsSync(OPENSSL);
}

/** A certificate and its key, as files. */
export interface CertFiles {
  cert: string;
  key: string;
}

/**
 * Runs openssl with its output captured: key material must never reach the test output, so a
 * failure reports the subcommand and openssl's diagnostics only (openssl writes no key there).
 */
function openssl(args: readonly string[]): void {
  try {
    execFileSync(OPENSSL, args, { stdio: ["ignore", "pipe", "pipe"] });
  } catch (error) {
    const stderr = error instanceof Error && "stderr" in error && Buffer.isBuffer(error.stderr) ? error.stderr.toString("utf8").slice(0, 400) : "";
    throw new Error(`openssl ${args[0] ?? ""} failed: ${stderr}`);
  }
}

/** A self-signed P-256 CA named `name` in `dir` (name.crt, name.key). */
export function makeCa(dir: string, name: string): CertFiles {
  const files = { cert: join(dir, `${name}.crt`), key: join(dir, `${name}.key`) };
  openssl([
    "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
    "-keyout", files.key, "-out", files.cert, "-subj", `/CN=${name}`, "-days", "2",
    "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
  ]);
  return files;
}

/**
 * A leaf certificate signed by `ca`: a server one (SAN 127.0.0.1 and `dnsNames`, by default
 * localhost) or a client one. Each call gets a fresh key and serial, so a replacement is told
 * apart by its fingerprint.
 */
export function makeLeaf(dir: string, name: string, ca: CertFiles, usage: "server" | "client", dnsNames: readonly string[] = ["localhost"]): CertFiles {
  const files = { cert: join(dir, `${name}.crt`), key: join(dir, `${name}.key`) };
  const csr = join(dir, `${name}.csr`);
  const ext = join(dir, `${name}.ext`);
  openssl(["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", files.key, "-out", csr, "-subj", `/CN=${name}`]);
  writeFileSync(
    ext,
    usage === "server"
      ? `subjectAltName=${dnsNames.map((n) => `DNS:${n}`).join(",")},IP:127.0.0.1\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature\n`
      : "extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\n",
  );
  openssl(["x509", "-req", "-in", csr, "-CA", ca.cert, "-CAkey", ca.key, "-set_serial", `0x${randomSerial()}`, "-out", files.cert, "-days", "2", "-extfile", ext]);
  return files;
}

function randomSerial(): string {
  return [...crypto.getRandomValues(new Uint8Array(12))].map((b) => b.toString(16).padStart(2, "0")).join("").replace(/^0/, "1");
}

/** The SHA-256 fingerprint of the certificate in a PEM file (as tls getPeerCertificate().fingerprint256 spells it). */
export function fingerprintOf(certFile: string): string {
  return new X509Certificate(readFileSync(certFile)).fingerprint256;
}
