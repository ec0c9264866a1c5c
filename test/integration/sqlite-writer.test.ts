import { spawnSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { getPriority, tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { DatabaseSync } from "node:sqlite";
import { pathToFileURL } from "node:url";
import { afterEach, describe, expect, it } from "vitest";
import { SqliteKeyStore } from "../../src/store/sqlite.js";
import { WriterThread } from "../../src/store/sqlite-writer.js";
import type { UsageDelta } from "../../src/store/store.js";
import { until } from "../harness/poll.js";
import { testKeyRecord } from "../harness/records.js";

const dirs: string[] = [];
afterEach(() => {
  for (const dir of dirs.splice(0)) rmSync(dir, { recursive: true, force: true });
});

function tempDir(): string {
  const dir = mkdtempSync(join(tmpdir(), "keygate-writer-"));
  dirs.push(dir);
  return dir;
}

function tempDb(): string {
  return join(tempDir(), "keygate.db");
}

/** True once the database file itself (not its WAL) holds `marker`: a checkpoint copied it there. */
function inDatabaseFile(path: string, marker: string): boolean {
  return readFileSync(path).includes(Buffer.from(marker));
}

async function writeMarker(store: SqliteKeyStore, marker: string): Promise<void> {
  await store.appendAudit({ id: `aud_${marker}`, atMs: Date.now(), actor: marker, action: "test", keyId: null, ownerId: null, changes: {}, source: "test" });
}

const usageRow = (count: number): UsageDelta => ({ ownerId: "acct_writer", keyId: "key_writer", day: "2026-12-03", outcome: "ALLOWED", count, credits: 0 });

/** The nice value of each of this process's threads (Linux: /proc/self/task/<tid>/stat, field 19). */
function threadNiceValues(): number[] {
  return readdirSync("/proc/self/task").map((tid) => {
    const stat = readFileSync(`/proc/self/task/${tid}/stat`, "utf8");
    // Fields after the command name (which may hold spaces) start at field 3, the state.
    return Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[16]);
  });
}

describe("SqliteKeyStore: write-behind batches on the writing thread", () => {
  it("waits for SQLite's write lock on the thread while the event loop goes on, then writes the batch", async () => {
    const path = tempDb();
    const failures: string[] = [];
    const store = new SqliteKeyStore(path, { writeInBackground: true, onWriterFailure: (m) => failures.push(m) });
    const holder = new DatabaseSync(path, { timeout: 0 });
    try {
      holder.exec("BEGIN IMMEDIATE");
      let settled = false;
      const written = store.applyUsage([usageRow(3)], []).finally(() => {
        settled = true;
      });
      // On the event loop this call would wait for the lock right here (SQLite's busy timeout)
      // and, the lock's holder being this same thread, fail with "database is locked".
      await new Promise((resolve) => setImmediate(resolve));
      expect(settled).toBe(false);
      holder.exec("COMMIT");
      await written;
      expect(await store.listUsage("acct_writer", "2026-12-03", "2026-12-03")).toEqual([
        { keyId: "key_writer", day: "2026-12-03", outcome: "ALLOWED", count: 3, credits: 0 },
      ]);
      await store.applyUsage([usageRow(4)], []);
      expect((await store.listUsage("acct_writer", "2026-12-03", "2026-12-03"))[0]?.count).toBe(7);
      expect(failures).toEqual([]);
    } finally {
      holder.close();
      await store.close();
    }
  });

  it("spends credits and moves last-use times forward only, on the thread", async () => {
    const path = tempDb();
    const store = new SqliteKeyStore(path, { writeInBackground: true });
    try {
      await store.upsertAccount({ ownerId: "acct_writer" }, { plan: "free", subscriptionStatus: "active", role: "standard" }, 1);
      await store.addCredits("acct_writer", 50);
      await store.applyUsage([], [{ ownerId: "acct_writer", period: "2026-12", monthlyUsed: 7, topupUsed: 3 }]);
      await store.applyUsage([], [{ ownerId: "acct_writer", period: "2026-12", monthlyUsed: 1, topupUsed: 0 }]);
      expect(await store.getCredits("acct_writer")).toEqual({ period: "2026-12", monthlyUsed: 8, topupBalance: 47, topupTotal: 50 });
      const defaults = { plan: "free", subscriptionStatus: "active", role: "standard" } as const;
      const { key } = await store.createKey(testKeyRecord("acct_writer", 1), { maxActiveKeysFor: () => 10, accountDefaults: defaults, nowMs: 1 });
      await store.touchLastUsed(new Map([[key.id, 5000]]));
      await store.touchLastUsed(new Map([[key.id, 4000]]));
      expect((await store.getKey(key.id))?.lastUsedAtMs).toBe(5000);
    } finally {
      await store.close();
    }
  });

  it("rejects a batch that SQLite refuses, with SQLite's message, and goes on writing", async () => {
    const path = tempDb();
    const failures: string[] = [];
    const store = new SqliteKeyStore(path, { writeInBackground: true, onWriterFailure: (m) => failures.push(m) });
    const other = new DatabaseSync(path);
    try {
      // Once a batch is written the thread has prepared its statements; dropping the table then
      // fails the next batch when SQLite prepares it again.
      await store.applyUsage([usageRow(1)], []);
      other.exec("DROP TABLE usage");
      await expect(store.applyUsage([usageRow(1)], [])).rejects.toThrow("SQLite write failed: no such table: usage");
      await expect(store.touchLastUsed(new Map([["key_writer", 1]]))).resolves.toBeUndefined();
      expect(failures).toEqual([]);
    } finally {
      other.close();
      await store.close();
    }
  });

  it.runIf(process.platform === "linux")("runs the thread at the lowest CPU priority and leaves the event loop's as it was", async () => {
    const before = getPriority();
    const lowestBefore = threadNiceValues().filter((nice) => nice === 19).length;
    const store = new SqliteKeyStore(tempDb(), { writeInBackground: true });
    try {
      await until(() => threadNiceValues().filter((nice) => nice === 19).length === lowestBefore + 1, 20_000, "one more thread at nice 19");
      expect(getPriority()).toBe(before);
    } finally {
      await store.close();
    }
    await until(() => threadNiceValues().filter((nice) => nice === 19).length === lowestBefore, 20_000, "the nice-19 thread gone after close");
  });
});

describe("WriterThread: a thread that fails or hangs", () => {
  function script(body: string): URL {
    const file = join(tempDir(), "writer.mjs");
    writeFileSync(file, `import { parentPort } from "node:worker_threads";\n${body}\n`);
    return pathToFileURL(file);
  }

  function start(url: URL, stopTimeoutMs = 5000): { writer: WriterThread; stopped: string[] } {
    const stopped: string[] = [];
    const writer = new WriterThread({
      path: "unused.db",
      walPath: "unused.db-wal",
      url,
      checkpointIntervalMs: 1000,
      busyTimeoutMs: 5000,
      stopTimeoutMs,
      onStopped: (m) => stopped.push(m),
      onCheckpointError: (m) => stopped.push(`checkpoint: ${m}`),
    });
    return { writer, stopped };
  }

  it("rejects the batches it had when it crashed, says so once, and takes no more", async () => {
    const { writer, stopped } = start(script(`parentPort.on("message", () => { throw new Error("writer crashed"); });`));
    await expect(writer.touch(new Map([["key_a", 1]]))).rejects.toThrow("the SQLite writing thread stopped (writer crashed)");
    expect(stopped).toEqual(["writer crashed"]);
    expect(writer.running).toBe(false);
    await expect(writer.applyUsage([usageRow(1)], [])).rejects.toThrow("the SQLite writing thread is not running");
    await writer.stop();
    expect(stopped).toEqual(["writer crashed"]);
  });

  it("ends a thread that does not stop when asked, and rejects what it never answered", async () => {
    const { writer, stopped } = start(script(`parentPort.on("message", () => {});`), 200);
    const pending = writer.touch(new Map([["key_a", 1]]));
    await writer.stop();
    await expect(pending).rejects.toThrow("the SQLite writing thread stopped");
    expect(stopped).toEqual([]);
  });
});

describe("SqliteKeyStore: WAL checkpoints on the writing thread", () => {
  it("copies a write into the database file without a checkpoint on the writing connection", async () => {
    const path = tempDb();
    const failures: string[] = [];
    const store = new SqliteKeyStore(path, { writeInBackground: true, onWriterFailure: (m) => failures.push(m) });
    try {
      const marker = `ckpt-${randomBytes(8).toString("hex")}`;
      await writeMarker(store, marker);
      // One small write is far below SQLite's automatic threshold (1,000 pages): only the
      // writing thread (every second) puts it in the database file while the store is open.
      await until(() => inDatabaseFile(path, marker), 20_000, "the marker row in the database file");
      // And it keeps doing so.
      const second = `ckpt-${randomBytes(8).toString("hex")}`;
      await writeMarker(store, second);
      await until(() => inDatabaseFile(path, second), 20_000, "the second marker row in the database file");
      expect(failures).toEqual([]);
    } finally {
      await store.close();
    }
  });

  it("leaves writes and checkpoints to the store's own connection when opened without it", async () => {
    const path = tempDb();
    const store = new SqliteKeyStore(path);
    const marker = `ckpt-${randomBytes(8).toString("hex")}`;
    await writeMarker(store, marker);
    await store.applyUsage([usageRow(2)], []);
    expect((await store.listUsage("acct_writer", "2026-12-03", "2026-12-03"))[0]?.count).toBe(2);
    expect(inDatabaseFile(path, marker)).toBe(false);
    // Closing the last connection checkpoints.
    await store.close();
    expect(inDatabaseFile(path, marker)).toBe(true);
  });

  it("never holds the process open when idle, and holds it until a batch sent is written", () => {
    const path = tempDb();
    const store = resolve(import.meta.dirname, "../../src/store/sqlite.ts");
    // The script waits until the thread has checkpointed once (it is running), sends a batch
    // without waiting for it, and ends without closing the store.
    const script = [
      `const { readFileSync } = await import("node:fs");`,
      `const { SqliteKeyStore } = await import(${JSON.stringify(store)});`,
      `const store = new SqliteKeyStore(${JSON.stringify(path)}, { writeInBackground: true });`,
      `await store.appendAudit({ id: "aud_exit", atMs: 1, actor: "exit-marker", action: "test", keyId: null, ownerId: null, changes: {}, source: "test" });`,
      `while (!readFileSync(${JSON.stringify(path)}).includes("exit-marker")) await new Promise((r) => setTimeout(r, 50));`,
      `void store.applyUsage([${JSON.stringify(usageRow(5))}], []);`,
      `console.log("opened");`,
    ].join("\n");
    const file = join(resolve(path, ".."), "exit.mjs");
    writeFileSync(file, script);
    const run = spawnSync(process.execPath, ["--import", "tsx", file], { encoding: "utf8", timeout: 60_000 });
    expect(run.signal).toBeNull();
    expect(run.stdout.trim()).toBe("opened");
    expect(run.status).toBe(0);
    const db = new DatabaseSync(path);
    try {
      expect(db.prepare("SELECT count FROM usage WHERE key_id = 'key_writer'").all()).toEqual([{ count: 5 }]);
    } finally {
      db.close();
    }
  });

  it("closes with the thread running, and the data is all in the database file", async () => {
    const path = tempDb();
    const store = new SqliteKeyStore(path, { writeInBackground: true });
    const marker = `ckpt-${randomBytes(8).toString("hex")}`;
    await writeMarker(store, marker);
    await store.close();
    expect(inDatabaseFile(path, marker)).toBe(true);
    const reopened = new SqliteKeyStore(path);
    try {
      const audit = await reopened.listAudit({ limit: 10 });
      expect(audit.map((a) => a.actor)).toEqual([marker]);
    } finally {
      await reopened.close();
    }
  });
});
