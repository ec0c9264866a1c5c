import { chmodSync, closeSync, constants, existsSync, fchmodSync, lstatSync, openSync, realpathSync, statSync } from "node:fs";
import type { Stats } from "node:fs";
import { stat } from "node:fs/promises";
import { DatabaseSync } from "node:sqlite";
import type { StatementSync } from "node:sqlite";
import { setTimeout as sleep } from "node:timers/promises";
import type { Logger } from "pino";
import { ConfigError } from "../config.js";
import { eventIdFloor } from "../keys/ids.js";
import { LogThrottle } from "../log-throttle.js";
import {
  CapExceededError,
  ConflictError,
  DuplicateError,
  IdempotencyKeyReusedError,
  MigrationsPendingError,
  StoreBusyError,
  StoreUnavailableError,
  TopUpKeysExhaustedError,
} from "./errors.js";
import {
  NothingWrittenError,
  WriteLockBusyError,
  asInteger,
  asIntegerOrNull,
  asText,
  asTextOrNull,
  fileSystemRefusal,
  immediateTransaction,
  integer,
  integerOrNull,
  isUniqueViolation,
  text,
  textOrNull,
} from "./sqlite-db.js";
import type { SqliteArrayRow, SqliteRow } from "./sqlite-db.js";
import { JOURNAL_SIZE_LIMIT_BYTES, WriteBehindStatements, WriterThread } from "./sqlite-writer.js";
import type { WalPinned } from "./sqlite-writer.js";
import { RECHECK_MS, sameFile } from "./data-dir-lock.js";
import { META_TABLE, PEPPER_CHECK_NAME, migrateSqlite, pendingSqliteMigrations } from "./sqlite-migrations.js";
import { namingFile } from "./sqlite-errors.js";
import { storedJson, storedMs, storedRateLimit, storedScopes } from "./stored-values.js";
import { CHAIN_GRACE_ENDED, MAX_KEYED_TOPUPS, TOPUP_KEY_RETENTION_MS, keyPrefixOfStart } from "./store.js";
import type {
  AccountDefaults,
  AccountRecord,
  AccountUpsert,
  CreateLimits,
  EnabledKey,
  KeyedTopUp,
  KeyPatch,
  KeyUpdateGuard,
  KeyRecord,
  KeySnapshot,
  KeyStore,
  ListKeysQuery,
  Role,
  Rotation,
  SubscriptionStatus,
  KeyMode,
  CreditState,
  UsageDelta,
  CreditDelta,
  UsagePage,
  UsagePageQuery,
  UsageRow,
  AuditRecord,
  AuditQuery,
  CreatedKey,
  UpsertedAccount,
} from "./store.js";


interface AccountRow {
  owner_id: string;
  plan: string;
  subscription_status: string;
  role: string;
  created_at: number;
  updated_at: number;
}

interface KeyRow {
  id: string;
  hash: string;
  owner_id: string;
  project_id: string | null;
  name: string;
  mode: string;
  start: string;
  last4: string;
  scopes: string;
  metadata: string;
  created_at: number;
  last_used_at: number | null;
  expires_at: number | null;
  revoked_at: number | null;
  revoke_reason: string | null;
  grace_ends_at: number | null;
  rotated_to_id: string | null;
  rate_limit: string | null;
  disabled_at: number | null;
}


/**
 * Expired keyed top-ups deleted by each keyed top-up: it adds one, so they go far faster than
 * they come, and no call does more than this much of that work.
 */
const TOPUP_PRUNE_BATCH = 64;

function toCredits(row: SqliteRow | undefined): CreditState {
  if (row === undefined) return { period: "", monthlyUsed: 0, topupBalance: 0, topupTotal: 0 };
  return { period: text(row, "credit_period"), monthlyUsed: integer(row, "monthly_used"), topupBalance: integer(row, "topup_balance"), topupTotal: integer(row, "topup_total") };
}

// Column reads are checked (node:sqlite types a row as name to any SQLite value); a value of the
// wrong type means a file keygate did not write, and fails the call instead of passing through.
function readAccountRow(row: SqliteRow): AccountRow {
  return {
    owner_id: text(row, "owner_id"),
    plan: text(row, "plan"),
    subscription_status: text(row, "subscription_status"),
    role: text(row, "role"),
    created_at: integer(row, "created_at"),
    updated_at: integer(row, "updated_at"),
  };
}

function readKeyRow(row: SqliteRow): KeyRow {
  return {
    id: text(row, "id"),
    hash: text(row, "hash"),
    owner_id: text(row, "owner_id"),
    project_id: textOrNull(row, "project_id"),
    name: text(row, "name"),
    mode: text(row, "mode"),
    start: text(row, "start"),
    last4: text(row, "last4"),
    scopes: text(row, "scopes"),
    metadata: text(row, "metadata"),
    created_at: integer(row, "created_at"),
    last_used_at: integerOrNull(row, "last_used_at"),
    expires_at: integerOrNull(row, "expires_at"),
    revoked_at: integerOrNull(row, "revoked_at"),
    revoke_reason: textOrNull(row, "revoke_reason"),
    grace_ends_at: integerOrNull(row, "grace_ends_at"),
    rotated_to_id: textOrNull(row, "rotated_to_id"),
    rate_limit: textOrNull(row, "rate_limit"),
    disabled_at: integerOrNull(row, "disabled_at"),
  };
}

// The cold lookup's columns, in the order its statement lists them: the key's, then its account's.
const SNAPSHOT_COLUMNS = [
  "k.id", "k.hash", "k.owner_id", "k.project_id", "k.name", "k.mode", "k.start", "k.last4", "k.scopes", "k.metadata", "k.created_at",
  "k.last_used_at", "k.expires_at", "k.revoked_at", "k.revoke_reason", "k.grace_ends_at", "k.rotated_to_id", "k.rate_limit", "k.disabled_at",
  "a.plan", "a.subscription_status", "a.role", "a.created_at", "a.updated_at",
] as const;
const SNAPSHOT_SQL = `SELECT ${SNAPSHOT_COLUMNS.join(", ")} FROM keys k JOIN accounts a ON a.owner_id = k.owner_id WHERE k.hash = ?`;
/** Where each of SNAPSHOT_COLUMNS is in the lookup's array row. */
const AT = Object.fromEntries(SNAPSHOT_COLUMNS.map((column, index) => [column, index])) as Record<(typeof SNAPSHOT_COLUMNS)[number], number>;

/**
 * The cold lookup's row, read as an array (node:sqlite then builds no object with a property a
 * column, a fifth of the lookup), with the same checked column reads as readKeyRow.
 */
