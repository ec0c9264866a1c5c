import { spawnSync } from "node:child_process";
import { closeSync, mkdirSync, mkdtempSync, openSync, rmSync, writeSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

/** Small tmpfs mounts for full-disk tests, under one fresh directory. */
export interface TmpfsMounts {
  /**
   * A tmpfs of `sizeMb` MB at `<root>/<name>`, or null when this process may not mount one:
   * mount(8) needs root, so a suite skips loudly without it (and fails in CI, which runs as root).
   */
  mount(name: string, sizeMb: number): string | null;
  /** Unmounts every mount and removes the root; call it once nothing has files open there. */
  remove(): void;
}

/** A fresh directory named from `tempPrefix` to mount tmpfs file systems under. */
export function tmpfsMounts(tempPrefix: string): TmpfsMounts {
  const root = mkdtempSync(join(tmpdir(), tempPrefix));
  const mounts: string[] = [];
  return {
    mount(name, sizeMb) {
      const mountPoint = join(root, name);
      mkdirSync(mountPoint);
      if (spawnSync("mount", ["-t", "tmpfs", "-o", `size=${sizeMb}m`, "tmpfs", mountPoint]).status !== 0) return null;
      mounts.push(mountPoint);
      return mountPoint;
    },
    remove() {
      // A lazy unmount as a last resort: a mount left behind would outlive the test run.
      for (const mountPoint of mounts) if (spawnSync("umount", [mountPoint]).status !== 0) spawnSync("umount", ["-l", mountPoint]);
      rmSync(root, { recursive: true, force: true });
    },
  };
}

/** Fills the file system holding `dir` to the last byte; returns the file that does. */
export function fillDisk(dir: string): string {
  const filler = join(dir, "filler");
  const fd = openSync(filler, "w");
  const chunk = Buffer.alloc(4096);
  try {
    for (;;) writeSync(fd, chunk);
  } catch {
    // ENOSPC: full. (The last partial block is left free; SQLite's WAL needs whole pages.)
  } finally {
    closeSync(fd);
  }
  return filler;
}
