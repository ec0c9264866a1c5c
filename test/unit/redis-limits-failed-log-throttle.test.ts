import { Writable } from "node:stream";
import { expect, it } from "vitest";
import { MemoryMeter } from "../../src/limits/memory.js";
import { RedisMeter } from "../../src/limits/redis.js";
import { createLogger } from "../../src/server/logger.js";
import { chargeInput, stubMeterDeps } from "../harness/redis-charge.js";

// While Redis is down, every charge fails with the same error: under limits.onRedisError
// fail-closed the meter keeps asking Redis for every Check of every known key, cached ones
// included (and under fallback until the invalidation bus declares Redis lost). Its warn line
// "Redis limits failed" (with the error's stack) was written for each, so anyone holding a key
// could flood the log while cached keys' Checks waited behind its writes. It is written once a
// minute per kind of error, with the count since; keygate_backend_errors_total counts every one.

it("fail-closed: 200 Checks while Redis refuses every command write one 'Redis limits failed' line, not 200", async () => {
  const lines: string[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _encoding, callback) {
      lines.push(chunk.toString("utf8"));
      callback();
    },
  });
  const deps = stubMeterDeps();
  // ioredis without an offline queue, its connection gone: every command is refused at once.
  const down = (): Promise<never> => Promise.reject(new Error("Stream isn't writeable and enableOfflineQueue options is false"));
  const redis = { evalsha: down, eval: down } as unknown as ConstructorParameters<typeof RedisMeter>[0];
  const meter = new RedisMeter(redis, deps.store, deps.usage, new MemoryMeter(deps.store, deps.usage), "fail-closed", createLogger("info", sink));
  const outcomes = await Promise.all(Array.from({ length: 200 }, () => Promise.resolve(meter.charge(chargeInput("flood-owner"))).then(() => "charged", (error: unknown) => (error as Error).name)));
  expect(new Set(outcomes)).toEqual(new Set(["MeterUnavailableError"]));
  const warned = lines.map((line) => JSON.parse(line) as { msg: string }).filter((line) => line.msg.startsWith("Redis limits failed"));
  expect(warned.length).toBeLessThanOrEqual(1);
  await deps.usage.stop();
});
