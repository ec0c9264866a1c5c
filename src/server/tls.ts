import { X509Certificate, createHash, createPrivateKey } from "node:crypto";
import { readFileSync, statSync, watch } from "node:fs";
import type { FSWatcher } from "node:fs";
import { createServer as createNetServer } from "node:net";
import type { Server as NetServer, Socket } from "node:net";
import { dirname, resolve } from "node:path";
import { createSecureContext, createServer as createTlsServer } from "node:tls";
import type { SecureContextOptions, Server as TlsServer, TLSSocket, TlsOptions } from "node:tls";
import type { Logger } from "pino";
import { ConfigError } from "../config.js";
import type { ListenerId, RedisTlsSettings, TlsSettings } from "../config.js";
import type { Metrics } from "./metrics.js";

/** What a reload of the certificate files did. */
export type TlsReloadResult = "applied" | "unchanged" | "failed";

/** The certificate, key and client CA as read from disk, checked to belong together. */
interface TlsMaterial {
  cert: Buffer;
  key: Buffer;
  clientCa: Buffer | undefined;
  /** SHA-256 of every file's bytes: a rewrite with the same content is not a change. */
  digest: string;
  /** The served certificate's SHA-256 fingerprint and expiry, for the log (public data). */
  fingerprint: string;
  validTo: string;
}

const PEM_CERTIFICATE = /-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g;

// At most one look at the files' stat per this interval from the accept path: a flood of new
// connections costs no more than that, and a directory watch makes most changes seen at once.
const RECHECK_MS = 1000;
// Writers replace the certificate and the key in steps: wait for the directory to go quiet.
const SETTLE_MS = 100;

function readPem(variable: string, path: string): Buffer {
  try {
    return readFileSync(path);
  } catch (error) {
    const code = error instanceof Error && "code" in error && typeof error.code === "string" ? error.code : "unreadable";
    throw new ConfigError(`${variable}: cannot read ${path} (${code})`);
  }
}

/** Every certificate of a PEM bundle, parsed; none, or one that does not parse, is an error naming the variable. */
function parseCertificates(variable: string, path: string, pem: Buffer): X509Certificate[] {
  const blocks = pem.toString("latin1").match(PEM_CERTIFICATE) ?? [];
  if (blocks.length === 0) throw new ConfigError(`${variable}: ${path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)`);
  return blocks.map((block, i) => {
    try {
      return new X509Certificate(block);
    } catch {
      throw new ConfigError(`${variable}: certificate ${i + 1} in ${path} is not a valid X.509 certificate`);
    }
  });
}

/**
 * Reads and checks the listeners' TLS files: certificates parse, the key is an unencrypted PEM
 * private key that belongs to the first certificate. Errors name the variable and the file and
 * never carry the key's bytes (the library's message is not passed on for the key).
 */
export function loadTlsMaterial(settings: Pick<TlsSettings, "certFile" | "keyFile" | "clientCaFile">): TlsMaterial {
  const cert = readPem("KEYGATE_TLS_CERT_FILE", settings.certFile);
  const key = readPem("KEYGATE_TLS_KEY_FILE", settings.keyFile);
  const clientCa = settings.clientCaFile === undefined ? undefined : readPem("KEYGATE_TLS_CLIENT_CA_FILE", settings.clientCaFile);
  const [leaf] = parseCertificates("KEYGATE_TLS_CERT_FILE", settings.certFile, cert);
  if (leaf === undefined) throw new ConfigError(`KEYGATE_TLS_CERT_FILE: ${settings.certFile} holds no PEM certificate`);
  let privateKey;
  try {
    privateKey = createPrivateKey({ key, format: "pem" });
  } catch {
    throw new ConfigError(`KEYGATE_TLS_KEY_FILE: ${settings.keyFile} holds no unencrypted PEM private key`);
  }
  if (!leaf.checkPrivateKey(privateKey)) {
    throw new ConfigError(`KEYGATE_TLS_KEY_FILE: the private key in ${settings.keyFile} does not belong to the certificate in ${settings.certFile} (KEYGATE_TLS_CERT_FILE)`);
  }
  if (clientCa !== undefined && settings.clientCaFile !== undefined) parseCertificates("KEYGATE_TLS_CLIENT_CA_FILE", settings.clientCaFile, clientCa);
  try {
    createSecureContext({ cert, key, ca: clientCa });
  } catch (error) {
    const code = error instanceof Error && "code" in error && typeof error.code === "string" ? error.code : "rejected";
    throw new ConfigError(`KEYGATE_TLS_CERT_FILE: OpenSSL refused the certificate and key of ${settings.certFile} (${code})`);
  }
  const digest = createHash("sha256").update(cert).update("\0").update(key).update("\0").update(clientCa ?? "").digest("hex");
  return { cert, key, clientCa, digest, fingerprint: leaf.fingerprint256, validTo: leaf.validTo };
}

