import { setTimeout as sleep } from "node:timers/promises";
import type { Logger } from "pino";
import { ConfigError } from "../config.js";
import { MigrationsPendingError, NewerSchemaError } from "../store/errors.js";

/** The error's system code (EADDRINUSE, ...), also when a library only kept it in the message. */
function systemCode(error: unknown): string {
  if (error instanceof Error && "code" in error && typeof error.code === "string" && /^E[A-Z]+$/.test(error.code)) return error.code;
  const text = error instanceof Error ? error.message : String(error);
  return /\b(EADDRINUSE|EACCES|EADDRNOTAVAIL|ENOTFOUND|EAI_AGAIN|EPERM)\b/.exec(text)?.[1] ?? "";
}

/**
 * A listener that could not bind, as one line naming the variable to change. grpc-js reports a
 * busy port only inside its own message, so the code is also looked for there.
 */
export function listenerStartError(variable: string, host: string, port: number, error: unknown): Error {
  const where = `${host}:${port}`;
  switch (systemCode(error)) {
    case "EADDRINUSE":
      return new ConfigError(`${variable}: port ${port} on ${host} is already in use; stop what holds it or choose another port`, { cause: error });
    case "EACCES":
    case "EPERM":
      return new ConfigError(`${variable}: not allowed to listen on ${where} (ports below 1024 need privileges)`, { cause: error });
    case "EADDRNOTAVAIL":
      return new ConfigError(`KEYGATE_HOST: ${host} is not an address of this machine`, { cause: error });
    case "ENOTFOUND":
    case "EAI_AGAIN":
      return new ConfigError(`KEYGATE_HOST: ${host} does not resolve`, { cause: error });
    default:
      return error instanceof Error ? error : new Error(String(error));
  }
}

/**
 * A backend a start needs did not answer (nothing listening, a name that does not resolve yet, a
 * timeout): what a store or Redis still starting looks like, so the start tries it again
 * (untilAnswered). Refused credentials, a certificate not trusted or a bad URI are mistakes no
 * wait mends, and stay plain ConfigErrors.
 */
export class BackendUnansweredError extends ConfigError {}

/** The first wait between two tries of a backend at start, and the longest. */
const RETRY_FIRST_MS = 1000;
const RETRY_LONGEST_MS = 5000;

/**
 * Runs `attempt` until it succeeds or fails other than by BackendUnansweredError, trying again
 * after 1, 2, 4, then every 5 s, for as long as `giveUpAtMs` (on `nowMs`'s clock) has not passed;
 * then its last error is the start's. Each failed try is one warning line, so a start that waits
 * says what it waits for (the message names the variable, never a password).
 */
export async function untilAnswered<T>(
  attempt: () => Promise<T>,
  options: { giveUpAtMs: number; logger: Logger; nowMs?: () => number; sleepMs?: (ms: number) => Promise<unknown> },
): Promise<T> {
  const nowMs = options.nowMs ?? (() => performance.now());
  const sleepMs = options.sleepMs ?? ((ms: number) => sleep(ms));
  for (let waitMs = RETRY_FIRST_MS; ; waitMs = Math.min(waitMs * 2, RETRY_LONGEST_MS)) {
    try {
      return await attempt();
    } catch (error) {
      const leftMs = options.giveUpAtMs - nowMs();
      if (!(error instanceof BackendUnansweredError) || leftMs <= 0) throw error;
      const retryInMs = Math.ceil(Math.min(waitMs, leftMs));
      options.logger.warn({ retryInMs, givesUpInMs: Math.ceil(leftMs) }, `${error.message}; trying again (the start waits KEYGATE_STARTUP_WAIT_SECONDS)`);
      await sleepMs(retryInMs);
    }
  }
}

/** A TLS verification failure in a driver's message (Node's codes and OpenSSL's wording). */
const UNTRUSTED_CERTIFICATE = /certificate|CERT_|SIGNATURE|ISSUER|ERR_TLS|ERR_SSL|SSL routines/i;

/**
 * Server codes of a member that answers but is not a primary yet, or is between states: a
 * single-node replica set restarting is SECONDARY for a few seconds before it elects itself
 * (NotWritablePrimary, NotPrimaryNoSecondaryOk, NotPrimaryOrSecondary, InterruptedAtShutdown,
 * InterruptedDueToReplStateChange, ShutdownInProgress, PrimarySteppedDown).
 */
const NOT_PRIMARY_YET = new Set([10107, 13435, 13436, 11600, 11602, 91, 189]);

/** MongoDB driver errors that mean the server refused who we said we are. */
const AUTH_CODES = new Set([11, 13, 18, 59]);

/**
 * MongoDB failing at start, as one line naming KEYGATE_MONGODB_URI. The URI carries the password,
 * so it is never repeated; the driver's own message names the host at most.
 */
export function mongoStartError(error: unknown): Error {
  // The store's own refusals already say what to do.
  if (error instanceof NewerSchemaError || error instanceof MigrationsPendingError) return error;
  if (!(error instanceof Error)) return new ConfigError(`KEYGATE_MONGODB_URI: MongoDB could not be opened (${String(error)})`);
  const code = "code" in error && typeof error.code === "number" ? error.code : null;
  const handshake = "errorLabelSet" in error && error.errorLabelSet instanceof Set && error.errorLabelSet.has("HandshakeError");
  const cause = error instanceof Error && error.cause !== undefined ? error.cause : error;
  const inner = cause instanceof Error ? cause : error;
  const innerCode = "code" in inner && typeof inner.code === "number" ? inner.code : code;
  const innerHandshake = "errorLabelSet" in inner && inner.errorLabelSet instanceof Set && inner.errorLabelSet.has("HandshakeError");
  if ((innerCode !== null && AUTH_CODES.has(innerCode) && (handshake || innerHandshake)) || /authentication failed/i.test(inner.message)) {
    return new ConfigError(`KEYGATE_MONGODB_URI: MongoDB refused the credentials (${inner.message.replace(/\s+/g, " ").slice(0, 160)})`, { cause: error });
  }
  if (innerCode !== null && NOT_PRIMARY_YET.has(innerCode)) {
    return new BackendUnansweredError(`KEYGATE_MONGODB_URI: MongoDB is not primary yet (${inner.message.replace(/\s+/g, " ").slice(0, 160)})`, { cause: error });
  }
  if (/ServerSelection|Network|Topology/.test(inner.name) || /ECONNREFUSED|ENOTFOUND|timed out/i.test(inner.message)) {
    const message = `KEYGATE_MONGODB_URI: no MongoDB server answered (${inner.message.replace(/\s+/g, " ").slice(0, 160)})`;
    // The driver reports a certificate it does not trust as a server it could not select.
    if (UNTRUSTED_CERTIFICATE.test(inner.message)) return new ConfigError(message, { cause: error });
    return new BackendUnansweredError(message, { cause: error });
  }
  return new ConfigError(`KEYGATE_MONGODB_URI: MongoDB could not be opened (${inner.message.replace(/\s+/g, " ").slice(0, 160)})`, { cause: error });
}
