import type { ChildProcess } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, truncateSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { ADMIN_TOKEN, postJson } from "../harness/keygate.js";
import { embeddedEnv, serveUntilExit, spawnKeygate } from "../harness/process.js";
import type { KeygateProcess } from "../harness/process.js";

// A start on a data directory with a damaged file names the file: "file is not a database" alone
// is the same for keygate.db and keygate.lock, and an operator told only that may restore
// keygate.db from a backup, losing what was written since, when keygate.lock was at fault.
// keygate.lock holds no data (its SQLite lock is all it is for), so one that is not an SQLite file
// (an editor saved over it) is emptied and locked, with a warning naming it; a damaged keygate.db
// stops the start with one line naming it (exit 1).

const children = new Set<ChildProcess>();
const running: KeygateProcess[] = [];
const dirs: string[] = [];
afterAll(async () => {
  for (const child of children) child.kill("SIGKILL");
  await Promise.all(running.map((p) => p.stop("SIGKILL").catch(() => null)));
  for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
});

function tempDir(): string {
  const dir = mkdtempSync(join(tmpdir(), "keygate-damaged-files-"));
  dirs.push(dir);
  return dir;
}

describe("embedded keygate: a start on damaged data directory files: happy", () => {
  it("empties a keygate.lock that is not an SQLite file, says so naming it, locks it and serves", async () => {
    const dir = tempDir();
    const dataDir = join(dir, "data");
    mkdirSync(dataDir);
    const lockFile = join(dataDir, "keygate.lock");
    writeFileSync(lockFile, "this is not a lock database, an editor saved it\n".repeat(200));
    const keygate = await spawnKeygate({ cwd: dir, env: embeddedEnv({ dataDir, adminToken: ADMIN_TOKEN, extra: { KEYGATE_LOG_LEVEL: "info" } }) });
    running.push(keygate);
    const warnings = keygate
      .stdout()
      .split("\n")
      .filter((line) => line.includes("keygate.lock was not a lock file keygate made"))
      .map((line) => JSON.parse(line) as Record<string, unknown>);
    expect(warnings.map(({ level, file, problem, msg }) => ({ level, file, problem, msg }))).toEqual([
      { level: 40, file: lockFile, problem: "file is not a database", msg: "keygate.lock was not a lock file keygate made; emptied it (it holds no data)" },
    ]);
    expect(statSync(lockFile).size).toBe(0);
    expect((await postJson(keygate.ports.admin, "CreateKey", { ownerId: "damaged-lock", name: "k" })).status).toBe(200);
    // The emptied file is this keygate's lock: a second start is refused.
    const second = await serveUntilExit(dir, embeddedEnv({ dataDir, adminToken: ADMIN_TOKEN }), children);
    expect(second.code).toBe(2);
    expect(second.stderr).toContain(`KEYGATE_DATA_DIR ${dataDir} is in use by another keygate process`);
    expect(await keygate.stop("SIGTERM")).toBe(0);
  }, 60_000);
});

describe("embedded keygate: a start on damaged data directory files: error", () => {
  it("names keygate.db when the database file is truncated", async () => {
    const dir = tempDir();
    const dataDir = join(dir, "data");
    const env = embeddedEnv({ dataDir, adminToken: ADMIN_TOKEN });
    const first = await spawnKeygate({ cwd: dir, env });
    expect(await first.stop("SIGTERM")).toBe(0);
    const db = join(dataDir, "keygate.db");
    expect(readFileSync(db).length).toBeGreaterThan(8192);
    truncateSync(db, 5000);
    const exited = await serveUntilExit(dir, env, children);
    expect(exited.code).toBe(1);
    expect(exited.stderr).toBe(`keygate: could not start: ${db}: database disk image is malformed\n`);
  }, 60_000);

  it("names keygate.db when it is not an SQLite file, before a pepper is generated beside it", async () => {
    const dir = tempDir();
    const dataDir = join(dir, "data");
    mkdirSync(dataDir);
    const db = join(dataDir, "keygate.db");
    writeFileSync(db, "not a database either\n".repeat(400));
    const exited = await serveUntilExit(dir, embeddedEnv({ dataDir, adminToken: ADMIN_TOKEN }), children);
    expect(exited.code).toBe(1);
    expect(exited.stderr).toBe(`keygate: could not start: ${db}: file is not a database\n`);
    expect(existsSync(join(dataDir, "pepper"))).toBe(false);
  }, 60_000);
});
