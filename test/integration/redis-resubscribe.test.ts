import { randomUUID } from "node:crypto";
import { Redis } from "ioredis";
import { expect, it } from "vitest";
import type { Invalidation } from "../../src/cache/cache.js";
import { RedisInvalidationBus, connectRedis } from "../../src/cache/redis.js";
import { openSubscriber } from "../../src/cache/redis-client.js";
import { until } from "../harness/poll.js";
import { suiteWithRedis } from "../harness/redis-server.js";
import type { Closers, RedisServer } from "../harness/redis-server.js";
import { startTcpRelay } from "../harness/tcp-relay.js";

const SUITE = "invalidation subscriber across reconnects";
await suiteWithRedis(SUITE, suites);

function suites(redisServer: RedisServer, closers: Closers): void {
  it("a SUBSCRIBE lost in a second drop fails nowhere unhandled, and the bus subscribes again once Redis is back", async () => {
    const rejections: unknown[] = [];
    const onRejection = (reason: unknown): void => {
      rejections.push(reason);
    };
    process.on("unhandledRejection", onRejection);
    closers.push(() => {
      process.off("unhandledRejection", onRejection);
    });

    const relay = await startTcpRelay(redisServer.port);
    closers.push(() => relay.close());
    const publisher = await connectRedis(redisServer.url);
    closers.push(() => publisher.disconnect());
    const subscriber = await openSubscriber({ kind: "standalone", url: `redis://127.0.0.1:${relay.port}` }, publisher);
    closers.push(() => subscriber.disconnect());
    const reconnects: number[] = [];
    (subscriber as Redis).on("reconnecting", () => reconnects.push(reconnects.length));
    const channel = `resubscribe-${randomUUID().slice(0, 8)}`;
    const bus = new RedisInvalidationBus(publisher, subscriber, { channel });
    closers.push(() => bus.close());
    const heard: Invalidation[] = [];
    bus.subscribe((event) => heard.push(event));
    await bus.start();

    // Drop 1: the connection comes back, and the first SUBSCRIBE sent on it is lost with the
    // connection (drop 2), after which Redis refuses connections: the second failed attempt
    // flushes every command still queued with MaxRetriesPerRequestError.
    // The next connection to send a SUBSCRIBE is dropped with it unsent, and the relay refuses connections until listen().
    relay.dropWhen = (chunk) => chunk.toLowerCase().includes("subscribe");
    relay.dropAll();
    await until(() => reconnects.length >= 3, 20_000, "the subscriber's third reconnect attempt (the second since the lost SUBSCRIBE)", { intervalMs: 10 });
    // Rejections with no handler are reported once the turn that made them has run its microtasks.
    await new Promise((done) => setImmediate(done));
    await new Promise((done) => setImmediate(done));
    expect(rejections.map((r) => (r instanceof Error ? `${r.name}: ${r.message}` : String(r)))).toEqual([]);

    // Redis is reachable again: the bus subscribes on its own and hears invalidations.
    await relay.listen();
    await until(() => bus.connected, 20_000, "the bus connected again", { intervalMs: 10 });
    heard.length = 0;
    await bus.publish({ kind: "key", hash: "h-after" });
    await until(() => heard.some((e) => e.kind === "key" && e.hash === "h-after"), 10_000, "the invalidation published after the reconnect, heard", { intervalMs: 10 });
    expect(rejections).toEqual([]);
  });
}
