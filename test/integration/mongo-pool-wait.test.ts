import { Code } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { z } from "zod";
import { StoreUnavailableError } from "../../src/store/errors.js";
import { MongoKeyStore } from "../../src/store/mongo.js";
import { adminRefusal, startKeygate, TEST_POLICY } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { mongoWireAvailable, startMongoWire } from "../harness/mongo-wire.js";
import type { MongoWire } from "../harness/mongo-wire.js";
import { requireServer } from "../harness/ports.js";
import { startTcpRelay } from "../harness/tcp-relay.js";
import type { TcpRelay } from "../harness/tcp-relay.js";

// A call that waits past waitQueueTimeoutMS (3 s) for a connection from a busy pool fails with the
// driver's MongoWaitQueueTimeoutError. It is the store being unavailable, as a lost connection is:
// StoreUnavailableError, which KeyAdmin answers UNAVAILABLE "retry shortly" (not INTERNAL
// "internal error", logged at error level), and a change made of several calls logs its audit
// record as "change outcome unknown". The pool here has one connection (maxPoolSize=1 in the URI,
// as an operator may set it), and a relay holds the call that took it.

const mongoReady = requireServer("MongoDB-wire server", mongoWireAvailable(), "run .ci/install-mongo-wire.sh");
const logLine = z.object({ level: z.number(), msg: z.string() });

/** `uri` through the relay, with a pool of one connection. */
function relayedOnePool(uri: string, relay: TcpRelay): string {
  const url = new URL(uri);
  url.port = String(relay.port);
  url.searchParams.set("maxPoolSize", "1");
  return url.toString();
}

describe.runIf(mongoReady)("a MongoDB call that waits too long for a pooled connection", { timeout: 60_000 }, () => {
  let mongo: MongoWire | undefined;
  let relay: TcpRelay | undefined;
  beforeAll(async () => {
    mongo = await startMongoWire();
    relay = await startTcpRelay(Number(new URL(mongo.uri).port));
  }, 120_000);
  afterAll(async () => {
    relay?.release();
    await relay?.close();
    await mongo?.stop();
  });

  it("error: the store: StoreUnavailableError, with the driver's error as its cause", async () => {
    if (mongo === undefined || relay === undefined) throw new Error("no MongoDB");
    const store = await MongoKeyStore.connect(relayedOnePool(mongo.uri, relay), { serverSelectionTimeoutMs: 1000 });
    try {
      relay.holdWhen = (chunk) => chunk.includes("pool-wait-held-owner");
      // Takes the pool's one connection; its answer never comes until release().
      const held = store.listUsage("pool-wait-held-owner", "2026-01-01", "2026-01-02").catch((e: unknown) => e);
      await new Promise((resolve) => setTimeout(resolve, 200));
      const startedMs = performance.now();
      const error = await store.listUsage("pool-wait-other-owner", "2026-01-01", "2026-01-02").then(
        () => null,
        (e: unknown) => e,
      );
      expect(performance.now() - startedMs).toBeGreaterThan(2500);
      expect({
        unavailable: error instanceof StoreUnavailableError,
        cause: error instanceof Error && error.cause instanceof Error ? error.cause.name : null,
      }).toEqual({ unavailable: true, cause: "MongoWaitQueueTimeoutError" });
      relay.release();
      await held;
    } finally {
      relay.holdWhen = null;
      relay.release();
      await store.close().catch(() => undefined);
    }
  });

  it("error: KeyAdmin: a change answers UNAVAILABLE, logs its audit record as outcome unknown, and nothing at error level as a failed call", async () => {
    if (mongo === undefined || relay === undefined) throw new Error("no MongoDB");
    let kg: TestKeygate | undefined;
    try {
      kg = await startKeygate({ policy: TEST_POLICY, env: { KEYGATE_MONGODB_URI: relayedOnePool(mongo.uri, relay), KEYGATE_PEPPER: "pool-wait-pepper-0123456789abcdefghijklmn" } });
      relay.holdWhen = (chunk) => chunk.includes("pool-wait-held-account");
      const held = kg.admin.getAccount({ ownerId: "pool-wait-held-account" }).catch((e: unknown) => e);
      await new Promise((resolve) => setTimeout(resolve, 200));
      const refused = await adminRefusal(kg.admin.upsertAccount({ ownerId: "pool-wait-new-account", plan: "business" }));
      expect(refused).toEqual({ code: Code.Unavailable, message: "the key store is unavailable; retry shortly" });
      const lines = kg.logLines.flatMap((text) => text.split("\n").filter((line) => line.startsWith("{"))).map((line) => logLine.parse(JSON.parse(line)));
      expect({
        unknown: lines.filter((l) => l.level === 50 && l.msg.startsWith("change outcome unknown")).length,
        failed: lines.filter((l) => l.msg === "KeyAdmin call failed").length,
      }).toEqual({ unknown: 1, failed: 0 });
      relay.release();
      await held;
    } finally {
      relay.holdWhen = null;
      relay.release();
      await kg?.stop();
    }
  });
});