function readSnapshotRow(row: SqliteArrayRow): KeySnapshot {
  const key: KeyRow = {
    id: asText(row[AT["k.id"]], "id"),
    hash: asText(row[AT["k.hash"]], "hash"),
    owner_id: asText(row[AT["k.owner_id"]], "owner_id"),
    project_id: asTextOrNull(row[AT["k.project_id"]], "project_id"),
    name: asText(row[AT["k.name"]], "name"),
    mode: asText(row[AT["k.mode"]], "mode"),
    start: asText(row[AT["k.start"]], "start"),
    last4: asText(row[AT["k.last4"]], "last4"),
    scopes: asText(row[AT["k.scopes"]], "scopes"),
    metadata: asText(row[AT["k.metadata"]], "metadata"),
    created_at: asInteger(row[AT["k.created_at"]], "created_at"),
    last_used_at: asIntegerOrNull(row[AT["k.last_used_at"]], "last_used_at"),
    expires_at: asIntegerOrNull(row[AT["k.expires_at"]], "expires_at"),
    revoked_at: asIntegerOrNull(row[AT["k.revoked_at"]], "revoked_at"),
    revoke_reason: asTextOrNull(row[AT["k.revoke_reason"]], "revoke_reason"),
    grace_ends_at: asIntegerOrNull(row[AT["k.grace_ends_at"]], "grace_ends_at"),
    rotated_to_id: asTextOrNull(row[AT["k.rotated_to_id"]], "rotated_to_id"),
    rate_limit: asTextOrNull(row[AT["k.rate_limit"]], "rate_limit"),
    disabled_at: asIntegerOrNull(row[AT["k.disabled_at"]], "disabled_at"),
  };
  return {
    key: toKey(key),
    account: toAccount({
      owner_id: key.owner_id,
      plan: asText(row[AT["a.plan"]], "a_plan"),
      subscription_status: asText(row[AT["a.subscription_status"]], "a_subscription_status"),
      role: asText(row[AT["a.role"]], "a_role"),
      created_at: asInteger(row[AT["a.created_at"]], "a_created_at"),
      updated_at: asInteger(row[AT["a.updated_at"]], "a_updated_at"),
    }),
  };
}

function readUsageRow(row: SqliteRow): UsageRow {
  return { keyId: text(row, "keyId"), day: text(row, "day"), outcome: text(row, "outcome"), count: integer(row, "count"), credits: integer(row, "credits") };
}



// Rows are written only by this module, so their enum columns hold values it wrote.
function toAccount(row: AccountRow): AccountRecord {
  const at = { store: "SQLite", ownerId: row.owner_id };
  return {
    ownerId: row.owner_id,
    plan: row.plan,
    subscriptionStatus: row.subscription_status as SubscriptionStatus,
    role: row.role as Role,
    createdAtMs: storedMs(row.created_at, "created_at", at),
    updatedAtMs: storedMs(row.updated_at, "updated_at", at),
  };
}

// The columns a Check decides by are checked (stored-values.ts): a value keygate never wrote
// (a scope list it would not make, a time of 9e999, which SQLite keeps as a REAL that reads as
// Infinity) fails the read instead of reaching L1.
function toKey(row: KeyRow): KeyRecord {
  const at = { store: "SQLite", keyId: row.id };
  return {
    id: row.id,
    hash: row.hash,
    ownerId: row.owner_id,
    projectId: row.project_id,
    name: row.name,
    mode: row.mode as KeyMode,
    start: row.start,
    last4: row.last4,
    scopes: storedScopes(storedJson(row.scopes, "scopes", at), at),
    metadata: JSON.parse(row.metadata) as Record<string, string>,
    createdAtMs: storedMs(row.created_at, "created_at", at),
    lastUsedAtMs: storedMs(row.last_used_at, "last_used_at", at),
    expiresAtMs: storedMs(row.expires_at, "expires_at", at),
    revokedAtMs: storedMs(row.revoked_at, "revoked_at", at),
    revokeReason: row.revoke_reason,
    graceEndsAtMs: storedMs(row.grace_ends_at, "grace_ends_at", at),
    rotatedToId: row.rotated_to_id,
    rateLimit: row.rate_limit === null ? null : storedRateLimit(storedJson(row.rate_limit, "rate_limit", at), "windowSeconds", at),
    disabledAtMs: storedMs(row.disabled_at, "disabled_at", at),
  };
}

function keyParams(key: KeyRecord): Record<string, string | number | null> {
  return {
    id: key.id,
    hash: key.hash,
    owner_id: key.ownerId,
    project_id: key.projectId,
    name: key.name,
    mode: key.mode,
    start: key.start,
    last4: key.last4,
    scopes: JSON.stringify(key.scopes),
    metadata: JSON.stringify(key.metadata),
    created_at: key.createdAtMs,
    last_used_at: key.lastUsedAtMs,
    expires_at: key.expiresAtMs,
    revoked_at: key.revokedAtMs,
    revoke_reason: key.revokeReason,
    grace_ends_at: key.graceEndsAtMs,
    rotated_to_id: key.rotatedToId,
    rate_limit: key.rateLimit === null ? null : JSON.stringify(key.rateLimit),
    disabled_at: key.disabledAtMs,
  };
}

/**
 * How long SQLite waits for another connection's lock before failing with SQLITE_BUSY: while the
 * store opens (before it serves) and on the writing thread. The store's own connection then waits
 * not at all (node:sqlite would wait on the event loop); its writes wait in whenUnlocked instead.
 */
const BUSY_TIMEOUT_MS = 5000;
/** How long a write of the store's own connection waits for the write lock before failing as unavailable. */
const LOCK_WAIT_MS = BUSY_TIMEOUT_MS;
/** The first and the longest pause between two tries for the write lock (doubling from the first). */
const LOCK_RETRY_FIRST_MS = 1;
const LOCK_RETRY_LONGEST_MS = 50;
/** How often the writing thread copies the WAL into the database file. */
const CHECKPOINT_INTERVAL_MS = 1000;
const WRITER_STOP_MS = 5000;
/** How long the stop's TRUNCATE checkpoint waits for other connections' reads to end (keygates sharing the file, a backup). */
const STOP_CHECKPOINT_WAIT_MS = 1000;
/** The warn line of a pinned WAL (WalPinned) at most this often: the thread reports it every second while it lasts. */
const WAL_PINNED_LOG_INTERVAL_MS = 60_000;
/** SQLite's own automatic checkpoint threshold, in pages, restored if the thread fails. */
const DEFAULT_AUTOCHECKPOINT_PAGES = 1000;
// From src/ (tests, tsx) the thread runs from its .ts file, which node strips of types; from dist/, the .js.
const WRITER_URL = new URL(import.meta.url.endsWith(".ts") ? "./sqlite-writer.ts" : "./sqlite-writer.js", import.meta.url);

/** How an embedded store is opened. */
export interface SqliteStoreOptions {
  /** false: refuse a database that needs migrating (MigrationsPendingError) instead of migrating it. */
  migrate?: boolean;
  /**
   * Write-behind batches and WAL checkpoints on a thread of their own (sqlite-writer.ts) instead
   * of the event loop (keygate serve). Off for short-lived stores (the CLI).
   */
  writeInBackground?: boolean;
  /** Told when the writing thread fails or stops (the store then writes and checkpoints here), or a checkpoint fails. */
  onWriterFailure?: (message: string) => void;
  /**
   * Told, once, that the database file was deleted or replaced while the store had it open, or
   * that a stop could not empty the WAL (error); once a minute while the WAL is pinned (warn).
   */
  logger?: Pick<Logger, "error" | "warn">;
}

/** The database and the WAL files beside it: they hold key hashes, so only the owner may read them. */
const OWNER_ONLY = 0o600;

/**
 * The row of the keygate_meta table (schema step 4) that holds the prefix the store's keys are
 * issued with (claimKeyPrefix); beside the pepper check, in the same table.
 */
const KEY_PREFIX_NAME = "key_prefix";

