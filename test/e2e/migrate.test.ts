import { execFile } from "node:child_process";
import { copyFileSync, existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { DatabaseSync } from "node:sqlite";
import { afterEach, describe, expect, it } from "vitest";
import { schemaVersion } from "../../src/store/sqlite-db.js";
import { SQLITE_MIGRATIONS, SQLITE_SCHEMA_VERSION } from "../../src/store/sqlite-migrations.js";
import { builtCli } from "../harness/built-cli.js";
import { spawnKeygate } from "../harness/process.js";

// `keygate migrate` and `keygate serve --no-migrate`, as an operator runs them, on the data the
// previous release wrote (test/fixtures/upgrade).
const root = resolve(import.meta.dirname, "../..");
const fixtureDb = join(root, "test/fixtures/upgrade/1dffb08/sqlite/keygate.db");
const pepper = (JSON.parse(readFileSync(join(root, "test/fixtures/upgrade/1dffb08/release.json"), "utf8")) as { pepper: string }).pepper;

function run(args: string[], env: Record<string, string>): Promise<{ code: number; stdout: string; stderr: string }> {
  const childEnv: NodeJS.ProcessEnv = {};
  for (const [name, value] of Object.entries(process.env)) if (!name.startsWith("KEYGATE_")) childEnv[name] = value;
  Object.assign(childEnv, env);
  return new Promise((done) => {
    execFile(process.execPath, [builtCli(), ...args], { env: childEnv, cwd: root, timeout: 60_000 }, (error, stdout, stderr) => {
      done({ code: error === null ? 0 : typeof error.code === "number" ? error.code : 1, stdout, stderr });
    });
  });
}

const dirs: string[] = [];
afterEach(() => {
  for (const dir of dirs.splice(0)) rmSync(dir, { recursive: true, force: true });
});

/** A data directory holding the previous release's database. */
function releaseDataDir(): string {
  const dir = mkdtempSync(join(tmpdir(), "keygate-migrate-cli-"));
  dirs.push(dir);
  copyFileSync(fixtureDb, join(dir, "keygate.db"));
  return dir;
}

function userVersion(path: string): number {
  const db = new DatabaseSync(path, { readOnly: true });
  try {
    return schemaVersion(db);
  } finally {
    db.close();
  }
}

describe("keygate migrate happy", () => {
  it("--dry-run lists the steps and changes nothing; migrate applies them; a second run has nothing to do", async () => {
    const dataDir = releaseDataDir();
    const env = { KEYGATE_DATA_DIR: dataDir, KEYGATE_PEPPER: pepper };
    const before = readFileSync(join(dataDir, "keygate.db"));
    const dry = await run(["migrate", "--dry-run"], env);
    expect(dry).toMatchObject({ code: 0, stderr: "" });
    const steps = SQLITE_MIGRATIONS.map((m) => `  ${m.version}: ${m.description}\n`).join("");
    expect(dry.stdout).toBe(`SQLite (${join(dataDir, "keygate.db")}): would apply ${SQLITE_MIGRATIONS.length} schema steps\n${steps}`);
    expect(dry.stdout).toContain("accounts.credit_period, monthly_used, topup_balance, topup_total");
    expect(readFileSync(join(dataDir, "keygate.db")).equals(before)).toBe(true);
    expect(userVersion(join(dataDir, "keygate.db"))).toBe(0);

    const applied = await run(["migrate"], env);
    expect(applied).toMatchObject({ code: 0, stderr: "" });
    expect(applied.stdout).toBe(`SQLite (${join(dataDir, "keygate.db")}): applied ${SQLITE_MIGRATIONS.length} schema steps\n${steps}`);
    expect(userVersion(join(dataDir, "keygate.db"))).toBe(SQLITE_SCHEMA_VERSION);

    const again = await run(["migrate"], env);
    expect(again).toEqual({ code: 0, stdout: `SQLite (${join(dataDir, "keygate.db")}): up to date, nothing to do\n`, stderr: "" });
  });

  it("--dry-run on a data directory with no database creates nothing", async () => {
    const dataDir = join(mkdtempSync(join(tmpdir(), "keygate-migrate-cli-")), "data");
    dirs.push(resolve(dataDir, ".."));
    const dry = await run(["migrate", "--dry-run"], { KEYGATE_DATA_DIR: dataDir });
    expect(dry.code).toBe(0);
    expect(dry.stdout.split("\n")[0]).toBe(`SQLite (${join(dataDir, "keygate.db")}, not there yet): would apply ${SQLITE_MIGRATIONS.length} schema steps`);
    expect(existsSync(dataDir)).toBe(false);
  });
});

describe("keygate migrate sad", () => {
  it("serve --no-migrate refuses a database that needs a step, naming it and the command, and leaves it as it was", async () => {
    const dataDir = releaseDataDir();
    const refused = await run(["serve", "--no-migrate"], { KEYGATE_DATA_DIR: dataDir, KEYGATE_PEPPER: pepper, KEYGATE_GRPC_PORT: "0", KEYGATE_HTTP_AUTHZ_PORT: "0", KEYGATE_ADMIN_PORT: "0", KEYGATE_HOST: "127.0.0.1" });
    expect(refused.code).toBe(1);
    expect(refused.stderr).toBe(`keygate: could not start: the SQLite database needs schema steps ${SQLITE_MIGRATIONS.map((m) => m.version).join(", ")}: run \`keygate migrate\`, or start without --no-migrate\n`);
    expect(userVersion(join(dataDir, "keygate.db"))).toBe(0);
  });

  it("migrate and serve refuse a database written by a newer keygate, exit 1, and change nothing", async () => {
    const dataDir = releaseDataDir();
    const db = new DatabaseSync(join(dataDir, "keygate.db"));
    db.exec(`PRAGMA user_version = ${SQLITE_SCHEMA_VERSION + 5}`);
    db.close();
    const env = { KEYGATE_DATA_DIR: dataDir, KEYGATE_PEPPER: pepper, KEYGATE_GRPC_PORT: "0", KEYGATE_HTTP_AUTHZ_PORT: "0", KEYGATE_ADMIN_PORT: "0", KEYGATE_HOST: "127.0.0.1" };
    const message = `the SQLite database is at schema version ${SQLITE_SCHEMA_VERSION + 5}, newer than this keygate knows (${SQLITE_SCHEMA_VERSION}): it was written by a newer keygate; run that version (or restore a backup made before the upgrade)`;
    expect(await run(["migrate"], env)).toEqual({ code: 1, stdout: "", stderr: `keygate: ${message}\n` });
    const served = await run(["serve"], env);
    expect(served.code).toBe(1);
    expect(served.stderr).toBe(`keygate: could not start: ${message}\n`);
    expect(userVersion(join(dataDir, "keygate.db"))).toBe(SQLITE_SCHEMA_VERSION + 5);
  });

  it("serve migrates on start by default and then serves", async () => {
    const dataDir = releaseDataDir();
    const keygate = await spawnKeygate({ cwd: root, env: { KEYGATE_DATA_DIR: dataDir, KEYGATE_PEPPER: pepper, KEYGATE_ADMIN_TOKENS: "kgadm_migrate_test_0123456789abcdef", KEYGATE_GRPC_PORT: "0", KEYGATE_HTTP_AUTHZ_PORT: "0", KEYGATE_ADMIN_PORT: "0", KEYGATE_HOST: "127.0.0.1" } });
    try {
      expect(userVersion(join(dataDir, "keygate.db"))).toBe(SQLITE_SCHEMA_VERSION);
    } finally {
      expect(await keygate.stop()).toBe(0);
    }
  });
});
