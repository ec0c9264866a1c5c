import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { mongoWireAvailable, startMongoWire } from "../harness/mongo-wire.js";
import type { MongoWire } from "../harness/mongo-wire.js";
import { until } from "../harness/poll.js";
import { requireServer } from "../harness/ports.js";

// README, Quick start port table: 8181 (HTTP authorization) serves `/healthz`, `/readyz`.
// README, Production: "a lost connection makes an uncached Check UNAVAILABLE (HTTP 503) at once
// and turns `/readyz` not-ready". Metrics: ready means "serving, and the store answered its last
// ping". The authorization port is the one a proxy can reach (the NetworkPolicy keeps proxies off
// the admin port), so a proxy's health check of keygate goes to 8181's /readyz. With the store
// gone, that /readyz must say not ready, as the admin port's does.

const ready = requireServer("MongoDB-wire server", mongoWireAvailable(), "run .ci/install-mongo-wire.sh");

describe.runIf(ready)("/readyz on the HTTP authorization port follows the store", { timeout: 120_000 }, () => {
  let mongo: MongoWire;
  let kg: TestKeygate;

  beforeAll(async () => {
    mongo = await startMongoWire();
    kg = await startKeygate({ env: { KEYGATE_MONGODB_URI: mongo.uri, KEYGATE_PEPPER: "readyz-authz-port-pepper-0123456789abcdef" } });
  }, 120_000);

  afterAll(async () => {
    await kg?.stop().catch(() => undefined);
    await mongo?.stop();
  });

  it("8181/readyz answers 503 while the store is unreachable, like 8080/readyz", async () => {
    const readyz = async (port: number) => (await fetch(`http://127.0.0.1:${port}/readyz`)).status;
    expect(await readyz(kg.ports.admin)).toBe(200);
    expect(await readyz(kg.ports.http)).toBe(200);
    // Created, never checked: no cache holds it.
    const secret = (await kg.admin.createKey({ ownerId: "readyz-owner", name: "uncached" })).secret;

    await mongo.pause();
    try {
      await until(async () => (await readyz(kg.ports.admin)) === 503, 20_000, "admin /readyz not ready", { intervalMs: 200 });
      // An uncached key's Check is UNAVAILABLE now (the store does not answer) ...
      const check = await fetch(`http://127.0.0.1:${kg.ports.http}/check/v1/things`, {
        headers: { "x-api-key": secret },
      });
      await check.text();
      expect(check.status).toBe(503);
      // ... and the port that answers those Checks still reports ready.
      expect(await readyz(kg.ports.http)).toBe(503);
    } finally {
      await mongo.start();
    }
  });
});