const { O_APPEND, O_CREAT, O_NONBLOCK, O_WRONLY } = constants;

function linkRefused(path: string, owner: number): ConfigError {
  return new ConfigError(
    `${path} is a symbolic link owned by uid ${owner}, not by the user keygate runs as (nor root): another user may have put it there, and keygate would write through it. Delete it, or if it is yours, chown -h it to the user keygate runs as`,
  );
}

/**
 * Refuses a symbolic link at the database's name or its journal files' that another user owns:
 * whoever can write the directory could point one at any file, which keygate would chmod and
 * SQLite write into (SQLite follows links, and a read-only connection still writes the -shm
 * file). A link of keygate's own user or root (a database kept on another volume) is followed.
 */
function refuseLinks(path: string): void {
  const uid = typeof process.geteuid === "function" ? process.geteuid() : null;
  if (uid === null) return;
  for (const name of [path, `${path}-wal`, `${path}-shm`, `${path}-journal`]) {
    const link = lstatSync(name, { throwIfNoEntry: false });
    if (link?.isSymbolicLink() === true && link.uid !== uid && link.uid !== 0) throw linkRefused(name, link.uid);
  }
}

/** Creates the database file owner-only before SQLite opens it; SQLite gives its -wal and -shm the same mode. */
function createOwnerOnly(path: string): void {
  refuseLinks(path);
  const fd = openSync(path, O_WRONLY | O_CREAT | O_APPEND | O_NONBLOCK, OWNER_ONLY);
  try {
    fchmodSync(fd, OWNER_ONLY);
  } finally {
    closeSync(fd);
  }
}

/** Tightens WAL files an older version left world-readable; SQLite keeps the mode of a file it reuses. */
function tightenWalFiles(path: string): void {
  for (const suffix of ["-wal", "-shm"]) {
    try {
      chmodSync(`${path}${suffix}`, OWNER_ONLY);
    } catch (error) {
      if (!(error instanceof Error && "code" in error && error.code === "ENOENT")) throw error;
    }
  }
}

/**
 * The name of the WAL file SQLite keeps for the database at `path`: SQLite resolves links in the
 * path it opens and keeps -wal and -shm beside the file a link leads to (keygate's own link to a
 * database on another volume), so the name beside the link leads nowhere. The given path's if it
 * cannot be resolved.
 */
function walPathOf(path: string): string {
  try {
    return `${realpathSync(path)}-wal`;
  } catch {
    return `${path}-wal`;
  }
}

type StatementName =
  | "getAccount" | "insertAccount" | "updateAccount" | "countActive" | "insertKey" | "getKey" | "snapshotByHash"
  | "updateName" | "updateScopes" | "updateRateLimit" | "disable" | "enable" | "getCredits" | "addCredits"
  | "getTopUp" | "countTopUps" | "putTopUp" | "pruneTopUps" | "listUsage" | "usageKeyDays" | "usageTotals" | "revoke" | "markRotated" | "appendAudit" | "ping";

/**
 * Whether the SQLite file at `path` holds a key or a recorded pepper check, read without writing
 * and before any schema step (a file of any version): a data directory that lost its pepper file
 * must not be given a new pepper.
 */
export function sqliteFileHoldsKeys(path: string): boolean {
  refuseLinks(path);
  if (!existsSync(path)) return false;
  let db: DatabaseSync | undefined;
  try {
    db = new DatabaseSync(path, { readOnly: true, timeout: BUSY_TIMEOUT_MS });
    const tables = new Set(db.prepare("SELECT name FROM sqlite_master WHERE type = 'table'").all().map((row) => text(row, "name")));
    if (tables.has("keys") && db.prepare("SELECT 1 FROM keys LIMIT 1").get() !== undefined) return true;
    return tables.has(META_TABLE) && db.prepare(`SELECT 1 FROM ${META_TABLE} WHERE name = ?`).get(PEPPER_CHECK_NAME) !== undefined;
  } catch (error) {
    throw namingFile(path, error);
  } finally {
    if (db?.isOpen === true) db.close();
  }
}

/**
 * Opens the store's own connection (every KeyAdmin write, and every read) to the database file
 * in WAL mode and applies its pending schema steps; with `migrate` false a database that needs
 * any is refused (MigrationsPendingError). SQLite's own errors name the file ("<path>: file is
 * not a database"): a start that fails on a damaged file says which one.
 */
export function openStoreDatabase(path: string, migrate: boolean): DatabaseSync {
  let db: DatabaseSync | undefined;
  try {
    // Named parameters are bound from bare keys ({ owner_id } for @owner_id), as better-sqlite3 did.
    // The busy timeout is set at open (node:sqlite's default is 0), so switching to WAL and the
    // schema steps wait for another process holding the file: the store does not serve yet.
    db = new DatabaseSync(path, { allowBareNamedParameters: true, timeout: BUSY_TIMEOUT_MS });
    db.exec("PRAGMA journal_mode = WAL");
    // FULL: a commit syncs the WAL before it returns, so a change answered OK (a revoke, a keyed
    // top-up) survives a power loss or an OS crash; with NORMAL it could roll back. The writing
    // thread's batches keep NORMAL (openWriterDatabase), as do those written here when it is down.
    db.exec("PRAGMA synchronous = FULL");
    db.exec("PRAGMA foreign_keys = ON");
    // This connection's commits also start the log over (KeyAdmin writes): the -wal file is then
    // cut back, whatever size it grew to (sqlite-writer.ts).
    db.exec(`PRAGMA journal_size_limit = ${JOURNAL_SIZE_LIMIT_BYTES}`);
    const pending = pendingSqliteMigrations(db);
    if (!migrate && pending.length > 0) throw new MigrationsPendingError("SQLite", pending);
    migrateSqlite(db);
    // From here a lock held elsewhere fails a statement at once (whenUnlocked tries writes again
    // off the event loop). Reads take no lock a writer holds in WAL mode, so they do not meet it.
    db.exec("PRAGMA busy_timeout = 0");
    return db;
  } catch (error) {
    if (db?.isOpen === true) db.close();
    throw namingFile(path, error);
  }
}

/**
 * A write's failure as the caller hears it, naming the file and never the rows: the file system's
 * refusal with nothing written (NothingWrittenError: a full volume, an I/O error before COMMIT) as
 * StoreBusyError, answered UNAVAILABLE with nothing unknown to log; one at COMMIT that may have
 * been written after all (an I/O error there) as StoreUnavailableError, whose outcome is unknown.
 */
function writeFailure(path: string, error: unknown): unknown {
  if (error instanceof NothingWrittenError) return new StoreBusyError(`SQLite: ${path}: ${error.reason}; nothing was written`, { cause: error });
  const reason = fileSystemRefusal(error);
  if (reason !== null) return new StoreUnavailableError(`SQLite: ${path}: ${reason} at COMMIT; the change may have been written`, { cause: error });
  return error;
}

/**
 * Runs `attempt`, a transaction of the store's own connection, until it finds the write lock free
 * (another process's `sqlite3` session or VACUUM, the writing thread's batch): the connection does
 * not wait in SQLite, which would hold the event loop and every Check with it, so a transaction
 * whose BEGIN met the lock (WriteLockBusyError: nothing ran) is run again after a pause, from 1 ms
 * doubling to 50 ms, for LOCK_WAIT_MS; then the call fails as unavailable, with nothing written.
 * Any other failure is thrown as writeFailure tells it.
 */
