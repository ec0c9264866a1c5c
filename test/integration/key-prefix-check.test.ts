import type { ChildProcess } from "node:child_process";
import { copyFileSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { DatabaseSync } from "node:sqlite";
import mongoose from "mongoose";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { ConfigError } from "../../src/config.js";
import { checkInit, checkOutcome, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { mongoWireAvailable, startMongoWire } from "../harness/mongo-wire.js";
import type { MongoWire } from "../harness/mongo-wire.js";
import { requireServer } from "../harness/ports.js";
import { serveUntilExit } from "../harness/process.js";

// A store records the prefix its keys were issued with (KEYGATE_KEY_PREFIX). Under another prefix
// every stored key fails the shape test and is refused 401 "malformed" by a keygate that reports
// ready, so such a start is refused, naming the variable and both prefixes; never silently served.

const ALLOWED = { status: 200, code: null };
const fixtureDir = resolve(import.meta.dirname, "../fixtures/upgrade/1dffb08");
const release = JSON.parse(readFileSync(join(fixtureDir, "release.json"), "utf8")) as { pepper: string; adminToken: string };
const releaseActiveKey = (store: "sqlite" | "mongo"): string =>
  (JSON.parse(readFileSync(join(fixtureDir, `${store}-expected.json`), "utf8")) as { keys: { active: { secret: string } } }).keys.active.secret;

/** The one line a start with `configured` on a store whose keys carry `recorded` is refused with. */
function mismatch(configured: string, recorded: string): string {
  return `KEYGATE_KEY_PREFIX is "${configured}", but this store's keys were issued with "${recorded}": every key would be refused as malformed. Set KEYGATE_KEY_PREFIX to "${recorded}", the prefix the store was created with`;
}

const dirs: string[] = [];
const running: TestKeygate[] = [];
const children = new Set<ChildProcess>();
afterEach(async () => {
  for (const k of running.splice(0)) await k.stop({ keepData: true }).catch(() => undefined);
});
afterAll(() => {
  for (const child of children) child.kill("SIGKILL");
  for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
});

function tempDir(): string {
  const dir = mkdtempSync(join(tmpdir(), "keygate-prefix-"));
  dirs.push(dir);
  return dir;
}

async function started(options: Parameters<typeof startKeygate>[0]): Promise<TestKeygate> {
  const keygate = await startKeygate(options);
  running.push(keygate);
  return keygate;
}

async function stopped(keygate: TestKeygate): Promise<void> {
  running.splice(running.indexOf(keygate), 1);
  await keygate.stop({ keepData: true });
}

/** The error a start was refused with; fails the test when the start succeeded. */
async function refusedStart(options: Parameters<typeof startKeygate>[0]): Promise<Error> {
  let keygate: TestKeygate;
  try {
    keygate = await startKeygate(options);
  } catch (error) {
    if (error instanceof Error) return error;
    throw error;
  }
  running.push(keygate);
  throw new Error("the start was not refused");
}

/** What a key gets from Check and from VerifyKey. */
async function answers(keygate: TestKeygate, secret: string): Promise<{ check: { status: number; code: string | null }; verify: unknown[] }> {
  const check = checkOutcome(await keygate.check(checkInit({ authorization: `Bearer ${secret}` })));
  const verified = await keygate.admin.verifyKey({ secret });
  return { check, verify: [verified.valid, verified.code, verified.message] };
}
const KEPT = { check: ALLOWED, verify: [true, "OK", ""] };

/** The rows of the SQLite store's keygate_meta table, read without writing. */
function metaRows(dataDir: string): Array<Record<string, unknown>> {
  const db = new DatabaseSync(join(dataDir, "keygate.db"), { readOnly: true });
  try {
    return db.prepare("SELECT name, value FROM keygate_meta WHERE name = 'key_prefix'").all();
  } finally {
    db.close();
  }
}

/** A data directory whose first start (with `env`) issued a key that works, and that key. */
async function keyedDataDir(env: Record<string, string> = {}): Promise<{ dataDir: string; secret: string }> {
  const dataDir = tempDir();
  const first = await started({ dataDir, env });
  const created = await first.admin.createKey({ ownerId: "prefix-owner", name: "k" });
  expect(await answers(first, created.secret)).toEqual(KEPT);
  await stopped(first);
  return { dataDir, secret: created.secret };
}

describe("key prefix check, embedded.happy", () => {
  it("a new data directory records KEYGATE_KEY_PREFIX at its first start, and a restart with it keeps every key", async () => {
    const { dataDir, secret } = await keyedDataDir({ KEYGATE_KEY_PREFIX: "acme" });
    expect(secret.startsWith("acme_live_")).toBe(true);
    expect(metaRows(dataDir)).toEqual([{ name: "key_prefix", value: "acme" }]);
    const again = await started({ dataDir, env: { KEYGATE_KEY_PREFIX: "acme" } });
    expect(await answers(again, secret)).toEqual(KEPT);
  });

  it("the release's database (keys, no prefix recorded) records the prefix its keys carry at the first start; its keys keep working", async () => {
    const dataDir = tempDir();
    copyFileSync(join(fixtureDir, "sqlite/keygate.db"), join(dataDir, "keygate.db"));
    const upgraded = await started({ dataDir, env: { KEYGATE_PEPPER: release.pepper } });
    expect(await answers(upgraded, releaseActiveKey("sqlite"))).toEqual(KEPT);
    expect(metaRows(dataDir)).toEqual([{ name: "key_prefix", value: "kg" }]);
  });
});

describe("key prefix check, embedded.error", () => {
  it("a restart with another KEYGATE_KEY_PREFIX is refused, naming both prefixes; the store's prefix starts again and every key works", async () => {
    const { dataDir, secret } = await keyedDataDir();
    const error = await refusedStart({ dataDir, env: { KEYGATE_KEY_PREFIX: "acme" } });
    expect(error).toBeInstanceOf(ConfigError);
    expect(error.message).toBe(mismatch("acme", "kg"));
    expect(metaRows(dataDir)).toEqual([{ name: "key_prefix", value: "kg" }]);

    // The refused start let go of the data directory and the database.
    const restored = await started({ dataDir });
    expect(await answers(restored, secret)).toEqual(KEPT);
  });

  it("the release's database started with another prefix is refused: the store's prefix is read from its keys, not taken from the configuration", async () => {
    const dataDir = tempDir();
    copyFileSync(join(fixtureDir, "sqlite/keygate.db"), join(dataDir, "keygate.db"));
    const error = await refusedStart({ dataDir, env: { KEYGATE_PEPPER: release.pepper, KEYGATE_KEY_PREFIX: "acme" } });
    expect(error).toBeInstanceOf(ConfigError);
    expect(error.message).toBe(mismatch("acme", "kg"));
    expect(metaRows(dataDir)).toEqual([{ name: "key_prefix", value: "kg" }]);

    const upgraded = await started({ dataDir, env: { KEYGATE_PEPPER: release.pepper } });
    expect(await answers(upgraded, releaseActiveKey("sqlite"))).toEqual(KEPT);
  });

  it("keygate serve with another KEYGATE_KEY_PREFIX exits 2 with the one line, and listens on nothing", async () => {
    const { dataDir } = await keyedDataDir();
    const cwd = tempDir();
    const env = { KEYGATE_DATA_DIR: dataDir, KEYGATE_KEY_PREFIX: "acme", KEYGATE_HOST: "127.0.0.1", KEYGATE_GRPC_PORT: "0", KEYGATE_HTTP_AUTHZ_PORT: "0", KEYGATE_ADMIN_PORT: "0" };
    const result = await serveUntilExit(cwd, env, children);
    expect({ code: result.code, stderr: result.stderr }).toEqual({ code: 2, stderr: `keygate: ${mismatch("acme", "kg")}\n` });
    expect(result.stdout).not.toContain("keygate listening");
  });
});

const mongoReady = requireServer("MongoDB-wire server", mongoWireAvailable(), "run .ci/install-mongo-wire.sh");

describe.runIf(mongoReady)("key prefix check, MongoDB", () => {
  let mongo: MongoWire;
  let database = 0;
  /** A fresh database on the test server for each case. */
  const freshUri = (): string => mongo.uri.replace(/\/([^/?]*)(\?.*)?$/, (_match, name: string, query: string | undefined) => `/${name}_prefix_${++database}${query ?? ""}`);
  const PEPPER = "mongo-prefix-pepper-of-at-least-32-characters-01";
  const mongoEnv = (uri: string, extra: Record<string, string> = {}): Record<string, string> => ({ KEYGATE_MONGODB_URI: uri, KEYGATE_PEPPER: PEPPER, ...extra });

  beforeAll(async () => {
    mongo = await startMongoWire();
  });
  afterAll(async () => {
    await mongo?.stop();
  });

  /** The keygate_schema document of the database at `uri`. */
  async function schemaDoc(uri: string): Promise<mongoose.mongo.Document | null> {
    const client = await mongoose.mongo.MongoClient.connect(uri);
    try {
      return await client.db().collection<{ _id: string }>("keygate_schema").findOne({ _id: "schema" });
    } finally {
      await client.close();
    }
  }

  it("error: a replica with another KEYGATE_KEY_PREFIX on the same MongoDB is refused; the first keeps serving", async () => {
    const uri = freshUri();
    const first = await started({ dataDir: tempDir(), env: mongoEnv(uri) });
    const created = await first.admin.createKey({ ownerId: "mongo-prefix", name: "k" });
    const error = await refusedStart({ dataDir: tempDir(), env: mongoEnv(uri, { KEYGATE_KEY_PREFIX: "acme" }) });
    expect(error).toBeInstanceOf(ConfigError);
    expect(error.message).toBe(mismatch("acme", "kg"));
    expect(await answers(first, created.secret)).toEqual(KEPT);
    expect(await schemaDoc(uri)).toMatchObject({ key_prefix: "kg" });
  });

  it("error: replicas starting at once on a new database with different prefixes: exactly one serves", async () => {
    const uri = freshUri();
    const outcomes = await Promise.allSettled(["kg", "acme", "zeta"].map((prefix) => startKeygate({ dataDir: tempDir(), env: mongoEnv(uri, { KEYGATE_KEY_PREFIX: prefix }) })));
    for (const outcome of outcomes) if (outcome.status === "fulfilled") running.push(outcome.value);
    const served = outcomes.flatMap((outcome) => (outcome.status === "fulfilled" ? [outcome.value] : []));
    expect(served).toHaveLength(1);
    const refusals = outcomes.flatMap((outcome) => (outcome.status === "rejected" ? [outcome.reason] : []));
    expect(refusals).toHaveLength(2);
    for (const reason of refusals) expect(reason).toBeInstanceOf(ConfigError);
    const created = await served[0]?.admin.createKey({ ownerId: "mongo-prefix-race", name: "k" });
    const recorded = (await schemaDoc(uri))?.["key_prefix"];
    expect(created?.secret.startsWith(`${String(recorded)}_live_`)).toBe(true);
  });

  it("error: the release's database (keys, no prefix recorded) started with another prefix is refused, naming the prefix its keys carry; with that one, its keys work", async () => {
    const uri = freshUri();
    // Every collection exactly as the release left it, types and all (canonical Extended JSON).
    const dump = mongoose.mongo.BSON.EJSON.parse(readFileSync(join(fixtureDir, "mongo.json"), "utf8"), { relaxed: false }) as Record<string, mongoose.mongo.Document[]>;
    const client = await mongoose.mongo.MongoClient.connect(uri);
    try {
      for (const [name, docs] of Object.entries(dump)) if (docs.length > 0) await client.db().collection(name).insertMany(docs);
    } finally {
      await client.close();
    }
    const releaseEnv = { KEYGATE_MONGODB_URI: uri, KEYGATE_PEPPER: release.pepper };
    const error = await refusedStart({ dataDir: tempDir(), env: { ...releaseEnv, KEYGATE_KEY_PREFIX: "acme" } });
    expect(error).toBeInstanceOf(ConfigError);
    expect(error.message).toBe(mismatch("acme", "kg"));
    const upgraded = await started({ dataDir: tempDir(), env: releaseEnv });
    expect(await answers(upgraded, releaseActiveKey("mongo"))).toEqual(KEPT);
    expect(await schemaDoc(uri)).toMatchObject({ key_prefix: "kg" });
  });
});
