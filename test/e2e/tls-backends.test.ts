import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Redis } from "ioredis";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { makeCa, makeLeaf, opensslAvailable } from "../harness/certs.js";
import type { CertFiles } from "../harness/certs.js";
import { checkInit, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { mongoWireAvailable, startMongoWire } from "../harness/mongo-wire.js";
import type { MongoWire } from "../harness/mongo-wire.js";
import { requireServer } from "../harness/ports.js";
import { redisAvailable, startRedis } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";
import { startTlsProxy } from "../harness/tls-proxy.js";
import type { TlsProxy } from "../harness/tls-proxy.js";

// keygate's own connections over TLS: Redis through rediss:// (a real redis-server listening
// with --tls-port only) and MongoDB through tls=true&tlsCAFile (a TLS-terminating proxy in front
// of the MongoDB-wire test server). A server whose certificate keygate does not trust stops the
// start: keygate never reports ready without its backend.

const haveOpenssl = requireServer("openssl", opensslAvailable(), "install the openssl package (/usr/bin/openssl)");
const haveRedis = haveOpenssl && requireServer("redis-server", redisAvailable(), "apt-get install redis-server");
const haveMongo = haveOpenssl && requireServer("MongoDB-wire server", mongoWireAvailable(), "run .ci/install-mongo-wire.sh");
const PEPPER = "tls-backends-pepper-0123456789abcdefghijklmnop";

let dir: string;
let ca: CertFiles;
let rogueCa: CertFiles;
let server: CertFiles;

beforeAll(() => {
  if (!haveOpenssl) return;
  dir = mkdtempSync(join(tmpdir(), "keygate-tls-backends-"));
  ca = makeCa(dir, "ca");
  rogueCa = makeCa(dir, "rogue-ca");
  server = makeLeaf(dir, "backend", ca, "server");
});
afterAll(() => {
  if (dir !== undefined) rmSync(dir, { recursive: true, force: true });
});

async function allowsNewKey(kg: TestKeygate, owner: string): Promise<void> {
  const created = await kg.admin.createKey({ ownerId: owner, name: "tls" });
  const allowed = await kg.check(checkInit({ "x-api-key": created.secret }));
  expect(allowed.status?.code).toBe(0);
}

async function startFailure(env: Record<string, string>): Promise<string> {
  return startKeygate({ env }).then(
    async (kg) => {
      await kg.stop();
      return "started";
    },
    (error: unknown) => (error instanceof Error ? error.message : String(error)),
  );
}

describe.runIf(haveRedis)("Redis over TLS (rediss://)", { timeout: 120_000 }, () => {
  let redis: RedisServer;

  beforeAll(async () => {
    const started = await startRedis({ tls: { certFile: server.cert, keyFile: server.key, caFile: ca.cert } });
    if (started === null) throw new Error("redis-server is missing");
    redis = started;
  });
  afterAll(async () => {
    await redis?.stop();
  });

  it("caches and counts in a Redis it reaches over TLS, trusting KEYGATE_REDIS_TLS_CA_FILE", async () => {
    expect(redis.url).toMatch(/^rediss:\/\//);
    const kg = await startKeygate({ env: { KEYGATE_REDIS_URL: redis.url, KEYGATE_REDIS_TLS_CA_FILE: ca.cert } });
    try {
      await allowsNewKey(kg, "redis-tls-owner");
      const client = new Redis(redis.url, { tls: { ca: readFileSync(ca.cert) }, lazyConnect: true, maxRetriesPerRequest: 1 });
      try {
        await client.connect();
        expect(await client.dbsize()).toBeGreaterThan(0);
      } finally {
        client.disconnect();
      }
    } finally {
      await kg.stop();
    }
  });

  it("does not start when Redis's certificate is not signed by the trusted CA, or when it is asked for plaintext", async () => {
    const untrusted = await startFailure({ KEYGATE_REDIS_URL: redis.url, KEYGATE_REDIS_TLS_CA_FILE: rogueCa.cert });
    expect(untrusted).toMatch(/^KEYGATE_REDIS_URL: the server's TLS certificate was not accepted \([A-Z_]+\); set KEYGATE_REDIS_TLS_CA_FILE/);
    const systemCas = await startFailure({ KEYGATE_REDIS_URL: redis.url });
    expect(systemCas).toMatch(/^KEYGATE_REDIS_URL: the server's TLS certificate was not accepted/);
    const plaintext = await startFailure({ KEYGATE_REDIS_URL: redis.url.replace(/^rediss:/, "redis:") });
    expect(plaintext).toMatch(/^KEYGATE_REDIS_URL: /);
  });

  it("refuses Redis TLS files without a rediss:// URL, naming the variable", async () => {
    const message = await startFailure({ KEYGATE_REDIS_URL: "redis://127.0.0.1:1", KEYGATE_REDIS_TLS_CA_FILE: ca.cert });
    expect(message).toBe("invalid environment: KEYGATE_REDIS_TLS_CA_FILE: needs KEYGATE_REDIS_URL to start with rediss://, rediss+cluster:// or rediss+sentinel:// (TLS)");
  });
});

describe.runIf(haveMongo)("MongoDB over TLS (tls=true&tlsCAFile=)", { timeout: 120_000 }, () => {
  let mongo: MongoWire;
  let proxy: TlsProxy;
  let tlsUri: (caFile: string) => string;

  beforeAll(async () => {
    mongo = await startMongoWire();
    const plain = new URL(mongo.uri);
    proxy = await startTlsProxy(Number(plain.port), { cert: readFileSync(server.cert), key: readFileSync(server.key) });
    tlsUri = (caFile) => `mongodb://127.0.0.1:${proxy.port}${plain.pathname}?tls=true&tlsCAFile=${encodeURIComponent(caFile)}`;
  });
  afterAll(async () => {
    await proxy?.stop();
    await mongo?.stop();
  });

  it("stores keys in a MongoDB it reaches over TLS", async () => {
    const before = proxy.handshakes();
    const kg = await startKeygate({ env: { KEYGATE_MONGODB_URI: tlsUri(ca.cert), KEYGATE_PEPPER: PEPPER } });
    try {
      await allowsNewKey(kg, "mongo-tls-owner");
      expect(proxy.handshakes()).toBeGreaterThan(before);
    } finally {
      await kg.stop();
    }
  });

  it("does not start when MongoDB's certificate is not signed by tlsCAFile", async () => {
    const before = proxy.handshakes();
    const message = await startFailure({ KEYGATE_MONGODB_URI: tlsUri(rogueCa.cert), KEYGATE_PEPPER: PEPPER });
    expect(message).toMatch(/^KEYGATE_MONGODB_URI: no MongoDB server answered/);
    expect(proxy.handshakes()).toBe(before);
  });
});
