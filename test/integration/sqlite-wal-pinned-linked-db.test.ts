import { spawn } from "node:child_process";
import type { ChildProcess } from "node:child_process";
import { once } from "node:events";
import { existsSync, mkdirSync, mkdtempSync, realpathSync, rmSync, statSync, symlinkSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { JOURNAL_SIZE_LIMIT_BYTES } from "../../src/store/sqlite-writer.js";
import { startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { until } from "../harness/poll.js";

// data/keygate.db may be keygate's own symbolic link to a database kept on another volume (README:
// "keygate's own link, to a database kept on another volume, is followed"). SQLite resolves the
// link and keeps -wal and -shm beside the file it leads to, but the writing thread looked for a
// pinned WAL's size at `keygate.db-wal` beside the link: nothing there, 0 bytes, never past the
// limit, so "the WAL keeps growing" never fired however far the real WAL grew until the volume was
// full. The warn line, and the stop's "could not be emptied" line, also named that missing file.
// The store now names the WAL from the resolved path (sqlite-wal-pinned.test.ts: a plain file).

let kg: TestKeygate | undefined;
const readers: ChildProcess[] = [];
const dirs: string[] = [];
afterEach(async () => {
  for (const r of readers.splice(0)) r.kill("SIGKILL");
  await kg?.stop();
  kg = undefined;
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

const PINNED = "the WAL keeps growing: checkpoints cannot copy it back into the database file while another connection holds a read transaction on it";
const NOT_EMPTIED = "the WAL of the SQLite file could not be emptied at the stop";

/** The log lines whose message starts with `prefix`, with their fields. */
function linesStarting(k: TestKeygate, prefix: string): Array<Record<string, unknown>> {
  return k.logLines
    .map((line) => JSON.parse(line) as Record<string, unknown>)
    .filter((line) => typeof line["msg"] === "string" && line["msg"].startsWith(prefix));
}

/** A process inside a read transaction on `dbPath` (pinning its WAL) until it is killed. */
async function pinningReader(dbPath: string): Promise<void> {
  const script = `
    const { DatabaseSync } = require("node:sqlite");
    const db = new DatabaseSync(${JSON.stringify(dbPath)}, { timeout: 5000 });
    db.exec("BEGIN");
    db.prepare("SELECT count(*) FROM keys").get();
    process.stdout.write("reading\\n");
    process.stdin.resume();
  `;
  const child = spawn(process.execPath, ["-e", script], { stdio: ["pipe", "pipe", "inherit"] });
  readers.push(child);
  const [chunk] = (await once(child.stdout, "data")) as [Buffer];
  expect(chunk.toString()).toBe("reading\n");
}

describe("embedded WAL pinned, with keygate.db keygate's own link to a database on another volume", () => {
  it("is reported by a warn line naming the WAL beside the linked file, as is the stop that cannot empty it", async () => {
    const dir = mkdtempSync(join(tmpdir(), "kg-linked-wal-"));
    dirs.push(dir);
    const dataDir = join(dir, "data");
    const volume = join(dir, "volume");
    mkdirSync(dataDir);
    mkdirSync(volume);
    const target = join(volume, "keygate.db");
    symlinkSync(target, join(dataDir, "keygate.db"));
    // The name SQLite gives it: the link resolved, the temporary directory's own links too.
    const realWal = `${join(realpathSync(volume), "keygate.db")}-wal`;
    kg = await startKeygate({ dataDir });
    const k = kg;
    await k.admin.createKey({ ownerId: "first", name: "k" });
    await pinningReader(target);
    for (let i = 0; statSync(realWal).size <= JOURNAL_SIZE_LIMIT_BYTES + JOURNAL_SIZE_LIMIT_BYTES / 4; i++) {
      await k.admin.createKey({ ownerId: `grow${i}`, name: "k" });
    }
    // The WAL grew beside the file the link leads to; nothing is beside the link.
    expect(existsSync(join(dataDir, "keygate.db-wal"))).toBe(false);

    // The thread reports once several checkpoints in a row (1 s apart) fell short.
    await until(() => linesStarting(k, PINNED).length > 0, 15_000, "the pinned WAL was reported", { intervalMs: 100 });
    const [line] = linesStarting(k, PINNED);
    expect(line).toMatchObject({ level: 40, file: realWal, since: 0 });
    expect(line?.["walBytes"]).toBeGreaterThan(JOURNAL_SIZE_LIMIT_BYTES);
    expect(line?.["checkpointedFrames"]).toBeLessThan(Number(line?.["logFrames"]));

    // A stop while the reader still holds its transaction cannot empty the WAL and says which file it left.
    kg = undefined;
    await k.stop();
    expect(linesStarting(k, NOT_EMPTIED).map((l) => ({ level: l["level"], file: l["file"] }))).toEqual([{ level: 50, file: realWal }]);
    expect(statSync(realWal).size).toBeGreaterThan(0);
  }, 60_000);
});
