import mongoose from "mongoose";
import { afterAll, afterEach, beforeAll, vi } from "vitest";
import type { KeyDoc } from "../../src/store/mongo.js";
import { TestClock } from "./clock.js";
import { TEST_POLICY, checkInit, checkOutcome, startKeygate } from "./keygate.js";
import type { TestKeygate } from "./keygate.js";
import { startMongoWire } from "./mongo-wire.js";
import type { MongoWire } from "./mongo-wire.js";

/** A key-lifecycle suite's keygate, started by the suite's beforeAll: read it inside tests. */
export interface LifecycleKeygate {
  readonly kg: TestKeygate;
  /** The Key model of keygate's MongoDB store; undefined on SQLite (or when it was not found). */
  readonly keys: mongoose.Model<KeyDoc> | undefined;
  /** The HTTP status and error code of a Check of /v1/things with `secret` as a bearer token. */
  check(secret: string): Promise<{ status: number; code: string | null }>;
  /** A new account on `plan` whose key A (named `name`, scope tutor) is rotated at once, with 7 days of grace, to B. */
  rotatedAtOnce(ownerId: string, plan: string, name: string): Promise<{ a: KeySecret; b: KeySecret }>;
}

/** A key's id and its secret. */
export interface KeySecret {
  id: string;
  secret: string;
}

/**
 * Registers the calling suite's hooks: beforeAll (120 s) starts keygate with TEST_POLICY, on a
 * fresh MongoDB-wire server with `mongo.pepper` when `mongo` is given, else on SQLite, and with its
 * clock stopped at `options.frozenAt` when given; afterEach restores every mock; afterAll stops
 * keygate, then the server.
 */
export function lifecycleKeygate(mongo: { pepper: string } | null, options: { frozenAt?: string } = {}): LifecycleKeygate {
  let server: MongoWire | undefined;
  let kg: TestKeygate | undefined;
  let keys: mongoose.Model<KeyDoc> | undefined;
  beforeAll(async () => {
    const env: Record<string, string> = {};
    if (mongo !== null) {
      server = await startMongoWire();
      Object.assign(env, { KEYGATE_MONGODB_URI: server.uri, KEYGATE_PEPPER: mongo.pepper });
    }
    let clock: TestClock | undefined;
    if (options.frozenAt !== undefined) {
      clock = new TestClock();
      clock.freeze(options.frozenAt);
    }
    const before = mongoose.connections.length;
    kg = await startKeygate({ policy: TEST_POLICY, clock, env });
    keys = mongoose.connections.slice(before).findLast((connection) => connection.models["Key"] !== undefined)?.models["Key"];
  }, 120_000);
  afterEach(() => {
    vi.restoreAllMocks();
  });
  afterAll(async () => {
    await kg?.stop();
    await server?.stop();
  });
  const started = (): TestKeygate => {
    if (kg === undefined) throw new Error("the suite's keygate did not start");
    return kg;
  };
  return {
    get kg() {
      return started();
    },
    get keys() {
      return keys;
    },
    async check(secret) {
      return checkOutcome(await started().check(checkInit({ authorization: `Bearer ${secret}` }, "/v1/things")));
    },
    async rotatedAtOnce(ownerId, plan, name) {
      const admin = started().admin;
      await admin.upsertAccount({ ownerId, plan });
      const created = await admin.createKey({ ownerId, name, scopes: ["tutor"] });
      const rotated = await admin.rotateKey({ id: created.key?.id ?? "", graceDays: 7 });
      return { a: { id: created.key?.id ?? "", secret: created.secret }, b: { id: rotated.key?.id ?? "", secret: rotated.secret } };
    },
  };
}
