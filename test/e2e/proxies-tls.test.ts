import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { HttpAuthzProxy } from "../../src/config.js";
import { makeCa, makeLeaf, opensslAvailable } from "../harness/certs.js";
import type { CertFiles } from "../harness/certs.js";
import { startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { requireServer } from "../harness/ports.js";
import { binaryAvailable, startCaddy, startEchoUpstream, startNginx } from "../harness/proxies.js";
import type { ProxyTls, RunningProxy } from "../harness/proxies.js";

// The shipped nginx and Caddy configs in their TLS variants (the sed their comments give), in
// front of a keygate whose HTTP authorization listener requires client certificates: the
// proxy's check is a real mTLS handshake, and a proxy without a client certificate is refused
// and fails closed.

const haveOpenssl = requireServer("openssl", opensslAvailable(), "install the openssl package (/usr/bin/openssl)");
type Start = (keygatePort: number, upstreamPort: number, options: { tls?: ProxyTls }) => Promise<RunningProxy>;
const proxies: Array<[string, boolean, HttpAuthzProxy, Start]> = [
  ["nginx", requireServer("nginx", binaryAvailable("nginx", ["-v"]), "apt-get install nginx"), "nginx", startNginx],
  ["caddy", requireServer("caddy", binaryAvailable("caddy", ["version"]), "apt-get install caddy"), "caddy", startCaddy],
];

describe.each(proxies)("%s to keygate over mTLS (the shipped config's TLS variant)", { timeout: 120_000 }, (_name, available, setting, start) => {
  let dir: string;
  let ca: CertFiles;
  let proxyClient: CertFiles;
  let kg: TestKeygate;
  let upstream: Awaited<ReturnType<typeof startEchoUpstream>>;
  let secret = "";

  beforeAll(async () => {
    if (!available || !haveOpenssl) return;
    dir = mkdtempSync(join(tmpdir(), "keygate-proxy-tls-"));
    ca = makeCa(dir, "ca");
    const server = makeLeaf(dir, "keygate", ca, "server", ["keygate"]);
    proxyClient = makeLeaf(dir, "proxy", ca, "client");
    // TLS on the HTTP authorization listener only: the harness's admin and gRPC clients stay plaintext.
    kg = await startKeygate({
      httpAuthzProxy: setting,
      env: {
        KEYGATE_TLS_CERT_FILE: server.cert,
        KEYGATE_TLS_KEY_FILE: server.key,
        KEYGATE_TLS_CLIENT_CA_FILE: ca.cert,
        KEYGATE_TLS_LISTENERS: "http",
      },
    });
    upstream = await startEchoUpstream();
    secret = (await kg.admin.createKey({ ownerId: "proxy-tls-owner", name: "k" })).secret;
  });
  afterAll(async () => {
    await upstream?.stop();
    await kg?.stop();
    if (dir !== undefined) rmSync(dir, { recursive: true, force: true });
  });

  it.runIf(available && haveOpenssl)("passes an allowed request with keygate's identity, and answers a denial with keygate's 401", async () => {
    const proxy = await start(kg.ports.http, upstream.port, { tls: { caFile: ca.cert, client: { certFile: proxyClient.cert, keyFile: proxyClient.key } } });
    try {
      const seen = upstream.requests.length;
      const allowed = await fetch(`http://127.0.0.1:${proxy.port}/v1/things`, { headers: { "x-api-key": secret } });
      expect(allowed.status).toBe(200);
      await allowed.text();
      expect(upstream.requests).toHaveLength(seen + 1);
      expect(upstream.requests.at(-1)?.headers["x-keygate-owner-id"]).toBe("proxy-tls-owner");
      expect(upstream.requests.at(-1)?.headers["x-api-key"]).toBeUndefined();
      const denied = await fetch(`http://127.0.0.1:${proxy.port}/v1/things`);
      expect(denied.status).toBe(401);
      expect(await denied.json()).toMatchObject({ success: false, error: { code: "UNAUTHENTICATED", statusCode: 401 } });
      expect(upstream.requests).toHaveLength(seen + 1);
    } finally {
      await proxy.stop();
    }
  });

  it.runIf(available && haveOpenssl)("fails closed when the proxy presents no client certificate: nothing reaches the API", async () => {
    const proxy = await start(kg.ports.http, upstream.port, { tls: { caFile: ca.cert } });
    try {
      const seen = upstream.requests.length;
      const refused = await fetch(`http://127.0.0.1:${proxy.port}/v1/things`, { headers: { "x-api-key": secret } });
      await refused.text();
      // keygate refuses the handshake: Caddy answers 502; nginx's check fails (500), and the
      // denial page it then asks keygate for fails the same way (502).
      expect(refused.status).toBe(502);
      expect(upstream.requests).toHaveLength(seen);
    } finally {
      await proxy.stop();
    }
  });
});
