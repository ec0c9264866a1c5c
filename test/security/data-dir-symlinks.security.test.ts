import { existsSync, lchownSync, linkSync, mkdtempSync, readFileSync, renameSync, rmSync, statSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pino } from "pino";
import { afterAll, describe, expect, it } from "vitest";
import { DataDirLock } from "../../src/store/data-dir-lock.js";
import { ADMIN_TOKEN } from "../harness/keygate.js";
import { until } from "../harness/poll.js";
import { requireServer } from "../harness/ports.js";
import { embeddedEnv, spawnedKeygates } from "../harness/process.js";

// keygate makes keygate.lock, admin-token.unshown, keygate.db and its WAL files itself, so one of
// them being a symbolic link another user owns means someone who can write the data directory (an
// emptyDir is 0777) put it there. Opened through it, keygate would chmod 600 and empty the file it
// leads to, or SQLite would write into it, with keygate's rights (root under a plain `npm start`
// as root). A link at keygate.lock or admin-token.unshown, and one at keygate.db or its journal
// files owned by another user than keygate's or root, stops the start (exit 2) with one line
// naming it, and the file it leads to is left as it was; keygate's own link at keygate.db (a
// database kept on another volume) is followed. (data/pepper and data/admin-token may be links: a
// Secret volume's files are; test/security/data-dir-planted-secrets.security.test.ts covers who
// may own them.)

const { tempDataDir, startOutcome } = spawnedKeygates("keygate-data-dir-symlinks-");
/** Another user, for links only root can give away (CI runs as root). */
const FOREIGN_UID = 65534;
const isRoot = requireServer("root (to plant another user's links)", typeof process.geteuid === "function" && process.geteuid() === 0, "run the suite as root");

const VICTIM_TEXT = "precious operator data, not keygate's\n";
const REFUSED = "is a symbolic link; keygate makes this file itself and never follows a link there: delete it";

/** A 0644 file outside the data directory, whose content and mode must survive the start. */
function victimIn(dir: string): string {
  const victim = join(dir, "victim.txt");
  writeFileSync(victim, VICTIM_TEXT, { mode: 0o644 });
  return victim;
}

function victimState(victim: string): { text: string; mode: string } {
  return { text: readFileSync(victim, "utf8"), mode: (statSync(victim).mode & 0o777).toString(8) };
}

const UNTOUCHED = { text: VICTIM_TEXT, mode: "644" };


/** The refusal of a link at the database's names that uid 65534 owns. */
const foreignLink = (path: string): string =>
  `keygate: ${path} is a symbolic link owned by uid ${FOREIGN_UID}, not by the user keygate runs as (nor root): another user may have put it there, and keygate would write through it. Delete it, or if it is yours, chown -h it to the user keygate runs as`;

/** A symbolic link at `at` to `target`, owned by `owner` (65534: another user; lchown needs root). */
function plantLink(target: string, at: string, owner: number | null): void {
  symlinkSync(target, at);
  if (owner !== null) lchownSync(at, owner, owner);
}

