import { execFileSync, spawn, spawnSync } from "node:child_process";
import type { ChildProcess } from "node:child_process";
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:http";
import type { IncomingMessage, Server } from "node:http";
import type { Duplex } from "node:stream";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import type { HttpAuthzProxy } from "../../src/config.js";
import { freePort, requireServer, waitForPort } from "./ports.js";

const deployDir = resolve(import.meta.dirname, "../../deploy");

/** A proxy started from the config shipped under deploy/. */
export interface RunningProxy {
  port: number;
  stop(): Promise<void>;
}

/** A proxy config shipped under deploy/ that the tests run for real, in front of keygate. */
export interface ShippedProxy {
  name: "nginx" | "caddy";
  /** The KEYGATE_HTTP_AUTHZ_PROXY keygate must run with behind this proxy. */
  setting: HttpAuthzProxy;
  /** False (with the reason printed) where the binary is missing; in CI a missing one throws. */
  available: boolean;
  start(keygateHttpPort: number, upstreamPort: number): Promise<RunningProxy>;
}

/** The shipped nginx and Caddy configs, each with the keygate setting it needs. */
export function shippedProxies(): ShippedProxy[] {
  return [
    { name: "nginx", setting: "nginx", available: requireServer("nginx", binaryAvailable("nginx", ["-v"]), "apt-get install nginx"), start: startNginx },
    { name: "caddy", setting: "caddy", available: requireServer("caddy", binaryAvailable("caddy", ["version"]), "apt-get install caddy"), start: startCaddy },
  ];
}

/** What the sample upstream saw: it answers every request with this, as JSON. */
export interface EchoedRequest {
  method: string;
  url: string;
  headers: Record<string, string | string[] | undefined>;
}

/**
 * A sample upstream that echoes the request it received, and keeps every one in `requests`. It
 * takes request heads up to 1 MiB, as an API behind a proxy may (Node's own default is 16 KiB).
 */
export async function startEchoUpstream(): Promise<{ port: number; requests: EchoedRequest[]; stop(): Promise<void> }> {
  const requests: EchoedRequest[] = [];
  const server: Server = createServer({ maxHeaderSize: 1024 * 1024 }, (req, res) => {
    const echoed: EchoedRequest = { method: req.method ?? "", url: req.url ?? "", headers: req.headers };
    requests.push(echoed);
    res.writeHead(200, { "content-type": "application/json" });
    res.end(JSON.stringify(echoed));
  });
  // A CONNECT or an upgrade that got through is kept too (Node hands them to "connect" and
  // "upgrade", not to the handler), and accepted, as an upstream that tunnels would.
  server.on("connect", (req: IncomingMessage, socket: Duplex) => {
    requests.push({ method: req.method ?? "", url: req.url ?? "", headers: req.headers });
    socket.end("HTTP/1.1 200 Connection Established\r\n\r\n");
  });
  server.on("upgrade", (req: IncomingMessage, socket: Duplex) => {
    requests.push({ method: req.method ?? "", url: req.url ?? "", headers: req.headers });
    socket.end(`HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: ${String(req.headers.upgrade)}\r\n\r\n`);
  });
  await new Promise<void>((done) => server.listen(0, "127.0.0.1", done));
  const address = server.address();
  const port = typeof address === "object" && address !== null ? address.port : 0;
  return {
    port,
    requests,
    stop: () =>
      new Promise<void>((done) => {
        server.closeAllConnections();
        server.close(() => done());
      }),
  };
}

/** True when the binary runs (`nginx -v`, `caddy version`). */
export function binaryAvailable(command: string, args: string[]): boolean {
  return spawnSync(command, args, { stdio: "ignore" }).status === 0;
}

function stopChild(child: ChildProcess, signal: NodeJS.Signals): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  return new Promise((done) => {
    const kill = setTimeout(() => child.kill("SIGKILL"), 5000);
    child.once("exit", () => {
      clearTimeout(kill);
      done();
    });
    child.kill(signal);
  });
}

