/**
 * The embedded store's writing thread: write-behind batches (last-use times, usage counts, spent
 * credits) and WAL checkpoints run here, on a connection of its own, at the lowest CPU priority,
 * so that the event loop never waits for them. On the event loop (one core), a 20,000-key flush
 * with SQLite's own checkpoints held it over 5 ms 10–20 times, at worst for 20–130 ms, stalling
 * every Check behind it. Only node: modules and ./sqlite-db.ts, so
 * that the thread runs as it is from src/ (node strips the types) and from dist/.
 */
import { once } from "node:events";
import { statSync } from "node:fs";
import { setPriority } from "node:os";
import { DatabaseSync } from "node:sqlite";
import type { StatementSync } from "node:sqlite";
import { Worker, parentPort, workerData } from "node:worker_threads";
import type { CreditDelta, UsageDelta } from "./store.ts";
import { immediateTransaction, integer } from "./sqlite-db.ts";

/** The write-behind statements, on whichever connection runs them (the thread's, or the store's own as a fallback). */
export class WriteBehindStatements {
  readonly #touch: StatementSync;
  readonly #addUsage: StatementSync;
  readonly #spendCredits: StatementSync;
  readonly #db: DatabaseSync;

  // No parameter properties in this module: node's type stripping runs it from src/ and refuses them.
  constructor(db: DatabaseSync) {
    this.#db = db;
    this.#touch = db.prepare("UPDATE keys SET last_used_at = ? WHERE id = ? AND (last_used_at IS NULL OR last_used_at < ?)");
    this.#addUsage = db.prepare(
      `INSERT INTO usage (owner_id, key_id, day, outcome, count, credits) VALUES (?, ?, ?, ?, ?, ?)
       ON CONFLICT (owner_id, day, key_id, outcome) DO UPDATE SET count = count + excluded.count, credits = credits + excluded.credits`,
    );
    // A delta for the stored period adds; one for a later period starts that period; an older one only spends top-up.
    this.#spendCredits = db.prepare(
      `UPDATE accounts SET
         monthly_used = CASE WHEN credit_period = @period THEN monthly_used + @monthly WHEN credit_period < @period THEN @monthly ELSE monthly_used END,
         credit_period = CASE WHEN credit_period < @period THEN @period ELSE credit_period END,
         topup_balance = topup_balance - @topup
       WHERE owner_id = @owner`,
    );
  }

  /** Sets last-use times, never moving one back; one transaction. */
  touch(lastUsed: Iterable<readonly [string, number]>): void {
    immediateTransaction(this.#db, () => {
      for (const [id, atMs] of lastUsed) this.#touch.run(atMs, id, atMs);
    });
  }

  /** Adds usage counts and spends credits; one transaction. */
  applyUsage(usage: readonly UsageDelta[], credits: readonly CreditDelta[]): void {
    immediateTransaction(this.#db, () => {
      for (const u of usage) this.#addUsage.run(u.ownerId, u.keyId, u.day, u.outcome, u.count, u.credits);
      for (const c of credits) this.#spendCredits.run({ period: c.period, monthly: c.monthlyUsed, topup: c.topupUsed, owner: c.ownerId });
    });
  }
}

/** A batch for the thread; `id` pairs it with its reply. */
type WriteRequest =
  | { id: number; touch: Array<[string, number]> }
  | { id: number; usage: UsageDelta[]; credits: CreditDelta[] };

/**
 * A WAL that checkpoints have not copied back for WAL_PINNED_CHECKPOINTS in a row and that is past
 * JOURNAL_SIZE_LIMIT_BYTES: another connection's read transaction holds it.
 */
export interface WalPinned {
  /** The -wal file's size on disk. */
  walBytes: number;
  /** Frames in the log, and how many of them the last checkpoint had copied into the database file. */
  logFrames: number;
  checkpointedFrames: number;
}

/** What the thread answers: a batch written (error null) or failed, a checkpoint that failed, or a WAL it cannot copy back. */
type WriterReply = { id: number; error: string | null } | { checkpointError: string } | { walPinned: WalPinned };

/** What the store gives the thread. */
interface WriterData {
  /** Marks the thread's data: the module is also loaded (for WriterThread) in other threads, where it runs nothing. */
  role: typeof WRITER_ROLE;
  path: string;
  walPath: string;
  checkpointIntervalMs: number;
  busyTimeoutMs: number;
}

