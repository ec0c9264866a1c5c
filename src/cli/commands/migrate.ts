import { existsSync } from "node:fs";
import { join } from "node:path";
import { ConfigError, loadConfig } from "../../config.js";
import type { Config } from "../../config.js";
import { MigrationsPendingError, NewerSchemaError } from "../../store/errors.js";
import type { SchemaStep } from "../../store/errors.js";
import { CliFailure } from "../errors.js";

/** What `keygate migrate` found and did. */
export interface MigrateReport {
  store: "SQLite" | "MongoDB";
  /** Where: the database file, or "the database of KEYGATE_MONGODB_URI" (the URI may hold a password). */
  where: string;
  pending: SchemaStep[];
  applied: boolean;
}

function describe(report: MigrateReport, dryRun: boolean): string {
  if (report.pending.length === 0) return `${report.store} (${report.where}): up to date, nothing to do\n`;
  const verb = dryRun ? "would apply" : "applied";
  const steps = report.pending.map((step) => `  ${step.version}: ${step.description}\n`).join("");
  return `${report.store} (${report.where}): ${verb} ${report.pending.length} schema step${report.pending.length === 1 ? "" : "s"}\n${steps}`;
}

async function migrateSqlite(config: Config, dryRun: boolean): Promise<MigrateReport> {
  const path = join(config.dataDir, "keygate.db");
  // Loaded on demand: the MongoDB path does not need SQLite.
  const { DatabaseSync } = await import("node:sqlite");
  const { pendingSqliteMigrations } = await import("../../store/sqlite-migrations.js");
  const exists = existsSync(path);
  // Read without writing: a file that is not there yet needs every step, and nothing creates it.
  // A running keygate may hold a lock for a moment: wait for it as the store does.
  const probe = exists ? new DatabaseSync(path, { readOnly: true, timeout: 5000 }) : new DatabaseSync(":memory:");
  let pending: SchemaStep[];
  try {
    pending = pendingSqliteMigrations(probe);
  } finally {
    probe.close();
  }
  const report: MigrateReport = { store: "SQLite", where: exists ? path : `${path}, not there yet`, pending, applied: false };
  if (dryRun || pending.length === 0) return report;
  const { ensureDataDir } = await import("../../server/secrets.js");
  const { SqliteKeyStore } = await import("../../store/sqlite.js");
  ensureDataDir(config.dataDir);
  await new SqliteKeyStore(path).close();
  return { ...report, where: path, applied: true };
}

async function migrateMongo(uri: string, dryRun: boolean): Promise<MigrateReport> {
  const { MongoKeyStore } = await import("../../store/mongo.js");
  const pending = await MongoKeyStore.pendingAt(uri);
  const report: MigrateReport = { store: "MongoDB", where: "KEYGATE_MONGODB_URI", pending, applied: false };
  if (dryRun || pending.length === 0) return report;
  const store = await MongoKeyStore.connect(uri);
  await store.close();
  return { ...report, applied: true };
}

/** `keygate migrate`: brings the configured store's schema up to this keygate's, or says what it would do. */
export async function migrate(dryRun: boolean): Promise<void> {
  let config: Config;
  try {
    config = loadConfig();
  } catch (error) {
    if (error instanceof ConfigError) throw new CliFailure(error.message, 2);
    throw error;
  }
  try {
    const report = config.mongodbUri === undefined ? await migrateSqlite(config, dryRun) : await migrateMongo(config.mongodbUri, dryRun);
    process.stdout.write(describe(report, dryRun));
  } catch (error) {
    if (error instanceof NewerSchemaError || error instanceof MigrationsPendingError) throw new CliFailure(error.message, 1);
    const { mongoStartError } = await import("../../server/startup-errors.js");
    if (config.mongodbUri !== undefined) throw new CliFailure(mongoStartError(error).message, 1);
    throw error;
  }
}
