import { copyFileSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Writable } from "node:stream";
import type { Server } from "node:net";
import { connect as tlsConnect } from "node:tls";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { LISTENER_NAMES } from "../../src/config.js";
import { createLogger } from "../../src/server/logger.js";
import { Metrics } from "../../src/server/metrics.js";
import { TlsCertificates, createAcceptor } from "../../src/server/tls.js";
import { fingerprintOf, makeCa, makeLeaf, opensslAvailable } from "../harness/certs.js";
import type { CertFiles } from "../harness/certs.js";
import { requireServer } from "../harness/ports.js";
import { servedFingerprint } from "../harness/tls-clients.js";

// The certificate holder in process, with a real TLS listener and a clock of its own: what
// reload() reports (SIGHUP calls it), and the look at the files a new connection triggers
// once a second without any directory watch.

describe.runIf(requireServer("openssl", opensslAvailable(), "install the openssl package"))("TLS certificate reload", () => {
  let dir: string;
  let ca: CertFiles;
  let certs: CertFiles[];
  let holder: TlsCertificates;
  let server: Server;
  let port = 0;
  let nowMs = 0;
  const lines: string[] = [];
  const metrics = new Metrics({ defaultMetrics: false });
  const trust = (): { ca: Buffer } => ({ ca: readFileSync(ca.cert) });
  const install = (files: CertFiles): void => {
    copyFileSync(files.key, join(dir, "tls.key"));
    copyFileSync(files.cert, join(dir, "tls.crt"));
  };

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), "keygate-tls-reload-"));
    ca = makeCa(dir, "ca");
    certs = [makeLeaf(dir, "one", ca, "server"), makeLeaf(dir, "two", ca, "server"), makeLeaf(dir, "three", ca, "server")];
    install(certs[0] as CertFiles);
    const sink = new Writable({
      write(chunk: Buffer, _encoding, callback) {
        lines.push(chunk.toString("utf8"));
        callback();
      },
    });
    holder = new TlsCertificates(
      { certFile: join(dir, "tls.crt"), keyFile: join(dir, "tls.key"), clientCaFile: undefined, listeners: new Set(LISTENER_NAMES), clientAuthListeners: new Set() },
      { logger: createLogger("info", sink), metrics, nowMs: () => nowMs },
    );
    server = createAcceptor(holder.forListener("http"), 5000, (socket) => socket.end()).server;
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
    const address = server.address();
    port = typeof address === "object" && address !== null ? address.port : 0;
  });
  afterAll(async () => {
    holder?.close();
    await new Promise<void>((resolve) => server?.close(() => resolve()));
    rmSync(dir, { recursive: true, force: true });
  });

  const served = (): Promise<string> => servedFingerprint(port, trust(), ["http/1.1"]);
  const series = async (name: string): Promise<string> => {
    const text = await metrics.registry.metrics();
    return text.split("\n").filter((line) => line.startsWith(name)).sort().join("\n");
  };

  it("reports applied, unchanged and failed, keeping the certificate in force on a failure", async () => {
    const [one, two, three] = certs;
    if (one === undefined || two === undefined || three === undefined) throw new Error("certificates missing");
    expect(await served()).toBe(fingerprintOf(one.cert));
    expect(holder.reload()).toBe("unchanged");

    install(two);
    expect(holder.reload()).toBe("applied");
    expect(await served()).toBe(fingerprintOf(two.cert));
    expect(holder.fingerprint).toBe(fingerprintOf(two.cert));

    // Rewritten with the same bytes: the stat changes, the content does not.
    install(two);
    expect(holder.reload()).toBe("unchanged");

    // A key that is not the certificate's.
    copyFileSync(three.cert, join(dir, "tls.crt"));
    expect(holder.reload()).toBe("failed");
    expect(await served()).toBe(fingerprintOf(two.cert));
    // Nothing changed on disk since: no second attempt, no second line.
    expect(holder.reload()).toBe("unchanged");
    const failures = lines.filter((line) => line.includes("TLS certificate reload failed"));
    expect(failures).toHaveLength(1);
    expect(failures[0]).toContain(`KEYGATE_TLS_KEY_FILE: the private key in ${join(dir, "tls.key")} does not belong to the certificate`);
    expect(await series("keygate_config_reload")).toBe(
      [
        'keygate_config_reload_failing{file="tls"} 1',
        'keygate_config_reloads_total{file="tls",result="applied"} 1',
        'keygate_config_reloads_total{file="tls",result="failed"} 1',
        'keygate_config_reloads_total{file="tls",result="unchanged"} 1',
      ].join("\n"),
    );

    copyFileSync(three.key, join(dir, "tls.key"));
    expect(holder.reload()).toBe("applied");
    expect(await served()).toBe(fingerprintOf(three.cert));
    expect(await series("keygate_config_reload_failing")).toBe('keygate_config_reload_failing{file="tls"} 0');
  });

  it("looks at the files from a new connection at most once a second, with no watch running", async () => {
    const [one, , three] = certs;
    if (one === undefined || three === undefined) throw new Error("certificates missing");
    expect(await served()).toBe(fingerprintOf(three.cert));
    install(one);
    nowMs += 500;
    // Within the second since the last look, a new connection still gets the certificate in force.
    expect(await served()).toBe(fingerprintOf(three.cert));
    nowMs += 500;
    expect(await served()).toBe(fingerprintOf(one.cert));
  });

  it("keeps requiring client certificates after a reload", async () => {
    const [one, two] = certs;
    if (one === undefined || two === undefined) throw new Error("certificates missing");
    const clientCert = makeLeaf(dir, "client", ca, "client");
    const mtlsDir = mkdtempSync(join(dir, "mtls-"));
    copyFileSync(one.cert, join(mtlsDir, "tls.crt"));
    copyFileSync(one.key, join(mtlsDir, "tls.key"));
    const mtls = new TlsCertificates(
      { certFile: join(mtlsDir, "tls.crt"), keyFile: join(mtlsDir, "tls.key"), clientCaFile: ca.cert, listeners: new Set(LISTENER_NAMES), clientAuthListeners: new Set(["admin"] as const) },
      { logger: createLogger("silent"), metrics: new Metrics({ defaultMetrics: false }), nowMs: () => nowMs },
    );
    // The server answers one byte once the handshake, client certificate included, is through.
    // Refused, the client sees an alert (an error) or, by timing, only the close: no byte either way.
    const NO_ANSWER = ["refused:", ""];
    const mtlsServer = createAcceptor(mtls.forListener("admin"), 5000, (socket) => socket.end("k")).server;
    await new Promise<void>((resolve) => mtlsServer.listen(0, "127.0.0.1", resolve));
    const address = mtlsServer.address();
    const mtlsPort = typeof address === "object" && address !== null ? address.port : 0;
    const answer = (withCert: boolean): Promise<string> =>
      new Promise((resolve) => {
        const socket = tlsConnect({
          host: "127.0.0.1",
          servername: "localhost",
          port: mtlsPort,
          ca: readFileSync(ca.cert),
          ...(withCert ? { cert: readFileSync(clientCert.cert), key: readFileSync(clientCert.key) } : {}),
        });
        let data = "";
        socket.on("data", (chunk: Buffer) => (data += chunk.toString("utf8")));
        socket.once("error", () => resolve(`refused:${data}`));
        socket.once("close", () => resolve(data));
      });
    try {
      expect(await answer(true)).toBe("k");
      expect(NO_ANSWER).toContain(await answer(false));
      copyFileSync(two.key, join(mtlsDir, "tls.key"));
      copyFileSync(two.cert, join(mtlsDir, "tls.crt"));
      expect(mtls.reload()).toBe("applied");
      expect(await servedFingerprint(mtlsPort, { ca: readFileSync(ca.cert), cert: readFileSync(clientCert.cert), key: readFileSync(clientCert.key) }, ["h2"])).toBe(fingerprintOf(two.cert));
      expect(await answer(true)).toBe("k");
      expect(NO_ANSWER).toContain(await answer(false));
    } finally {
      await new Promise<void>((resolve) => mtlsServer.close(() => resolve()));
    }
  });

  it("never writes key material to the log", () => {
    const text = lines.join("");
    const keyLines = certs.flatMap((c) => readFileSync(c.key, "utf8").split("\n").filter((line) => line.length > 16 && !line.startsWith("-----")));
    expect(text.includes("PRIVATE KEY") || keyLines.some((line) => text.includes(line))).toBe(false);
    expect(lines.filter((line) => line.includes('"msg":"TLS certificate reloaded"'))).toHaveLength(3);
  });
});
