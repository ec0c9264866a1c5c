import { copyFileSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { DatabaseSync } from "node:sqlite";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { ConfigError } from "../../src/config.js";
import { SqliteKeyStore } from "../../src/store/sqlite.js";
import { checkInit, checkOutcome, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { mongoWireAvailable, startMongoWire } from "../harness/mongo-wire.js";
import type { MongoWire } from "../harness/mongo-wire.js";
import { requireServer } from "../harness/ports.js";

// A store records which pepper its key hashes were made with (a check value, src/keys/pepper-check.ts).
// A start with any other pepper would answer every key as unknown while reporting ready, so it is
// refused, naming where the pepper came from; never silently served.

const ALLOWED = { status: 200, code: null };
const OTHER_PEPPER = "another-pepper-of-at-least-32-characters-0123";
const fixtureDir = resolve(import.meta.dirname, "../fixtures/upgrade/1dffb08");
const release = JSON.parse(readFileSync(join(fixtureDir, "release.json"), "utf8")) as { pepper: string };
const releaseKeys = (JSON.parse(readFileSync(join(fixtureDir, "sqlite-expected.json"), "utf8")) as { keys: { active: { secret: string } } }).keys;

const dirs: string[] = [];
const running: TestKeygate[] = [];
afterEach(async () => {
  for (const k of running.splice(0)) await k.stop({ keepData: true }).catch(() => undefined);
});
afterAll(() => {
  for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
});

function tempDir(): string {
  const dir = mkdtempSync(join(tmpdir(), "keygate-pepper-"));
  dirs.push(dir);
  return dir;
}

async function started(options: Parameters<typeof startKeygate>[0]): Promise<TestKeygate> {
  const keygate = await startKeygate(options);
  running.push(keygate);
  return keygate;
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

/** A data directory whose first start (generated pepper) issued a key that works. */
async function keyedDataDir(): Promise<{ dataDir: string; secret: string; pepper: string }> {
  const dataDir = tempDir();
  const first = await startKeygate({ dataDir });
  const created = await first.admin.createKey({ ownerId: "pepper-owner", name: "k" });
  expect(checkOutcome(await first.check(checkInit({ "x-api-key": created.secret })))).toEqual(ALLOWED);
  await first.stop({ keepData: true });
  return { dataDir, secret: created.secret, pepper: readFileSync(join(dataDir, "pepper"), "utf8").trim() };
}

/** The pino lines of `level` (40 warn) in a test keygate's log. */
function logged(keygate: TestKeygate, level: number): Array<Record<string, unknown>> {
  return keygate.logLines.map((line) => JSON.parse(line) as Record<string, unknown>).filter((entry) => entry["level"] === level);
}

describe("pepper check, embedded.happy", () => {
  it("the generated data/pepper given as KEYGATE_PEPPER byte for byte, trailing newline included, keeps every key; one warning names the variable", async () => {
    const { dataDir, secret, pepper } = await keyedDataDir();
    // What `kubectl create secret generic --from-file=pepper=data/pepper` and secretKeyRef give.
    const fileBytes = readFileSync(join(dataDir, "pepper"), "utf8");
    expect(fileBytes).toBe(`${pepper}\n`);

    const trimmed = await started({ dataDir, env: { KEYGATE_PEPPER: pepper } });
    expect(checkOutcome(await trimmed.check(checkInit({ "x-api-key": secret })))).toEqual(ALLOWED);
    expect(logged(trimmed, 40)).toEqual([]);
    await trimmed.stop({ keepData: true });
    running.pop();

    const asFile = await started({ dataDir, env: { KEYGATE_PEPPER: fileBytes } });
    expect(checkOutcome(await asFile.check(checkInit({ "x-api-key": secret })))).toEqual(ALLOWED);
    // A key made now is hashed with the pepper in force (the trimmed one), so the file's start knows it too.
    const later = await asFile.admin.createKey({ ownerId: "pepper-owner-later", name: "later" });
    expect(logged(asFile, 40).map((entry) => [entry["variable"], entry["msg"]])).toEqual([
      [
        "KEYGATE_PEPPER",
        "KEYGATE_PEPPER ends with a line break or space that this store's keys were not hashed with; keygate uses it without them. Remove them from the secret",
      ],
    ]);
    expect(asFile.logLines.join("")).not.toContain(pepper);
    await asFile.stop({ keepData: true });
    running.pop();

    const fromFile = await started({ dataDir });
    expect(checkOutcome(await fromFile.check(checkInit({ "x-api-key": later.secret })))).toEqual(ALLOWED);
  });

  it("a data directory made by `keygate migrate` (a database with no keys, no pepper file) gets a pepper generated at its first start", async () => {
    const dataDir = tempDir();
    await new SqliteKeyStore(join(dataDir, "keygate.db")).close();
    const keygate = await started({ dataDir });
    expect(existsSync(join(dataDir, "pepper"))).toBe(true);
    const created = await keygate.admin.createKey({ ownerId: "migrated-first", name: "k" });
    expect(checkOutcome(await keygate.check(checkInit({ "x-api-key": created.secret })))).toEqual(ALLOWED);
  });

  it("the first start on a database of the release before the check records it: the release's keys work, and another pepper is then refused", async () => {
    const dataDir = tempDir();
    copyFileSync(join(fixtureDir, "sqlite/keygate.db"), join(dataDir, "keygate.db"));
    const upgraded = await started({ dataDir, env: { KEYGATE_PEPPER: release.pepper } });
    expect(checkOutcome(await upgraded.check(checkInit({ authorization: `Bearer ${releaseKeys.active.secret}` })))).toEqual(ALLOWED);
    await upgraded.stop({ keepData: true });
    running.pop();

    const error = await refusedStart({ dataDir, env: { KEYGATE_PEPPER: OTHER_PEPPER } });
    expect(error).toBeInstanceOf(ConfigError);
    expect(error.message).toBe(
      `KEYGATE_PEPPER is not the pepper this store's keys were hashed with: every key would be unknown. Restore the pepper the store was created with (${join(dataDir, "pepper")}, or the keygate-secrets Secret)`,
    );
  });
});

describe("pepper check, embedded.error", () => {
  it("data/pepper deleted: the start is refused and no pepper is generated; put back, every key works", async () => {
    const { dataDir, secret, pepper } = await keyedDataDir();
    const file = join(dataDir, "pepper");
    rmSync(file);
    const error = await refusedStart({ dataDir });
    expect(error).toBeInstanceOf(ConfigError);
    expect(error.message).toBe(
      `${file} is missing but the data directory holds keys: a new pepper would make every key unknown. Restore it from a backup, or set KEYGATE_PEPPER to the pepper the keys were made with`,
    );
    expect(existsSync(file)).toBe(false);

    // The refused start let go of the data directory and the database.
    writeFileSync(file, `${pepper}\n`, { mode: 0o600 });
    const restored = await started({ dataDir });
    expect(checkOutcome(await restored.check(checkInit({ "x-api-key": secret })))).toEqual(ALLOWED);
  });

  it("data/pepper replaced by another value: the start is refused, naming the file", async () => {
    const { dataDir, pepper } = await keyedDataDir();
    const file = join(dataDir, "pepper");
    writeFileSync(file, `${OTHER_PEPPER}\n`, { mode: 0o600 });
    const error = await refusedStart({ dataDir });
    expect(error).toBeInstanceOf(ConfigError);
    expect(error.message).toBe(
      `${file} is not the pepper this store's keys were hashed with: every key would be unknown. Restore the ${file} the store was created with, or set KEYGATE_PEPPER to that pepper`,
    );
    expect(error.message).not.toContain(OTHER_PEPPER);
    expect(error.message).not.toContain(pepper);
  });

  it.each([
    ["another value", OTHER_PEPPER],
    ["another value with a trailing newline", `${OTHER_PEPPER}\n`],
  ])("KEYGATE_PEPPER set to %s: the start is refused, naming the variable", async (_name, value) => {
    const { dataDir, pepper } = await keyedDataDir();
    const error = await refusedStart({ dataDir, env: { KEYGATE_PEPPER: value } });
    expect(error).toBeInstanceOf(ConfigError);
    expect(error.message).toBe(
      `KEYGATE_PEPPER is not the pepper this store's keys were hashed with: every key would be unknown. Restore the pepper the store was created with (${join(dataDir, "pepper")}, or the keygate-secrets Secret)`,
    );
    expect(error.message).not.toContain(OTHER_PEPPER);
    expect(error.message).not.toContain(pepper);
  });

  it("the release's data directory without its pepper (keys, but no check recorded yet): the start is refused and no pepper is generated", async () => {
    const dataDir = tempDir();
    copyFileSync(join(fixtureDir, "sqlite/keygate.db"), join(dataDir, "keygate.db"));
    const error = await refusedStart({ dataDir });
    expect(error.message).toBe(
      `${join(dataDir, "pepper")} is missing but the data directory holds keys: a new pepper would make every key unknown. Restore it from a backup, or set KEYGATE_PEPPER to the pepper the keys were made with`,
    );
    expect(existsSync(join(dataDir, "pepper"))).toBe(false);
    // Nothing was written to the release's file: not even a schema step.
    const db = new DatabaseSync(join(dataDir, "keygate.db"), { readOnly: true });
    try {
      expect(db.prepare("PRAGMA user_version").get()?.["user_version"]).toBe(0);
    } finally {
      db.close();
    }
  });
});

const mongoReady = requireServer("MongoDB-wire server", mongoWireAvailable(), "run .ci/install-mongo-wire.sh");

describe.runIf(mongoReady)("pepper check, MongoDB", () => {
  let mongo: MongoWire;
  let database = 0;
  /** A fresh database on the test server for each case. */
  const freshUri = (): string => mongo.uri.replace(/\/([^/?]*)(\?.*)?$/, (_match, name: string, query: string | undefined) => `/${name}_pepper_${++database}${query ?? ""}`);
  const PEPPER = "mongo-pepper-of-at-least-32-characters-0123456";

  beforeAll(async () => {
    mongo = await startMongoWire();
  });
  afterAll(async () => {
    await mongo?.stop();
  });

  it("error: a second keygate with another pepper on the same MongoDB is refused; the first keeps serving", async () => {
    const uri = freshUri();
    const first = await started({ dataDir: tempDir(), env: { KEYGATE_MONGODB_URI: uri, KEYGATE_PEPPER: PEPPER } });
    const created = await first.admin.createKey({ ownerId: "mongo-pepper", name: "k" });
    const error = await refusedStart({ dataDir: tempDir(), env: { KEYGATE_MONGODB_URI: uri, KEYGATE_PEPPER: OTHER_PEPPER } });
    expect(error).toBeInstanceOf(ConfigError);
    expect(error.message).toBe(
      "KEYGATE_PEPPER is not the pepper this store's keys were hashed with: every key would be unknown. Restore the pepper the store was created with (the keygate-secrets Secret; every replica needs the same one)",
    );
    expect(error.message).not.toContain(OTHER_PEPPER);
    expect(error.message).not.toContain(PEPPER);
    expect(checkOutcome(await first.check(checkInit({ "x-api-key": created.secret })))).toEqual(ALLOWED);
  });

  it("happy: a replica given the pepper with a trailing newline joins, warns once naming KEYGATE_PEPPER, and knows every key", async () => {
    const uri = freshUri();
    const first = await started({ dataDir: tempDir(), env: { KEYGATE_MONGODB_URI: uri, KEYGATE_PEPPER: PEPPER } });
    const created = await first.admin.createKey({ ownerId: "mongo-newline", name: "k" });
    const second = await started({ dataDir: tempDir(), env: { KEYGATE_MONGODB_URI: uri, KEYGATE_PEPPER: `${PEPPER}\r\n` } });
    expect(checkOutcome(await second.check(checkInit({ "x-api-key": created.secret })))).toEqual(ALLOWED);
    expect(logged(second, 40).map((entry) => entry["variable"])).toEqual(["KEYGATE_PEPPER"]);
    expect(second.logLines.join("")).not.toContain(PEPPER);
  });

  it("error: replicas starting at once with different peppers: exactly one serves", async () => {
    const uri = freshUri();
    const outcomes = await Promise.allSettled(
      [PEPPER, OTHER_PEPPER, `${OTHER_PEPPER}x`].map((pepper) => startKeygate({ dataDir: tempDir(), env: { KEYGATE_MONGODB_URI: uri, KEYGATE_PEPPER: pepper } })),
    );
    for (const outcome of outcomes) if (outcome.status === "fulfilled") running.push(outcome.value);
    expect(outcomes.filter((outcome) => outcome.status === "fulfilled")).toHaveLength(1);
    const refusals = outcomes.flatMap((outcome) => (outcome.status === "rejected" ? [outcome.reason] : []));
    expect(refusals).toHaveLength(2);
    for (const reason of refusals) expect(reason).toBeInstanceOf(ConfigError);
  });
});
