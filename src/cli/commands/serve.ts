import { statSync, watch } from "node:fs";
import type { FSWatcher } from "node:fs";
import { basename, dirname, resolve } from "node:path";
import { setLogger as setGrpcLogger } from "@grpc/grpc-js";
import type { Logger } from "pino";
import { loadTokensFile } from "../../admin/permissions.js";
import { ConfigError, connectionPasswords, ignoredVariables, loadConfig } from "../../config.js";
import type { Config } from "../../config.js";
import { redactText } from "../../keys/redact.js";
import { buildKeygate } from "../../server/app.js";
import type { GcThreadPriority } from "../../server/gc-threads.js";
import type { BoundPorts, Keygate } from "../../server/app.js";
import { createLogger, createStdoutLog } from "../../server/logger.js";
import { markAdminTokenShown } from "../../server/secrets.js";
import { adminCurlLines } from "../admin-curl.js";

/** How long an exit waits for stdout to take the log lines still waiting for it. */
const LOG_DRAIN_MS = 2000;

/** A configuration mistake's one line on stderr, scrubbed as a log line is. */
function reportConfigError(error: ConfigError, secrets: readonly string[] = []): void {
  process.stderr.write(`keygate: ${redactText(error.message, secrets)}\n`);
}

/** Configuration mistakes found before the log exists exit 2 with the message; anything else is a crash. */
function exitOnConfigError(error: unknown): never {
  if (error instanceof ConfigError) {
    reportConfigError(error);
    process.exit(2);
  }
  throw error;
}

/**
 * An error as one line, as the CLI reports a defect (src/cli.ts): its name and message, its
 * secrets redacted before its whitespace is folded (a pepper or password may hold a tab, a line
 * break or two spaces, and would no longer be found as written).
 */
function oneLine(error: unknown, secrets: readonly string[]): string {
  const text = error instanceof Error ? `${error.name}: ${error.message}` : String(error);
  return redactText(text, secrets).replace(/\s+/g, " ").trim();
}

