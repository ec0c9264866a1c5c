import { closeSync, constants, fchmodSync, fstatSync, ftruncateSync, openSync, statSync, watch } from "node:fs";
import type { FSWatcher, Stats } from "node:fs";
import { stat } from "node:fs/promises";
import { join } from "node:path";
import { DatabaseSync } from "node:sqlite";
import type { Logger } from "pino";
import { ConfigError } from "../config.js";
import { SQLITE_BUSY, SQLITE_CORRUPT, SQLITE_LOCKED, SQLITE_NOTADB, namingFile, sqliteErrorCode } from "./sqlite-errors.js";

/**
 * How a keygate holds its data directory: `exclusive` without Redis (its caches, invalidations and
 * limits are its own), `shared` with Redis (keygates that share Redis hear each other's changes
 * and share limits, as replicas do, so they may share the directory with each other only).
 */
export type DataDirLockMode = "exclusive" | "shared";

/** The lock file in the data directory. */
export const LOCK_FILE = "keygate.lock";

/**
 * How long a shared lock waits for a lock held for a moment: a start that asks for the exclusive
 * lock and is refused holds SQLite's PENDING lock, which shuts out new shared locks, until it gives up.
 */
const SHARED_WAIT_MS = 2000;

/** How often the holder checks that keygate.lock is still the file it locked (besides watching it); the SQLite store does the same for keygate.db. */
export const RECHECK_MS = 1000;

const { O_APPEND, O_CREAT, O_NOFOLLOW, O_NONBLOCK, O_WRONLY } = constants;

/**
 * Runs `use` on keygate.lock opened (made if missing, owner-only), never through a symbolic link:
 * whoever can write the directory could point one at any file, and keygate would chmod it (and
 * empty it, were it not an SQLite file) with its own rights. Closed before SQLite locks the file:
 * closing any descriptor of a file drops every POSIX lock this process holds on it.
 */
function withLockFile<T>(path: string, use: (fd: number) => T): T {
  let fd: number;
  try {
    fd = openSync(path, O_WRONLY | O_CREAT | O_APPEND | O_NOFOLLOW | O_NONBLOCK, 0o600);
  } catch (error) {
    if (error instanceof Error && "code" in error && error.code === "ELOOP") {
      throw new ConfigError(`${path} is a symbolic link; keygate makes this file itself and never follows a link there: delete it`, { cause: error });
    }
    throw error;
  }
  try {
    return use(fd);
  } finally {
    closeSync(fd);
  }
}

/**
 * Takes the lock on `path`'s file; null when another process's lock is in the way. `waitMs`: how
 * long SQLite waits for a lock in the way to go (it waits on the calling thread).
 */
function tryLock(path: string, mode: DataDirLockMode, waitMs: number): DatabaseSync | null {
  // Owner-only, as everything in the data directory (it holds nothing, but nothing there is shared).
  withLockFile(path, (fd) => fchmodSync(fd, 0o600));
  const db = new DatabaseSync(path, { timeout: waitMs });
  try {
    if (mode === "exclusive") {
      db.exec("PRAGMA locking_mode = EXCLUSIVE");
      db.exec("BEGIN EXCLUSIVE");
    } else {
      // A read transaction holds SQLite's SHARED lock until it ends: any number of them at once,
      // and none beside an EXCLUSIVE one.
      db.exec("BEGIN");
      db.prepare("SELECT count(*) FROM sqlite_master").get();
    }
    return db;
  } catch (error) {
    db.close();
    const code = sqliteErrorCode(error);
    if (code === SQLITE_BUSY || code === SQLITE_LOCKED) return null;
    throw error;
  }
}

/** What holds a lock this process could not take: shared holders leave room for another shared one. */
function holderOf(path: string, refused: DataDirLockMode): DataDirLockMode {
  if (refused === "shared") return "exclusive";
  const probe = new DatabaseSync(path, { timeout: 0 });
  try {
    probe.exec("BEGIN");
    probe.prepare("SELECT count(*) FROM sqlite_master").get();
    return "shared";
  } catch {
    return "exclusive";
  } finally {
    probe.close();
  }
}

/**
 * Empties keygate.lock. One with another name too (a hard link to it) is left alone: emptying it
 * would empty that file, which may be anyone's.
 */
function emptyLockFile(path: string, fd: number): void {
  const links = fstatSync(fd).nlink;
  if (links > 1) throw new ConfigError(`${path} is not an SQLite file and has ${links - 1} other hard link(s); keygate empties only a lock file of its own: delete it`);
  ftruncateSync(fd, 0);
}

/** Whether two stats are of one file (device and inode). */
export function sameFile(a: Stats, b: Stats): boolean {
  return a.dev === b.dev && a.ino === b.ino;
}

/**
 * The embedded data directory's lock. Two processes on one directory without Redis (a second
 * start by mistake, a supervisor that starts the new process before the old one has gone, a volume
 * mounted by two pods on one node) would each keep their own caches, invalidations and in-process
 * limits over one database: a key revoked through one would pass through the other until its cache
 * entry expired, each would allow a plan's whole rate, and a balance would be spent twice. So a
 * keygate without Redis holds the directory alone, keygates with Redis hold it together, and a
 * start that would mix the two is refused.
 *
 * The lock is an SQLite lock on `keygate.lock` held open for the process's life (EXCLUSIVE, or a
 * read transaction's SHARED): the operating system lets it go with the process, however it ends,
 * so a crash leaves nothing to clean up and the lock is never stale. It is held on the file, not
 * its name: an operator who deletes keygate.lock for a stale lock file would free the name for a
 * second keygate, so the holder watches the name (and looks again every second) and locks the new
 * file at once, or logs an error-level line when another process got there first.
 */
