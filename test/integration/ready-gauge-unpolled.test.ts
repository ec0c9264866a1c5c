import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { mongoWireAvailable, startMongoWire } from "../harness/mongo-wire.js";
import type { MongoWire } from "../harness/mongo-wire.js";
import { until } from "../harness/poll.js";
import { requireServer } from "../harness/ports.js";

// keygate_ready asks the store at each scrape (the shared ping), not only when something polls
// /readyz: a deployment where nothing does (a VM behind nginx OSS, which has no active health
// checks; compose without a healthcheck) must still export 0 while the store is gone, or
// KeygateNotReady never fires there.
const ready = requireServer("MongoDB-wire server", mongoWireAvailable(), "run .ci/install-mongo-wire.sh");

function gauge(text: string, name: string): number | undefined {
  const line = text.split("\n").find((l) => l.startsWith(`${name} `));
  return line === undefined ? undefined : Number(line.slice(name.length + 1));
}

describe.runIf(ready)("keygate_ready with nothing polling /readyz", { timeout: 120_000 }, () => {
  let mongo: MongoWire;
  let kg: TestKeygate;

  beforeAll(async () => {
    mongo = await startMongoWire();
    kg = await startKeygate({ env: { KEYGATE_MONGODB_URI: mongo.uri, KEYGATE_PEPPER: "recheck3-ready-gauge-pepper-0123456789abcdef" } });
  }, 120_000);

  afterAll(async () => {
    await kg?.stop().catch(() => undefined);
    await mongo?.stop();
  });

  it("a scrape while the store is gone says 0, though no one asked /readyz", async () => {
    const scrape = async () => (await fetch(`http://127.0.0.1:${kg.ports.admin}/metrics`)).text();
    expect(gauge(await scrape(), "keygate_ready")).toBe(1);
    const secret = (await kg.admin.createKey({ ownerId: "recheck3-owner", name: "uncached" })).secret;
    await mongo.pause();
    try {
      // The store is gone: an uncached key's Check is UNAVAILABLE.
      await until(
        async () => {
          const res = await fetch(`http://127.0.0.1:${kg.ports.http}/check/v1/things`, { headers: { "x-api-key": secret } });
          await res.text();
          return res.status === 503;
        },
        30_000,
        "uncached Check 503",
        { intervalMs: 500 },
      );
      // Scrapes for a few seconds (Prometheus's interval would be 15-30 s): the gauge never moves.
      const seen: Array<number | undefined> = [];
      for (let i = 0; i < 5; i++) {
        seen.push(gauge(await scrape(), "keygate_ready"));
        await new Promise((resolve) => setTimeout(resolve, 500));
      }
      expect(seen.at(-1)).toBe(0);
    } finally {
      await mongo.start();
    }
  });
});
