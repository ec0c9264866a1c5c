import { rmSync, statSync } from "node:fs";
import { join } from "node:path";
import { DatabaseSync } from "node:sqlite";
import { afterAll, beforeAll, expect, it } from "vitest";
import { checkInit, checkOutcome, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { until, untilValue } from "../harness/poll.js";
import { suiteWithServer } from "../harness/ports.js";
import { fillDisk, tmpfsMounts } from "../harness/tmpfs.js";

// The embedded store's volume fills up while keygate serves (the default `npm start` mode). Checks
// only read, so they go on answering; what fails is every write: the writing thread's checkpoint,
// tried each second, and the write-behind flushes of billed usage and last-use times, which then
// wait in memory. Guards that the first is not logged each second (86,400 lines a day, onto that
// same disk), and that the second shows where the README's runbook says KeygateStoreErrors looks:
// keygate_backend_errors_total{backend="store"}, by op, one ratio each.
//
// Runs on a tmpfs of its own (8 MB) filled to the last byte, which needs mount(8): skipped loudly
// without it, and failing in CI, which runs as root.

const tmpfs = tmpfsMounts("keygate-full-disk-writes-");
const mounted = tmpfs.mount("data", 8);
// Never opened when the suite is skipped (nothing mounted).
const dbPath = join(mounted ?? "", "keygate.db");
let kg: TestKeygate | undefined;
let reader: DatabaseSync | undefined;
let filler: string | undefined;

afterAll(async () => {
  reader?.close();
  // Freed first: the stop's final flush then succeeds at once instead of retrying for the grace period.
  if (filler !== undefined) rmSync(filler, { force: true });
  await kg?.stop().catch(() => null);
  tmpfs.remove();
});

/**
 * Pages of the database as SQLite sees it (the WAL's included) past the end of its file: pages a
 * checkpoint has to add to the file, which on a full disk it cannot.
 */
function pagesPastFileEnd(): number {
  const db = new DatabaseSync(dbPath, { readOnly: true });
  try {
    const pages = Number(db.prepare("PRAGMA page_count").get()?.["page_count"]);
    const pageSize = Number(db.prepare("PRAGMA page_size").get()?.["page_size"]);
    return pages - Math.floor(statSync(dbPath).size / pageSize);
  } finally {
    db.close();
  }
}

/** The keygate beforeAll started. */
function running(): TestKeygate {
  if (kg === undefined) throw new Error("keygate did not start");
  return kg;
}

const walSize = (): number => statSync(`${dbPath}-wal`).size;

const CHECKPOINT_FAILED = "a WAL checkpoint failed";
const USAGE_FLUSH_FAILED = "usage flush failed; will retry";
const LAST_USED_FLUSH_FAILED = "last-used flush failed; will retry";

/** The log lines of `k` whose message starts with `msg`, parsed. */
function logged(k: TestKeygate, msg: string): Array<{ level: number; msg: string; since?: number }> {
  return k.logLines
    .flatMap((chunk) => chunk.split("\n"))
    .filter((line) => line.startsWith("{"))
    .map((line) => JSON.parse(line) as { level: number; msg: string; since?: number })
    .filter((line) => line.msg.startsWith(msg));
}

/** Each op's count of one store series (`keygate_backend_errors_total` or `..._duration_seconds_count`) in a scrape. */
function storeSeries(text: string, name: string): Record<string, number> {
  const byOp: Record<string, number> = {};
  for (const line of text.split("\n")) {
    if (!line.startsWith(`${name}{`) || !line.includes('backend="store"')) continue;
    const op = /op="([^"]*)"/.exec(line)?.[1] ?? "";
    byOp[op] = Number(line.split(" ").at(-1));
  }
  return byOp;
}

