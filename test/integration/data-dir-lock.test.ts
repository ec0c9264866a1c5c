import { mkdtempSync, readFileSync, renameSync, rmSync, unlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pino } from "pino";
import type { Logger } from "pino";
import { afterAll, describe, expect, it } from "vitest";
import { DataDirLock } from "../../src/store/data-dir-lock.js";
import type { DataDirLockMode } from "../../src/store/data-dir-lock.js";
import { startKeygate } from "../harness/keygate.js";
import { until } from "../harness/poll.js";

// One embedded data directory, one serving keygate without Redis: a second on it would keep
// caches and limits of its own over the same database, and a key revoked through one would pass
// through the other. Processes sharing Redis hear each other's changes, as replicas do, and may
// share it with each other (test/integration/charge-usage.test.ts runs two on one directory), never
// with one without Redis (test/e2e/sqlite-lock-mixed-redis.test.ts, across processes).

const root = mkdtempSync(join(tmpdir(), "keygate-data-dir-lock-"));
afterAll(() => rmSync(root, { recursive: true, force: true }));

interface LogLine {
  level: number;
  file?: string;
  msg: string;
}

/** A logger that keeps the lines a lock wrote (warn and above). */
function recordingLogger(): { lines: LogLine[]; logger: Logger } {
  const lines: LogLine[] = [];
  return { lines, logger: pino({ level: "warn", base: null, timestamp: false }, { write: (line: string) => void lines.push(JSON.parse(line) as LogLine) }) };
}

function held(result: DataDirLock | { heldBy: DataDirLockMode }): DataDirLock {
  if (!(result instanceof DataDirLock)) throw new Error(`the directory is held (${result.heldBy})`);
  return result;
}

describe("the embedded data directory", () => {
  it("is refused to a second keygate while the first serves, and taken again once it has stopped", async () => {
    const dataDir = mkdtempSync(join(root, "serve-"));
    const first = await startKeygate({ dataDir });
    try {
      await expect(startKeygate({ dataDir })).rejects.toThrow(
        `KEYGATE_DATA_DIR ${dataDir} is in use by another keygate process (one without Redis, which holds ${join(dataDir, "keygate.lock")} alone); ` +
          "without Redis each embedded keygate needs a data directory of its own (replicas share MongoDB and Redis instead). " +
          "The lock is never stale: the operating system releases it when the process holding it ends, so do not delete keygate.lock",
      );
      // The first goes on serving.
      expect((await first.admin.createKey({ ownerId: "lock-owner", name: "k" })).key?.state).toBe("active");
    } finally {
      await first.stop({ keepData: true });
    }
    const second = await startKeygate({ dataDir });
    try {
      expect((await second.admin.listKeys({ ownerId: "lock-owner" })).keys.map((k) => k.name)).toEqual(["k"]);
    } finally {
      await second.stop({ keepData: true });
    }
  });

  it("is held by any number of shared holders together, by one exclusive holder alone, and says which holds it", () => {
    const dataDir = mkdtempSync(join(root, "modes-"));
    const { logger } = recordingLogger();
    const a = held(DataDirLock.acquire(dataDir, "shared", logger));
    const b = held(DataDirLock.acquire(dataDir, "shared", logger));
    try {
      expect(DataDirLock.acquire(dataDir, "exclusive", logger)).toEqual({ heldBy: "shared" });
    } finally {
      a.release();
      b.release();
    }
    const alone = held(DataDirLock.acquire(dataDir, "exclusive", logger));
    try {
      expect(DataDirLock.acquire(dataDir, "exclusive", logger)).toEqual({ heldBy: "exclusive" });
      expect(DataDirLock.acquire(dataDir, "shared", logger)).toEqual({ heldBy: "exclusive" });
    } finally {
      alone.release();
    }
    held(DataDirLock.acquire(dataDir, "shared", logger)).release();
  });

  it("security: stays held when keygate.lock is deleted: the holder locks the file made anew at once", async () => {
    for (const mode of ["exclusive", "shared"] as const) {
      const dataDir = mkdtempSync(join(root, `deleted-${mode}-`));
      const { lines, logger } = recordingLogger();
      const lock = held(DataDirLock.acquire(dataDir, mode, logger));
      try {
        unlinkSync(join(dataDir, "keygate.lock"));
        await until(() => lines.length > 0, 5000, "the holder to notice keygate.lock is gone");
        expect(lines).toEqual([
          {
            level: 40,
            file: join(dataDir, "keygate.lock"),
            msg: "keygate.lock was deleted or replaced while this keygate held it; locked the file now there. The lock is never stale (the operating system releases it when the process ends): do not delete keygate.lock",
          },
        ]);
        expect(DataDirLock.acquire(dataDir, "exclusive", logger)).toEqual({ heldBy: mode });
      } finally {
        lock.release();
      }
      held(DataDirLock.acquire(dataDir, "exclusive", logger)).release();
    }
  });

  it("security: stays held when an editor saves a text file over keygate.lock: the holder empties it and locks it, as a start would", async () => {
    for (const mode of ["exclusive", "shared"] as const) {
      const dataDir = mkdtempSync(join(root, `replaced-${mode}-`));
      const lockFile = join(dataDir, "keygate.lock");
      const holder = recordingLogger();
      const lock = held(DataDirLock.acquire(dataDir, mode, holder.logger));
      try {
        // An editor's save: a new file written beside it, then renamed over it.
        writeFileSync(join(dataDir, "keygate.lock.swp"), "this file is a lock, do not edit\n");
        renameSync(join(dataDir, "keygate.lock.swp"), lockFile);
        await until(() => holder.lines.some((line) => line.level === 40 && line.msg.includes("locked the file now there")), 5000, "the holder to lock the file saved over keygate.lock");
        expect(holder.lines).toEqual([
          { level: 40, file: lockFile, problem: "file is not a database", msg: "keygate.lock was not a lock file keygate made; emptied it (it holds no data)" },
          {
            level: 40,
            file: lockFile,
            msg: "keygate.lock was deleted or replaced while this keygate held it; locked the file now there. The lock is never stale (the operating system releases it when the process ends): do not delete keygate.lock",
          },
        ]);
        expect(readFileSync(lockFile, "utf8")).toBe("");
        // A second keygate without Redis is refused: it meets the holder's lock on the new file.
        expect(DataDirLock.acquire(dataDir, "exclusive", recordingLogger().logger)).toEqual({ heldBy: mode });
      } finally {
        lock.release();
      }
      held(DataDirLock.acquire(dataDir, "exclusive", recordingLogger().logger)).release();
    }
  });

  it("security: when another process locked the new keygate.lock first, the holder says at error level that two may serve", async () => {
    const dataDir = mkdtempSync(join(root, "raced-"));
    const holder = recordingLogger();
    const lock = held(DataDirLock.acquire(dataDir, "exclusive", holder.logger));
    // The other start comes between the delete and the holder's look (its watch and timer are
    // asynchronous, the delete and this start are not).
    unlinkSync(join(dataDir, "keygate.lock"));
    const other = held(DataDirLock.acquire(dataDir, "exclusive", recordingLogger().logger));
    try {
      await until(() => holder.lines.length > 0, 5000, "the holder to notice keygate.lock was replaced");
      expect(holder.lines).toEqual([
        {
          level: 50,
          file: join(dataDir, "keygate.lock"),
          msg: "keygate.lock was deleted or replaced while this keygate held it, and another keygate has locked the new one: two keygates may be serving this data directory, each with its own limits; stop one. The lock is never stale: do not delete keygate.lock",
        },
      ]);
    } finally {
      other.release();
      lock.release();
    }
  });
});
