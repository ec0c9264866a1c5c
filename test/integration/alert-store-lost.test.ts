import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { mongoWireAvailable, startMongoWire } from "../harness/mongo-wire.js";
import type { MongoWire } from "../harness/mongo-wire.js";
import { until } from "../harness/poll.js";
import { requireServer } from "../harness/ports.js";
import { firingAfter20m, promtool, seriesFromScrapes } from "../harness/promtool.js";

// The store lost, as deploy/k8s/monitoring/prometheusrule.yaml sees it. /readyz pings the store,
// so every replica turns not ready and leaves the keygate-authz Service: the proxies (fail
// closed) refuse every request, no Check reaches keygate, every Check-based rate is 0/0, and the
// ServiceMonitor still scrapes the pods (up == 1). keygate_ready and KeygateNotReady say it.

const ready =
  requireServer("MongoDB-wire server", mongoWireAvailable(), "run .ci/install-mongo-wire.sh") &&
  requireServer("promtool", promtool !== undefined, "apt-get install prometheus (Debian's package ships promtool)");

/** The value of a label-free sample, or undefined when /metrics has none. */
function gauge(text: string, name: string): number | undefined {
  const line = text.split("\n").find((l) => l.startsWith(`${name} `));
  return line === undefined ? undefined : Number(line.slice(name.length + 1));
}

describe.runIf(ready)("alerts: every replica not ready (store lost)", () => {
  let mongo: MongoWire;
  let kg: TestKeygate;

  beforeAll(async () => {
    mongo = await startMongoWire();
    kg = await startKeygate({
      env: {
        KEYGATE_MONGODB_URI: mongo.uri,
        KEYGATE_PEPPER: "alert-store-lost-pepper-0123456789abcdefgh",
        // The drain keeps the listeners open for a second: what a scrape sees meanwhile is tested.
        KEYGATE_SHUTDOWN_DELAY_SECONDS: "1",
      },
    });
  }, 120_000);

  afterAll(async () => {
    await kg?.stop().catch(() => undefined);
    await mongo?.stop();
  });

  it("keygate_ready follows /readyz, and KeygateNotReady fires on what keygate exports while it is 503", async () => {
    const readyz = async () => (await fetch(`http://127.0.0.1:${kg.ports.admin}/readyz`)).status;
    const scrape = async () => (await fetch(`http://127.0.0.1:${kg.ports.admin}/metrics`)).text();

    expect(await readyz()).toBe(200);
    const healthy = await scrape();
    expect(gauge(healthy, "keygate_ready")).toBe(1);
    // Without KEYGATE_REDIS_URL there is no bus to lose: no series, so no Redis alert.
    expect(healthy).not.toContain("keygate_redis_connected");
    const quiet = firingAfter20m(seriesFromScrapes(healthy, healthy, 1), 'alertname="KeygateNotReady"', []);
    expect(quiet.passed, quiet.output).toBe(true);

    await mongo.pause();
    await until(async () => (await readyz()) === 503, 20_000, "/readyz not ready", { intervalMs: 200 });
    // The pod is out of the Service now: no Check arrives. Prometheus keeps scraping it, and the
    // kubelet keeps probing /readyz.
    const startedAt = performance.now();
    const first = await scrape();
    await until(async () => (await readyz()) === 503 && performance.now() - startedAt > 3000, 20_000, "3 s of not ready", { intervalMs: 500 });
    const second = await scrape();
    const seconds = (performance.now() - startedAt) / 1000;
    expect(gauge(first, "keygate_ready")).toBe(0);
    expect(gauge(second, "keygate_ready")).toBe(0);

    const outage = firingAfter20m(seriesFromScrapes(first, second, seconds), 'alertname="KeygateNotReady"', [
      { alertname: "KeygateNotReady", severity: "critical", namespace: "keygate", job: "keygate-admin" },
    ]);
    expect(outage.passed, outage.output).toBe(true);

    // Back: the next probe's ping answers, and the gauge follows it.
    await mongo.start();
    await until(async () => (await readyz()) === 200, 60_000, "/readyz ready once the store is back", { intervalMs: 500 });
    expect(gauge(await scrape(), "keygate_ready")).toBe(1);
  });

  it("keygate_ready is 0 while the replica drains", async () => {
    // Last: it stops the instance. /readyz answers 503 from the first moment of the drain.
    const scrape = async () => (await fetch(`http://127.0.0.1:${kg.ports.admin}/metrics`)).text();
    expect(gauge(await scrape(), "keygate_ready")).toBe(1);
    const stopping = kg.stop();
    try {
      expect((await fetch(`http://127.0.0.1:${kg.ports.admin}/readyz`)).status).toBe(503);
      expect(gauge(await scrape(), "keygate_ready")).toBe(0);
    } finally {
      await stopping;
    }
  });
});
