import { Writable } from "node:stream";
import mongoose from "mongoose";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { z } from "zod";
import { UsageRecorder } from "../../src/limits/usage.js";
import { PartialWriteError, StoreUnavailableError } from "../../src/store/errors.js";
import { MongoKeyStore } from "../../src/store/mongo.js";
import type { UsageDelta } from "../../src/store/store.js";
import { createLogger } from "../../src/server/logger.js";
import { mongoWireAvailable, startMongoWire } from "../harness/mongo-wire.js";
import type { MongoWire } from "../harness/mongo-wire.js";
import { until, untilValue } from "../harness/poll.js";
import { requireServer } from "../harness/ports.js";
import { startTcpRelay } from "../harness/tcp-relay.js";
import type { TcpRelay } from "../harness/tcp-relay.js";

// README "Caching and write-behind": on MongoDB a usage call that fails is written again at the
// next flush only where it is sure not to be written (rows the server refused, calls that never
// reached it); rows whose answer was lost are logged at error level as `unsure`, never written
// twice. The driver wraps every failure of a bulk write (no server selected, a connection refused,
// one dropped) in a MongoBulkWriteError with no write errors, which once read as "the server
// answered and refused none": every row of a batch sent while MongoDB was unreachable was
// dropped, with nothing retried, nothing logged as unsure, and stop() reporting nothing lost.

const mongoReady = requireServer("MongoDB-wire server", mongoWireAvailable(), "run .ci/install-mongo-wire.sh");
const DAY = "2026-12-07";

const logLine = z.object({ level: z.number(), msg: z.string(), rows: z.number().optional(), unsure: z.number().optional() });

/** A logger into `lines`, one JSON line each. */
function capturingLogger(lines: string[]): ReturnType<typeof createLogger> {
  const sink = new Writable({
    write(chunk: Buffer, _encoding, callback) {
      lines.push(chunk.toString("utf8"));
      callback();
    },
  });
  return createLogger("debug", sink);
}

/** The failure of `call`: a PartialWriteError, or the test fails. */
async function partialFailure(call: Promise<void>): Promise<PartialWriteError> {
  const error = await call.then(
    () => null,
    (e: unknown) => e,
  );
  if (!(error instanceof PartialWriteError)) throw new Error(`expected a PartialWriteError, got ${String(error)}`);
  return error;
}

/** The driver error a PartialWriteError's cause wraps, through StoreUnavailableError and MongoBulkWriteError. */
function driverFailure(error: PartialWriteError): unknown {
  const translated = error.cause instanceof StoreUnavailableError ? error.cause.cause : error.cause;
  return translated instanceof mongoose.mongo.MongoBulkWriteError ? translated.errorResponse : translated;
}

/** Whether a failed ping never reached MongoDB: its connection refused, or no server selected. */
function unreachable(error: unknown): boolean {
  const failure = error instanceof StoreUnavailableError ? error.cause : error;
  if (failure instanceof mongoose.mongo.MongoServerSelectionError) return true;
  const cause = failure instanceof mongoose.mongo.MongoNetworkError ? failure.cause : undefined;
  return typeof cause === "object" && cause !== null && "code" in cause && cause.code === "ECONNREFUSED";
}