suiteWithServer("embedded keygate: the data volume fills up while serving (store writes)", mounted, "mounting a tmpfs needs root (mount -t tmpfs)", (disk) => {
  beforeAll(async () => {
    kg = await startKeygate({ dataDir: disk });
    // The full disk must come while writes wait in the WAL to grow the database file, or the
    // checkpoints have nothing to fail on and the flushes fit in the WAL's old blocks: a read
    // transaction held from a checkpointed database on keeps every later write in the WAL (a
    // checkpoint copies nothing past a reader's snapshot, and the WAL cannot start over), and
    // keys are created until those writes need new database pages and new WAL blocks.
    await until(() => pagesPastFileEnd() === 0, 10_000, "the first checkpoint to write the schema into the database file", { intervalMs: 50 });
    reader = new DatabaseSync(dbPath, { readOnly: true });
    reader.exec("BEGIN");
    reader.prepare("SELECT COUNT(*) FROM sqlite_schema").get();
    const walBefore = walSize();
    let secret = "";
    for (let i = 0; i < 500 && (secret === "" || pagesPastFileEnd() === 0 || walSize() <= walBefore); i++) {
      secret = (await kg.admin.createKey({ ownerId: `full-${i}`, name: "k" })).secret;
    }
    expect(pagesPastFileEnd()).toBeGreaterThan(0);
    expect(walSize()).toBeGreaterThan(walBefore);
    filler = fillDisk(disk);
    // A read, served on the full disk; its usage row and last-use time are the flushes' to write.
    expect(checkOutcome(await kg.check(checkInit({ "x-api-key": secret })))).toEqual({ status: 200, code: null });
    reader.exec("COMMIT");
    reader.close();
    reader = undefined;
  }, 60_000);

  it("error: a checkpoint that keeps failing on the full disk is logged once a minute, not every second", async () => {
    const k = running();
    await until(() => logged(k, CHECKPOINT_FAILED).length > 0, 10_000, "a checkpoint to fail on the full disk", { intervalMs: 50 });
    // Two usage flushes failing after it span 5 s or more (usageFlushSeconds), five checkpoints
    // (one a second, CHECKPOINT_INTERVAL_MS), each failing as the first did: before the fix, five
    // more warn lines.
    const flushesBefore = logged(k, USAGE_FLUSH_FAILED).length;
    await until(() => logged(k, USAGE_FLUSH_FAILED).length >= flushesBefore + 2, 20_000, "two more usage flushes to fail", { intervalMs: 50 });
    const lines = logged(k, CHECKPOINT_FAILED);
    expect(lines).toHaveLength(1);
    expect(lines[0]).toMatchObject({ level: 40, msg: expect.stringContaining("database or disk is full"), since: 0 });
  }, 30_000);

  it("error: each failed write-behind flush counts in keygate_backend_errors_total{backend=\"store\"} under its op (KeygateStoreErrors fires)", async () => {
    const k = running();
    await until(
      () => logged(k, USAGE_FLUSH_FAILED).length > 0 && logged(k, LAST_USED_FLUSH_FAILED).length > 0,
      15_000,
      "a usage and a last-used flush to fail on the full disk",
      { intervalMs: 50 },
    );
    const failures = (): { apply_usage: number; touch_last_used: number } => ({
      apply_usage: logged(k, USAGE_FLUSH_FAILED).length,
      touch_last_used: logged(k, LAST_USED_FLUSH_FAILED).length,
    });
    // A scrape no flush failed during, so the log lines and the counts are of the same flushes.
    const { value: scrape } = await untilValue(
      async () => {
        const before = failures();
        const text = await (await fetch(`http://127.0.0.1:${k.ports.admin}/metrics`)).text();
        return { before, after: failures(), text };
      },
      (s) => s.before.apply_usage === s.after.apply_usage && s.before.touch_last_used === s.after.touch_last_used,
      10_000,
      "a scrape between two flushes",
    );
    // Each failed flush is one call (a flush stops at its first failed call), and none succeeded:
    // nothing was pending before the disk filled. Lookups (find_snapshot) read, and do not fail.
    expect(storeSeries(scrape.text, "keygate_backend_errors_total")).toEqual(scrape.after);
    const { find_snapshot: lookups, ...writes } = storeSeries(scrape.text, "keygate_backend_duration_seconds_count");
    expect(writes).toEqual(scrape.after);
    expect(lookups).toBeGreaterThan(0);
  }, 30_000);
});