/** A file's identity and change times, following symlinks (a Secret volume swaps a ..data link). */
function stamp(path: string): string {
  try {
    const s = statSync(path, { bigint: true });
    return `${s.dev}:${s.ino}:${s.size}:${s.mtimeNs}:${s.ctimeNs}`;
  } catch {
    return "missing";
  }
}

/** How one listener uses TLS: its server options, and hooking a server up to certificate reloads. */
export interface ListenerTls {
  /** Options for tls.createServer or https.createServer (context, client certificates, ALPN, handshake timeout). */
  serverOptions(): TlsOptions;
  /** Keeps the server's context current: a changed file is looked at before a new connection's handshake. */
  attach(server: TlsServer): void;
}

/**
 * The listeners' certificate, key and client CA, reloaded from disk: a file replaced in place or
 * by a symlink swap is served from the next new connection on. A replacement that does not load
 * keeps the material in force, logs one line and sets keygate_config_reload_failing{file="tls"}.
 */
export class TlsCertificates {
  readonly #settings: TlsSettings;
  readonly #logger: Logger;
  readonly #metrics: Metrics;
  readonly #nowMs: () => number;
  readonly #servers = new Map<TlsServer, ListenerId>();
  #material: TlsMaterial;
  #stamps: string;
  #checkedAtMs = 0;
  #dirty = false;
  #watchers: FSWatcher[] = [];
  #settle: NodeJS.Timeout | undefined;

  /** Loads the files; a problem is a ConfigError naming the variable. */
  constructor(settings: TlsSettings, deps: { logger: Logger; metrics: Metrics; nowMs?: () => number }) {
    this.#settings = settings;
    this.#logger = deps.logger;
    this.#metrics = deps.metrics;
    this.#nowMs = deps.nowMs ?? Date.now;
    this.#stamps = this.#currentStamps();
    this.#material = loadTlsMaterial(settings);
    this.#checkedAtMs = this.#nowMs();
  }

  /** The SHA-256 fingerprint of the certificate being served. */
  get fingerprint(): string {
    return this.#material.fingerprint;
  }

