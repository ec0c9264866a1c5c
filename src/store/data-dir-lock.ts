import { chmodSync, closeSync, openSync } from "node:fs";
import { join } from "node:path";
import { DatabaseSync } from "node:sqlite";

/**
 * The embedded data directory, held by one serving keygate at a time when there is no Redis. Two
 * processes on one directory (a second start by mistake, a supervisor that starts the new process
 * before the old one has gone, a volume mounted by two pods on one node) would each keep their
 * own caches, invalidations and in-process limits over one database: a key revoked through one
 * would pass through the other until its cache entry expired, and each would allow a plan's whole
 * rate. So the second start is refused.
 *
 * The lock is an exclusive SQLite transaction on `keygate.lock`, held open for the process's
 * life: the operating system lets it go with the process, however it ends, so a crash leaves
 * nothing to clean up.
 */
export class DataDirLock {
  private constructor(private readonly db: DatabaseSync) {}

  /** Takes the directory, or returns null when another process holds it. */
  static acquire(dataDir: string): DataDirLock | null {
    const path = join(dataDir, "keygate.lock");
    // Owner-only, as everything in the data directory (it holds nothing, but nothing there is shared).
    closeSync(openSync(path, "a", 0o600));
    chmodSync(path, 0o600);
    const db = new DatabaseSync(path);
    try {
      db.exec("PRAGMA locking_mode = EXCLUSIVE");
      db.exec("BEGIN EXCLUSIVE");
      return new DataDirLock(db);
    } catch (error) {
      db.close();
      if (error instanceof Error && /locked|busy/i.test(error.message)) return null;
      throw error;
    }
  }

  release(): void {
    if (this.db.isOpen) this.db.close();
  }
}
