import { pino } from "pino";
import type { DestinationStream, Logger, LevelWithSilent } from "pino";
import { REDACTED_LOG_PATHS } from "../keys/redact.js";

/** The process logger: JSON lines, with every secret-bearing field redacted. */
export function createLogger(level: LevelWithSilent, destination?: DestinationStream): Logger {
  const options = { level, base: { service: "keygate" }, redact: { paths: REDACTED_LOG_PATHS, censor: "[redacted]" } };
  return destination === undefined ? pino(options) : pino(options, destination);
}