/** `keygate serve`: reads the environment, starts every listener, and drains on SIGTERM or SIGINT. */
export async function serve(options: { migrate: boolean; gcThreads?: GcThreadPriority } = { migrate: true }): Promise<void> {
  let config;
  try {
    config = loadConfig();
  } catch (error) {
    exitOnConfigError(error);
  }
  // The configured pepper, admin tokens and the Redis and MongoDB passwords are scrubbed from
  // every log line and start error by value, too; longest first, so that one secret inside
  // another cannot leave the rest of the longer one showing. The pepper also without trailing
  // space: that form may be the one in force (settlePepper).
  const secrets = [config.pepper ?? "", config.pepper?.trimEnd() ?? "", ...(config.adminTokens ?? []), ...fileTokens(config.adminTokensFile), ...connectionPasswords(config)].sort(
    (a, b) => b.length - a.length,
  );
  const stdoutLog = createStdoutLog();
  const logger = createLogger(config.logLevel, stdoutLog.destination, secrets);
  stdoutLog.reportDropsTo(logger);
  // The log is written asynchronously; what waits is written before the exit, for at most
  // LOG_DRAIN_MS: a stdout nobody reads would otherwise hold the exit for ever (pino's exit hook).
  const exitAfterLog = async (code: number): Promise<never> => {
    await stdoutLog.drain(LOG_DRAIN_MS);
    process.exit(code);
  };
  // An exception nothing caught (and, until keygate's handler below, a rejection nothing handled,
  // which Node raises as one) exits 1 as Node's default does, but after the log's bounded wait:
  // Node's own exit runs pino's exit hook, which never returns while stdout is not read. One line
  // on stderr, not Node's stack trace, which can quote a secret; the whole error is in the log.
  process.on("uncaughtException", (error: unknown, origin: NodeJS.UncaughtExceptionOrigin) => {
    logger.fatal({ err: error, origin }, "uncaught exception");
    process.stderr.write(`keygate: unexpected error: ${oneLine(error, secrets)}\n`);
    void exitAfterLog(1);
  });
  warnOfIgnoredVariables(logger);
  if (config.mongodbUri !== undefined && config.redis === undefined) {
    // Nothing refuses several such replicas (none knows of the others), so say what they would do.
    logger.warn(
      "MongoDB without KEYGATE_REDIS_URL: this replica's caches, rate limits, quotas and credit counts are its own; run one replica, or give every replica the same Redis",
    );
  }
  // SIGHUP and file changes are listened for in the same turn that read the files, not once the
  // start is done: the start can wait many seconds (Redis, MongoDB, schema steps), an edit made
  // meanwhile would be lost, and a SIGHUP with no handler ends the process. Until keygate has
  // started, a reload is held.
  const reloads = liveReload(config, logger);
  // grpc-js writes its own errors to stderr as bare lines ("No address added ..."); they go to the
  // JSON log instead, and a failure that stops the start is reported once, below.
  setGrpcLogger({ error: (...args: unknown[]) => logger.debug({ grpc: args.map(String).join(" ") }, "grpc-js") });
  // What the start did with KEYGATE_GC_THREAD_NICE (src/cli.ts, before these modules loaded).
  const gc = options.gcThreads;
  if (gc !== undefined && gc.error !== null) logger.warn({ gcThreadNice: gc.nice, threads: gc.threads, error: gc.error }, "could not lower the priority of every V8 GC thread");
  else if (gc !== undefined && gc.nice !== 0) logger.info({ gcThreadNice: gc.nice, threads: gc.threads }, "V8 GC threads' priority lowered");
  let generatedAdminToken: string | null = null;
  let tokenPrinted = false;
  const tls = config.tls;
  const adminTls = tls?.listeners.has("admin") === true ? { certFile: tls.certFile, clientAuth: tls.clientAuthListeners.has("admin") } : null;
  // Printed by the first start that gets its listeners up, and never logged; before the "keygate
  // listening" line, so whoever waits for that line has the token too.
  const announce = (ports: BoundPorts): void => {
    // From the moment the listeners take work, SIGTERM drains (the "keygate listening" line comes
    // after this): before it, a SIGTERM ends the start as Node's default does.
    process.on("SIGTERM", () => shutdown("SIGTERM"));
    process.on("SIGINT", () => shutdown("SIGINT"));
    if (generatedAdminToken === null) return;
    const tokenFile = `${config.dataDir}/admin-token`;
    const use = adminCurlLines({ host: config.host, port: ports.admin, tokenFile, tls: adminTls });
    // Through the log's writer, not process.stdout: the one writer on fd 1 keeps it before the
    // "keygate listening" line and out of the middle of a line still waiting for stdout, and it is
    // held within the log's bound and its wait at exit.
    tokenPrinted = stdoutLog.print(`\nkeygate generated an admin token (stored in ${tokenFile}, mode 0600):\n  ${generatedAdminToken}\n${use.join("\n")}\n\n`);
  };
  // Anything else that stops a start is one line too, with the full error in the (scrubbed) log.
  const exitOnStartError = async (error: unknown): Promise<never> => {
    // A mistake found once the log exists (Redis refused, the data directory in use, the tokens
    // file, TLS) exits 2 too, after the log's bounded wait like any other exit.
    if (error instanceof ConfigError) {
      reportConfigError(error, secrets);
      return exitAfterLog(2);
    }
    logger.fatal({ err: error }, "keygate could not start");
    // Redacted whole, then cut: a secret holding a line break would not be found in a part of it.
    const firstLine = redactText(error instanceof Error ? error.message : String(error), secrets).split("\n")[0] ?? "";
    process.stderr.write(`keygate: could not start: ${firstLine}\n`);
    return exitAfterLog(1);
  };
  const keygate = await buildKeygate(config, { logger, announce, migrate: options.migrate }).catch(exitOnStartError);
  generatedAdminToken = keygate.generatedAdminToken;
  keygate.metrics.watchLogDrops(() => stdoutLog.droppedLines());
  // Node ends the process on a promise rejected with no handler. One from a library's internals
  // (ioredis's flush of queued commands on a reconnect has been seen to leave one) must not take
  // every Check in flight down with it: it is logged, counted, and keygate keeps serving.
  process.on("unhandledRejection", (reason: unknown) => {
    keygate.metrics.unhandledRejection();
    logger.error({ err: reason }, "unhandled promise rejection");
  });
  let stopping = false;
  // Installed by announce: a signal there may come before start() has returned.
  function shutdown(signal: string): void {
    if (stopping) return;
    stopping = true;
    reloads.stop();
    logger.info({ signal }, "draining");
    // 1 when usage, spent credits or last-use times are lost with the process (logged at error level).
    keygate.stop().then(
      (report) => exitAfterLog(report.writesLost ? 1 : 0),
      (error: unknown) => {
        logger.error({ err: error }, "shutdown failed");
        return exitAfterLog(1);
      },
    );
  }
  await keygate.start().catch(exitOnStartError);
  // A banner dropped (the log's bound reached) or never written (stdout closed) is not marked
  // shown: the next start prints it again.
  if (tokenPrinted) markShown(config.dataDir, logger);
  // A drain that began within the start ignores reloads already (reloads.stop()).
  if (!stopping) reloads.started(keygate);
}