async function whenUnlocked<T>(path: string, attempt: () => T): Promise<T> {
  const deadlineMs = performance.now() + LOCK_WAIT_MS;
  for (let pauseMs = LOCK_RETRY_FIRST_MS; ; pauseMs = Math.min(pauseMs * 2, LOCK_RETRY_LONGEST_MS)) {
    try {
      return attempt();
    } catch (error) {
      if (!(error instanceof WriteLockBusyError)) throw writeFailure(path, error);
      const leftMs = deadlineMs - performance.now();
      if (leftMs <= 0) {
        throw new StoreBusyError(`SQLite: another connection held the database's write lock for ${LOCK_WAIT_MS} ms; nothing was written`, { cause: error });
      }
      await sleep(Math.min(pauseMs, leftMs));
    }
  }
}

function isMissing(error: unknown): boolean {
  return error instanceof Error && "code" in error && error.code === "ENOENT";
}

/** The embedded store: one SQLite file through Node's built-in node:sqlite, in WAL mode. */
export class SqliteKeyStore implements KeyStore {
  readonly kind = "sqlite";
  readonly #path: string;
  readonly #db: DatabaseSync;
  readonly #stmt: Record<StatementName, StatementSync>;
  readonly #writeBehind: WriteBehindStatements;
  #writer: WriterThread | null = null;
  readonly #logger: Pick<Logger, "error" | "warn"> | undefined;
  /**
   * The database file opened: its device and inode, stat'ed through a link at the path (keygate's
   * own link to a database on another volume), as SQLite opened it. null in memory.
   */
  readonly #opened: Stats | null;
  /** The WAL file of the database opened (walPathOf), named in the log lines about it. */
  readonly #walPath: string;
  /** What is at the path instead of the file opened, once found: the store then writes nothing until a restart. */
  #moved: "nothing" | "another file" | null = null;
  readonly #recheck: NodeJS.Timeout | null = null;
  /** Spaces out the writing thread's reports of a pinned WAL (one kind). */
  readonly #walPinnedLog = new LogThrottle(WAL_PINNED_LOG_INTERVAL_MS, 1);

  /**
   * Opens (and creates) the database file; ":memory:" gives a private in-memory store. Pending
   * schema steps are applied first; with `migrate: false` a database that needs any is refused
   * (MigrationsPendingError), and one written by a newer keygate always is (NewerSchemaError).
   */
  constructor(path: string, options: SqliteStoreOptions = {}) {
    const onDisk = path !== ":memory:" && path !== "";
    if (onDisk) createOwnerOnly(path);
    this.#path = path;
    this.#logger = options.logger;
    // Before the open: a file put at the path in between is then found moved, never taken for the one opened.
    this.#opened = onDisk ? statSync(path) : null;
    // Resolved with the stat, so that both name the file SQLite opens: a link pointed elsewhere
    // later does not move the WAL SQLite holds.
    this.#walPath = onDisk ? walPathOf(path) : `${path}-wal`;
    this.#db = openStoreDatabase(path, options.migrate !== false);
    const db = this.#db;
    try {
      this.#writeBehind = new WriteBehindStatements(db);
      this.#stmt = this.#prepare(db);
    } catch (error) {
      db.close();
      throw namingFile(path, error);
    }
    if (onDisk) tightenWalFiles(path);
    if (onDisk && options.writeInBackground === true) this.#startWriter(path, options.onWriterFailure);
    if (onDisk) {
      this.#recheck = setInterval(() => void this.#recheckFile(), RECHECK_MS);
      this.#recheck.unref();
    }
  }