export class DataDirLock {
  #db: DatabaseSync;
  #file: Stats;
  #watcher: FSWatcher | null = null;
  readonly #timer: NodeJS.Timeout;
  #checking = false;
  #released = false;
  /** The file another process locked after ours was deleted, reported once. */
  #reportedTaken: Stats | null = null;
  /** The file at the name (its device and inode, or "missing") that could not be locked, reported once. */
  #reportedFailure: string | null = null;

  private constructor(
    readonly path: string,
    readonly mode: DataDirLockMode,
    db: DatabaseSync,
    file: Stats,
    private readonly logger: Pick<Logger, "warn" | "error">,
  ) {
    this.#db = db;
    this.#file = file;
    this.#watch();
    this.#timer = setInterval(() => void this.#check(), RECHECK_MS);
    this.#timer.unref();
  }

  /**
   * Takes the directory in `mode`, or returns the mode the processes holding it have. A
   * keygate.lock that is not an SQLite file (an editor saved over it) holds nothing keygate wrote:
   * it is emptied in place, with a warning naming it, and locked. Any other failure names the file.
   */
  static acquire(dataDir: string, mode: DataDirLockMode, logger: Pick<Logger, "warn" | "error">): DataDirLock | { heldBy: DataDirLockMode } {
    const path = join(dataDir, LOCK_FILE);
    let db: DatabaseSync | null;
    try {
      db = DataDirLock.#lockRecovering(path, mode, mode === "shared" ? SHARED_WAIT_MS : 0, logger);
    } catch (error) {
      throw namingFile(path, error);
    }
    if (db === null) return { heldBy: holderOf(path, mode) };
    return new DataDirLock(path, mode, db, statSync(path), logger);
  }

  /** tryLock, once more after emptying a keygate.lock that SQLite cannot read. */
  static #lockRecovering(path: string, mode: DataDirLockMode, waitMs: number, logger: Pick<Logger, "warn">): DatabaseSync | null {
    try {
      return tryLock(path, mode, waitMs);
    } catch (error) {
      const code = sqliteErrorCode(error);
      if (code !== SQLITE_NOTADB && code !== SQLITE_CORRUPT) throw error;
      // Emptied, never deleted and made anew: a process holding the file keeps holding it, and
      // every start still meets its lock on this one file.
      withLockFile(path, (fd) => emptyLockFile(path, fd));
      logger.warn({ file: path, problem: error instanceof Error ? error.message : String(error) }, "keygate.lock was not a lock file keygate made; emptied it (it holds no data)");
      return tryLock(path, mode, waitMs);
    }
  }

  /** Checks that keygate.lock is still the file this process locked, on any change to it. */
  #watch(): void {
    this.#watcher?.close();
    try {
      this.#watcher = watch(this.path, { persistent: false }, () => void this.#check());
      // A file system that cannot be watched (some network ones) is still checked every second.
      this.#watcher.on("error", () => undefined);
    } catch {
      this.#watcher = null;
    }
  }

  async #check(): Promise<void> {
    if (this.#checking || this.#released) return;
    this.#checking = true;
    try {
      const now = await stat(this.path).catch(() => null);
      if (this.#released || (now !== null && sameFile(now, this.#file))) return;
      this.#relock();
    } catch (error) {
      this.logger.error({ file: this.path, err: error }, "could not check that keygate.lock is still the file this keygate locked");
    } finally {
      this.#checking = false;
    }
  }

  /**
   * keygate.lock was deleted or replaced: locks the file now at that name, made anew if missing,
   * as a start would (one SQLite cannot read, such as a text file an editor saved over it, is
   * emptied and locked). A failure is logged once per file: the look every second repeats it.
   */
  #relock(): void {
    let db: DatabaseSync | null;
    try {
      // No wait: this runs on a serving keygate's event loop.
      db = DataDirLock.#lockRecovering(this.path, this.mode, 0, this.logger);
    } catch (error) {
      const file = statSync(this.path, { throwIfNoEntry: false });
      const failed = file === undefined ? "missing" : `${file.dev}:${file.ino}`;
      if (failed === this.#reportedFailure) return;
      this.#reportedFailure = failed;
      this.logger.error({ file: this.path, err: namingFile(this.path, error) }, "keygate.lock was deleted or replaced while this keygate held it, and could not be locked again");
      return;
    }
    this.#reportedFailure = null;
    const now = statSync(this.path, { throwIfNoEntry: false });
    if (now === undefined) {
      // Deleted again meanwhile: the next look locks what is there then.
      db?.close();
      return;
    }
    if (db === null) {
      if (this.#reportedTaken !== null && sameFile(now, this.#reportedTaken)) return;
      this.#reportedTaken = now;
      this.logger.error(
        { file: this.path },
        "keygate.lock was deleted or replaced while this keygate held it, and another keygate has locked the new one: two keygates may be serving this data directory, each with its own limits; stop one. The lock is never stale: do not delete keygate.lock",
      );
      return;
    }
    const previous = this.#db;
    this.#db = db;
    this.#file = now;
    this.#reportedTaken = null;
    previous.close();
    this.#watch();
    this.logger.warn(
      { file: this.path },
      "keygate.lock was deleted or replaced while this keygate held it; locked the file now there. The lock is never stale (the operating system releases it when the process ends): do not delete keygate.lock",
    );
  }

  release(): void {
    this.#released = true;
    clearInterval(this.#timer);
    this.#watcher?.close();
    this.#watcher = null;
    if (this.#db.isOpen) this.#db.close();
  }
}
