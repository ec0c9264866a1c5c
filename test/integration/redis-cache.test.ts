import { randomUUID } from "node:crypto";
import { Socket } from "node:net";
import { Writable } from "node:stream";
import { Redis } from "ioredis";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { z } from "zod";
import type { Invalidation } from "../../src/cache/cache.js";
import { SnapshotLookup } from "../../src/cache/lookup.js";
import { MemoryCache } from "../../src/cache/memory.js";
import { RedisInvalidationBus, RedisSharedCache, SNAPSHOT_FORMAT, connectRedis, redisOptions } from "../../src/cache/redis.js";
import { createLogger } from "../../src/server/logger.js";
import type { KeySnapshot, SnapshotStore } from "../../src/store/store.js";
import { until } from "../harness/poll.js";
import { startRedis } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";
import { newKeyRecord } from "../../src/store/store.js";
import { suiteWithServer } from "../harness/ports.js";

/** Polls every 10 ms: fine enough for the elapsed times reported, light on the shared Redis. */
const POLL = { intervalMs: 10 } as const;

const SUITE = "Redis L2 cache and invalidation bus";
// Keys and channels of this run, so reruns against a shared KEYGATE_TEST_REDIS_URL do not collide.
const ns = `run-${randomUUID().slice(0, 8)}:`;
const server = await startRedis();

suiteWithServer(SUITE, server, "redis-server is not on PATH (apt-get install redis-server, or set KEYGATE_TEST_REDIS_URL)", redisSuites);

function snapshot(ownerId: string, id: string): KeySnapshot {
  return {
    key: newKeyRecord({
      id,
      hash: `h-${id}`,
      ownerId,
      name: `key ${id}`,
      mode: "live",
      start: "kg_live_abcd",
      last4: "wxyz",
      scopes: ["decks", "tutor"],
      metadata: { team: "core" },
      createdAtMs: 1_700_000_000_000,
      expiresAtMs: 1_800_000_000_000,
      rateLimit: { limit: 10, windowSeconds: 60 },
    }),
    account: { ownerId, plan: "pro", subscriptionStatus: "active", role: "standard", createdAtMs: 1, updatedAtMs: 2 },
  };
}

const monitorEvent = z.tuple([z.string(), z.array(z.string()), z.string()]).rest(z.unknown());
const numsubReply = z.tuple([z.string(), z.number()]);
const logLine = z.object({ level: z.number(), msg: z.string() });

/** The lookup's part of the store: snapshots from a map, reads counted. */
class CountingKeyStore implements SnapshotStore {
  readonly snapshots = new Map<string, KeySnapshot>();
  findCalls = 0;

  async findSnapshotByHash(hash: string): Promise<KeySnapshot | null> {
    this.findCalls += 1;
    return this.snapshots.get(hash) ?? null;
  }
}