const WRITER_ROLE = "keygate-sqlite-writer";
/** The message that stops the thread: it closes its connection and ends. */
const STOP = "stop";
/** The nice value of the thread (Linux: a per-thread attribute): it runs when Checks leave the core idle. */
const LOWEST_PRIORITY = 19;
/**
 * The size the -wal file is cut back to when a writer starts the log over (`journal_size_limit`,
 * on every connection of the store's): without it the file keeps the largest size it ever
 * reached, such as the one a long read transaction elsewhere made it grow to, for the life of the
 * database. A second's batches of a busy keygate fit well within it.
 */
export const JOURNAL_SIZE_LIMIT_BYTES = 4 * 1024 * 1024;
/**
 * How many checkpoints in a row must fall short (frames left uncopied) before the thread reports
 * the WAL as pinned: one alone is the store's own read, or a backup's, that was under way.
 */
const WAL_PINNED_CHECKPOINTS = 5;

function errorText(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

function field<T>(value: object, name: string, guard: (v: unknown) => v is T): T {
  const v: unknown = Reflect.get(value, name);
  if (!guard(v)) throw new Error(`SQLite writer: bad message field ${name}`);
  return v;
}

const isString = (v: unknown): v is string => typeof v === "string";
const isNumber = (v: unknown): v is number => typeof v === "number";
const isArray = (v: unknown): v is unknown[] => Array.isArray(v);
const isObject = (v: unknown): v is object => typeof v === "object" && v !== null;

function parseUsage(v: unknown): UsageDelta {
  if (!isObject(v)) throw new Error("SQLite writer: bad usage row");
  return {
    ownerId: field(v, "ownerId", isString),
    keyId: field(v, "keyId", isString),
    day: field(v, "day", isString),
    outcome: field(v, "outcome", isString),
    count: field(v, "count", isNumber),
    credits: field(v, "credits", isNumber),
  };
}

function parseCredit(v: unknown): CreditDelta {
  if (!isObject(v)) throw new Error("SQLite writer: bad credit row");
  return { ownerId: field(v, "ownerId", isString), period: field(v, "period", isString), monthlyUsed: field(v, "monthlyUsed", isNumber), topupUsed: field(v, "topupUsed", isNumber) };
}

function parseTouch(v: unknown): [string, number] {
  if (!isArray(v) || v.length !== 2 || !isString(v[0]) || !isNumber(v[1])) throw new Error("SQLite writer: bad last-used row");
  return [v[0], v[1]];
}

function parseRequest(message: object): WriteRequest {
  const id = field(message, "id", isNumber);
  const touch: unknown = Reflect.get(message, "touch");
  if (touch !== undefined) return { id, touch: field(message, "touch", isArray).map(parseTouch) };
  return { id, usage: field(message, "usage", isArray).map(parseUsage), credits: field(message, "credits", isArray).map(parseCredit) };
}

function parseReply(message: unknown): WriterReply | null {
  if (!isObject(message)) return null;
  const checkpointError: unknown = Reflect.get(message, "checkpointError");
  if (isString(checkpointError)) return { checkpointError };
  const walPinned: unknown = Reflect.get(message, "walPinned");
  if (isObject(walPinned)) {
    const [walBytes, logFrames, checkpointedFrames]: unknown[] = ["walBytes", "logFrames", "checkpointedFrames"].map((name) => Reflect.get(walPinned, name));
    return isNumber(walBytes) && isNumber(logFrames) && isNumber(checkpointedFrames) ? { walPinned: { walBytes, logFrames, checkpointedFrames } } : null;
  }
  const id: unknown = Reflect.get(message, "id");
  const error: unknown = Reflect.get(message, "error");
  return isNumber(id) && (error === null || isString(error)) ? { id, error } : null;
}

function dataOf(value: unknown): WriterData | null {
  if (!isObject(value) || Reflect.get(value, "role") !== WRITER_ROLE) return null;
  return {
    role: WRITER_ROLE,
    path: field(value, "path", isString),
    walPath: field(value, "walPath", isString),
    checkpointIntervalMs: field(value, "checkpointIntervalMs", isNumber),
    busyTimeoutMs: field(value, "busyTimeoutMs", isNumber),
  };
}

/**
 * The thread's connection. synchronous = NORMAL: a commit is not synced, so a power loss or an OS
 * crash may lose the batches of the last moments (counts and last-use times, as the README says);
 * WAL mode keeps the file consistent, and the store's own connection syncs each KeyAdmin change.
 */
export function openWriterDatabase(path: string, busyTimeoutMs: number): DatabaseSync {
  const db = new DatabaseSync(path, { timeout: busyTimeoutMs });
  db.exec("PRAGMA synchronous = NORMAL");
  db.exec("PRAGMA wal_autocheckpoint = 0");
  db.exec(`PRAGMA journal_size_limit = ${JOURNAL_SIZE_LIMIT_BYTES}`);
  return db;
}

/**
 * Runs the thread's PASSIVE checkpoint and returns a report once the WAL is pinned: copied short
 * (frames left) WAL_PINNED_CHECKPOINTS times in a row, and grown past JOURNAL_SIZE_LIMIT_BYTES.
 * PASSIVE copies nothing past the oldest snapshot another connection still reads (an operator's
 * `sqlite3` session left inside BEGIN), so the log then grows with every write, unseen, until the
 * volume is full.
 */
function checkpointer(db: DatabaseSync, walPath: string): () => WalPinned | null {
  const checkpoint = db.prepare("PRAGMA wal_checkpoint(PASSIVE)");
  let shortInARow = 0;
  return () => {
    const row = checkpoint.get();
    const logFrames = row === undefined ? 0 : integer(row, "log");
    const checkpointedFrames = row === undefined ? 0 : integer(row, "checkpointed");
    shortInARow = checkpointedFrames < logFrames ? shortInARow + 1 : 0;
    if (shortInARow < WAL_PINNED_CHECKPOINTS) return null;
    const walBytes = statSync(walPath, { throwIfNoEntry: false })?.size ?? 0;
    return walBytes > JOURNAL_SIZE_LIMIT_BYTES ? { walBytes, logFrames, checkpointedFrames } : null;
  };
}

function runThread(port: NonNullable<typeof parentPort>, data: WriterData): void {
  // setpriority(2) on the calling thread: only Linux keeps nice values per thread; elsewhere it
  // would lower the whole process, event loop included.
  if (process.platform === "linux") setPriority(0, LOWEST_PRIORITY);
  const db = openWriterDatabase(data.path, data.busyTimeoutMs);
  const statements = new WriteBehindStatements(db);
  const reply = (message: WriterReply): void => port.postMessage(message);
  // PASSIVE copies what it can without waiting for, or blocking, another connection.
  const checkpoint = checkpointer(db, data.walPath);
  const timer = setInterval(() => {
    try {
      const walPinned = checkpoint();
      if (walPinned !== null) reply({ walPinned });
    } catch (error) {
      reply({ checkpointError: errorText(error) });
    }
  }, data.checkpointIntervalMs);
  port.on("message", (message: unknown) => {
    if (message === STOP) {
      clearInterval(timer);
      db.close();
      port.close();
      return;
    }
    // A malformed message is a bug in the store: it ends the thread, and the store falls back.
    if (!isObject(message)) throw new Error("SQLite writer: bad message");
    const request = parseRequest(message);
    try {
      if ("touch" in request) statements.touch(request.touch);
      else statements.applyUsage(request.usage, request.credits);
      reply({ id: request.id, error: null });
    } catch (error) {
      reply({ id: request.id, error: errorText(error) });
    }
  });
}

/** How the store reaches its writing thread. */
export interface WriterThreadOptions {
  path: string;
  /**
   * The -wal file's name, whose size tells a pinned WAL: beside the file a link at `path` leads
   * to, where SQLite keeps it, not beside the link (there, nothing: a WAL never seen to grow).
   */
  walPath: string;
  url: URL;
  checkpointIntervalMs: number;
  busyTimeoutMs: number;
  stopTimeoutMs: number;
  /** Called once if the thread fails or exits on its own; its pending batches have been rejected. */
  onStopped: (message: string) => void;
  /** Called when a checkpoint fails (the thread goes on). */
  onCheckpointError: (message: string) => void;
  /** Called at each checkpoint while the WAL is pinned (WalPinned): spaced out by the caller. */
  onWalPinned?: (report: WalPinned) => void;
}

/** The store's handle on its writing thread: batches go in, each answered by its own reply. */
export class WriterThread {
  readonly #worker: Worker;
  readonly #pending = new Map<number, { resolve: () => void; reject: (error: Error) => void }>();
  #nextId = 0;
  #running = true;
  readonly #options: WriterThreadOptions;

  constructor(options: WriterThreadOptions) {
    this.#options = options;
    const data: WriterData = { role: WRITER_ROLE, path: options.path, walPath: options.walPath, checkpointIntervalMs: options.checkpointIntervalMs, busyTimeoutMs: options.busyTimeoutMs };
    // None of the process's node flags: the thread needs none, and some (--cpu-prof, a loader's
    // --input-type) would misapply to it.
    const worker = new Worker(options.url, { workerData: data, execArgv: [] });
    this.#worker = worker;
    worker.on("error", (error: Error) => this.#stopped(error.message));
    worker.on("exit", (code: number) => this.#stopped(`exit code ${code}`));
    worker.on("message", (message: unknown) => this.#onReply(message));
    // The store's owner decides when the process ends; the thread holds it open only while a
    // batch is out. After the listeners: adding a 'message' listener refs the worker again.
    worker.unref();
  }

  /** Whether batches can go to the thread (false once it failed or stopped). */
  get running(): boolean {
    return this.#running;
  }

  touch(lastUsed: ReadonlyMap<string, number>): Promise<void> {
    return this.#send((id) => ({ id, touch: [...lastUsed] }));
  }

  applyUsage(usage: readonly UsageDelta[], credits: readonly CreditDelta[]): Promise<void> {
    return this.#send((id) => ({ id, usage: [...usage], credits: [...credits] }));
  }

  /** Stops the thread after the batches already sent (it closes its connection), waiting at most stopTimeoutMs. */
  async stop(): Promise<void> {
    if (!this.#running) return;
    this.#running = false;
    const exited = once(this.#worker, "exit", { signal: AbortSignal.timeout(this.#options.stopTimeoutMs) });
    // Held while it stops: with the thread unref'd (and AbortSignal.timeout's timer too), a process
    // with nothing else left would exit here, before the rest of its shutdown ran.
    this.#worker.ref();
    this.#worker.postMessage(STOP);
    try {
      await exited;
    } catch {
      // Not gone within stopTimeoutMs (or it went with an error): end the thread.
      await this.#worker.terminate();
    }
    this.#rejectPending("the SQLite writing thread stopped");
  }

  #send(build: (id: number) => WriteRequest): Promise<void> {
    if (!this.#running) return Promise.reject(new Error("the SQLite writing thread is not running"));
    const id = this.#nextId++;
    const done = new Promise<void>((resolve, reject) => this.#pending.set(id, { resolve, reject }));
    // A batch out holds the process open until it is answered, as a write on the event loop would.
    if (this.#pending.size === 1) this.#worker.ref();
    this.#worker.postMessage(build(id));
    return done;
  }

  #onReply(message: unknown): void {
    const reply = parseReply(message);
    if (reply === null) return;
    if ("checkpointError" in reply) {
      this.#options.onCheckpointError(reply.checkpointError);
      return;
    }
    if ("walPinned" in reply) {
      this.#options.onWalPinned?.(reply.walPinned);
      return;
    }
    const waiter = this.#pending.get(reply.id);
    if (waiter === undefined) return;
    this.#pending.delete(reply.id);
    if (this.#pending.size === 0) this.#worker.unref();
    if (reply.error === null) waiter.resolve();
    else waiter.reject(new Error(`SQLite write failed: ${reply.error}`));
  }

  #stopped(message: string): void {
    if (!this.#running) return;
    this.#running = false;
    this.#rejectPending(`the SQLite writing thread stopped (${message})`);
    this.#options.onStopped(message);
  }

  #rejectPending(message: string): void {
    for (const waiter of this.#pending.values()) waiter.reject(new Error(message));
    this.#pending.clear();
  }
}

const data = parentPort === null ? null : dataOf(workerData);
if (parentPort !== null && data !== null) runThread(parentPort, data);
