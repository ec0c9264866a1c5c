import { spawn } from "node:child_process";
import type { ChildProcess } from "node:child_process";
import { once } from "node:events";
import { statSync } from "node:fs";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { JOURNAL_SIZE_LIMIT_BYTES } from "../../src/store/sqlite-writer.js";
import { startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { until } from "../harness/poll.js";

// An operator's `sqlite3 data/keygate.db` session left inside a read transaction (BEGIN; SELECT
// …; then lunch) pins the WAL: the writing thread's PASSIVE checkpoint every second copies nothing
// past that reader's snapshot, so keygate.db-wal grows with every write for as long as the session
// stays open. keygate dropped the checkpoint's result, so nothing told the operator until the
// volume was full, and the file never shrank afterwards (no journal_size_limit), so the space it
// took stayed taken for the life of the database. The thread now reads the result and keygate
// logs a warning (once a minute) while the WAL keeps growing past the limit; every connection
// sets journal_size_limit, so the file is cut back once the log starts over.

let kg: TestKeygate | undefined;
const readers: ChildProcess[] = [];
afterEach(async () => {
  for (const r of readers.splice(0)) r.kill("SIGKILL");
  await kg?.stop();
  kg = undefined;
});

const PINNED = "the WAL keeps growing: checkpoints cannot copy it back into the database file while another connection holds a read transaction on it";

function walBytes(dir: string): number {
  return statSync(join(dir, "keygate.db-wal")).size;
}

/** The warn lines of a pinned WAL, with their fields. */
function pinnedLines(k: TestKeygate): Array<Record<string, unknown>> {
  return k.logLines
    .map((line) => JSON.parse(line) as Record<string, unknown>)
    .filter((line) => typeof line["msg"] === "string" && line["msg"].startsWith(PINNED));
}

/** A process inside a read transaction on `dbPath` until told to end it. */
async function pinningReader(dbPath: string): Promise<{ end: () => Promise<void> }> {
  const script = `
    const { DatabaseSync } = require("node:sqlite");
    const db = new DatabaseSync(${JSON.stringify(dbPath)}, { timeout: 5000 });
    db.exec("BEGIN");
    db.prepare("SELECT count(*) FROM keys").get();
    process.stdout.write("reading\\n");
    process.stdin.once("data", () => { db.exec("COMMIT"); db.close(); process.exit(0); });
  `;
  const child = spawn(process.execPath, ["-e", script], { stdio: ["pipe", "pipe", "inherit"] });
  readers.push(child);
  const [chunk] = (await once(child.stdout, "data")) as [Buffer];
  expect(chunk.toString()).toBe("reading\n");
  return {
    async end() {
      const exited = once(child, "exit");
      child.stdin.write("end\n");
      expect(await exited).toEqual([0, null]);
    },
  };
}

/** Writes keys (each a KeyAdmin commit and its audit record) until the WAL is past the limit. */
async function growWalPastLimit(k: TestKeygate): Promise<void> {
  for (let i = 0; walBytes(k.dataDir) <= JOURNAL_SIZE_LIMIT_BYTES + JOURNAL_SIZE_LIMIT_BYTES / 4; i++) {
    await k.admin.createKey({ ownerId: `grow${i}`, name: "k" });
  }
}

describe("embedded WAL pinned by another process's read transaction", () => {
  it("is reported by a warn line naming the WAL and its size while it grows", async () => {
    kg = await startKeygate();
    const k = kg;
    const reader = await pinningReader(join(k.dataDir, "keygate.db"));
    await growWalPastLimit(k);
    // The thread reports once several checkpoints in a row fell short.
    await until(() => pinnedLines(k).length > 0, 15_000, "the pinned WAL was reported", { intervalMs: 100 });
    await reader.end();
    const [line] = pinnedLines(k);
    expect(line).toMatchObject({ level: 40, file: join(k.dataDir, "keygate.db-wal"), since: 0 });
    expect(line?.["walBytes"]).toBeGreaterThan(JOURNAL_SIZE_LIMIT_BYTES);
    expect(line?.["checkpointedFrames"]).toBeLessThan(Number(line?.["logFrames"]));
  }, 60_000);

  it("once the reader is gone, the log starts over and keygate.db-wal is cut back to journal_size_limit", async () => {
    kg = await startKeygate();
    const k = kg;
    const reader = await pinningReader(join(k.dataDir, "keygate.db"));
    await growWalPastLimit(k);
    await reader.end();
    // A write after a checkpoint has copied the whole log starts the log over, and its commit cuts
    // the file back; until the thread's next checkpoint (every second), writes append to the log.
    let i = 0;
    await until(
      async () => {
        await k.admin.createKey({ ownerId: `after${i++}`, name: "k" });
        return walBytes(k.dataDir) <= JOURNAL_SIZE_LIMIT_BYTES;
      },
      15_000,
      "keygate.db-wal was cut back",
      { intervalMs: 200 },
    );
    // No more reports once the log could be copied back.
    expect(pinnedLines(k).every((line) => Number(line["walBytes"]) > JOURNAL_SIZE_LIMIT_BYTES)).toBe(true);
  }, 60_000);
});
