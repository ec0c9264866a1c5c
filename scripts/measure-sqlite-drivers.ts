// Measures Node's built-in node:sqlite (DatabaseSync) against better-sqlite3 on the SQL the
// embedded store runs (src/store/sqlite.ts): the Check's cold lookup by hash (hit and miss), the
// account read, the write-behind batches (last-used times; usage and credits) each in one
// IMMEDIATE transaction, and a page of ListKeys. Not part of `npm test`.
//   npm install --no-save better-sqlite3@13      # the comparison driver is not a dependency
//   taskset -c 1 npx tsx scripts/measure-sqlite-drivers.ts [--rounds 7] [--keys 20000] [--owners 200]
// Both drivers open copies of one seeded file (WAL, the store's pragmas). Each round runs every
// figure for both drivers in 20 alternating slices, so a neighbour's load on a shared machine falls
// on both. Prints one JSON line per figure: the median µs per operation over the
// rounds for each driver and the median of the per-round ratios (node:sqlite / better-sqlite3;
// below 1 means node:sqlite is faster).
import { randomBytes } from "node:crypto";
import { copyFileSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { DatabaseSync } from "node:sqlite";
import { Command } from "commander";
import { z } from "zod";
import { SqliteKeyStore } from "../src/store/sqlite.js";
import { newKeyRecord } from "../src/store/store.js";

const options = z
  .object({
    rounds: z.coerce.number().int().positive(),
    keys: z.coerce.number().int().positive(),
    owners: z.coerce.number().int().positive(),
    better: z.string().min(1),
  })
  .parse(
    new Command()
      .option("--rounds <n>", "rounds, each running every figure once per driver", "7")
      .option("--keys <n>", "keys in the seeded store", "20000")
      .option("--owners <n>", "accounts the keys are spread over", "200")
      .option("--better <module>", "the package to load better-sqlite3 from (an npm alias)", "better-sqlite3")
      .parse()
      .opts(),
  );

/** The slice of better-sqlite3's API this script calls; checked at load, since it is not a dependency. */
interface BetterStatement {
  get(...params: unknown[]): unknown;
  all(...params: unknown[]): unknown[];
  run(...params: unknown[]): unknown;
}
interface BetterDatabase {
  prepare(sql: string): BetterStatement;
  pragma(sql: string): unknown;
  transaction(fn: () => void): { immediate(): void };
  close(): void;
}
type BetterConstructor = new (path: string) => BetterDatabase;

function isBetterConstructor(value: unknown): value is BetterConstructor {
  return typeof value === "function" && typeof value.prototype === "object" && value.prototype !== null && "prepare" in value.prototype && "transaction" in value.prototype;
}

async function loadBetterSqlite(): Promise<{ Database: BetterConstructor; version: string }> {
  // A computed specifier: better-sqlite3 is installed only to run this comparison.
  const name = options.better;
  let module: { default?: unknown };
  try {
    module = (await import(name)) as { default?: unknown };
  } catch (error) {
    throw new Error("better-sqlite3 is not installed: run `npm install --no-save better-sqlite3@13` first", { cause: error });
  }
  if (!isBetterConstructor(module.default)) throw new Error("better-sqlite3: its default export is not the Database class");
  const pkg = (await import(`${name}/package.json`, { with: { type: "json" } })) as { default?: { version?: unknown } };
  return { Database: module.default, version: String(pkg.default?.version ?? "unknown") };
}

// The store's SQL, verbatim from src/store/sqlite.ts.
const SQL = {
  snapshotByHash: `SELECT k.*, a.plan AS a_plan, a.subscription_status AS a_subscription_status, a.role AS a_role,
                a.created_at AS a_created_at, a.updated_at AS a_updated_at
         FROM keys k JOIN accounts a ON a.owner_id = k.owner_id WHERE k.hash = ?`,
  getAccount: "SELECT * FROM accounts WHERE owner_id = ?",
  touch: "UPDATE keys SET last_used_at = ? WHERE id = ? AND (last_used_at IS NULL OR last_used_at < ?)",
  addUsage: `INSERT INTO usage (owner_id, key_id, day, outcome, count, credits) VALUES ($owner_id, $key_id, $day, $outcome, $count, $credits)
         ON CONFLICT (owner_id, day, key_id, outcome) DO UPDATE SET count = count + excluded.count, credits = credits + excluded.credits`,
  spendCredits: `UPDATE accounts SET
           monthly_used = CASE WHEN credit_period = $period THEN monthly_used + $monthly WHEN credit_period < $period THEN $monthly ELSE monthly_used END,
           credit_period = CASE WHEN credit_period < $period THEN $period ELSE credit_period END,
           topup_balance = topup_balance - $topup
         WHERE owner_id = $owner`,
  listPage: "SELECT * FROM keys WHERE owner_id = $owner_id AND revoked_at IS NULL AND (rotated_to_id IS NULL OR grace_ends_at > $now) AND id > $after_id ORDER BY id LIMIT $limit",
} as const;

const PRAGMAS = ["journal_mode = WAL", "synchronous = NORMAL", "busy_timeout = 5000", "foreign_keys = ON"];

/** One driver's version of each figure: a function that runs `n` operations. */
type Figures = Record<FigureName, (n: number) => void>;
type FigureName = "lookupHit" | "lookupMiss" | "getAccount" | "touchBatch100" | "usageBatch50" | "listPage50";
const FIGURES: readonly FigureName[] = ["lookupHit", "lookupMiss", "getAccount", "touchBatch100", "usageBatch50", "listPage50"];

interface Seed {
  hashes: string[];
  keyIds: string[];
  owners: string[];
  misses: string[];
}

function bareParams<T extends Record<string, unknown>>(params: T): Record<string, unknown> {
  return params;
}

/** The figures on better-sqlite3. Its named parameters are bound without the `$`. */
function betterFigures(Database: BetterConstructor, path: string, seed: Seed): { figures: Figures; close(): void } {
  const db = new Database(path);
  for (const pragma of PRAGMAS) db.pragma(pragma);
  const s = {
    snapshotByHash: db.prepare(SQL.snapshotByHash),
    getAccount: db.prepare(SQL.getAccount),
    touch: db.prepare(SQL.touch),
    addUsage: db.prepare(SQL.addUsage),
    spendCredits: db.prepare(SQL.spendCredits),
    listPage: db.prepare(SQL.listPage),
  };
  let cursor = 0;
  let clock = Date.now();
  const figures: Figures = {
    lookupHit: (n) => {
      for (let i = 0; i < n; i++) s.snapshotByHash.get(seed.hashes[cursor++ % seed.hashes.length]);
    },
    lookupMiss: (n) => {
      for (let i = 0; i < n; i++) s.snapshotByHash.get(seed.misses[i % seed.misses.length]);
    },
    getAccount: (n) => {
      for (let i = 0; i < n; i++) s.getAccount.get(seed.owners[cursor++ % seed.owners.length]);
    },
    touchBatch100: (n) => {
      for (let i = 0; i < n; i++) {
        const at = ++clock;
        db.transaction(() => {
          for (let j = 0; j < 100; j++) s.touch.run(at, seed.keyIds[cursor++ % seed.keyIds.length], at);
        }).immediate();
      }
    },
    usageBatch50: (n) => {
      for (let i = 0; i < n; i++) {
        db.transaction(() => {
          for (let j = 0; j < 50; j++) {
            const k = cursor++;
            const owner = seed.owners[k % seed.owners.length];
            s.addUsage.run(bareParams({ owner_id: owner, key_id: seed.keyIds[k % seed.keyIds.length], day: "2026-12-03", outcome: "ALLOWED", count: 3, credits: 3 }));
          }
          for (let j = 0; j < 10; j++) s.spendCredits.run(bareParams({ period: "2026-12", monthly: 3, topup: 0, owner: seed.owners[cursor++ % seed.owners.length] }));
        }).immediate();
      }
    },
    listPage50: (n) => {
      for (let i = 0; i < n; i++) s.listPage.all(bareParams({ owner_id: seed.owners[cursor++ % seed.owners.length], now: clock, after_id: "", limit: 50 }));
    },
  };
  return { figures, close: () => db.close() };
}

/** The figures on node:sqlite, written as src/store/sqlite.ts writes them. */
function nodeFigures(path: string, seed: Seed): { figures: Figures; close(): void } {
  const db = new DatabaseSync(path);
  for (const pragma of PRAGMAS) db.exec(`PRAGMA ${pragma}`);
  const s = {
    snapshotByHash: db.prepare(SQL.snapshotByHash),
    getAccount: db.prepare(SQL.getAccount),
    touch: db.prepare(SQL.touch),
    addUsage: db.prepare(SQL.addUsage),
    spendCredits: db.prepare(SQL.spendCredits),
    listPage: db.prepare(SQL.listPage),
  };
  const immediate = (fn: () => void): void => {
    db.exec("BEGIN IMMEDIATE");
    try {
      fn();
      db.exec("COMMIT");
    } catch (error) {
      if (db.isTransaction) db.exec("ROLLBACK");
      throw error;
    }
  };
  let cursor = 0;
  let clock = Date.now();
  const figures: Figures = {
    lookupHit: (n) => {
      for (let i = 0; i < n; i++) s.snapshotByHash.get(seed.hashes[cursor++ % seed.hashes.length] ?? "");
    },
    lookupMiss: (n) => {
      for (let i = 0; i < n; i++) s.snapshotByHash.get(seed.misses[i % seed.misses.length] ?? "");
    },
    getAccount: (n) => {
      for (let i = 0; i < n; i++) s.getAccount.get(seed.owners[cursor++ % seed.owners.length] ?? "");
    },
    touchBatch100: (n) => {
      for (let i = 0; i < n; i++) {
        const at = ++clock;
        immediate(() => {
          for (let j = 0; j < 100; j++) s.touch.run(at, seed.keyIds[cursor++ % seed.keyIds.length] ?? "", at);
        });
      }
    },
    usageBatch50: (n) => {
      for (let i = 0; i < n; i++) {
        immediate(() => {
          for (let j = 0; j < 50; j++) {
            const k = cursor++;
            const owner = seed.owners[k % seed.owners.length] ?? "";
            s.addUsage.run({ owner_id: owner, key_id: seed.keyIds[k % seed.keyIds.length] ?? "", day: "2026-12-03", outcome: "ALLOWED", count: 3, credits: 3 });
          }
          for (let j = 0; j < 10; j++) s.spendCredits.run({ period: "2026-12", monthly: 3, topup: 0, owner: seed.owners[cursor++ % seed.owners.length] ?? "" });
        });
      }
    },
    listPage50: (n) => {
      for (let i = 0; i < n; i++) s.listPage.all({ owner_id: seed.owners[cursor++ % seed.owners.length] ?? "", now: clock, after_id: "", limit: 50 });
    },
  };
  return { figures, close: () => db.close() };
}

/** Operations per timed run, so each run takes tens of milliseconds. */
const OPS: Record<FigureName, number> = { lookupHit: 20_000, lookupMiss: 20_000, getAccount: 20_000, touchBatch100: 100, usageBatch50: 100, listPage50: 1_000 };

/** Alternating slices per figure and round. */
const SLICES = 20;

function time(run: (n: number) => void, n: number): number {
  const started = process.hrtime.bigint();
  run(n);
  return Number(process.hrtime.bigint() - started) / 1000 / n;
}

function median(values: readonly number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? (sorted[mid] ?? NaN) : ((sorted[mid - 1] ?? NaN) + (sorted[mid] ?? NaN)) / 2;
}

async function seedStore(path: string): Promise<Seed> {
  const store = new SqliteKeyStore(path);
  const owners = Array.from({ length: options.owners }, (_, i) => `owner_${String(i).padStart(5, "0")}`);
  const now = Date.now();
  for (const ownerId of owners) await store.upsertAccount({ ownerId }, { plan: "free", subscriptionStatus: "active", role: "standard" }, now);
  const records = Array.from({ length: options.keys }, (_, i) =>
    newKeyRecord({
      id: `key_${String(i).padStart(8, "0")}`,
      hash: randomBytes(32).toString("base64url"),
      ownerId: owners[i % owners.length] ?? "",
      name: `key ${i}`,
      mode: "live",
      start: "kg_live_abcd",
      last4: "wxyz",
      createdAtMs: now,
      scopes: ["read", "write"],
      metadata: { team: "bench" },
    }),
  );
  store.importKeys(records);
  await store.close();
  return {
    hashes: records.map((r) => r.hash),
    keyIds: records.map((r) => r.id),
    owners,
    misses: Array.from({ length: 1000 }, () => randomBytes(32).toString("base64url")),
  };
}

const better = await loadBetterSqlite();
const dir = mkdtempSync(join(tmpdir(), "keygate-sqlite-drivers-"));
try {
  const seeded = join(dir, "seed.db");
  const seed = await seedStore(seeded);
  copyFileSync(seeded, join(dir, "better.db"));
  copyFileSync(seeded, join(dir, "node.db"));
  const drivers = {
    "better-sqlite3": betterFigures(better.Database, join(dir, "better.db"), seed),
    "node:sqlite": nodeFigures(join(dir, "node.db"), seed),
  };
  console.log(
    JSON.stringify({
      node: process.version,
      betterSqlite3: better.version,
      sqlite: new DatabaseSync(":memory:").prepare("SELECT sqlite_version() AS v").get()?.["v"],
      keys: options.keys,
      owners: options.owners,
      rounds: options.rounds,
      unit: "µs per operation (a batch is one operation)",
    }),
  );
  // Warm-up: JIT, page cache, statement caches.
  for (const name of FIGURES) for (const d of Object.values(drivers)) d.figures[name](Math.ceil(OPS[name] / 4));
  const samples = new Map<FigureName, { better: number[]; node: number[]; ratio: number[] }>();
  for (const name of FIGURES) samples.set(name, { better: [], node: [], ratio: [] });
  for (let round = 0; round < options.rounds; round++) {
    for (const name of FIGURES) {
      const sample = samples.get(name);
      if (sample === undefined) continue;
      // Slices alternate between the drivers, so a burst of a neighbour's load lands on both.
      let b = 0;
      let n = 0;
      const slice = Math.max(1, Math.floor(OPS[name] / SLICES));
      for (let i = 0; i < SLICES; i++) {
        if ((i + round) % 2 === 0) {
          b += time(drivers["better-sqlite3"].figures[name], slice);
          n += time(drivers["node:sqlite"].figures[name], slice);
        } else {
          n += time(drivers["node:sqlite"].figures[name], slice);
          b += time(drivers["better-sqlite3"].figures[name], slice);
        }
      }
      b /= SLICES;
      n /= SLICES;
      sample.better.push(b);
      sample.node.push(n);
      sample.ratio.push(n / b);
    }
  }
  for (const [name, sample] of samples) {
    const round2 = (v: number): number => Math.round(v * 100) / 100;
    console.log(
      JSON.stringify({
        figure: name,
        betterSqlite3Us: round2(median(sample.better)),
        nodeSqliteUs: round2(median(sample.node)),
        ratioMedian: round2(median(sample.ratio)),
        ratioMin: round2(Math.min(...sample.ratio)),
        ratioMax: round2(Math.max(...sample.ratio)),
      }),
    );
  }
  for (const d of Object.values(drivers)) d.close();
} finally {
  rmSync(dir, { recursive: true, force: true });
}
