import { Writable } from "node:stream";
import { expect, it } from "vitest";
import { RedisInvalidationBus, connectRedis } from "../../src/cache/redis.js";
import { openSubscriber } from "../../src/cache/redis-client.js";
import { createLogger } from "../../src/server/logger.js";
import { until } from "../harness/poll.js";
import { redisCommand, suiteWithRedis } from "../harness/redis-server.js";
import { startTcpRelay } from "../harness/tcp-relay.js";
import type { Closers, RedisServer } from "../harness/redis-server.js";

// The warning that heartbeats stopped names Redis's refusal (READONLY, OOM) so an operator knows
// why. When a heartbeat had stalled first (a busy host, a slow network) the warning went out with
// no cause, and a refusal that came after it was never named: a master demoted under a plain URL
// then looked like a stall in the log.

const SUITE = "the heartbeat warning names a refusal that came after a stall";
await suiteWithRedis(SUITE, suites);

function suites(redisServer: RedisServer, closers: Closers): void {
  it("error: a stall, then READONLY: one warning without a cause, then one naming READONLY", async () => {
    const lines: Array<Record<string, unknown>> = [];
    const sink = new Writable({
      write(chunk: Buffer, _encoding, done) {
        for (const line of chunk.toString("utf8").split("\n").filter(Boolean)) lines.push(JSON.parse(line) as Record<string, unknown>);
        done();
      },
    });
    // The heartbeats go through a relay that can hold them, as a stalled connection does.
    const relay = await startTcpRelay(redisServer.port);
    closers.push(() => relay.close());
    const publisher = await connectRedis(`redis://127.0.0.1:${relay.port}`);
    closers.push(() => publisher.disconnect());
    const subscriber = await openSubscriber({ kind: "standalone", url: redisServer.url }, publisher);
    const bus = new RedisInvalidationBus(publisher, subscriber, { logger: createLogger("info", sink), channel: "hb-refusal", heartbeatIntervalMs: 50, silenceLimitMs: 400 });
    closers.push(() => bus.close());
    await bus.start();
    await until(() => bus.connected, 5_000, "the bus answering");

    relay.holdWhen = (chunk) => chunk.includes("kg:hb:");
    await until(() => !bus.connected, 5_000, "the bus silent from the stall");
    await redisCommand(redisServer.port, "REPLICAOF", "127.0.0.1", "1");
    closers.push(() => redisCommand(redisServer.port, "REPLICAOF", "NO", "ONE"));
    relay.holdWhen = null;
    relay.release();
    const warnings = (): Array<Record<string, unknown>> => lines.filter((line) => String(line["msg"]).startsWith("heartbeats stopped coming back"));
    await until(() => warnings().some((line) => String(line["heartbeatError"]).startsWith("READONLY")), 10_000, "a warning naming READONLY");
    expect(warnings().map((line) => (line["heartbeatError"] === undefined ? "no cause" : String(line["heartbeatError"]).split(" ")[0]))).toEqual(["no cause", "READONLY"]);
    expect(bus.connected).toBe(false);
  });
}
