import { connect as h2connect } from "node:http2";
import type { ClientHttp2Session } from "node:http2";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { checkInit, checkOutcome, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { mongoWireAvailable, startMongoWire } from "../harness/mongo-wire.js";
import type { MongoWire } from "../harness/mongo-wire.js";
import { until } from "../harness/poll.js";
import { requireServer } from "../harness/ports.js";
import { startTcpRelay } from "../harness/tcp-relay.js";
import type { TcpRelay } from "../harness/tcp-relay.js";

/**
 * The admin port's /readyz needs no token (the kubelet calls it), and its store ping is a command
 * on the connections the key lookups use (on MongoDB, the driver's pool, which keygate otherwise
 * keeps to LOOKUPS_IN_FLIGHT = 2 lookups at once). One ping per /readyz let a flood of them fill
 * the pool and its wait queue, so a cold key's Check waited behind them past its budget and was
 * answered UNAVAILABLE (1,571 pings outstanding after 3,500 requests). The ping is shared: at
 * most one at a time, its answer standing for a second (sharedPing in readiness.ts).
 */

const FLOOD_SESSIONS = 16;
const MONGO_PEPPER = "exhaust-readyz-pepper-0123456789abcdefgh";

/** Opens `count` GET streams of `path` on one HTTP/2 session; resolves to their statuses as they end. */
function streams(session: ClientHttp2Session, path: string, count: number): Array<Promise<number>> {
  const out: Array<Promise<number>> = [];
  for (let i = 0; i < count; i++) {
    out.push(
      new Promise<number>((resolve) => {
        const req = session.request({ ":method": "GET", ":path": path });
        let status = 0;
        req.on("response", (headers) => (status = Number(headers[":status"])));
        req.on("error", () => resolve(-1));
        req.on("close", () => resolve(status));
        req.resume();
        req.end();
      }),
    );
  }
  return out;
}

if (requireServer("MongoDB-wire server", mongoWireAvailable(), "run .ci/install-mongo-wire.sh")) {
  describe("admin /readyz flooded: store pings shared", () => {
    let mongo: MongoWire | undefined;
    let relay: TcpRelay | undefined;
    let kg: TestKeygate | undefined;
    let delay = 0;
    let outstanding = 0;
    let calls = 0;

    beforeAll(async () => {
      mongo = await startMongoWire();
      const upstreamPort = Number(new URL(mongo.uri).port);
      // A relay in front of MongoDB: `delay` delays every answer chunk; freeze() holds everything.
      relay = await startTcpRelay(upstreamPort, { answerDelayMs: () => delay });
      const uri = mongo.uri.replace(`:${upstreamPort}/`, `:${relay.port}/`);
      // A budget a loaded machine cannot exhaust: the pings outstanding and made are what the
      // test judges (with a ping per /readyz, the Check of a cold key also ran out of 400 ms).
      kg = await startKeygate({ env: { KEYGATE_MONGODB_URI: uri, KEYGATE_PEPPER: MONGO_PEPPER, KEYGATE_CHECK_BUDGET_MS: "5000" } });
      // Count the store pings the admin server's readiness probe makes (it calls store.ping()).
      const store = kg.app.store as unknown as { ping: () => Promise<void> };
      const ping = store.ping.bind(store);
      store.ping = () => {
        calls += 1;
        outstanding += 1;
        return ping().finally(() => (outstanding -= 1));
      };
    }, 120_000);

    afterAll(async () => {
      relay?.thaw();
      delay = 0;
      await kg?.stop();
      await relay?.close();
      await mongo?.stop();
    }, 60_000);

    it("a cold key's Check is allowed (200) while /readyz is flooded on a MongoDB 40 ms away, and the store is pinged at most once a second", async () => {
      if (kg === undefined || relay === undefined) throw new Error("setup failed");
      await kg.admin.upsertAccount({ ownerId: "exhaust-readyz", plan: "pro" });
      const baseline = await kg.admin.createKey({ ownerId: "exhaust-readyz", name: "baseline" });
      const victim = await kg.admin.createKey({ ownerId: "exhaust-readyz", name: "victim" });
      delay = 40;
      // Without a flood, a cold key (one lookup, about one 40 ms round trip) is allowed.
      expect(checkOutcome(await kg.check(checkInit({ authorization: `Bearer ${baseline.secret}` })))).toEqual({ status: 200, code: null });
      const sessions = Array.from({ length: FLOOD_SESSIONS }, () => h2connect(`http://127.0.0.1:${kg?.ports.admin ?? 0}`));
      try {
        calls = 0;
        const floodStarted = performance.now();
        let answered = 0;
        const flood = sessions.flatMap((session) => streams(session, "/readyz", 250)).map((p) => p.finally(() => (answered += 1)));
        // Once a good part of the flood has been answered, a Check of a key no cache holds.
        await until(() => answered >= 1000, 60_000, "1,000 /readyz answered", { intervalMs: 5 });
        const pingsOut = outstanding;
        // gRPC UNAVAILABLE (14) is what Envoy turns into a 503 (failure_mode_allow off).
        const outcome = await kg.check(checkInit({ authorization: `Bearer ${victim.secret}` })).then(
          (response) => checkOutcome(response),
          (error: { code?: number }) => ({ status: 503, code: `grpc ${error.code ?? "?"}` }),
        );
        expect(outcome).toEqual({ status: 200, code: null });
        // One ping in flight at most, shared by every /readyz that comes while it is out.
        expect(pingsOut).toBeLessThanOrEqual(1);
        const statuses = await Promise.all(flood);
        expect(statuses.filter((status) => status !== 200)).toEqual([]);
        // At most one ping a second (its answer stands that long), and one more at each end.
        expect(calls).toBeLessThanOrEqual(Math.ceil((performance.now() - floodStarted) / 1000) + 2);
      } finally {
        for (const session of sessions) session.destroy();
        delay = 0;
      }
    }, 90_000);
  });
}