/**
 * markAdminTokenShown, once the token has been printed. keygate is serving by then: a marker it
 * cannot remove (a read-only data directory, a directory at its name) is a warning, and the next
 * start prints the token again; a throw here would leave live reload never started.
 */
function markShown(dataDir: string, logger: Logger): void {
  try {
    markAdminTokenShown(dataDir);
  } catch (error) {
    logger.warn({ file: `${dataDir}/admin-token.unshown`, err: error }, "the generated admin token could not be marked as shown: the next start prints it again");
  }
}

/**
 * One line naming the KEYGATE_* variables keygate does not read, each with the name it may have
 * meant: a misspelled one (KEYGATE_CONFIG_FILE) would otherwise leave its default in force without
 * a word. Not a refusal: Kubernetes, CI and the CLI set KEYGATE_* names of their own.
 */
function warnOfIgnoredVariables(logger: Logger): void {
  const ignored = ignoredVariables(process.env);
  if (ignored.length === 0) return;
  const variables = ignored.map(({ name, closest, serviceLink }) =>
    serviceLink === true ? `${name} (a Kubernetes or Docker service link, not a port: the default stands)` : closest === null ? name : `${name} (did you mean ${closest}?)`,
  );
  logger.warn({ variables }, "environment variables keygate does not read are ignored");
}

/** Live reload of `keygate serve`, listened for from the start on. */
interface LiveReload {
  /** Hands reloads to the started keygate, and runs the one held during the start, if any. */
  started(keygate: Pick<Keygate, "reload">): void;
  /** From the drain on: SIGHUP and file changes are ignored (the handler stays, so SIGHUP cannot end the process). */
  stop(): void;
}

/**
 * Reloads on SIGHUP, or on a change to the policy or admin tokens file (a ConfigMap or Secret
 * update swaps the directory's ..data link, so the directory is watched; a burst of events is one
 * reload), once the files are quiet (quietReloads). Until started(), a reload is held and logged
 * as held; started() runs it once.
 */
function liveReload(config: Config, logger: Logger): LiveReload {
  let keygate: Pick<Keygate, "reload"> | null = null;
  let held: string | null = null;
  let stopped = false;
  const files = [config.policyFile, config.adminTokensFile].filter((file) => file !== undefined);
  const reload = (why: string): void => {
    if (stopped) return;
    if (keygate === null) {
      held ??= why;
      logger.info({ why }, "configuration reload held until keygate has started");
      return;
    }
    const outcome = keygate.reload();
    // "adminTokens" is a secret's field name to the log redaction, so the outcome is logged per file.
    logger.info({ why, policyFile: outcome.policy, adminTokensFile: outcome.adminTokens, tlsFiles: outcome.tls }, "configuration reload");
  };
  const quiet = quietReloads(files, reload, logger);
  const watchers = files.flatMap((file) => watchFile(file, () => quiet.ask("file changed", RELOAD_SETTLE_MS), logger) ?? []);
  const unwatch = (): void => {
    for (const watcher of watchers.splice(0)) watcher.close();
  };
  process.on("SIGHUP", () => quiet.ask("SIGHUP", 0));
  process.once("exit", unwatch);
  return {
    started(built) {
      keygate = built;
      if (held === null) return;
      const why = held;
      held = null;
      quiet.ask(`${why}, held during the start`, 0);
    },
    stop() {
      stopped = true;
      quiet.stop();
      unwatch();
    },
  };
}

/** How long a file must stay quiet after a change before it is read: editors write in steps. */
const RELOAD_SETTLE_MS = 200;