  /**
   * SQLite holds the file it opened, not its name: deleted, or replaced (`mv` of a backup over
   * it), it keeps writing into a file no name leads to, which the next start does not open, so
   * every change answered OK from then on would vanish with the process. So the store looks that
   * the path still names that file (once a second, in every write transaction after its BEGIN, and
   * at each readiness ping); once it does not, the store refuses writes with nothing written
   * (StoreBusyError), fails its ping (/readyz 503) and its key lookups: a Check of a key not cached
   * fails closed rather than be decided from a file that is no longer the database.
   */
  async #recheckFile(): Promise<void> {
    if (this.#moved !== null) return;
    // Other errors (a permission taken away) are left to the next write's look, which reports them.
    const now = await stat(this.#path).catch((error: unknown) => (isMissing(error) ? undefined : null));
    if (now !== null) this.#compareFile(now);
  }

  /** Compares the file now at the path (undefined: none) with the one opened; a difference is kept and logged once. */
  #compareFile(now: Stats | undefined): void {
    if (this.#opened === null || this.#moved !== null || (now !== undefined && sameFile(now, this.#opened))) return;
    this.#moved = now === undefined ? "nothing" : "another file";
    if (this.#recheck !== null) clearInterval(this.#recheck);
    this.#logger?.error(
      { file: this.#path, found: this.#moved },
      `the SQLite database file was deleted or replaced while keygate served from it: SQLite writes only into the file it opened, which the next start does not open, so keygate writes nothing (KeyAdmin changes answer UNAVAILABLE), /readyz answers 503 and Checks of keys it has not cached are refused. Restart keygate with SIGTERM (a clean stop empties the WAL of the file it opened, which the next start would otherwise apply to the file now there); until it stops, the file it opened is readable through /proc/${process.pid}/fd`,
    );
  }

  /** Refuses, with nothing written, a write (or a ping) once the path no longer names the file opened; looks again first. */
  #refuseIfMoved(): void {
    if (this.#opened !== null && this.#moved === null) {
      let now: Stats | undefined;
      try {
        now = statSync(this.#path, { throwIfNoEntry: false });
      } catch (error) {
        throw new StoreBusyError(`SQLite: ${this.#path} could not be stat'ed to check that it is still the file keygate opened; nothing was written`, { cause: error });
      }
      this.#compareFile(now);
    }
    if (this.#moved !== null) throw this.#movedError();
  }

  #movedError(): StoreBusyError {
    return new StoreBusyError(`SQLite: ${this.#path} is no longer the file keygate opened (deleted or replaced); keygate writes nothing until it is restarted`);
  }

  #prepare(db: DatabaseSync): Record<StatementName, StatementSync> {
    const stmt: Record<StatementName, StatementSync> = {
      getAccount: db.prepare("SELECT * FROM accounts WHERE owner_id = ?"),
      insertAccount: db.prepare(
        "INSERT INTO accounts (owner_id, plan, subscription_status, role, created_at, updated_at) VALUES (@owner_id, @plan, @subscription_status, @role, @created_at, @updated_at)",
      ),
      updateAccount: db.prepare(
        "UPDATE accounts SET plan = @plan, subscription_status = @subscription_status, role = @role, updated_at = @updated_at WHERE owner_id = @owner_id",
      ),
      countActive: db.prepare(
        "SELECT COUNT(*) AS n FROM keys WHERE owner_id = ? AND mode = ? AND revoked_at IS NULL AND rotated_to_id IS NULL AND (expires_at IS NULL OR expires_at > ?)",
      ),
      insertKey: db.prepare(
        `INSERT INTO keys (id, hash, owner_id, project_id, name, mode, start, last4, scopes, metadata, created_at, last_used_at, expires_at, revoked_at, revoke_reason, grace_ends_at, rotated_to_id, rate_limit, disabled_at)
         VALUES (@id, @hash, @owner_id, @project_id, @name, @mode, @start, @last4, @scopes, @metadata, @created_at, @last_used_at, @expires_at, @revoked_at, @revoke_reason, @grace_ends_at, @rotated_to_id, @rate_limit, @disabled_at)`,
      ),
      getKey: db.prepare("SELECT * FROM keys WHERE id = ?"),
      snapshotByHash: db.prepare(SNAPSHOT_SQL),
      updateName: db.prepare("UPDATE keys SET name = ? WHERE id = ?"),
      updateScopes: db.prepare("UPDATE keys SET scopes = ? WHERE id = ?"),
      updateRateLimit: db.prepare("UPDATE keys SET rate_limit = ? WHERE id = ?"),
      // Disabling a disabled key keeps the time it was first disabled.
      disable: db.prepare("UPDATE keys SET disabled_at = COALESCE(disabled_at, ?) WHERE id = ?"),
      enable: db.prepare("UPDATE keys SET disabled_at = NULL WHERE id = ?"),
      getCredits: db.prepare("SELECT credit_period, monthly_used, topup_balance, topup_total FROM accounts WHERE owner_id = ?"),
      addCredits: db.prepare("UPDATE accounts SET topup_balance = topup_balance + @amount, topup_total = topup_total + @amount WHERE owner_id = @owner"),
      getTopUp: db.prepare("SELECT amount, topup_total, at FROM credit_topups WHERE owner_id = ? AND idempotency_key = ?"),
      countTopUps: db.prepare("SELECT COUNT(*) AS n, MIN(at) AS oldest FROM credit_topups WHERE owner_id = ? AND at > ?"),
      // REPLACE: an expired record of the same key, not yet pruned, gives way to the new one.
      putTopUp: db.prepare(
        "INSERT OR REPLACE INTO credit_topups (owner_id, idempotency_key, amount, topup_total, at) VALUES (@owner, @key, @amount, @total, @at)",
      ),
      pruneTopUps: db.prepare(`DELETE FROM credit_topups WHERE rowid IN (SELECT rowid FROM credit_topups WHERE at <= ? ORDER BY at LIMIT ${TOPUP_PRUNE_BATCH})`),
      listUsage: db.prepare(
        "SELECT key_id AS keyId, day, outcome, count, credits FROM usage WHERE owner_id = ? AND day >= ? AND day <= ? ORDER BY day, key_id, outcome",
      ),
      // A page of key-days walks the primary key (owner_id, day, key_id, outcome) from the
      // previous page's last one and stops after @limit, then reads each one's rows (CROSS JOIN
      // keeps that order; a plain JOIN scanned all of the owner's rows): one page, whatever the range.
      usageKeyDays: db.prepare(
        "WITH page AS (SELECT DISTINCT day, key_id FROM usage WHERE owner_id = @owner AND day >= @from AND day <= @to AND (day, key_id) > (@afterDay, @afterKey) " +
          "ORDER BY day, key_id LIMIT @limit) " +
          "SELECT u.key_id AS keyId, u.day AS day, u.outcome AS outcome, u.count AS count, u.credits AS credits FROM page " +
          "CROSS JOIN usage u WHERE u.owner_id = @owner AND u.day = page.day AND u.key_id = page.key_id ORDER BY u.day, u.key_id, u.outcome",
      ),
      usageTotals: db.prepare(
        "SELECT outcome, SUM(count) AS count, SUM(credits) AS credits FROM usage WHERE owner_id = ? AND day >= ? AND day <= ? GROUP BY outcome ORDER BY outcome",
      ),
      revoke: db.prepare("UPDATE keys SET revoked_at = ?, revoke_reason = ? WHERE id = ? AND revoked_at IS NULL"),
      markRotated: db.prepare("UPDATE keys SET rotated_to_id = ?, grace_ends_at = ?, revoked_at = ?, revoke_reason = ? WHERE id = ?"),
      // An id already in is the same change, recorded by an earlier call (EventIds.derived): the first record stands.
      appendAudit: db.prepare("INSERT INTO audit (id, at, actor, action, key_id, owner_id, changes, source) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING"),
      ping: db.prepare("SELECT 1"),
    };
    stmt.snapshotByHash.setReturnArrays(true);
    return stmt;
  }

  async upsertAccount(input: AccountUpsert, defaults: AccountDefaults, nowMs: number): Promise<UpsertedAccount> {
    return this.#transaction(() => {
      const existing = this.#getAccountRow(input.ownerId);
      return { account: this.#upsertAccountSync(input, defaults, nowMs), before: existing === undefined ? null : toAccount(existing) };
    });
  }

