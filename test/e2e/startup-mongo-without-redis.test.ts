import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { mongoWireAvailable, startMongoWire } from "../harness/mongo-wire.js";
import type { MongoWire } from "../harness/mongo-wire.js";
import { requireServer } from "../harness/ports.js";
import { spawnKeygate } from "../harness/process.js";
import type { KeygateProcess } from "../harness/process.js";
import { redisAvailable, startRedis } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";

// Replicas on MongoDB share keys, not caches or limits: without Redis each one's caches, rate
// limits, quotas and credit counts are its own. Nothing can refuse a second such replica (none
// knows of the others), so each says so at start, in one warn line.

const ready = requireServer("MongoDB-wire server and redis-server", mongoWireAvailable() && redisAvailable(), "run .ci/install-mongo-wire.sh; apt-get install redis-server");
const TOKEN = "mongo-no-redis-admin-token-0123456789ab";
const PEPPER = "mongo-no-redis-pepper-0123456789abcdefghij";
const WARNING = "MongoDB without KEYGATE_REDIS_URL: this replica's caches, rate limits, quotas and credit counts are its own; run one replica, or give every replica the same Redis";

describe.runIf(ready)("keygate on MongoDB, with and without Redis", { timeout: 120_000 }, () => {
  let mongo: MongoWire | undefined;
  let redis: RedisServer | null = null;
  const dir = mkdtempSync(join(tmpdir(), "keygate-mongo-no-redis-"));
  const running: KeygateProcess[] = [];
  beforeAll(async () => {
    mongo = await startMongoWire();
    redis = await startRedis();
  }, 120_000);
  afterAll(async () => {
    await Promise.all(running.map((kg) => kg.stop("SIGTERM")));
    await redis?.stop();
    await mongo?.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  async function start(env: Record<string, string>): Promise<string[]> {
    const kg = await spawnKeygate({
      cwd: dir,
      env: { KEYGATE_MONGODB_URI: mongo?.uri ?? "", KEYGATE_PEPPER: PEPPER, KEYGATE_ADMIN_TOKENS: TOKEN, KEYGATE_HOST: "127.0.0.1", KEYGATE_GRPC_PORT: "0", KEYGATE_HTTP_AUTHZ_PORT: "0", KEYGATE_ADMIN_PORT: "0", ...env },
    });
    running.push(kg);
    return kg
      .stdout()
      .split("\n")
      .filter((line) => line.startsWith("{"))
      .map((line) => String((JSON.parse(line) as { msg?: unknown }).msg));
  }

  it("without Redis: one warning that its caches and limits are its own", async () => {
    const messages = await start({});
    expect(messages.filter((msg) => msg === WARNING)).toHaveLength(1);
    expect(messages).toContain("keygate listening");
  });

  it("with Redis: no such warning", async () => {
    const messages = await start({ KEYGATE_REDIS_URL: redis?.url ?? "" });
    expect(messages.filter((msg) => msg === WARNING)).toEqual([]);
    expect(messages).toContain("keygate listening");
  });
});
