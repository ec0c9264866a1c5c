import { Writable } from "node:stream";
import { randomUUID } from "node:crypto";
import { Redis } from "ioredis";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { z } from "zod";
import type { Invalidation } from "../../src/cache/cache.js";
import { MALFORMED_LOG_INTERVAL_MS, RedisInvalidationBus, redisOptions } from "../../src/cache/redis.js";
import { createLogger } from "../../src/server/logger.js";
import { until } from "../harness/poll.js";
import { requireServer } from "../harness/ports.js";
import { redisAvailable, startRedis } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";

// Foreign data on the invalidation channel: anything that can PUBLISH on it (a tool sharing the
// Redis, another service that picked the same channel name) sends what keygate cannot read. Each
// such message is ignored, and the warn line saying so is written once a minute with how many
// more came since, as the L2 failure lines are: one line a message would let it flood every
// replica's log at the rate it publishes.

const ready = requireServer("redis-server", redisAvailable(), "apt-get install redis-server");
const POLL = { intervalMs: 10 } as const;
const MALFORMED = 500;
const LINE = "ignored a malformed invalidation message";
const logLine = z.object({ level: z.number(), msg: z.string(), since: z.number().optional() });

describe.runIf(ready)("malformed invalidation messages and the log", { timeout: 60_000 }, () => {
  let server: RedisServer | null = null;
  const connections: Redis[] = [];

  async function open(): Promise<Redis> {
    if (server === null) throw new Error("no redis");
    const redis = new Redis(server.url, redisOptions({ lazyConnect: false, retryStrategy: () => 100 }));
    redis.on("error", () => undefined);
    connections.push(redis);
    await until(() => redis.status === "ready", 5000, "connection ready", POLL);
    return redis;
  }

  beforeAll(async () => {
    server = await startRedis();
  });
  afterAll(async () => {
    for (const connection of connections) connection.disconnect();
    await server?.stop();
  });

  it(`${MALFORMED} malformed messages write one warn line, then one a minute later counting the rest; each is ignored`, async () => {
    const [publisher, subscriber] = await Promise.all([open(), open()]);
    const lines: string[] = [];
    const sink = new Writable({
      write(chunk: Buffer, _encoding, callback) {
        lines.push(chunk.toString("utf8"));
        callback();
      },
    });
    let clockMs = 0;
    const channel = `flood-${randomUUID().slice(0, 8)}:inv`;
    const bus = new RedisInvalidationBus(publisher, subscriber, { channel, logger: createLogger("debug", sink), logClockMs: () => clockMs });
    const seen: Invalidation[] = [];
    bus.subscribe((event) => seen.push(event));
    await bus.start();
    const malformed = (): Array<z.infer<typeof logLine>> => lines.map((line) => logLine.parse(JSON.parse(line))).filter((line) => line.msg === LINE);
    try {
      for (let i = 0; i < MALFORMED; i++) await publisher.publish(channel, `garbage ${i}`);
      // Messages on one channel arrive in order: the valid one comes after every malformed one.
      await bus.publish({ kind: "key", hash: "valid" });
      await until(() => seen.length > 0, 5000, "the valid event", POLL);
      expect(malformed().map(({ level, since }) => ({ level, since }))).toEqual([{ level: 40, since: 0 }]);

      // A minute on, the next one is logged with the count of those held back.
      clockMs += MALFORMED_LOG_INTERVAL_MS;
      await publisher.publish(channel, "{}");
      await bus.publish({ kind: "owner", ownerId: "after" });
      await until(() => seen.length > 1, 5000, "the second valid event", POLL);
      expect(malformed().map(({ since }) => since)).toEqual([0, MALFORMED - 1]);
      // Ignored: no event at all, not even an `all`, came of them.
      expect(seen).toEqual([
        { kind: "key", hash: "valid" },
        { kind: "owner", ownerId: "after" },
      ]);
    } finally {
      await bus.close();
    }
  });
});
