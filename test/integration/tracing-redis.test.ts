import { randomBytes } from "node:crypto";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { checkInit, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { startOtlpCollector } from "../harness/otlp-collector.js";
import type { OtlpCollector, ReceivedSpan } from "../harness/otlp-collector.js";
import { startRedis } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";
import { suiteWithServer } from "../harness/ports.js";

const SUITE = "tracing with Redis";
const server = await startRedis();

suiteWithServer(SUITE, server, "redis-server is not on PATH (apt-get install redis-server, or set KEYGATE_TEST_REDIS_URL)", redisTracing);

function redisTracing(redis: RedisServer): void {
  describe(`${SUITE} happy`, () => {
    let collector: OtlpCollector;
    let kg: TestKeygate;
    beforeAll(async () => {
      collector = await startOtlpCollector();
      kg = await startKeygate({ env: { KEYGATE_REDIS_URL: redis.url, OTEL_EXPORTER_OTLP_ENDPOINT: collector.endpoint, OTEL_BSP_SCHEDULE_DELAY: "50" } });
    }, 60_000);
    afterAll(async () => {
      await kg.stop();
      await collector.close();
      await redis.stop();
    });

    it("the L2 read, the store lookup and the Redis charge are children of the decision span", async () => {
      const owner = `owner-trace-redis-${randomBytes(4).toString("hex")}`;
      await kg.admin.upsertAccount({ ownerId: owner, plan: "business" });
      const created = await kg.admin.createKey({ ownerId: owner, name: "traced" });
      const traceId = randomBytes(16).toString("hex");
      const spanId = randomBytes(8).toString("hex");
      const response = await kg.check(checkInit({ authorization: `Bearer ${created.secret}`, traceparent: `00-${traceId}-${spanId}-01` }));
      expect(response.status?.code).toBe(0);
      const check = await collector.waitForSpan((s) => s.traceId === traceId && s.name === "keygate.check");
      expect(check.parentSpanId).toBe(spanId);
      expect(check.attributes["keygate.cache.tier"]).toBe("store");
      const names = ["keygate.redis.l2_get", "keygate.store.lookup", "keygate.redis.charge"];
      const children: ReceivedSpan[] = [];
      for (const name of names) children.push(await collector.waitForSpan((s) => s.traceId === traceId && s.name === name));
      for (const child of children) expect(child.parentSpanId, child.name).toBe(check.spanId);
      expect(children.map((c) => c.attributes["db.system.name"])).toEqual(["redis", "sqlite", "redis"]);
      expect(collector.spans.filter((s) => s.traceId === traceId)).toHaveLength(4);
    });
  });
}