/**
 * Fills ${NAME} placeholders as `envsubst '${A} ${B}'` (given the list, as the README runs it)
 * does, leaving nginx's own $variables alone; a missing value is an error, not "".
 */
export function substitute(template: string, values: Record<string, string>): string {
  return template.replace(/\$\{([A-Z_][A-Z0-9_]*)\}/g, (_match, name: string) => {
    const value = values[name];
    if (value === undefined) throw new Error(`no value for \${${name}}`);
    return value;
  });
}

/**
 * The two lines the README tells an operator to add to the nginx config for each forwarded
 * metadata name (policy forwardMetadata): read it from keygate's answer, and set it upstream.
 */
export function nginxForwardedMetadataLines(name: string): { read: string; set: string } {
  const variable = `kg_meta_${name.replaceAll("-", "_")}`;
  const header = `X-Keygate-Meta-${name.split("-").map((part) => part.charAt(0).toUpperCase() + part.slice(1)).join("-")}`;
  return {
    read: `auth_request_set $${variable} $upstream_http_x_keygate_meta_${name.replaceAll("-", "_")};`,
    set: `proxy_set_header ${header} $${variable};`,
  };
}

/**
 * TLS from a proxy to keygate: the CA keygate's certificate is checked against and, for mTLS,
 * the client certificate the proxy presents. keygate's certificate must name "keygate".
 */
export interface ProxyTls {
  caFile: string;
  client?: { certFile: string; keyFile: string };
}

/**
 * The shipped config made into its TLS variant by the sed command its comments give: "#tls"
 * lines uncommented, and "#mtls" lines too when a client certificate is used.
 */
function tlsVariant(file: string, tls: ProxyTls, extra: readonly string[]): string {
  const uncomment = tls.client === undefined ? "s/^(\\s*)#tls /\\1/" : "s/^(\\s*)#m?tls /\\1/";
  return execFileSync("sed", ["-E", ...extra, "-e", uncomment, file], { encoding: "utf8" });
}

/**
 * Runs nginx with deploy/nginx/keygate.conf.template inside a minimal main config; with
 * `forwardMetadata`, plus the README's two lines for each name (after the identity headers');
 * with `tls`, its TLS variant, the files copied to keygate-tls/ beside the config.
 */