  /** The listener's TLS, or null when it is plaintext (not in KEYGATE_TLS_LISTENERS). */
  forListener(listener: ListenerId): ListenerTls | null {
    if (!this.#settings.listeners.has(listener)) return null;
    const clientAuth = this.#settings.clientAuthListeners.has(listener);
    return {
      serverOptions: () => ({
        ...this.#contextOptions(clientAuth),
        requestCert: clientAuth,
        rejectUnauthorized: clientAuth,
        ALPNProtocols: listener === "grpc" ? ["h2"] : listener === "http" ? ["http/1.1"] : ["h2", "http/1.1"],
      }),
      attach: (server) => {
        this.#servers.set(server, listener);
        server.once("close", () => this.#servers.delete(server));
        // Before Node's own listener makes the TLS socket from the server's context.
        server.prependListener("connection", () => this.#maybeReload());
        server.on("tlsClientError", (error: Error) => {
          // Once the listener is closed, the handshakes that end are those its stop() cut.
          if (!server.listening) return;
          this.#metrics.tlsHandshakeFailed(listener);
          const code = "code" in error && typeof error.code === "string" ? error.code : error.message.slice(0, 120);
          this.#logger.debug({ listener, code }, "TLS handshake failed");
        });
      },
    };
  }

  /** Looks at the files now: reloads them if they changed. SIGHUP and the directory watch call this. */
  reload(): TlsReloadResult {
    this.#checkedAtMs = this.#nowMs();
    this.#dirty = false;
    const stamps = this.#currentStamps();
    if (stamps === this.#stamps) return "unchanged";
    // The stamps are taken before reading, so a write during the read is seen next time.
    this.#stamps = stamps;
    let next: TlsMaterial;
    try {
      next = loadTlsMaterial(this.#settings);
    } catch (error) {
      const problem = error instanceof Error ? error.message : String(error);
      this.#logger.error({ problem, serving: this.#material.fingerprint }, "TLS certificate reload failed; the certificate in force stays");
      this.#metrics.configReloaded("tls", "failed");
      return "failed";
    }
    if (next.digest === this.#material.digest) {
      this.#metrics.configReloaded("tls", "unchanged");
      return "unchanged";
    }
    try {
      for (const [server, listener] of this.#servers) server.setSecureContext(this.#contextOptions(this.#settings.clientAuthListeners.has(listener), next));
    } catch (error) {
      // Never out of the accept path or a signal handler: loadTlsMaterial built this context
      // already, so this is not expected; the listeners that did not take it keep the old one.
      const code = error instanceof Error && "code" in error && typeof error.code === "string" ? error.code : "rejected";
      this.#logger.error({ problem: `OpenSSL refused the new context (${code})`, serving: this.#material.fingerprint }, "TLS certificate reload failed; the certificate in force stays");
      this.#metrics.configReloaded("tls", "failed");
      return "failed";
    }
    this.#material = next;
    this.#logger.info({ fingerprint: next.fingerprint, validTo: next.validTo }, "TLS certificate reloaded");
    this.#metrics.configReloaded("tls", "applied");
    return "applied";
  }

  /** Watches the files' directories, so a change is picked up without waiting for a connection. */
  watch(): void {
    const dirs = new Set(this.#files().map((file) => dirname(resolve(file))));
    for (const dir of dirs) {
      try {
        const watcher = watch(dir, () => {
          this.#dirty = true;
          if (this.#settle !== undefined) clearTimeout(this.#settle);
          this.#settle = setTimeout(() => this.reload(), SETTLE_MS);
          this.#settle.unref();
        });
        watcher.on("error", (error: unknown) => this.#logger.warn({ err: error, dir }, "cannot watch the TLS files' directory; changes are seen on new connections"));
        watcher.unref();
        this.#watchers.push(watcher);
      } catch (error) {
        this.#logger.warn({ err: error, dir }, "cannot watch the TLS files' directory; changes are seen on new connections");
      }
    }
  }

  /** Stops watching. */
  close(): void {
    for (const watcher of this.#watchers) watcher.close();
    this.#watchers = [];
    if (this.#settle !== undefined) clearTimeout(this.#settle);
  }

  #maybeReload(): void {
    if (this.#dirty || this.#nowMs() - this.#checkedAtMs >= RECHECK_MS) this.reload();
  }

  #files(): string[] {
    const { certFile, keyFile, clientCaFile } = this.#settings;
    return clientCaFile === undefined ? [certFile, keyFile] : [certFile, keyFile, clientCaFile];
  }

  #currentStamps(): string {
    return this.#files().map(stamp).join("|");
  }

  #contextOptions(clientAuth: boolean, material: TlsMaterial = this.#material): SecureContextOptions {
    // The client CA is only loaded where client certificates are asked for: elsewhere it would
    // just be advertised to clients for nothing.
    return { cert: material.cert, key: material.key, ca: clientAuth ? material.clientCa : undefined, minVersion: "TLSv1.2" };
  }
}

/** A listener's accepting server, and its stop. */
export interface Acceptor {
  /** The server to listen on: plain TCP, or TLS over it. */
  readonly server: NetServer;
  /** True from stop() on: a connection the listener has not handed to a protocol server yet is closed, never handed over. */
  readonly stopped: boolean;
  /**
   * Stops accepting and closes the connections still in their TLS handshake, which are in no
   * protocol server's hands yet; `closed` runs once every accepted connection has closed (as
   * net.Server.close's callback). Connections already handed on are the listener's to drain.
   */
  stop(closed?: () => void): void;
}

/**
 * A listener's accepting server: plain TCP, or TLS with the listener's context. `onSocket` gets
 * the decrypted socket once the handshake is done, unless stop() came first; a handshake must
 * finish within `handshakeTimeoutMs`. Connection caps and counts apply to the TCP connections
 * either way.
 */
export function createAcceptor(tls: ListenerTls | null, handshakeTimeoutMs: number, onSocket: (socket: Socket) => void): Acceptor {
  if (tls === null) {
    const server = createNetServer(onSocket);
    let stopped = false;
    return {
      server,
      get stopped() {
        return stopped;
      },
      stop(closed) {
        stopped = true;
        server.close(() => closed?.());
      },
    };
  }
  const server = createTlsServer({ ...tls.serverOptions(), handshakeTimeout: handshakeTimeoutMs });
  const handshakes = trackHandshakes(server);
  server.on("secureConnection", (socket: TLSSocket) => {
    if (!handshakes.stopped) onSocket(socket);
  });
  tls.attach(server);
  return {
    server,
    get stopped() {
      return handshakes.stopped;
    },
    stop(closed) {
      server.close(() => closed?.());
      handshakes.stop();
    },
  };
}

/** A TLS server's connections whose handshake is under way; see trackHandshakes. */
export interface Handshakes {
  /** True from stop() on. */
  readonly stopped: boolean;
  /** Closes every connection still in its TLS handshake; one whose handshake completes later is closed at once. */
  stop(): void;
}

/**
 * Tracks the TCP connections of a TLS server from accept to the end of their handshake. Node
 * hands a connection to the server's 'secureConnection' listeners only then, so a listener's
 * own sets miss it, and a handshake that completes after the listener's stop() would be served.
 * Call stop() after server.close(): the cut connections count as no failed handshake.
 */
export function trackHandshakes(server: TlsServer): Handshakes {
  // By the connection's addresses and ports: Node gives no public link from the TCP socket to
  // its TLS socket, and both name the same connection, unique among those open.
  const handshaking = new Map<string, Socket>();
  let stopped = false;
  server.on("connection", (raw: Socket) => {
    const id = connectionId(raw);
    if (id === null) return;
    handshaking.set(id, raw);
    raw.once("close", () => {
      if (handshaking.get(id) === raw) handshaking.delete(id);
    });
  });
  // Ahead of the protocol server's own listener (node:https registers its connection handler here).
  server.prependListener("secureConnection", (socket: TLSSocket) => {
    const id = connectionId(socket);
    if (id !== null) handshaking.delete(id);
    if (stopped) socket.destroy();
  });
  return {
    get stopped() {
      return stopped;
    },
    stop() {
      stopped = true;
      for (const raw of handshaking.values()) raw.destroy();
      handshaking.clear();
    },
  };
}

/** The local and remote address and port of an open connection, or null once they are unknown (closed). */
function connectionId(socket: Socket): string | null {
  const { localAddress, localPort, remoteAddress, remotePort } = socket;
  if (localAddress === undefined || localPort === undefined || remoteAddress === undefined || remotePort === undefined) return null;
  return `${localAddress} ${localPort} ${remoteAddress} ${remotePort}`;
}

/** The ioredis `tls` options for rediss:// with a private CA or a client certificate; files read at start. */
export function redisTlsOptions(settings: RedisTlsSettings): { ca?: Buffer; cert?: Buffer; key?: Buffer } {
  const options: { ca?: Buffer; cert?: Buffer; key?: Buffer } = {};
  if (settings.caFile !== undefined) {
    options.ca = readPem("KEYGATE_REDIS_TLS_CA_FILE", settings.caFile);
    parseCertificates("KEYGATE_REDIS_TLS_CA_FILE", settings.caFile, options.ca);
  }
  if (settings.certFile !== undefined && settings.keyFile !== undefined) {
    options.cert = readPem("KEYGATE_REDIS_TLS_CERT_FILE", settings.certFile);
    options.key = readPem("KEYGATE_REDIS_TLS_KEY_FILE", settings.keyFile);
    const [leaf] = parseCertificates("KEYGATE_REDIS_TLS_CERT_FILE", settings.certFile, options.cert);
    let privateKey;
    try {
      privateKey = createPrivateKey({ key: options.key, format: "pem" });
    } catch {
      throw new ConfigError(`KEYGATE_REDIS_TLS_KEY_FILE: ${settings.keyFile} holds no unencrypted PEM private key`);
    }
    if (leaf === undefined || !leaf.checkPrivateKey(privateKey)) {
      throw new ConfigError(`KEYGATE_REDIS_TLS_KEY_FILE: the private key in ${settings.keyFile} does not belong to the certificate in ${settings.certFile}`);
    }
  }
  return options;
}