function redisSuites(redisServer: RedisServer): void {
  describe(SUITE, () => {
    const connections: Redis[] = [];
    const buses: RedisInvalidationBus[] = [];
    // Outage tests stop and start their own redis-server; KEYGATE_TEST_REDIS_URL gives them none.
    const external = process.env["KEYGATE_TEST_REDIS_URL"] !== undefined && process.env["KEYGATE_TEST_REDIS_URL"] !== "";
    let admin: Redis;

    /** A connection with the production options, but quick to reconnect. */
    async function open(): Promise<Redis> {
      const redis = new Redis(redisServer.url, redisOptions({ lazyConnect: false, maxRetriesPerRequest: 1, retryStrategy: () => 100 }));
      connections.push(redis);
      // Refused reconnects during the restart test are expected; without a listener ioredis prints them.
      redis.on("error", () => {});
      await until(() => redis.status === "ready", 5000, "connection ready", POLL);
      return redis;
    }

    function bus(publisher: Redis, subscriber: Redis, channel: string, logLines?: string[]): RedisInvalidationBus {
      const sink = new Writable({
        write(chunk: Buffer, _encoding, callback) {
          logLines?.push(chunk.toString("utf8"));
          callback();
        },
      });
      const created = new RedisInvalidationBus(publisher, subscriber, { channel, logger: createLogger("debug", sink) });
      buses.push(created);
      return created;
    }

    async function subscriberCount(channel: string): Promise<number> {
      return numsubReply.parse(await admin.pubsub("NUMSUB", channel))[1];
    }

    beforeAll(async () => {
      admin = await open();
    });

    afterAll(async () => {
      await Promise.allSettled(buses.map((b) => b.close()));
      await Promise.allSettled(connections.map((c) => c.quit()));
      for (const connection of connections) connection.disconnect();
      await redisServer.stop();
    });

    describe("happy", () => {
      it("builds the hot-path options: no auto-pipelining, no offline queue, a command timeout, bounded retries", () => {
        for (const options of [redisOptions(), redisOptions({ lazyConnect: false })]) {
          // ioredis's auto-pipelining kept every Check's objects past young-generation GCs (docs/performance-log.md).
          expect(options.enableAutoPipelining).toBe(false);
          expect(options.enableOfflineQueue).toBe(false);
          // ioredis waits forever without a commandTimeout, and retries without end when maxRetriesPerRequest is null.
          expect(options.commandTimeout).toBeGreaterThan(0);
          expect(options.commandTimeout).toBeLessThanOrEqual(2000);
          expect(options.maxRetriesPerRequest).toBeGreaterThanOrEqual(0);
          expect(options.maxRetriesPerRequest).toBeLessThanOrEqual(3);
        }
      });

      it("round-trips a snapshot exactly, with TTLs and the owner index", async () => {
        const redis = await open();
        const cache = new RedisSharedCache(redis, { ttlSeconds: 30, negativeTtlSeconds: 5, keyPrefix: `${ns}t1:` });
        const snap = snapshot("o1", "k1");
        await cache.set("h1", snap);

        expect(await cache.get("h1")).toStrictEqual(snap);
        const ttl = await admin.ttl(`${ns}t1:snap:h1`);
        expect(ttl).toBeGreaterThan(0);
        expect(ttl).toBeLessThanOrEqual(30);
        expect(await admin.smembers(`${ns}t1:owner:o1`)).toEqual(["h1"]);
        const ownerTtl = await admin.ttl(`${ns}t1:owner:o1`);
        expect(ownerTtl).toBeGreaterThan(0);
        expect(ownerTtl).toBeLessThanOrEqual(30);
      });

      it("sends an L2 fill in one socket write with the command a Check sends after it in the same turn (its charge)", async () => {
        const redis = await open();
        const cache = new RedisSharedCache(redis, { ttlSeconds: 30, negativeTtlSeconds: 5, keyPrefix: `${ns}t-turn:` });
        // The first fill on a server loads the script (EVALSHA, NOSCRIPT, EVAL): not the case counted.
        await cache.set("h0", snapshot("o-turn", "k0"));
        const socket = redis.stream;
        if (!(socket instanceof Socket)) throw new Error("a standalone connection has a socket");
        let writes = 0;
        // Count the writes the socket hands to the OS: one per write, one per batch of corked writes.
        const { _write: write, _writev: writev } = socket;
        socket._write = function (this: Socket, ...args: Parameters<Socket["_write"]>) {
          writes += 1;
          write.apply(this, args);
        };
        socket._writev = function (this: Socket, ...args: Parameters<NonNullable<Socket["_writev"]>>) {
          writes += 1;
          writev?.apply(this, args);
        };
        try {
          const filled = cache.set("h1", snapshot("o-turn", "k1"));
          const pinged = redis.ping();
          expect(await Promise.all([filled, pinged])).toEqual([true, "PONG"]);
          expect(writes).toBe(1);
        } finally {
          delete (socket as Partial<Socket>)._write;
          delete (socket as Partial<Socket>)._writev;
        }
        expect((await cache.get("h1"))?.key.id).toBe("k1");
        expect(socket.writableCorked).toBe(0);
      });

      it("returns null for a cached miss and undefined for nothing cached", async () => {
        const redis = await open();
        const cache = new RedisSharedCache(redis, { ttlSeconds: 30, negativeTtlSeconds: 5, keyPrefix: `${ns}t2:` });
        await cache.setMissing("gone");

        expect(await cache.get("gone")).toBeNull();
        const ttl = await admin.ttl(`${ns}t2:miss:gone`);
        expect(ttl).toBeGreaterThan(0);
        expect(ttl).toBeLessThanOrEqual(5);
        expect(await cache.get("never-seen")).toBeUndefined();

        await cache.set("gone", snapshot("o2", "back"));
        expect(await admin.exists(`${ns}t2:miss:gone`)).toBe(0);
        expect((await cache.get("gone"))?.key.id).toBe("back");
      });

      it("uses the default prefix kg:", async () => {
        const redis = await open();
        const cache = new RedisSharedCache(redis, { ttlSeconds: 30, negativeTtlSeconds: 5 });
        await cache.set(`${ns}dflt`, snapshot(`${ns}o-default`, "d1"));
        await cache.setMissing(`${ns}dflt-miss`);
        expect(await admin.exists(`kg:snap:${ns}dflt`, `kg:miss:${ns}dflt-miss`, `kg:owner:${ns}o-default`)).toBe(3);
      });

      it("reads with exactly one command: one EVALSHA of the read script over the snapshot, miss, generation and floor keys", async () => {
        const redis = await open();
        const cache = new RedisSharedCache(redis, { ttlSeconds: 30, negativeTtlSeconds: 5, keyPrefix: `${ns}t3:` });
        await cache.set("h1", snapshot("o3", "k3"));
        // The first call on a server loads the script (EVALSHA, NOSCRIPT, EVAL); later ones send only EVALSHA.
        await cache.get("h1");
        const address = /addr=(\S+)/.exec(await redis.client("INFO"))?.[1];
        expect(address).toMatch(/^127\.0\.0\.1:\d+$/);

        const monitor = await redis.monitor();
        connections.push(monitor);
        const commands: string[][] = [];
        monitor.on("monitor", (...args: unknown[]) => {
          const [, command, source] = monitorEvent.parse(args);
          if (source === address) commands.push(command.map((part, i) => (i === 0 ? part.toLowerCase() : part)));
        });
        // MONITOR is asynchronous: markers from the same connection bracket what get() sent.
        await redis.echo("count-start");
        await until(() => commands.some((c) => c[0] === "echo" && c[1] === "count-start"), 2000, "start marker seen", POLL);
        await cache.get("h1");
        await redis.echo("count-end");
        await until(() => commands.some((c) => c[0] === "echo" && c[1] === "count-end"), 2000, "end marker seen", POLL);

        const start = commands.findIndex((c) => c[1] === "count-start");
        const end = commands.findIndex((c) => c[1] === "count-end");
        const sent = commands.slice(start + 1, end);
        expect(sent.map((c) => [c[0], ...c.slice(2)])).toEqual([["evalsha", "4", `${ns}t3:snap:h1`, `${ns}t3:miss:h1`, `${ns}t3:l2:gen`, `${ns}t3:l2:floor`]]);
        monitor.disconnect();
      });

      it("invalidates one key: its snapshot and its miss marker", async () => {
        const redis = await open();
        const cache = new RedisSharedCache(redis, { ttlSeconds: 30, negativeTtlSeconds: 5, keyPrefix: `${ns}t4:` });
        await cache.set("a1", snapshot("alice", "a1"));
        await cache.setMissing("a1");
        await cache.set("a2", snapshot("alice", "a2"));
        expect(await admin.exists(`${ns}t4:snap:a1`, `${ns}t4:miss:a1`)).toBe(2);

        await cache.invalidate({ kind: "key", hash: "a1" });
        expect(await admin.exists(`${ns}t4:snap:a1`, `${ns}t4:miss:a1`)).toBe(0);
        expect(await cache.get("a1")).toBeUndefined();
        expect(await cache.get("a2")).toStrictEqual(snapshot("alice", "a2"));
      });

      it("invalidates every snapshot of one owner and none of another's", async () => {
        const redis = await open();
        const cache = new RedisSharedCache(redis, { ttlSeconds: 30, negativeTtlSeconds: 5, keyPrefix: `${ns}t5:` });
        for (const id of ["a1", "a2", "a3"]) await cache.set(id, snapshot("alice", id));
        await cache.set("b1", snapshot("bob", "b1"));

        await cache.invalidate({ kind: "owner", ownerId: "alice" });
        expect(await admin.exists(`${ns}t5:snap:a1`, `${ns}t5:snap:a2`, `${ns}t5:snap:a3`, `${ns}t5:owner:alice`)).toBe(0);
        expect(await cache.get("b1")).toStrictEqual(snapshot("bob", "b1"));
        expect(await admin.smembers(`${ns}t5:owner:bob`)).toEqual(["b1"]);
      });

      it("leaves Redis untouched on an `all` invalidation, which is for L1 only", async () => {
        const redis = await open();
        const cache = new RedisSharedCache(redis, { ttlSeconds: 30, negativeTtlSeconds: 5, keyPrefix: `${ns}t6:` });
        await cache.set("x", snapshot("o6", "x"));
        await cache.setMissing("y");
        await cache.invalidate({ kind: "all" });
        expect(await admin.exists(`${ns}t6:snap:x`, `${ns}t6:miss:y`, `${ns}t6:owner:o6`)).toBe(3);
      });

      it("delivers a publish to the handlers of both replicas within 1 s", async () => {
        const [pubA, subA, pubB, subB] = await Promise.all([open(), open(), open(), open()]);
        const busA = bus(pubA, subA, `${ns}t7:inv`);
        const busB = bus(pubB, subB, `${ns}t7:inv`);
        const seenA: Invalidation[] = [];
        const seenB: Invalidation[] = [];
        busA.subscribe((event) => seenA.push(event));
        busB.subscribe((event) => seenB.push(event));
        await busA.start();
        await busB.start();
        expect(busA.connected).toBe(true);
        expect(await subscriberCount(`${ns}t7:inv`)).toBe(2);

        await busA.publish({ kind: "key", hash: "zz" });
        await until(() => seenA.length === 1 && seenB.length === 1, 1000, "both replicas saw the event", POLL);
        await busB.publish({ kind: "owner", ownerId: "o7" });
        await until(() => seenA.length === 2 && seenB.length === 2, 1000, "both replicas saw the second event", POLL);

        const expected: Invalidation[] = [
          { kind: "key", hash: "zz" },
          { kind: "owner", ownerId: "o7" },
        ];
        expect(seenA).toEqual(expected);
        expect(seenB).toEqual(expected);
      });

      it("close() unsubscribes and drops handlers but leaves the connections to their owner", async () => {
        const [pubA, subA, pubB, subB] = await Promise.all([open(), open(), open(), open()]);
        const busA = bus(pubA, subA, `${ns}t8:inv`);
        const busB = bus(pubB, subB, `${ns}t8:inv`);
        const seenA: Invalidation[] = [];
        const seenB: Invalidation[] = [];
        busA.subscribe((event) => seenA.push(event));
        busB.subscribe((event) => seenB.push(event));
        await busA.start();
        await busB.start();

        await busB.close();
        expect(busB.connected).toBe(false);
        expect(await subscriberCount(`${ns}t8:inv`)).toBe(1);
        expect([pubB.status, subB.status]).toEqual(["ready", "ready"]);
        await busA.publish({ kind: "key", hash: "after-close" });
        await until(() => seenA.length === 1, 1000, "the open bus saw the event", POLL);
        expect(seenB).toEqual([]);
      });

      it("serves a replica's load from Redis, and drops its L1 entry when another replica invalidates", async () => {
        const [mainA, subA, mainB, subB] = await Promise.all([open(), open(), open(), open()]);
        const store = new CountingKeyStore();
        const snap = snapshot("o9", "k9");
        store.snapshots.set("h9", snap);
        const cacheOptions = { maxEntries: 100, ttlSeconds: 60, negativeMaxEntries: 100, negativeTtlSeconds: 60 };
        const sharedOptions = { ttlSeconds: 30, negativeTtlSeconds: 5, keyPrefix: `${ns}t9:` };
        const busA = bus(mainA, subA, `${ns}t9:inv`);
        const busB = bus(mainB, subB, `${ns}t9:inv`);
        await busA.start();
        await busB.start();
        const replicaA = new SnapshotLookup({ local: new MemoryCache(cacheOptions), shared: new RedisSharedCache(mainA, sharedOptions), store, bus: busA });
        const replicaB = new SnapshotLookup({ local: new MemoryCache(cacheOptions), shared: new RedisSharedCache(mainB, sharedOptions), store, bus: busB });

        // What L1 keeps of it, and what later Checks on replica A read.
        expect(await replicaA.load("h9")).toStrictEqual(new MemoryCache(cacheOptions).set("h9", snap));
        expect(store.findCalls).toBe(1);
        // Replica A fills L2 off the answer's path; wait for it rather than race it.
        await until(async () => (await admin.exists(`${ns}t9:snap:h9`)) === 1, 1000, "L2 filled by replica A", POLL);
        expect(replicaB.peek("h9")).toBeUndefined();
        expect(await replicaB.load("h9")).toStrictEqual(new MemoryCache(cacheOptions).set("h9", snap));
        expect(store.findCalls).toBe(1);
        // L1 keeps what a Check reads of it (test/unit/cached-key-memory.test.ts holds the fields).
        expect(replicaB.peek("h9")).toMatchObject({ key: { id: snap.key.id, ownerId: snap.key.ownerId, scopes: snap.key.scopes }, account: { plan: snap.account.plan } });

        expect(await replicaA.load("unknown")).toBeNull();
        expect(store.findCalls).toBe(2);
        await until(async () => (await admin.exists(`${ns}t9:miss:unknown`)) === 1, 1000, "L2 miss marker filled by replica A", POLL);
        expect(await replicaB.load("unknown")).toBeNull();
        expect(store.findCalls).toBe(2);

        await replicaA.invalidate({ kind: "key", hash: "h9" });
        expect(replicaA.peek("h9")).toBeUndefined();
        expect(await admin.exists(`${ns}t9:snap:h9`)).toBe(0);
        const elapsedMs = await until(() => replicaB.peek("h9") === undefined, 1000, "replica B dropped its L1 entry", POLL);
        expect(elapsedMs).toBeLessThanOrEqual(1000);
        expect(await replicaB.load("h9")).toStrictEqual(new MemoryCache(cacheOptions).set("h9", snap));
        expect(store.findCalls).toBe(3);
      });
    });

    describe("error", () => {
      it("treats a corrupt snapshot as not cached and deletes it", async () => {
        const redis = await open();
        const cache = new RedisSharedCache(redis, { ttlSeconds: 30, negativeTtlSeconds: 5, keyPrefix: `${ns}t10:` });
        await admin.set(`${ns}t10:snap:bad-json`, "{not json");
        const wrongShape = snapshot("o10", "k10");
        await admin.set(`${ns}t10:snap:bad-shape`, JSON.stringify({ ...wrongShape, account: { ...wrongShape.account, role: "root" } }));

        expect(await cache.get("bad-json")).toBeUndefined();
        expect(await cache.get("bad-shape")).toBeUndefined();
        expect(await admin.exists(`${ns}t10:snap:bad-json`, `${ns}t10:snap:bad-shape`)).toBe(0);
      });

      it("propagates Redis errors to the caller", async () => {
        const redis = await open();
        const cache = new RedisSharedCache(redis, { ttlSeconds: 30, negativeTtlSeconds: 5, keyPrefix: `${ns}t11:` });
        // The owner index is a string here, so SADD fails inside the transaction.
        await admin.set(`${ns}t11:owner:o11`, "not a set");
        await expect(cache.set("h", snapshot("o11", "k11"))).rejects.toThrow(/WRONGTYPE/);

        const closed = await open();
        closed.disconnect();
        const offline = new RedisSharedCache(closed, { ttlSeconds: 30, negativeTtlSeconds: 5, keyPrefix: `${ns}t11:` });
        await expect(offline.get("h")).rejects.toThrow();
      });

      it.skipIf(external)("rejects a get at once while redis-server is down, instead of queueing it", async () => {
        // A server of its own: stopping the shared one would break the tests around this one.
        const downServer = await startRedis();
        if (downServer === null) throw new Error("redis-server is not on PATH");
        try {
          const redis = await connectRedis(downServer.url);
          connections.push(redis);
          redis.on("error", () => {});
          const cache = new RedisSharedCache(redis, { ttlSeconds: 30, negativeTtlSeconds: 5, keyPrefix: `${ns}t14:` });
          expect(await cache.get("h14")).toBeUndefined();

          await downServer.stop();
          await until(() => redis.status !== "ready", 2000, "the client saw the server go", POLL);
          let timer: NodeJS.Timeout | undefined;
          const stillPending = new Promise<"still pending">((resolve) => {
            timer = setTimeout(() => resolve("still pending"), 2000);
          });
          const outcome = await Promise.race([
            cache.get("h14").then(
              () => "resolved",
              (error: unknown) => error,
            ),
            stillPending,
          ]);
          clearTimeout(timer);
          expect(outcome).toBeInstanceOf(Error);
          // ioredis's own wording for a command refused because the offline queue is off.
          expect(outcome).toMatchObject({ message: "Stream isn't writeable and enableOfflineQueue options is false" });
          redis.disconnect();
        } finally {
          await downServer.stop();
        }
      });

      it.skipIf(external)("a subscriber on a server the publishes do not reach, one that still answers PING, counts as disconnected: every L1 cleared", async () => {
        // As after a Sentinel failover that left the subscriber on the old master: the publisher
        // writes to one server, the subscriber listens on another.
        const elsewhere = await startRedis();
        if (elsewhere === null) throw new Error("redis-server is not on PATH");
        try {
          const publisher = await open();
          const subscriber = new Redis(elsewhere.url, redisOptions({ lazyConnect: false, maxRetriesPerRequest: 1, retryStrategy: () => 100 }));
          connections.push(subscriber);
          subscriber.on("error", () => {});
          await until(() => subscriber.status === "ready", 5000, "subscriber ready", POLL);
          const split = new RedisInvalidationBus(publisher, subscriber, { channel: `${ns}t20:inv`, heartbeatIntervalMs: 100, silenceLimitMs: 600 });
          buses.push(split);
          const seen: Invalidation[] = [];
          split.subscribe((event) => seen.push(event));
          await split.start();
          await until(() => !split.connected, 5000, "the bus counted itself disconnected", POLL);
          expect(seen).toEqual([{ kind: "all" }]);
        } finally {
          await elsewhere.stop();
        }
      });

      it("ignores and logs malformed messages, and one failing handler does not stop the others", async () => {
        const [pubA, subA, pubB, subB] = await Promise.all([open(), open(), open(), open()]);
        const logLines: string[] = [];
        const busA = bus(pubA, subA, `${ns}t12:inv`);
        const busB = bus(pubB, subB, `${ns}t12:inv`, logLines);
        const seenB: Invalidation[] = [];
        busB.subscribe(() => {
          throw new Error("handler bug");
        });
        busB.subscribe((event) => seenB.push(event));
        await busA.start();
        await busB.start();

        for (const raw of ["not json", '{"kind":"key"}', '{"kind":"nope","hash":"x"}', "[]"]) await pubA.publish(`${ns}t12:inv`, raw);
        // Messages on one channel arrive in order, so the valid one comes after all the bad ones.
        await busA.publish({ kind: "key", hash: "valid" });
        await until(() => seenB.length === 1, 1000, "the valid event arrived", POLL);

        expect(seenB).toEqual([{ kind: "key", hash: "valid" }]);
        const messages = logLines.map((line) => logLine.parse(JSON.parse(line)).msg);
        // One line for the four: the line is throttled (test/integration/redis-invalidation-malformed-flood.test.ts).
        expect(messages.filter((m) => m === "ignored a malformed invalidation message")).toHaveLength(1);
        expect(messages.filter((m) => m === "invalidation handler failed")).toHaveLength(1);
      });
    });

    describe("reconnect", () => {
      if (external) console.warn(`\n!!! SKIPPING the Redis restart test: it needs the harness's own redis-server, not KEYGATE_TEST_REDIS_URL\n`);

      it.skipIf(external)("clears L1 everywhere after the subscriber reconnects, and publishes again", async () => {
        const [pubA, subA, pubB, subB] = await Promise.all([open(), open(), open(), open()]);
        const busA = bus(pubA, subA, `${ns}t13:inv`);
        const busB = bus(pubB, subB, `${ns}t13:inv`);
        const seenB: Array<{ event: Invalidation; connected: boolean }> = [];
        const seenA: Invalidation[] = [];
        busA.subscribe((event) => seenA.push(event));
        busB.subscribe((event) => seenB.push({ event, connected: busB.connected }));
        await busA.start();
        await busB.start();

        await redisServer.restart();
        await until(() => busB.connected && seenB.length === 2, 10_000, "bus B resubscribed", POLL);
        // One `all` when the subscription dropped, one once it was confirmed again.
        expect(seenB).toEqual([
          { event: { kind: "all" }, connected: false },
          { event: { kind: "all" }, connected: true },
        ]);
        await until(() => busA.connected && pubA.status === "ready" && admin.status === "ready", 10_000, "replica A reconnected", POLL);
        expect(await subscriberCount(`${ns}t13:inv`)).toBe(2);

        await busA.publish({ kind: "key", hash: "after-restart" });
        await until(() => seenB.length === 3 && seenA.length === 3, 1000, "the event after the restart arrived", POLL);
        expect(seenB[2]).toEqual({ event: { kind: "key", hash: "after-restart" }, connected: true });
        expect(seenA).toEqual([{ kind: "all" }, { kind: "all" }, { kind: "key", hash: "after-restart" }]);
      });
    });

    // Replicas of two keygate versions share Redis during a rolling upgrade: each reads what the
    // other wrote, or leaves it be, and never fails because of it.
    describe("snapshot formats", () => {
      /** The stored entry is "<generation>|<json>": its JSON, and a way to replace it. */
      async function entry(key: string): Promise<{ generation: string; json: Record<string, unknown> }> {
        const raw = await admin.get(key);
        if (raw === null) throw new Error(`no entry at ${key}`);
        const bar = raw.indexOf("|");
        return { generation: raw.slice(0, bar), json: JSON.parse(raw.slice(bar + 1)) as Record<string, unknown> };
      }

      it(`writes format ${SNAPSHOT_FORMAT} in a "v" field`, async () => {
        const cache = new RedisSharedCache(await open(), { ttlSeconds: 30, negativeTtlSeconds: 5, keyPrefix: `${ns}f1:` });
        await cache.set("h", snapshot("o", "k"));
        expect((await entry(`${ns}f1:snap:h`)).json).toStrictEqual({ v: SNAPSHOT_FORMAT, ...snapshot("o", "k") });
      });

      it("reads an entry of an older format (the previous release wrote none) as not cached: it says nothing of whether the key is disabled", async () => {
        const redis = await open();
        const cache = new RedisSharedCache(redis, { ttlSeconds: 30, negativeTtlSeconds: 5, keyPrefix: `${ns}f2:` });
        const current = snapshot("o", "k");
        await cache.set("h", current);
        const { generation } = await entry(`${ns}f2:snap:h`);
        const { disabledAtMs: _unknownThen, ...olderKey } = current.key;
        // Exactly what 1dffb08's RedisSharedCache.set stored: the snapshot's JSON, nothing else.
        for (const older of [JSON.stringify({ ...current, key: olderKey }), JSON.stringify({ v: 1, ...current, key: olderKey })]) {
          await admin.set(`${ns}f2:snap:h`, `${generation}|${older}`, "KEEPTTL");
          expect(await cache.get("h")).toBeUndefined();
        }
        // The store answers, and this replica's fill replaces the older entry.
        const store = new CountingKeyStore();
        store.snapshots.set("h", { ...current, key: { ...current.key, disabledAtMs: 7 } });
        const [pub, sub] = await Promise.all([open(), open()]);
        const replicaBus = bus(pub, sub, `${ns}f2:inv`);
        await replicaBus.start();
        const lookup = new SnapshotLookup({ local: new MemoryCache({ maxEntries: 10, ttlSeconds: 60, negativeMaxEntries: 10, negativeTtlSeconds: 5 }), shared: cache, bus: replicaBus, store });
        expect((await lookup.load("h"))?.key.disabledAtMs).toBe(7);
        expect(store.findCalls).toBe(1);
        await until(async () => (await entry(`${ns}f2:snap:h`)).json["v"] === SNAPSHOT_FORMAT, 2000, "the fill in the current format", POLL);
        expect((await entry(`${ns}f2:snap:h`)).json).toStrictEqual({ v: SNAPSHOT_FORMAT, ...current, key: { ...current.key, disabledAtMs: 7 } });
      });

      it("reads a newer keygate's entry as not cached, leaves it for that keygate, and answers from the store", async () => {
        const redis = await open();
        const cache = new RedisSharedCache(redis, { ttlSeconds: 30, negativeTtlSeconds: 5, keyPrefix: `${ns}f3:` });
        await cache.set("h", snapshot("o", "k"));
        const { generation } = await entry(`${ns}f3:snap:h`);
        const newer = `${generation}|${JSON.stringify({ v: SNAPSHOT_FORMAT + 1, ...snapshot("o", "k"), key: { ...snapshot("o", "k").key, disabledAtMs: 5, scopes: "now an object" } })}`;
        await admin.set(`${ns}f3:snap:h`, newer, "KEEPTTL");
        expect(await cache.get("h")).toBeUndefined();
        expect(await admin.get(`${ns}f3:snap:h`)).toBe(newer);

        const store = new CountingKeyStore();
        store.snapshots.set("h", snapshot("o", "from-store"));
        const [pub, sub] = await Promise.all([open(), open()]);
        const replicaBus = bus(pub, sub, `${ns}f3:inv`);
        await replicaBus.start();
        const lookup = new SnapshotLookup({ local: new MemoryCache({ maxEntries: 10, ttlSeconds: 60, negativeMaxEntries: 10, negativeTtlSeconds: 5 }), shared: cache, bus: replicaBus, store });
        expect((await lookup.load("h"))?.key.id).toBe("from-store");
        expect(store.findCalls).toBe(1);
      });

      it("drops an entry it cannot read (not JSON, a wrong shape, a bad format number) and reads the store", async () => {
        const cache = new RedisSharedCache(await open(), { ttlSeconds: 30, negativeTtlSeconds: 5, keyPrefix: `${ns}f4:` });
        const bad = ["{not json", JSON.stringify({ v: SNAPSHOT_FORMAT, key: {} }), JSON.stringify({ v: "1", ...snapshot("o", "k") }), JSON.stringify({ v: 0, ...snapshot("o", "k") }), "null"];
        for (const [i, json] of bad.entries()) {
          await cache.set(`h${i}`, snapshot("o", `k${i}`));
          const { generation } = await entry(`${ns}f4:snap:h${i}`);
          await admin.set(`${ns}f4:snap:h${i}`, `${generation}|${json}`, "KEEPTTL");
          expect(await cache.get(`h${i}`)).toBeUndefined();
          expect(await admin.exists(`${ns}f4:snap:h${i}`)).toBe(0);
        }
      });
    });
  });
}
