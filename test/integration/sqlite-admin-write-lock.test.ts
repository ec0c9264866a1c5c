import { spawn } from "node:child_process";
import type { ChildProcess } from "node:child_process";
import { once } from "node:events";
import { join } from "node:path";
import { Code } from "@connectrpc/connect";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { adminRefusal, checkInit, checkOutcome, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

// Another process holds SQLite's write lock on keygate.db: an operator's `sqlite3` session inside
// a transaction, a VACUUM, another keygate's flush. node:sqlite is synchronous, so a KeyAdmin write
// that waited for the lock inside SQLite (its busy timeout) would hold the event loop, and every
// Check with it, cached ones too, for as long as the lock is held.

let kg: TestKeygate;
const holders: ChildProcess[] = [];

beforeEach(async () => {
  kg = await startKeygate();
});
afterEach(async () => {
  for (const holder of holders.splice(0)) holder.kill("SIGKILL");
  await kg.stop();
});

/** A process holding the write lock until release() is called; resolved once it holds it. */
async function holdWriteLock(dbPath: string): Promise<{ release: () => Promise<void> }> {
  const script = `
    const { DatabaseSync } = require("node:sqlite");
    const db = new DatabaseSync(${JSON.stringify(dbPath)}, { timeout: 5000 });
    db.exec("BEGIN IMMEDIATE");
    process.stdout.write("locked\\n");
    process.stdin.once("data", () => {
      db.exec("COMMIT");
      db.close();
      process.exit(0);
    });
  `;
  const child = spawn(process.execPath, ["-e", script], { stdio: ["pipe", "pipe", "inherit"] });
  holders.push(child);
  const [chunk] = (await once(child.stdout, "data")) as [Buffer];
  expect(chunk.toString()).toBe("locked\n");
  return {
    async release() {
      const exited = once(child, "exit");
      child.stdin.write("release\n");
      expect(await exited).toEqual([0, null]);
    },
  };
}

/** Tracks whether `call` has settled, without letting a rejection go unhandled. */
function watch<T>(call: Promise<T>): { settled: () => boolean; result: Promise<T> } {
  let settled = false;
  const result = call.finally(() => {
    settled = true;
  });
  result.catch(() => undefined);
  return { settled: () => settled, result };
}

// Time for the admin call to reach the store and meet the lock before the Checks are sent: without
// it the Checks could be answered first even if the admin write held the event loop.
const ADMIN_CALL_REACHES_STORE_MS = 200;

describe("SQLite: a KeyAdmin write while another process holds the write lock", () => {
  it("happy: Checks of a cached and of an uncached key are answered while the write waits; the write is made once, after the release", async () => {
    const hot = await kg.admin.createKey({ ownerId: "acme", name: "hot" });
    const cold = await kg.admin.createKey({ ownerId: "initech", name: "cold" });
    const hotAuth = { authorization: `Bearer ${hot.secret}` };
    expect(checkOutcome(await kg.check(checkInit(hotAuth)))).toEqual({ status: 200, code: null });

    const holder = await holdWriteLock(join(kg.dataDir, "keygate.db"));
    const topUp = watch(kg.admin.addCredits({ ownerId: "acme", amount: 250n, reason: "while locked" }));
    await new Promise((resolve) => setTimeout(resolve, ADMIN_CALL_REACHES_STORE_MS));

    // The holder has not been told to release: these are answered while it holds the lock.
    expect(checkOutcome(await kg.check(checkInit(hotAuth)))).toEqual({ status: 200, code: null });
    // An L1 miss reads the store: WAL readers do not wait for the write lock.
    expect(checkOutcome(await kg.check(checkInit({ authorization: `Bearer ${cold.secret}` })))).toEqual({ status: 200, code: null });
    expect(topUp.settled()).toBe(false);

    await holder.release();
    const answered = await topUp.result;
    expect(answered.account?.topupCredits).toBe(250n);
    expect((await kg.admin.getAccount({ ownerId: "acme" })).account?.topupCredits).toBe(250n);
  }, 20_000);

  it("error: a lock held past the wait fails the write as UNAVAILABLE, with nothing written, and Checks answered meanwhile", async () => {
    const hot = await kg.admin.createKey({ ownerId: "acme", name: "hot" });
    const hotAuth = { authorization: `Bearer ${hot.secret}` };
    expect(checkOutcome(await kg.check(checkInit(hotAuth)))).toEqual({ status: 200, code: null });

    const holder = await holdWriteLock(join(kg.dataDir, "keygate.db"));
    const create = watch(kg.admin.createKey({ ownerId: "globex", name: "blocked" }));
    await new Promise((resolve) => setTimeout(resolve, ADMIN_CALL_REACHES_STORE_MS));
    expect(checkOutcome(await kg.check(checkInit(hotAuth)))).toEqual({ status: 200, code: null });
    expect(create.settled()).toBe(false);

    // The store gives up after its wait (5 s) while the holder still holds the lock.
    expect(await adminRefusal(create.result)).toEqual({ code: Code.Unavailable, message: "the key store is unavailable; retry shortly" });
    await holder.release();
    expect((await kg.admin.listKeys({ ownerId: "globex" })).keys).toEqual([]);
    // Surely nothing written: no "outcome unknown" record logged for it.
    expect(kg.logLines.filter((line) => line.includes("change outcome unknown"))).toEqual([]);
  }, 20_000);
});