describe.runIf(mongoReady)("usage write-behind on MongoDB while it is unreachable", { timeout: 60_000 }, () => {
  let mongo: MongoWire | undefined;
  let relay: TcpRelay;
  let store: MongoKeyStore;
  let direct: mongoose.mongo.MongoClient;
  /** While true, the relay holds MongoDB's answers back (10 s), so a test can drop a connection with a write made and its answer out. */
  let holdAnswers = false;
  beforeAll(async () => {
    mongo = await startMongoWire();
    relay = await startTcpRelay(Number(new URL(mongo.uri).port), { answerDelayMs: () => (holdAnswers ? 10_000 : 0) });
    const uri = new URL(mongo.uri);
    uri.port = String(relay.port);
    store = await MongoKeyStore.connect(uri.toString(), { serverSelectionTimeoutMs: 1000 });
    direct = new mongoose.mongo.MongoClient(mongo.uri, { serverSelectionTimeoutMS: 3000 });
    await direct.connect();
  }, 120_000);
  afterAll(async () => {
    await direct?.close();
    await store?.close();
    await relay?.close();
    await mongo?.stop();
  });

  const row = (ownerId: string, count: number): UsageDelta => ({ ownerId, keyId: "key_1", day: DAY, outcome: "ALLOWED", count, credits: 0 });
  const stored = async (ownerId: string): Promise<number[]> => (await store.listUsage(ownerId, DAY, DAY)).map((r) => r.count);
  /**
   * Closes the relay and waits until the store's connections are known gone: a write on one the
   * driver still holds open would be sent into a closed socket, and its answer lost, not refused.
   */
  async function refuseConnections(): Promise<void> {
    await relay.close();
    await until(async () => unreachable(await store.ping().then(() => null, (e: unknown) => e)), 20_000, "the store's ping refused", { intervalMs: 20 });
  }
  /** Opens the relay again and waits until the store answers through it. */
  async function acceptConnections(): Promise<void> {
    await relay.listen();
    await until(async () => (await store.ping().then(() => true, () => false)), 20_000, "the store's ping answered", { intervalMs: 50 });
  }
  /** The store's usage count of `ownerId`, read past the relay. */
  const storedDirect = async (ownerId: string): Promise<number | undefined> =>
    (await direct.db().collection<{ _id: string; count: number }>("usage").findOne({ _id: `${ownerId}|${DAY}|key_1|ALLOWED` }))?.count;

  describe("MongoKeyStore.applyUsage.error", () => {
    it("every connection refused: every row is named unapplied, none unsure", async () => {
      await store.applyUsage([row("refused", 1)], []);
      await refuseConnections();
      try {
        const partial = await partialFailure(store.applyUsage([row("refused", 5)], []));
        expect({ usage: partial.unapplied.usage, unsure: partial.unsure }).toEqual({ usage: [row("refused", 5)], unsure: 0 });
      } finally {
        await acceptConnections();
      }
      expect(await stored("refused")).toEqual([1]);
    });

    it("no server selected within the selection timeout: every row is named unapplied, none unsure", async () => {
      await store.applyUsage([row("unselected", 1)], []);
      await refuseConnections();
      try {
        // Refused connections come first; once the driver's monitor marks the server unknown,
        // a write waits for server selection and fails with MongoServerSelectionError.
        const { value: partial } = await untilValue(
          () => partialFailure(store.applyUsage([row("unselected", 5)], [])),
          (p) => p.unsure > 0 || p.unapplied.usage.length !== 1 || driverFailure(p) instanceof mongoose.mongo.MongoServerSelectionError,
          20_000,
          "a usage write failed by server selection",
          { intervalMs: 100 },
        );
        expect({ usage: partial.unapplied.usage, unsure: partial.unsure, selection: driverFailure(partial) instanceof mongoose.mongo.MongoServerSelectionError }).toEqual({
          usage: [row("unselected", 5)],
          unsure: 0,
          selection: true,
        });
      } finally {
        await acceptConnections();
      }
      expect(await stored("unselected")).toEqual([1]);
    });

    it("the connection dropped with the write made and its answer out: every row is unsure, none named unapplied", async () => {
      holdAnswers = true;
      const call = partialFailure(store.applyUsage([row("answer-lost", 3)], []));
      try {
        await until(async () => (await storedDirect("answer-lost")) === 3, 10_000, "the usage write made by the server");
        relay.dropAll();
        const partial = await call;
        expect({ usage: partial.unapplied.usage, unsure: partial.unsure }).toEqual({ usage: [], unsure: 1 });
      } finally {
        holdAnswers = false;
      }
      expect(await storedDirect("answer-lost")).toBe(3);
    });
  });

  describe("UsageRecorder on MongoDB.error", () => {
    it("requests recorded while MongoDB refuses connections are all in the store, once, when it is back", async () => {
      const lines: string[] = [];
      const usage = new UsageRecorder(store, capturingLogger(lines), 60_000);
      for (let i = 0; i < 7; i++) usage.record("outage", "key_1", DAY, "ALLOWED", 0);
      await refuseConnections();
      try {
        await usage.flush();
      } finally {
        await acceptConnections();
      }
      await until(
        async () => {
          await usage.flush();
          return usage.pendingCount === 0;
        },
        20_000,
        "the kept rows written once MongoDB is back",
        { intervalMs: 100 },
      );
      const logged = lines.map((l) => logLine.parse(JSON.parse(l)));
      expect(await stored("outage")).toEqual([7]);
      expect(logged.length).toBeGreaterThan(0);
      expect(logged.map((l) => [l.level, l.msg, l.rows, l.unsure])).toEqual(logged.map(() => [40, "usage flush failed; will retry", 1, undefined]));
    });

    it("a flush whose answer was lost logs its rows as unsure at error level and never writes them again", async () => {
      const lines: string[] = [];
      const usage = new UsageRecorder(store, capturingLogger(lines), 60_000);
      for (let i = 0; i < 4; i++) usage.record("flush-answer-lost", "key_1", DAY, "ALLOWED", 0);
      holdAnswers = true;
      const flushed = usage.flush();
      try {
        await until(async () => (await storedDirect("flush-answer-lost")) === 4, 10_000, "the usage write made by the server");
        relay.dropAll();
        await flushed;
      } finally {
        holdAnswers = false;
      }
      await usage.flush();
      const logged = lines.map((l) => logLine.parse(JSON.parse(l)));
      expect({ stored: await stored("flush-answer-lost"), pending: usage.pendingCount }).toEqual({ stored: [4], pending: 0 });
      expect(logged.map((l) => [l.level, l.rows, l.unsure])).toEqual([[50, 0, 1]]);
    });

    it("stop() while MongoDB refuses connections until the grace period ends: false, and the rows logged as lost", async () => {
      const lines: string[] = [];
      const usage = new UsageRecorder(store, capturingLogger(lines), 60_000);
      for (let i = 0; i < 3; i++) usage.record("shutdown", "key_1", DAY, "ALLOWED", 0);
      await refuseConnections();
      try {
        const written = await usage.stop(performance.now() + 2000);
        const lost = lines.map((l) => logLine.parse(JSON.parse(l))).filter((l) => l.msg.startsWith("usage not written at shutdown"));
        expect({ written, lost: lost.map((l) => [l.level, l.rows, l.unsure]) }).toEqual({ written: false, lost: [[50, 1, 0]] });
      } finally {
        await acceptConnections();
      }
      expect(await stored("shutdown")).toEqual([]);
    });
  });
});