describe("a symbolic link at the name of a file keygate makes: security", { timeout: 60_000 }, () => {
  for (const name of ["keygate.lock", "keygate.db", "keygate.db-wal", "keygate.db-shm"]) {
    it.runIf(isRoot)(`${name}: another user's link refuses the start, naming it, and leaves the file it leads to alone`, async () => {
      const { dir, dataDir } = tempDataDir();
      const victim = victimIn(dir);
      plantLink(victim, join(dataDir, name), FOREIGN_UID);
      const { code, lastLine } = await startOutcome(dir, embeddedEnv({ dataDir, adminToken: ADMIN_TOKEN }));
      expect(victimState(victim)).toEqual(UNTOUCHED);
      expect({ code, lastLine }).toEqual({ code: 2, lastLine: name === "keygate.lock" ? `keygate: ${join(dataDir, name)} ${REFUSED}` : foreignLink(join(dataDir, name)) });
    });
  }

  for (const name of ["keygate.lock", "keygate.db"]) {
    it.runIf(isRoot)(`${name}: another user's link to nothing creates nothing where it leads`, async () => {
      const { dir, dataDir } = tempDataDir();
      const target = join(dir, "created-through-the-link");
      plantLink(target, join(dataDir, name), FOREIGN_UID);
      const { code, lastLine } = await startOutcome(dir, embeddedEnv({ dataDir, adminToken: ADMIN_TOKEN }));
      expect(existsSync(target)).toBe(false);
      expect({ code, lastLine }).toEqual({ code: 2, lastLine: name === "keygate.lock" ? `keygate: ${join(dataDir, name)} ${REFUSED}` : foreignLink(join(dataDir, name)) });
    });
  }

  it("keygate.lock: keygate's own link is refused too (keygate alone makes that file)", async () => {
    const { dir, dataDir } = tempDataDir();
    const victim = victimIn(dir);
    plantLink(victim, join(dataDir, "keygate.lock"), null);
    const { code, lastLine } = await startOutcome(dir, embeddedEnv({ dataDir, adminToken: ADMIN_TOKEN }));
    expect(victimState(victim)).toEqual(UNTOUCHED);
    expect({ code, lastLine }).toEqual({ code: 2, lastLine: `keygate: ${join(dataDir, "keygate.lock")} ${REFUSED}` });
  });

  it("keygate.db: keygate's own link to a database on another volume is followed: keygate starts and keeps its data there", async () => {
    const { dir, dataDir } = tempDataDir();
    const elsewhere = join(dir, "elsewhere.db");
    plantLink(elsewhere, join(dataDir, "keygate.db"), null);
    const { code } = await startOutcome(dir, embeddedEnv({ dataDir, adminToken: ADMIN_TOKEN }));
    expect(code).toBe("served");
    expect((statSync(elsewhere).mode & 0o777).toString(8)).toBe("600");
  });

  it("admin-token.unshown: the first start, which generates the admin token, refuses it and leaves the file it leads to alone", async () => {
    const { dir, dataDir } = tempDataDir();
    const victim = victimIn(dir);
    symlinkSync(victim, join(dataDir, "admin-token.unshown"));
    const env = embeddedEnv({ dataDir, adminToken: ADMIN_TOKEN });
    delete env["KEYGATE_ADMIN_TOKENS"];
    const { code, lastLine } = await startOutcome(dir, env);
    expect(victimState(victim)).toEqual(UNTOUCHED);
    expect({ code, lastLine }).toEqual({ code: 2, lastLine: `keygate: ${join(dataDir, "admin-token.unshown")} ${REFUSED}` });
  });

  it("keygate.lock: a hard link to another file that is no SQLite file is not emptied", async () => {
    const { dir, dataDir } = tempDataDir();
    const victim = victimIn(dir);
    linkSync(victim, join(dataDir, "keygate.lock"));
    const { code, lastLine } = await startOutcome(dir, embeddedEnv({ dataDir, adminToken: ADMIN_TOKEN }));
    expect(readFileSync(victim, "utf8")).toBe(VICTIM_TEXT);
    expect({ code, lastLine }).toEqual({
      code: 2,
      lastLine: `keygate: ${join(dataDir, "keygate.lock")} is not an SQLite file and has 1 other hard link(s); keygate empties only a lock file of its own: delete it`,
    });
  });
});

describe("a symbolic link put at keygate.lock while keygate holds the directory: security", () => {
  const root = mkdtempSync(join(tmpdir(), "keygate-lock-relink-"));
  afterAll(() => rmSync(root, { recursive: true, force: true }));

  it("is not followed: the holder logs an error naming keygate.lock, and the file it leads to keeps its content and mode", async () => {
    const dataDir = mkdtempSync(join(root, "data-"));
    const victim = victimIn(root);
    const lines: Array<{ level: number; file?: string; err?: { message?: string }; msg: string }> = [];
    const logger = pino({ level: "warn", base: null, timestamp: false }, { write: (line: string) => void lines.push(JSON.parse(line) as (typeof lines)[number]) });
    const lock = DataDirLock.acquire(dataDir, "exclusive", logger);
    if (!(lock instanceof DataDirLock)) throw new Error("the fresh data directory is held");
    try {
      const lockFile = join(dataDir, "keygate.lock");
      symlinkSync(victim, join(dataDir, "planted"));
      renameSync(join(dataDir, "planted"), lockFile);
      await until(() => lines.length > 0, 5000, "the holder to report the change at keygate.lock");
      expect(victimState(victim)).toEqual(UNTOUCHED);
      expect(lines.map(({ level, file, err, msg }) => ({ level, file, err: err?.message, msg }))).toEqual([
        { level: 50, file: lockFile, err: expect.stringContaining(`${lockFile} ${REFUSED}`), msg: "keygate.lock was deleted or replaced while this keygate held it, and could not be locked again" },
      ]);
    } finally {
      lock.release();
    }
  });
});
