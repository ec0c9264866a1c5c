import { spawnSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { SqliteKeyStore } from "../../src/store/sqlite.js";
import { until } from "../harness/poll.js";

const dirs: string[] = [];
afterEach(() => {
  for (const dir of dirs.splice(0)) rmSync(dir, { recursive: true, force: true });
});

function tempDb(): string {
  const dir = mkdtempSync(join(tmpdir(), "keygate-ckpt-"));
  dirs.push(dir);
  return join(dir, "keygate.db");
}

/** True once the database file itself (not its WAL) holds `marker`: a checkpoint copied it there. */
function inDatabaseFile(path: string, marker: string): boolean {
  return readFileSync(path).includes(Buffer.from(marker));
}

async function writeMarker(store: SqliteKeyStore, marker: string): Promise<void> {
  await store.appendAudit({ id: `aud_${marker}`, atMs: Date.now(), actor: marker, action: "test", keyId: null, ownerId: null, changes: {}, source: "test" });
}

describe("SqliteKeyStore: WAL checkpoints on a thread of their own", () => {
  it("copies a write into the database file without a checkpoint on the writing connection", async () => {
    const path = tempDb();
    const failures: string[] = [];
    const store = new SqliteKeyStore(path, { checkpointInBackground: true, onCheckpointerFailure: (m) => failures.push(m) });
    try {
      const marker = `ckpt-${randomBytes(8).toString("hex")}`;
      await writeMarker(store, marker);
      // One small write is far below SQLite's automatic threshold (1,000 pages): only the
      // checkpoint thread (every second) puts it in the database file while the store is open.
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

  it("leaves checkpoints to SQLite on a store opened without it", async () => {
    const path = tempDb();
    const store = new SqliteKeyStore(path);
    const marker = `ckpt-${randomBytes(8).toString("hex")}`;
    await writeMarker(store, marker);
    expect(inDatabaseFile(path, marker)).toBe(false);
    // Closing the last connection checkpoints.
    await store.close();
    expect(inDatabaseFile(path, marker)).toBe(true);
  });

  it("never holds the process open: a process that ends without closing the store exits", () => {
    const path = tempDb();
    const store = resolve(import.meta.dirname, "../../src/store/sqlite.ts");
    // The script waits until the thread has checkpointed once (it is running), then ends
    // without closing the store.
    const script = [
      `const { readFileSync } = await import("node:fs");`,
      `const { SqliteKeyStore } = await import(${JSON.stringify(store)});`,
      `const store = new SqliteKeyStore(${JSON.stringify(path)}, { checkpointInBackground: true });`,
      `await store.appendAudit({ id: "aud_exit", atMs: 1, actor: "exit-marker", action: "test", keyId: null, ownerId: null, changes: {}, source: "test" });`,
      `while (!readFileSync(${JSON.stringify(path)}).includes("exit-marker")) await new Promise((r) => setTimeout(r, 50));`,
      `console.log("opened");`,
    ].join("\n");
    const file = join(resolve(path, ".."), "exit.mjs");
    writeFileSync(file, script);
    const run = spawnSync(process.execPath, ["--import", "tsx", file], { encoding: "utf8", timeout: 60_000 });
    expect(run.signal).toBeNull();
    expect(run.stdout.trim()).toBe("opened");
    expect(run.status).toBe(0);
  });

  it("closes with the thread running, and the data is all in the database file", async () => {
    const path = tempDb();
    const store = new SqliteKeyStore(path, { checkpointInBackground: true });
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