/** The longest a reload waits for files that keep changing (or are dated ahead of the clock). */
const RELOAD_SETTLE_MAX_MS = 10_000;

/**
 * Runs `reload` once none of `files` has been written for RELOAD_SETTLE_MS, checked from the
 * files' mtimes after `delayMs` and again while they keep changing, for at most
 * RELOAD_SETTLE_MAX_MS; then it reads them anyway, with a warning. A file read mid-rewrite is
 * usually a valid policy (a prefix that ends before `routes:` has no scope requirement at all);
 * this covers a writer that is still writing, not one paused longer than the settle, which only
 * an atomic replace (a rename, as ConfigMap mounts do) rules out. Asks while one waits join it.
 */
function quietReloads(files: readonly string[], reload: (why: string) => void, logger: Logger): { ask(why: string, delayMs: number): void; stop(): void } {
  let wanted: { why: string; sinceMs: number; waitLogged: boolean } | null = null;
  let timer: NodeJS.Timeout | undefined;
  const later = (delayMs: number): void => {
    if (timer !== undefined) clearTimeout(timer);
    timer = setTimeout(whenQuiet, delayMs);
    timer.unref();
  };
  function whenQuiet(): void {
    timer = undefined;
    if (wanted === null) return;
    const changedAgoMs = quietForMs(files);
    const waitedMs = performance.now() - wanted.sinceMs;
    if (changedAgoMs < RELOAD_SETTLE_MS && waitedMs < RELOAD_SETTLE_MAX_MS) {
      if (!wanted.waitLogged) logger.info({ why: wanted.why, files }, "configuration reload waits until the files have not changed for 200 ms");
      wanted.waitLogged = true;
      later(Math.min(Math.max(RELOAD_SETTLE_MS - changedAgoMs, 1), RELOAD_SETTLE_MS, RELOAD_SETTLE_MAX_MS - waitedMs));
      return;
    }
    if (changedAgoMs < RELOAD_SETTLE_MS) logger.warn({ why: wanted.why, files, waitedMs: Math.round(waitedMs) }, "configuration files kept changing for 10 s; reading them anyway");
    const { why } = wanted;
    wanted = null;
    reload(why);
  }
  return {
    ask(why, delayMs) {
      wanted ??= { why, sinceMs: performance.now(), waitLogged: false };
      // A wait under way is not put off: it reads the files' times itself, and a stream of change
      // events less than RELOAD_SETTLE_MS apart would otherwise hold it past RELOAD_SETTLE_MAX_MS.
      if (timer === undefined) later(delayMs);
    },
    stop() {
      wanted = null;
      if (timer !== undefined) clearTimeout(timer);
    },
  };
}

/**
 * How long ago the most recently changed of `files` was last written (by its mtime, following a
 * ConfigMap's links); 0 for one that cannot be read at the moment (a replace in steps).
 */
function quietForMs(files: readonly string[]): number {
  let quietMs = Number.POSITIVE_INFINITY;
  for (const file of files) {
    let mtimeMs: number;
    try {
      mtimeMs = statSync(file).mtimeMs;
    } catch {
      return 0;
    }
    quietMs = Math.min(quietMs, Date.now() - mtimeMs);
  }
  return quietMs;
}

/**
 * Watches a file's directory for changes to it (or to the ..data link Kubernetes swaps); null,
 * with a warning, when the directory cannot be watched (a missing tokens file fails the start anyway).
 */
function watchFile(file: string, changed: () => void, logger: Logger): FSWatcher | null {
  const name = basename(file);
  const cannotWatch = (error: unknown): void => logger.warn({ err: error, file }, "cannot watch the file for changes; reload with SIGHUP");
  let watcher: FSWatcher;
  try {
    watcher = watch(dirname(resolve(file)), (_event, changedName) => {
      if (changedName === null || changedName === name || changedName === "..data") changed();
    });
  } catch (error) {
    cannotWatch(error);
    return null;
  }
  watcher.on("error", cannotWatch);
  watcher.unref();
  return watcher;
}

/** The tokens of KEYGATE_ADMIN_TOKENS_FILE, to scrub from logs; none if it cannot be read (the start reports that). */
function fileTokens(path: string | undefined): string[] {
  if (path === undefined) return [];
  try {
    return loadTokensFile(path).map((t) => t.token);
  } catch {
    return [];
  }
}
