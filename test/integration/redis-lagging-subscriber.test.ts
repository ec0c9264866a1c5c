import { mkdtempSync, rmSync } from "node:fs";
import { connect, createServer } from "node:net";
import type { Server, Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { TEST_POLICY, checkInit, checkOutcome, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { until } from "../harness/poll.js";
import { requireServer } from "../harness/ports.js";
import { redisAvailable, startRedis } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";

// Replica B's invalidation subscriber lags: what Redis sends it arrives late, by a lag that grows
// (a queue building on the path, as under congestion), while B's command connection is fast. The
// bus counted B connected as long as *some* heartbeat arrived every 2 s, whatever its age: a
// heartbeat carried no send time, so one published 6 s ago counted as fresh, and invalidations
// waiting behind the same lag left B allowing a key A revoked for the whole lag (5.9 s measured
// with a 6 s lag) with keygate_redis_connected 1. A heartbeat now carries its send time: B counts
// the bus lost once the newest one it heard is older than the silence limit, and from then on
// reads keys from the store, so a revoke reaches it with no invalidation at all.

const ready = requireServer("redis-server", redisAvailable(), "apt-get install redis-server") && (process.env["KEYGATE_TEST_REDIS_URL"] ?? "") === "";

/** Relays to Redis; answers on a connection that has sent SUBSCRIBE are delayed by lagMs(), in order. */
class SubscriberLagRelay {
  port = 0;
  lagMs: () => number = () => 0;
  readonly #sockets = new Set<Socket>();
  #server: Server | null = null;
  constructor(private readonly target: number) {}

  async listen(): Promise<void> {
    const server = createServer((client) => this.#relay(client));
    await new Promise<void>((done) => server.listen(0, "127.0.0.1", () => done()));
    const address = server.address();
    if (address === null || typeof address === "string") throw new Error("no address");
    this.port = address.port;
    this.#server = server;
  }

  async close(): Promise<void> {
    for (const socket of this.#sockets) socket.destroy();
    const server = this.#server;
    if (server !== null) await new Promise<void>((done) => server.close(() => done()));
  }

  #relay(client: Socket): void {
    const upstream = connect(this.target, "127.0.0.1");
    this.#sockets.add(client).add(upstream);
    let pubsub = false;
    let lastAt = 0;
    const end = (): void => {
      client.destroy();
      upstream.destroy();
    };
    client.on("close", end).on("error", end);
    upstream.on("close", end).on("error", end);
    client.on("data", (chunk: Buffer) => {
      if (chunk.toString("latin1").toLowerCase().includes("subscribe")) pubsub = true;
      upstream.write(chunk);
    });
    upstream.on("data", (chunk: Buffer) => {
      if (!pubsub) {
        client.write(chunk);
        return;
      }
      // In order: never before the chunk ahead of it.
      const at = Math.max(lastAt, Date.now() + this.lagMs());
      lastAt = at;
      setTimeout(() => {
        if (!client.destroyed) client.write(chunk);
      }, at - Date.now());
    });
  }
}

async function outcome(kg: TestKeygate, secret: string): Promise<{ status: number; code: string | null } | string> {
  try {
    return checkOutcome(await kg.check(checkInit({ "x-api-key": secret })));
  } catch (error) {
    return `grpc ${(error as { code?: number }).code}`;
  }
}

async function redisConnected(kg: TestKeygate): Promise<string> {
  const text = await (await fetch(`http://127.0.0.1:${kg.ports.admin}/metrics`)).text();
  return /^keygate_redis_connected (\S+)$/m.exec(text)?.[1] ?? "absent";
}

describe.runIf(ready)("revocation reaching a replica whose invalidation subscriber lags", () => {
  const stops: Array<() => Promise<unknown>> = [];
  let dir = "";
  afterAll(async () => {
    for (const stop of stops.reverse()) await stop().catch(() => undefined);
    if (dir !== "") rmSync(dir, { recursive: true, force: true });
  });

  it("B counts the lagging channel lost and refuses a key A revoked from the store", async () => {
    const redis: RedisServer | null = await startRedis();
    if (redis === null) throw new Error("redis-server is not on PATH");
    stops.push(() => redis.stop());
    const relay = new SubscriberLagRelay(redis.port);
    await relay.listen();
    stops.push(() => relay.close());
    dir = mkdtempSync(join(tmpdir(), "keygate-lag-"));
    const a = await startKeygate({ policy: TEST_POLICY, dataDir: dir, env: { KEYGATE_REDIS_URL: redis.url } });
    stops.push(() => a.stop());
    const b = await startKeygate({ policy: TEST_POLICY, dataDir: dir, env: { KEYGATE_REDIS_URL: `redis://127.0.0.1:${relay.port}` } });
    stops.push(() => b.stop());

    await a.admin.upsertAccount({ ownerId: "lag-owner", plan: "business" });
    const created = await a.admin.createKey({ ownerId: "lag-owner", name: "k" });
    const secret = created.secret;
    expect(await outcome(a, secret)).toEqual({ status: 200, code: null });
    expect(await outcome(b, secret)).toEqual({ status: 200, code: null });
    expect(await redisConnected(b)).toBe("1");

    // The lag grows by 0.8 s a second up to 6 s: heartbeats still arrive under a second apart,
    // each older than the one before.
    const t0 = Date.now();
    relay.lagMs = () => Math.min(6000, 0.8 * (Date.now() - t0));
    await until(async () => (await redisConnected(b)) === "0", 30_000, "B counting its lagging invalidation channel as lost", { intervalMs: 100 });

    // From here nothing on B's subscriber connection arrives at all: B can refuse the revoked key
    // only by reading it from the store, as a replica that counts Redis lost does.
    relay.lagMs = () => 100_000_000;
    expect(await outcome(b, secret)).toEqual({ status: 200, code: null });
    await a.admin.revokeKey({ id: created.key?.id ?? "", reason: "leaked" });
    expect(await outcome(a, secret)).toEqual({ status: 401, code: "KEY_REVOKED" });
    await until(
      async () => {
        const seen = await outcome(b, secret);
        return typeof seen !== "string" && seen.status === 401;
      },
      20_000,
      "B refusing the revoked key without its invalidation",
      { intervalMs: 100 },
    );
    expect(await outcome(b, secret)).toEqual({ status: 401, code: "KEY_REVOKED" });
    expect(await redisConnected(b)).toBe("0");
  }, 90_000);
});
