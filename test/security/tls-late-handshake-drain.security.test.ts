import { mkdtempSync, rmSync } from "node:fs";
import { connect as h2Connect } from "node:http2";
import { connect as netConnect } from "node:net";
import type { Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { connect as tlsConnect } from "node:tls";
import type { TLSSocket } from "node:tls";
import { create, toBinary } from "@bufbuild/protobuf";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { AdminAuth } from "../../src/admin/auth.js";
import type { Decision } from "../../src/authz/pipeline.js";
import { LISTENER_NAMES } from "../../src/config.js";
import { CheckRequestSchema } from "../../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import { KeyFormat } from "../../src/keys/key-format.js";
import { createAdminServer } from "../../src/server/admin.js";
import { authorizationDefinition, createGrpcAuthzServer } from "../../src/server/grpc-authz.js";
import type { StartedServer } from "../../src/server/grpc-authz.js";
import { createHttpAuthzServer } from "../../src/server/http-authz.js";
import { createLogger } from "../../src/server/logger.js";
import { Metrics } from "../../src/server/metrics.js";
import type { ListenerName } from "../../src/server/metrics.js";
import { Readiness } from "../../src/server/readiness.js";
import { TlsCertificates } from "../../src/server/tls.js";
import type { ListenerTls } from "../../src/server/tls.js";
import { makeCa, makeLeaf, opensslAvailable } from "../harness/certs.js";
import type { CertFiles } from "../harness/certs.js";
import { until } from "../harness/poll.js";

// README "Operations": SIGTERM stops accepting work and lets in-flight calls finish. A connection
// the listener had accepted before stop() but whose TLS handshake was still under way was in no
// set stop() closed: its handshake completed after stop() and it was served as if keygate were
// up. On the gRPC port (both engines) stop() had already ended, so keygate went on to the final
// usage and last-used flush while that connection's Checks were still decided and charged; on
// the HTTP authorization and admin ports stop() waited past its grace for that connection and
// served it. Such a connection is now closed at stop(); one already serving keeps its grace.

const GRACE_MS = 300;
// Far longer than a case: a connection closed during one was closed by stop(), not by the
// handshake or headers timeout.
const LIMITS = { headersTimeoutMs: 60_000, requestTimeoutMs: 60_000, idleTimeoutMs: 120_000, maxConnections: 1000 };
/** Bound on a wait that, with the defect, may never end: the case then reports what it saw. */
const WAIT_MS = 5_000;
const DENIAL: Decision = { allow: false, reason: "MISSING_CREDENTIAL", message: "No API key was sent." };

const dir = mkdtempSync(join(tmpdir(), "keygate-tls-late-handshake-"));
let leaf: CertFiles;

beforeAll(() => {
  if (!opensslAvailable()) throw new Error("openssl is needed");
  leaf = makeLeaf(dir, "server", makeCa(dir, "ca"), "server");
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const sockets: Socket[] = [];
afterEach(() => {
  for (const socket of sockets.splice(0)) socket.destroy();
});

/** The listener's TLS as keygate sets it up (its ALPN, handshake failures counted in `metrics`). */
function listenerTls(listener: ListenerName, metrics: Metrics): ListenerTls {
  const settings = { certFile: leaf.cert, keyFile: leaf.key, clientCaFile: undefined, listeners: new Set(LISTENER_NAMES), clientAuthListeners: new Set<ListenerName>() };
  const tls = new TlsCertificates(settings, { logger: createLogger("silent"), metrics }).forListener(listener);
  if (tls === null) throw new Error(`no TLS for ${listener}`);
  return tls;
}

/** Decisions (or readiness probes) the listener started; each waits until released while `holding`. */
class Work {
  started = 0;
  holding = false;
  readonly #waiting: Array<() => void> = [];
  run<T>(result: T): T | Promise<T> {
    this.started += 1;
    if (!this.holding) return result;
    return new Promise((resolve) => this.#waiting.push(() => resolve(result)));
  }
  release(): void {
    this.holding = false;
    for (const go of this.#waiting.splice(0)) go();
  }
}

interface Started {
  server: StartedServer;
  readiness: Readiness;
  metrics: Metrics;
}

interface ListenerCase {
  name: string;
  listener: ListenerName;
  alpn: string;
  start(work: Work): Promise<Started>;
  /** One call on the connection; what it was answered, "no answer" if nothing came back. */
  ask(socket: TLSSocket): Promise<string>;
  /** What `ask` gets when the call is served (the pipeline denies; the probe passes). */
  served: string;
}

function ready(): Readiness {
  const readiness = new Readiness();
  readiness.setReady(true);
  return readiness;
}

function grpcCase(engine: "h2" | "grpc-js"): ListenerCase {
  return {
    name: `gRPC, engine ${engine}`,
    listener: "grpc",
    alpn: "h2",
    async start(work) {
      const readiness = ready();
      const metrics = new Metrics({ defaultMetrics: false });
      const grpc = createGrpcAuthzServer({
        pipeline: { decide: () => work.run(DENIAL) },
        readiness,
        metrics,
        logger: createLogger("silent"),
        nowMs: () => Date.now(),
        limits: LIMITS,
        engine,
        tls: listenerTls("grpc", metrics),
      });
      return { server: await grpc.start("127.0.0.1", 0), readiness, metrics };
    },
    ask: grpcCheck,
    served: "200/0",
  };
}

const httpCase: ListenerCase = {
  name: "HTTP authorization",
  listener: "http",
  alpn: "http/1.1",
  async start(work) {
    const readiness = ready();
    const metrics = new Metrics({ defaultMetrics: false });
    const http = createHttpAuthzServer({
      pipeline: { decide: () => work.run(DENIAL) },
      readiness,
      metrics,
      logger: createLogger("silent"),
      nowMs: () => Date.now(),
      proxy: "envoy",
      limits: LIMITS,
      tls: listenerTls("http", metrics),
    });
    return { server: await http.start("127.0.0.1", 0), readiness, metrics };
  },
  ask: (socket) => http1Call(socket, "GET /check/v1/things HTTP/1.1\r\nHost: keygate\r\n\r\n"),
  served: "HTTP/1.1 401 Unauthorized",
};

const adminCase: ListenerCase = {
  name: "admin",
  listener: "admin",
  alpn: "http/1.1",
  async start(work) {
    const readiness = ready();
    const metrics = new Metrics({ defaultMetrics: false });
    const admin = createAdminServer({
      routes: () => undefined,
      auth: new AdminAuth(["kgadm_late-handshake-test-token-000000"], new KeyFormat("kg")),
      readiness,
      metrics,
      logger: createLogger("silent"),
      probe: async () => {
        await work.run(undefined);
      },
      maxBodyBytes: 1024 * 1024,
      limits: LIMITS,
      tls: listenerTls("admin", metrics),
    });
    return { server: await admin.start("127.0.0.1", 0), readiness, metrics };
  },
  // /readyz asks the probe while ready, and answers 503 without it once draining.
  ask: (socket) => http1Call(socket, "GET /readyz HTTP/1.1\r\nHost: keygate\r\n\r\n"),
  served: "HTTP/1.1 200 OK",
};

function checkFrame(): Buffer {
  const request = create(CheckRequestSchema, { attributes: { request: { http: { id: "late", method: "GET", path: "/v1", headers: {} } } } });
  const bytes = toBinary(CheckRequestSchema, request);
  const out = Buffer.alloc(5 + bytes.length);
  out.writeUInt32BE(bytes.length, 1);
  out.set(bytes, 5);
  return out;
}

/** One Check over HTTP/2 on the connection: ":status/grpc-status", or "no answer". */
function grpcCheck(socket: TLSSocket): Promise<string> {
  return new Promise((resolve) => {
    const session = h2Connect("https://localhost", { createConnection: () => socket });
    session.on("error", () => undefined);
    const stream = session.request({ ":method": "POST", ":path": authorizationDefinition.Check.path, "content-type": "application/grpc", te: "trailers" });
    let status = "";
    stream.on("response", (headers) => (status = `${headers[":status"]}/${headers["grpc-status"] ?? ""}`));
    stream.on("trailers", (trailers) => (status += `${trailers["grpc-status"]}`));
    stream.on("error", () => undefined);
    stream.resume();
    stream.on("close", () => {
      session.close();
      resolve(status === "" ? "no answer" : status);
    });
    stream.end(checkFrame());
  });
}

/** One HTTP/1.1 request on the connection: the answer's status line, or "no answer" if the connection closed without one. */
function http1Call(socket: TLSSocket, request: string): Promise<string> {
  return new Promise((resolve) => {
    let received = "";
    socket.setEncoding("latin1");
    socket.on("data", (chunk: string) => {
      received += chunk;
      if (received.includes("\r\n")) resolve(received.slice(0, received.indexOf("\r\n")));
    });
    socket.once("close", () => resolve("no answer"));
    socket.write(request);
  });
}

function openRaw(port: number): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const socket = netConnect({ host: "127.0.0.1", port }, () => resolve(socket));
    sockets.push(socket);
    socket.once("error", reject);
  });
}

function startTls(raw: Socket, alpn: string): TLSSocket {
  const socket = tlsConnect({ socket: raw, servername: "localhost", ALPNProtocols: [alpn], rejectUnauthorized: false });
  sockets.push(socket);
  socket.on("error", () => undefined);
  return socket;
}

/** A sample of one of the per-listener metrics, NaN if there is none. */
async function sample(metrics: Metrics, name: string, listener: ListenerName): Promise<number> {
  const metric = await metrics.registry.getSingleMetric(name)?.get();
  return metric?.values.find((value) => value.labels.listener === listener)?.value ?? Number.NaN;
}

function openConnections(metrics: Metrics, listener: ListenerName): Promise<number> {
  return sample(metrics, "keygate_connections", listener);
}

/** `promise`'s value, or `late` if it has not settled within WAIT_MS. */
function within<T>(promise: Promise<T>, late: T): Promise<T> {
  return Promise.race([promise, new Promise<T>((resolve) => setTimeout(() => resolve(late), WAIT_MS).unref())]);
}

describe.each([grpcCase("h2"), grpcCase("grpc-js"), httpCase, adminCase])("$name listener with TLS, stopped", (c) => {
  it("security: a connection still in its TLS handshake at stop() is closed; nothing on it is decided or answered", async () => {
    const work = new Work();
    const { server, readiness, metrics } = await c.start(work);
    const raw = await openRaw(server.port);
    const rawClosed = new Promise<string>((resolve) => raw.once("close", () => resolve("closed")));
    await until(async () => (await openConnections(metrics, c.listener)) === 1, WAIT_MS, "the listener has accepted the connection");

    readiness.drain();
    const stopping = server.stop(GRACE_MS).then(() => "ended");
    // The handshake completes, if at all, after stop() was called.
    const answer = await within(c.ask(startTls(raw, c.alpn)), "no answer within the wait");
    const stop = await within(stopping, "still running");
    expect({ answer, decided: work.started, stop, connection: await within(rawClosed, "open") }).toEqual({ answer: "no answer", decided: 0, stop: "ended", connection: "closed" });
    await until(async () => (await openConnections(metrics, c.listener)) === 0, WAIT_MS, "no connection counted open");
    // Cut by keygate, not failed by the client.
    expect(await sample(metrics, "keygate_tls_handshake_failures_total", c.listener)).toBe(0);
  }, 30_000);

  it("happy: a call in flight on a TLS connection made before stop() is answered within the grace", async () => {
    const work = new Work();
    work.holding = true;
    const { server, readiness } = await c.start(work);
    const socket = startTls(await openRaw(server.port), c.alpn);
    await new Promise<void>((resolve) => socket.once("secureConnect", () => resolve()));
    const answer = c.ask(socket);
    await until(() => work.started === 1, WAIT_MS, "the call is being decided");

    readiness.drain();
    let stopped = false;
    const stopping = server.stop(20_000).then(() => (stopped = true));
    // Give stop() a turn to cut whatever it cuts before the call is let go.
    await new Promise((resolve) => setImmediate(resolve));
    const stoppedBeforeAnswer = stopped;
    work.release();
    expect(await within(answer, "no answer within the wait")).toBe(c.served);
    expect(await within(stopping, false)).toBe(true);
    expect(stoppedBeforeAnswer).toBe(false);
  }, 30_000);
});

describe("admin listener with TLS, stopped while a call holds the grace", () => {
  it("security: a connection whose handshake is done but whose first bytes come after stop() is closed, not served", async () => {
    const work = new Work();
    work.holding = true;
    const { server, readiness } = await adminCase.start(work);
    const busy = startTls(await openRaw(server.port), adminCase.alpn);
    const late = startTls(await openRaw(server.port), adminCase.alpn);
    await Promise.all([busy, late].map((socket) => new Promise<void>((resolve) => socket.once("secureConnect", () => resolve()))));
    const busyAnswer = adminCase.ask(busy);
    await until(() => work.started === 1, WAIT_MS, "the held call is being decided");

    readiness.drain();
    const stopping = server.stop(20_000);
    // The drain waits for the held call; meanwhile the idle connection sends its first request.
    const lateAnswer = await within(http1Call(late, "GET /healthz HTTP/1.1\r\nHost: keygate\r\n\r\n"), "no answer within the wait");
    work.release();
    expect({ busy: await within(busyAnswer, "no answer within the wait"), late: lateAnswer }).toEqual({ busy: adminCase.served, late: "no answer" });
    await stopping;
  }, 30_000);
});