  /**
   * `fn` in one IMMEDIATE transaction of the store's connection, once the write lock is free
   * (whenUnlocked), and while the path still names the file opened: looked at after BEGIN, so a
   * file moved before this write's lock is found by it.
   */
  #transaction<T>(fn: () => T): Promise<T> {
    return whenUnlocked(this.#path, () =>
      immediateTransaction(this.#db, () => {
        this.#refuseIfMoved();
        return fn();
      }),
    );
  }

  /**
   * A write-behind batch written here (the writing thread down, or none): with synchronous NORMAL,
   * as on the thread. Synced, each call of a flush (64 rows) would hold the event loop for an fsync.
   */
  #unsynced(write: () => void): void {
    this.#db.exec("PRAGMA synchronous = NORMAL");
    try {
      write();
    } finally {
      this.#db.exec("PRAGMA synchronous = FULL");
    }
  }

  #getAccountRow(ownerId: string): AccountRow | undefined {
    const row = this.#stmt.getAccount.get(ownerId);
    return row === undefined ? undefined : readAccountRow(row);
  }

  #getKeyRow(id: string): KeyRow | undefined {
    const row = this.#stmt.getKey.get(id);
    return row === undefined ? undefined : readKeyRow(row);
  }

  #countActive(ownerId: string, mode: KeyMode, nowMs: number): number {
    const row = this.#stmt.countActive.get(ownerId, mode, nowMs);
    return row === undefined ? 0 : integer(row, "n");
  }

  #upsertAccountSync(input: AccountUpsert, defaults: AccountDefaults, nowMs: number): AccountRecord {
    const existing = this.#getAccountRow(input.ownerId);
    const row: AccountRow = {
      owner_id: input.ownerId,
      plan: input.plan ?? existing?.plan ?? defaults.plan,
      subscription_status: input.subscriptionStatus ?? existing?.subscription_status ?? defaults.subscriptionStatus,
      role: input.role ?? existing?.role ?? defaults.role,
      created_at: existing?.created_at ?? nowMs,
      updated_at: nowMs,
    };
    if (existing === undefined) this.#stmt.insertAccount.run({ ...row });
    // node:sqlite refuses a named parameter the statement does not have: created_at stays as it is.
    else this.#stmt.updateAccount.run({ owner_id: row.owner_id, plan: row.plan, subscription_status: row.subscription_status, role: row.role, updated_at: row.updated_at });
    return toAccount(row);
  }

  async getAccount(ownerId: string): Promise<AccountRecord | null> {
    const row = this.#getAccountRow(ownerId);
    return row === undefined ? null : toAccount(row);
  }

  async countActiveKeys(ownerId: string, nowMs: number, mode: KeyMode = "live"): Promise<number> {
    return this.#countActive(ownerId, mode, nowMs);
  }

  async createKey(record: KeyRecord, limits: CreateLimits): Promise<CreatedKey> {
    // IMMEDIATE takes the write lock before counting, so the cap also holds across processes.
    return this.#transaction(() => {
      const existing = this.#getAccountRow(record.ownerId);
      const createdAccount = existing === undefined ? this.#upsertAccountSync({ ownerId: record.ownerId }, limits.accountDefaults, limits.nowMs) : null;
      const plan = existing?.plan ?? createdAccount?.plan ?? limits.accountDefaults.plan;
      const cap = limits.maxActiveKeysFor(plan, record.mode);
      const active = this.#countActive(record.ownerId, record.mode, limits.nowMs);
      if (active >= cap) throw new CapExceededError(plan, cap, record.mode);
      this.#insertKeySync(record);
      return { key: record, createdAccount };
    });
  }

  /**
   * Inserts keys of existing accounts in one transaction, without the active-key cap: for
   * restores and for seeding large stores, where one transaction per key would take minutes.
   * It waits for no lock (WriteLockBusyError): for a file that no keygate is serving from.
   */
  importKeys(records: readonly KeyRecord[]): void {
    immediateTransaction(this.#db, () => {
      this.#refuseIfMoved();
      for (const record of records) this.#insertKeySync(record);
    });
  }

  #insertKeySync(record: KeyRecord): void {
    try {
      this.#stmt.insertKey.run(keyParams(record));
    } catch (error) {
      if (isUniqueViolation(error)) throw new DuplicateError("a key with this id or hash already exists", { cause: error });
      throw error;
    }
  }

  async getKey(id: string): Promise<KeyRecord | null> {
    const row = this.#getKeyRow(id);
    return row === undefined ? null : toKey(row);
  }

  async findSnapshotByHash(hash: string): Promise<KeySnapshot | null> {
    return this.findSnapshotByHashNow(hash);
  }

  findSnapshotByHashNow(hash: string): KeySnapshot | null {
    // No look at the file here (the hot path): the flag the once-a-second look and the writes keep.
    if (this.#moved !== null) throw this.#movedError();
    // setReturnArrays(true) (below): the row is an array in SNAPSHOT_COLUMNS' order.
    const row = this.#stmt.snapshotByHash.get(hash) as unknown as SqliteArrayRow | undefined;
    return row === undefined ? null : readSnapshotRow(row);
  }

  async listKeys(query: ListKeysQuery): Promise<KeyRecord[]> {
    const where = ["owner_id = @owner_id"];
    const params: Record<string, string | number> = { owner_id: query.ownerId, limit: query.limit };
    if (query.projectId !== undefined) {
      where.push("project_id = @project_id");
      params["project_id"] = query.projectId;
    }
    if (!query.includeRevoked) {
      where.push("revoked_at IS NULL AND (rotated_to_id IS NULL OR grace_ends_at > @now)");
      // node:sqlite refuses a named parameter the statement does not have, so it is bound only with its condition.
      params["now"] = query.nowMs;
    }
    if (query.afterId !== undefined) {
      where.push("id > @after_id");
      params["after_id"] = query.afterId;
    }
    const rows = this.#db.prepare(`SELECT * FROM keys WHERE ${where.join(" AND ")} ORDER BY id LIMIT @limit`).all(params);
    return rows.map((row) => toKey(readKeyRow(row)));
  }

  async updateKey(id: string, patch: KeyPatch, guard?: KeyUpdateGuard): Promise<KeyRecord | null> {
    const row = await this.#transaction(() => {
      if (guard !== undefined) {
        const before = this.#getKeyRow(id);
        if (before === undefined) return undefined;
        const key = toKey(before);
        if ((guard.unrevoked === true && key.revokedAtMs !== null) || (guard.unrotated === true && key.rotatedToId !== null)) return before;
      }
      if (patch.name !== undefined) this.#stmt.updateName.run(patch.name, id);
      if (patch.scopes !== undefined) this.#stmt.updateScopes.run(JSON.stringify(patch.scopes), id);
      if (patch.rateLimit !== undefined) this.#stmt.updateRateLimit.run(patch.rateLimit === null ? null : JSON.stringify(patch.rateLimit), id);
      if (patch.disabledAtMs === null) this.#stmt.enable.run(id);
      else if (patch.disabledAtMs !== undefined) this.#stmt.disable.run(patch.disabledAtMs, id);
      return this.#getKeyRow(id);
    });
    return row === undefined ? null : toKey(row);
  }

  async redisableKey(id: string, disabledAtMs: number, whileAtMs?: number | null): Promise<KeyRecord | null> {
    // Prepared per call: a rare admin write, kept out of the hot statements. `IS` matches NULL too.
    const row = await this.#transaction(() => {
      if (whileAtMs === undefined) this.#db.prepare("UPDATE keys SET disabled_at = ? WHERE id = ? AND revoked_at IS NULL").run(disabledAtMs, id);
      else this.#db.prepare("UPDATE keys SET disabled_at = ? WHERE id = ? AND revoked_at IS NULL AND disabled_at IS ?").run(disabledAtMs, id, whileAtMs);
      return this.#getKeyRow(id);
    });
    return row === undefined ? null : toKey(row);
  }

  async enableKey(id: string, inGraceIds: readonly string[]): Promise<EnabledKey | null> {
    return this.#transaction(() => {
      const row = this.#getKeyRow(id);
      if (row === undefined) return null;
      if (row.revoked_at !== null || row.disabled_at === null) return { key: toKey(row), resumed: [], changed: false };
      const resumed: KeyRecord[] = [];
      // Paused with it: its own time, after its issue (pausedWith in the lifecycle).
      if (row.disabled_at > row.created_at) {
        const resume = this.#db.prepare("UPDATE keys SET disabled_at = NULL WHERE id = ? AND rotated_to_id = ? AND disabled_at = ? AND revoked_at IS NULL");
        for (const keyId of inGraceIds) {
          if (Number(resume.run(keyId, id, row.disabled_at).changes) === 0) continue;
          const follower = this.#getKeyRow(keyId);
          if (follower !== undefined) resumed.push(toKey(follower));
        }
      }
      this.#stmt.enable.run(id);
      const enabled = this.#getKeyRow(id);
      return enabled === undefined ? null : { key: toKey(enabled), resumed, changed: true };
    });
  }

  async pauseKeysInGrace(id: string, inGraceIds: readonly string[]): Promise<KeyRecord[]> {
    return this.#transaction(() => {
      const pausedAtMs = this.#getKeyRow(id)?.disabled_at ?? null;
      if (pausedAtMs === null) return [];
      const pause = this.#db.prepare("UPDATE keys SET disabled_at = ? WHERE id = ? AND rotated_to_id = ? AND disabled_at IS NULL AND revoked_at IS NULL");
      const paused: KeyRecord[] = [];
      for (const keyId of inGraceIds) {
        if (Number(pause.run(pausedAtMs, keyId, id).changes) === 0) continue;
        const follower = this.#getKeyRow(keyId);
        if (follower !== undefined) paused.push(toKey(follower));
      }
      return paused;
    });
  }

  async revokeKey(id: string, nowMs: number, reason: string | null): Promise<KeyRecord | null> {
    const row = await this.#transaction(() => {
      this.#stmt.revoke.run(nowMs, reason, id);
      return this.#getKeyRow(id);
    });
    return row === undefined ? null : toKey(row);
  }

  async rotateKey(previousId: string, next: KeyRecord, graceEndsAtMs: number, nowMs: number, revokedAtMs = nowMs): Promise<Rotation> {
    return this.#transaction(() => {
      const row = this.#getKeyRow(previousId);
      if (row === undefined) throw new ConflictError(`key ${previousId} does not exist`);
      const previous = toKey(row);
      if (previous.revokedAtMs !== null || previous.rotatedToId !== null || (previous.expiresAtMs !== null && previous.expiresAtMs <= nowMs)) {
        throw new ConflictError(`key ${previousId} is not active, so it cannot be rotated`);
      }
      this.#insertKeySync(next);
      const immediate = graceEndsAtMs <= nowMs;
      this.#stmt.markRotated.run(next.id, graceEndsAtMs, immediate ? nowMs : null, immediate ? "rotated" : null, previousId);
      const updated = this.#getKeyRow(previousId);
      if (updated === undefined) throw new ConflictError(`key ${previousId} vanished during rotation`);
      return { next, previous: toKey(updated), ended: this.#endGraceFor(previous, nowMs, revokedAtMs) };
    });
  }

  /** Inside a rotation of `rotated`: revokes the keys still in grace from rotating to it (an earlier link of the chain). */
  #endGraceFor(rotated: KeyRecord, nowMs: number, revokedAtMs: number): KeyRecord[] {
    // By owner, so the owner_state index finds them.
    const inGrace = this.#db
      .prepare("SELECT id FROM keys WHERE owner_id = ? AND revoked_at IS NULL AND rotated_to_id = ? AND grace_ends_at > ? AND (expires_at IS NULL OR expires_at > ?)")
      .all(rotated.ownerId, rotated.id, nowMs, nowMs);
    const ended: KeyRecord[] = [];
    for (const found of inGrace) {
      const keyId = text(found, "id");
      this.#stmt.revoke.run(revokedAtMs, CHAIN_GRACE_ENDED, keyId);
      const row = this.#getKeyRow(keyId);
      if (row !== undefined) ended.push(toKey(row));
    }
    return ended;
  }

  async touchLastUsed(lastUsed: ReadonlyMap<string, number>): Promise<void> {
    this.#refuseIfMoved();
    if (this.#writer !== null) return this.#writer.touch(lastUsed);
    return whenUnlocked(this.#path, () => this.#unsynced(() => this.#writeBehind.touch(lastUsed)));
  }

  async getCredits(ownerId: string): Promise<CreditState> {
    return toCredits(this.#stmt.getCredits.get(ownerId));
  }

  async addCredits(ownerId: string, amount: number): Promise<CreditState> {
    const row = await this.#transaction(() => {
      this.#stmt.addCredits.run({ amount, owner: ownerId });
      return this.#stmt.getCredits.get(ownerId);
    });
    return toCredits(row);
  }

  async addCreditsOnce(ownerId: string, amount: number, idempotencyKey: string, nowMs: number, atMs = nowMs): Promise<KeyedTopUp | null> {
    const expiredAtMs = nowMs - TOPUP_KEY_RETENTION_MS;
    // One IMMEDIATE transaction: the key's record and the credits are written together or not at
    // all, and a second process with the same key waits for this one and then finds its record.
    return this.#transaction(() => {
      this.#stmt.pruneTopUps.run(expiredAtMs);
      const kept = this.#stmt.getTopUp.get(ownerId, idempotencyKey);
      if (kept !== undefined && integer(kept, "at") > expiredAtMs) {
        const topUp = { ownerId, idempotencyKey, amount: integer(kept, "amount"), topupTotal: integer(kept, "topup_total"), atMs: integer(kept, "at") };
        if (topUp.amount !== amount) throw new IdempotencyKeyReusedError(topUp.amount, amount);
        return { topUp, replayed: true, credits: toCredits(this.#stmt.getCredits.get(ownerId)) };
      }
      const held = this.#stmt.countTopUps.get(ownerId, expiredAtMs);
      if (held !== undefined && integer(held, "n") >= MAX_KEYED_TOPUPS) {
        throw new TopUpKeysExhaustedError(MAX_KEYED_TOPUPS, integer(held, "oldest") + TOPUP_KEY_RETENTION_MS);
      }
      if (Number(this.#stmt.addCredits.run({ amount, owner: ownerId }).changes) === 0) return null;
      const credits = toCredits(this.#stmt.getCredits.get(ownerId));
      this.#stmt.putTopUp.run({ owner: ownerId, key: idempotencyKey, amount, total: credits.topupTotal, at: atMs });
      return { topUp: { ownerId, idempotencyKey, amount, topupTotal: credits.topupTotal, atMs }, replayed: false, credits };
    });
  }

  async applyUsage(usage: readonly UsageDelta[], credits: readonly CreditDelta[]): Promise<void> {
    this.#refuseIfMoved();
    if (this.#writer !== null) return this.#writer.applyUsage(usage, credits);
    return whenUnlocked(this.#path, () => this.#unsynced(() => this.#writeBehind.applyUsage(usage, credits)));
  }

  async listUsage(ownerId: string, fromDay: string, toDay: string): Promise<UsageRow[]> {
    return this.#stmt.listUsage.all(ownerId, fromDay, toDay).map(readUsageRow);
  }

  async listUsagePage(query: UsagePageQuery): Promise<UsagePage> {
    const { ownerId, fromDay, toDay, after, keyDays } = query;
    const totals = this.#stmt.usageTotals.all(ownerId, fromDay, toDay).map((row) => ({ outcome: text(row, "outcome"), count: integer(row, "count"), credits: integer(row, "credits") }));
    // A day is never "": the first page starts after ("", ""). A later one seeks from its day
    // (@from), which the row value alone does not make the index do.
    const from = after !== null && after.day > fromDay ? after.day : fromDay;
    const rows = this.#stmt.usageKeyDays.all({ owner: ownerId, from, to: toDay, afterDay: after?.day ?? "", afterKey: after?.keyId ?? "", limit: keyDays });
    return { totals, rows: rows.map(readUsageRow) };
  }

  async appendAudit(record: AuditRecord): Promise<void> {
    await this.#transaction(() => {
      this.#stmt.appendAudit.run(record.id, record.atMs, record.actor, record.action, record.keyId, record.ownerId, JSON.stringify(record.changes), record.source);
    });
  }

  async listAudit(query: AuditQuery): Promise<AuditRecord[]> {
    const where: string[] = [];
    const params: Record<string, string | number> = { limit: query.limit };
    if (query.ownerId !== undefined) {
      where.push("owner_id = @owner_id");
      params["owner_id"] = query.ownerId;
    }
    if (query.keyId !== undefined) {
      where.push("key_id = @key_id");
      params["key_id"] = query.keyId;
    }
    if (query.sinceMs !== undefined) {
      // The id bound lets SQLite search from `since` by the id (or owner, key) index; `at` decides.
      where.push("id >= @min_id", "at >= @since");
      params["min_id"] = eventIdFloor(query.sinceMs);
      params["since"] = query.sinceMs;
    }
    if (query.afterId !== undefined) {
      where.push("id > @after_id");
      params["after_id"] = query.afterId;
    }
    const sql = `SELECT * FROM audit ${where.length > 0 ? `WHERE ${where.join(" AND ")}` : ""} ORDER BY id LIMIT @limit`;
    return this.#db.prepare(sql).all(params).map((row) => ({
      id: text(row, "id"),
      atMs: integer(row, "at"),
      actor: text(row, "actor"),
      action: text(row, "action"),
      keyId: textOrNull(row, "key_id"),
      ownerId: textOrNull(row, "owner_id"),
      changes: JSON.parse(text(row, "changes")) as Record<string, unknown>,
      source: text(row, "source"),
    }));
  }

  async lastAuditId(): Promise<string | null> {
    // Once a start: prepared here rather than kept with the store's statements.
    const row: SqliteRow | undefined = this.#db.prepare("SELECT id FROM audit ORDER BY id DESC LIMIT 1").get();
    return row === undefined ? null : text(row, "id");
  }

  async ping(): Promise<void> {
    this.#refuseIfMoved();
    this.#stmt.ping.get();
  }

  async claimPepperCheck(check: string): Promise<string> {
    let row: SqliteRow | undefined;
    try {
      // Once a start: prepared here rather than kept with the store's statements.
      row = await this.#transaction(() => {
        this.#db.prepare(`INSERT INTO ${META_TABLE} (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING`).run(PEPPER_CHECK_NAME, check);
        return this.#db.prepare(`SELECT value FROM ${META_TABLE} WHERE name = ?`).get(PEPPER_CHECK_NAME);
      });
    } catch (error) {
      // The start's first read past the schema: a file damaged there is named.
      throw namingFile(this.#path, error);
    }
    if (row === undefined) throw new Error(`SQLite: ${META_TABLE} lost its ${PEPPER_CHECK_NAME} row`);
    return text(row, "value");
  }

  async claimKeyPrefix(prefix: string): Promise<string> {
    try {
      // Once a start: prepared here rather than kept with the store's statements. IMMEDIATE, so
      // the newest key read and the row written are one step against other processes' claims.
      return await this.#transaction(() => {
        const row = this.#db.prepare(`SELECT value FROM ${META_TABLE} WHERE name = ?`).get(KEY_PREFIX_NAME);
        if (row !== undefined) return text(row, "value");
        const newest = this.#db.prepare("SELECT start FROM keys ORDER BY id DESC LIMIT 1").get();
        const claimed = (newest === undefined ? null : keyPrefixOfStart(text(newest, "start"))) ?? prefix;
        this.#db.prepare(`INSERT INTO ${META_TABLE} (name, value) VALUES (?, ?)`).run(KEY_PREFIX_NAME, claimed);
        return claimed;
      });
    } catch (error) {
      throw namingFile(this.#path, error);
    }
  }

  /**
   * Moves write-behind batches and WAL checkpoints to the writing thread: this connection stops
   * checkpointing. If the thread fails, this connection writes and checkpoints again as SQLite
   * does by default, so the log stays bounded; batches the thread had not answered are rejected,
   * and their recorders keep them for the next flush.
   */
  #startWriter(path: string, onFailure: ((message: string) => void) | undefined): void {
    this.#db.exec("PRAGMA wal_autocheckpoint = 0");
    const writer = new WriterThread({
      path,
      walPath: this.#walPath,
      url: WRITER_URL,
      checkpointIntervalMs: CHECKPOINT_INTERVAL_MS,
      busyTimeoutMs: BUSY_TIMEOUT_MS,
      stopTimeoutMs: WRITER_STOP_MS,
      onStopped: (message) => {
        if (this.#writer !== writer) return;
        this.#writer = null;
        if (this.#db.isOpen) this.#db.exec(`PRAGMA wal_autocheckpoint = ${DEFAULT_AUTOCHECKPOINT_PAGES}`);
        onFailure?.(`the SQLite writing thread stopped (${message}); write-behind batches and checkpoints run on the main thread again`);
      },
      onCheckpointError: (message) => onFailure?.(`a WAL checkpoint failed: ${message}`),
      onWalPinned: (report) => this.#walPinned(report),
    });
    this.#writer = writer;
  }

  #walPinned(report: WalPinned): void {
    const since = this.#walPinnedLog.due("wal-pinned");
    if (since === null) return;
    this.#logger?.warn(
      { file: this.#walPath, ...report, since },
      `the WAL keeps growing: checkpoints cannot copy it back into the database file while another connection holds a read transaction on it (a sqlite3 session inside BEGIN, a long backup); it grows with every write until that transaction ends, then is cut back to ${JOURNAL_SIZE_LIMIT_BYTES / 1024 / 1024} MiB`,
    );
  }

  async close(): Promise<void> {
    if (this.#recheck !== null) clearInterval(this.#recheck);
    const writer = this.#writer;
    this.#writer = null;
    await writer?.stop();
    if (!this.#db.isOpen) return;
    // One more look: a file swapped since the last (an idle keygate writes nothing, and a stop
    // right after `mv backup.db keygate.db` comes before the timer's) leaves SQLite's close its
    // WAL at the path, which the next start would apply to the file now there.
    try {
      this.#compareFile(statSync(this.#path, { throwIfNoEntry: false }));
    } catch {
      // A file that cannot be looked at is left as the last look found it.
    }
    if (this.#opened !== null) this.#emptyOwnLog();
    this.#db.close();
  }

  /**
   * Before closing: SQLite's close checkpoints the WAL and deletes it only as the file's last
   * connection across all processes. Another one left open (an idle `sqlite3` session, a second keygate)
   * or a file moved since its open would leave the stop's last frames at the path, and the next
   * start would apply that log to the file then there: a backup restored by `mv` would come up
   * with keys made after it, or damaged. A TRUNCATE checkpoint empties it through the handles
   * SQLite holds, so it touches only the files opened (one renamed away ends complete); one that
   * another connection's read transaction keeps from emptying is logged instead.
   */
  #emptyOwnLog(): void {
    const moved = this.#moved !== null;
    let emptied = false;
    try {
      // Waits (on the event loop, which serves nothing by now) for other connections' reads to end.
      this.#db.exec(`PRAGMA busy_timeout = ${STOP_CHECKPOINT_WAIT_MS}`);
      const row = this.#db.prepare("PRAGMA wal_checkpoint(TRUNCATE)").get();
      emptied = row !== undefined && integer(row, "busy") === 0;
    } catch (error) {
      this.#logger?.error({ file: this.#walPath, err: error }, `the WAL of the ${moved ? "moved " : ""}SQLite file could not be emptied`);
      return;
    }
    if (emptied) return;
    if (moved) {
      this.#logger?.error(
        { file: this.#walPath },
        "the WAL of the moved SQLite file could not be emptied (another connection reads it): the next start would apply it to the file now at the path; stop every keygate on this data directory, then delete it before starting one",
      );
    } else {
      this.#logger?.error(
        { file: this.#walPath },
        "the WAL of the SQLite file could not be emptied at the stop (another connection holds a read transaction on it): the next start applies it to whatever file is then at the path; before restoring a backup there, close every other connection to the file and delete its -wal and -shm files",
      );
    }
  }
}
