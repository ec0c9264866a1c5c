import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { TEST_POLICY, httpCheck, postJson, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { until } from "../harness/poll.js";
import { requireServer } from "../harness/ports.js";
import { firingAfter20m, promtool, seriesFromScrapes } from "../harness/promtool.js";
import { redisAvailable, startRedis } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";

// A full Redis outage, as deploy/k8s/monitoring/prometheusrule.yaml sees it. Once the invalidation
// bus has lost Redis, keygate stops calling it on the Check path (charges go to
// limits.onRedisError, L2 is not read), so keygate_backend_errors_total and the Redis call count
// stay flat and KeygateRedisErrors' ratio is 0/0: it cannot fire while every replica counts
// limits and credits on its own. keygate_redis_connected and KeygateRedisLost say it instead.

const ready =
  requireServer("redis-server", redisAvailable(), "apt-get install redis-server") &&
  requireServer("promtool", promtool !== undefined, "apt-get install prometheus (Debian's package ships promtool)");

const POLICY = {
  ...TEST_POLICY,
  plans: {
    ...TEST_POLICY.plans,
    basic: { maxActiveKeys: 5, rateLimit: { limit: 10_000_000, windowSeconds: 60 }, dailyQuota: null, monthlyCredits: null },
  },
};

/** Sum of the samples of `name` whose labels include `label`. */
function total(text: string, name: string, label: string): number {
  let sum = 0;
  for (const line of text.split("\n")) {
    if (line.startsWith(`${name}{`) && line.includes(label)) sum += Number(line.split(" ").at(-1));
  }
  return sum;
}

/** The value of a label-free sample, or undefined when /metrics has none. */
function gauge(text: string, name: string): number | undefined {
  const line = text.split("\n").find((l) => l.startsWith(`${name} `));
  return line === undefined ? undefined : Number(line.slice(name.length + 1));
}

const ALERT_LABELS = { severity: "critical", namespace: "keygate", job: "keygate-admin" };

describe.runIf(ready)("alerts: Redis lost while Checks keep coming", () => {
  let redis: RedisServer;
  let kg: TestKeygate;

  beforeAll(async () => {
    const started = await startRedis();
    if (started === null) throw new Error("redis-server is not on PATH");
    redis = started;
    kg = await startKeygate({ policy: POLICY, env: { KEYGATE_REDIS_URL: redis.url } });
  });

  afterAll(async () => {
    await kg?.stop();
    await redis?.stop();
  });

  it("keygate_redis_connected goes to 0 and KeygateRedisLost fires on what keygate exports, where KeygateRedisErrors cannot", async () => {
    const created = await postJson(kg.ports.admin, "CreateKey", { ownerId: "alert-redis-lost", name: "r" });
    const secret = String(created.json["secret"]);
    const check = async () => (await httpCheck(kg.ports.http, "/check/v1/x", { "x-api-key": secret })).status;
    const scrape = async () => (await fetch(`http://127.0.0.1:${kg.ports.admin}/metrics`)).text();
    const redisCalls = (text: string) => total(text, "keygate_backend_duration_seconds_count", 'backend="redis"');
    const redisErrors = (text: string) => total(text, "keygate_backend_errors_total", 'backend="redis"');

    // Healthy: connected, each Check charges its bucket in Redis, and no alert fires.
    const healthyStartedAt = performance.now();
    const healthyFirst = await scrape();
    for (let i = 0; i < 20; i++) expect(await check()).toBe(200);
    const healthy = await scrape();
    expect(gauge(healthy, "keygate_redis_connected")).toBe(1);
    expect(redisCalls(healthy) - redisCalls(healthyFirst)).toBeGreaterThanOrEqual(20);
    const quiet = firingAfter20m(seriesFromScrapes(healthyFirst, healthy, (performance.now() - healthyStartedAt) / 1000), 'alertname=~"KeygateRedis.*"', []);
    expect(quiet.passed, quiet.output).toBe(true);

    await redis.stop();
    await until(
      async () => {
        await check();
        return gauge(await scrape(), "keygate_redis_connected") === 0;
      },
      15_000,
      "keygate_redis_connected 0 once the bus has lost Redis",
      { intervalMs: 50 },
    );
    const startedAt = performance.now();
    const first = await scrape();
    const statuses: number[] = [];
    for (let i = 0; i < 100; i++) statuses.push(await check());
    const second = await scrape();
    const seconds = (performance.now() - startedAt) / 1000;
    // Answered in-process (limits.onRedisError: fallback), and without a Redis call to fail.
    expect(statuses.filter((s) => s === 200)).toHaveLength(100);
    expect(redisCalls(second)).toBe(redisCalls(first));
    expect(redisErrors(second)).toBe(redisErrors(first));
    expect(gauge(second, "keygate_redis_connected")).toBe(0);

    const outage = firingAfter20m(seriesFromScrapes(first, second, seconds), 'alertname=~"KeygateRedis.*"', [{ alertname: "KeygateRedisLost", ...ALERT_LABELS }]);
    expect(outage.passed, outage.output).toBe(true);

    // Back: the bus hears Redis again, and so does the gauge.
    await redis.start();
    await until(async () => gauge(await scrape(), "keygate_redis_connected") === 1, 20_000, "keygate_redis_connected 1 once Redis is back", { intervalMs: 100 });
    expect(await check()).toBe(200);
  });
});
