import { pino } from "pino";
import type { DestinationStream, Logger, LevelWithSilent, LoggerOptions } from "pino";
import { redactLogObject, redactText } from "../keys/redact.js";

/**
 * The process logger: JSON lines with every secret redacted at any depth. Secret-named fields,
 * secret-shaped text (keys, hashes, bearer credentials, admin tokens) and each literal in `secrets`
 * (the configured pepper and admin tokens) become "[redacted]", in the merged object, in errors
 * and in the message.
 */
export function createLogger(level: LevelWithSilent, destination?: DestinationStream, secrets: readonly string[] = []): Logger {
  const options: LoggerOptions = {
    level,
    base: { service: "keygate" },
    formatters: { log: (object) => redactLogObject(object, secrets) as Record<string, unknown> },
    // The formatter above has already serialized (and scrubbed) errors.
    serializers: { err: (value: unknown) => value },
    hooks: {
      logMethod(args, method) {
        const scrubbed = args.map((arg: unknown) => (typeof arg === "string" ? redactText(arg, secrets) : arg));
        method.apply(this, scrubbed as Parameters<typeof method>);
      },
    },
  };
  return destination === undefined ? pino(options) : pino(options, destination);
}