export async function startNginx(
  keygateHttpPort: number,
  upstreamPort: number,
  options: { forwardMetadata?: readonly string[]; tls?: ProxyTls } = {},
): Promise<RunningProxy> {
  const dir = mkdtempSync(join(tmpdir(), "keygate-nginx-"));
  const port = await freePort();
  const templateFile = join(deployDir, "nginx/keygate.conf.template");
  const template =
    options.tls === undefined ? readFileSync(templateFile, "utf8") : tlsVariant(templateFile, options.tls, ["-e", "s|proxy_pass http://keygate_authz|proxy_pass https://keygate_authz|"]);
  if (options.tls !== undefined) {
    mkdirSync(join(dir, "keygate-tls"));
    copyFileSync(options.tls.caFile, join(dir, "keygate-tls", "ca.crt"));
    if (options.tls.client !== undefined) {
      copyFileSync(options.tls.client.certFile, join(dir, "keygate-tls", "client.crt"));
      copyFileSync(options.tls.client.keyFile, join(dir, "keygate-tls", "client.key"));
    }
  }
  let site = substitute(template, {
    KEYGATE_HTTP_AUTHZ: `127.0.0.1:${keygateHttpPort}`,
    API_UPSTREAM: `127.0.0.1:${upstreamPort}`,
    LISTEN_PORT: `127.0.0.1:${port}`,
  });
  for (const name of options.forwardMetadata ?? []) {
    const lines = nginxForwardedMetadataLines(name);
    const readAnchor = "auth_request_set $kg_mode $upstream_http_x_keygate_mode;";
    const setAnchor = "proxy_set_header X-Keygate-Mode $kg_mode;";
    if (!site.includes(readAnchor) || !site.includes(setAnchor)) throw new Error("the nginx template no longer has the identity header lines to add forwarded metadata after");
    site = site.replace(readAnchor, `${readAnchor}\n        ${lines.read}`).replace(setAnchor, `${setAnchor}\n        ${lines.set}`);
  }
  writeFileSync(join(dir, "keygate.conf"), site);
  const runAs = process.getuid?.() === 0 ? "user root;" : "";
  writeFileSync(
    join(dir, "nginx.conf"),
    `${runAs}
worker_processes 1;
daemon off;
pid ${dir}/nginx.pid;
error_log ${dir}/error.log warn;
events { worker_connections 256; }
http {
  access_log off;
  client_body_temp_path ${dir}/body;
  proxy_temp_path ${dir}/proxy;
  fastcgi_temp_path ${dir}/fastcgi;
  uwsgi_temp_path ${dir}/uwsgi;
  scgi_temp_path ${dir}/scgi;
  include ${dir}/keygate.conf;
}
`,
  );
  let stderr = "";
  const child = spawn("nginx", ["-p", dir, "-c", join(dir, "nginx.conf")], { stdio: ["ignore", "ignore", "pipe"] });
  child.stderr?.on("data", (chunk: Buffer) => (stderr += chunk.toString()));
  await waitForPort(port, 10_000, () => `${stderr}\n${safeRead(join(dir, "error.log"))}`);
  return {
    port,
    async stop() {
      await stopChild(child, "SIGQUIT");
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/**
 * Runs Caddy with deploy/caddy/Caddyfile, its placeholders filled from the environment; with
 * `tls`, its TLS variant, given the files through KEYGATE_CA_CERT and KEYGATE_CLIENT_CERT/KEY;
 * with `caddyfile`, that text instead (an edit of the shipped file), its placeholders filled the same way.
 */
export async function startCaddy(keygateHttpPort: number, upstreamPort: number, options: { tls?: ProxyTls; caddyfile?: string } = {}): Promise<RunningProxy> {
  const dir = mkdtempSync(join(tmpdir(), "keygate-caddy-"));
  const port = await freePort();
  let stderr = "";
  let config = join(deployDir, "caddy/Caddyfile");
  const tlsEnv: Record<string, string> = {};
  if (options.caddyfile !== undefined) {
    config = join(dir, "Caddyfile");
    writeFileSync(config, options.caddyfile);
  } else if (options.tls !== undefined) {
    config = join(dir, "Caddyfile");
    writeFileSync(config, tlsVariant(join(deployDir, "caddy/Caddyfile"), options.tls, []));
    tlsEnv["KEYGATE_CA_CERT"] = options.tls.caFile;
    if (options.tls.client !== undefined) {
      tlsEnv["KEYGATE_CLIENT_CERT"] = options.tls.client.certFile;
      tlsEnv["KEYGATE_CLIENT_KEY"] = options.tls.client.keyFile;
    }
  }
  const child = spawn("caddy", ["run", "--config", config, "--adapter", "caddyfile"], {
    stdio: ["ignore", "ignore", "pipe"],
    env: {
      ...process.env,
      HOME: dir,
      XDG_DATA_HOME: dir,
      XDG_CONFIG_HOME: dir,
      LISTEN_PORT: String(port),
      KEYGATE_HTTP_AUTHZ: `127.0.0.1:${keygateHttpPort}`,
      API_UPSTREAM: `127.0.0.1:${upstreamPort}`,
      ...tlsEnv,
    },
  });
  child.stderr?.on("data", (chunk: Buffer) => (stderr += chunk.toString()));
  await waitForPort(port, 15_000, () => stderr);
  return {
    port,
    async stop() {
      await stopChild(child, "SIGTERM");
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

function safeRead(path: string): string {
  try {
    return readFileSync(path, "utf8");
  } catch {
    return "";
  }
}
