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

/**
 * The most log, in bytes, `keygate serve` holds for a stdout that does not take it (a stuck log
 * shipper, a container runtime's full log pipe): past it, lines are dropped and counted rather
 * than kept until the replica is killed for its memory. Normal bursts stay far below it.
 */
export const STDOUT_LOG_MAX_BYTES = 4 * 1024 * 1024;

/** `keygate serve`'s log destination, stdout, written asynchronously with a bound on what waits. */
export interface StdoutLog {
  readonly destination: DestinationStream;
  /** Log lines dropped since the start because STDOUT_LOG_MAX_BYTES were waiting for stdout. */
  droppedLines(): number;
  /** Logs, once stdout has taken what waited, a warning with the lines dropped meanwhile. */
  reportDropsTo(logger: Logger): void;
  /**
   * Writes text that is not a log line (the generated admin token's banner) in its place among
   * the log lines and within the same bound; false when it was dropped or stdout is closed.
   */
  print(text: string): boolean;
  /**
   * Resolves true once what was logged has been written; false after `timeoutMs` without that,
   * having discarded the rest, so that pino's exit hook (a flushSync retrying EAGAIN every 100 ms
   * for as long as nobody reads) lets the process exit; false at once when the reader of stdout
   * has gone (EPIPE), since nothing will be written again. Nothing may be logged after a false.
   */
  drain(timeoutMs: number): Promise<boolean>;
}

/** stdout as `keygate serve`'s log destination: pino's default (an asynchronous SonicBoom on fd 1), bounded. */
export function createStdoutLog(): StdoutLog {
  // sonic-boom drops a whole line (and emits "drop") when it would take the bytes not yet written
  // past maxLength; the line in flight counts, so the bound holds.
  const stream = pino.destination({ fd: 1, sync: false, maxLength: STDOUT_LOG_MAX_BYTES });
  let dropped = 0;
  let unreported = 0;
  let report: ((lines: number) => void) | null = null;
  // "drain" comes when nothing waits any more, so the warning is not dropped itself.
  const reportOnDrain = (): void => {
    const lines = unreported;
    unreported = 0;
    report?.(lines);
  };
  stream.on("drop", () => {
    dropped += 1;
    unreported += 1;
    if (unreported === 1) stream.once("drain", reportOnDrain);
  });
  // EPIPE: the reader has gone (`keygate serve | head -1`). pino's own listener then turns every
  // write (and destroy) into a no-op, so no "drain" ever comes. Once, and ahead of pino's; every
  // other error pino re-emits after removing its listener, and with none left it still ends the
  // process, as it did.
  let closed = false;
  let onClosed: (() => void) | null = null;
  stream.prependOnceListener("error", (error: unknown) => {
    if (!(error instanceof Error && "code" in error && error.code === "EPIPE")) return;
    closed = true;
    onClosed?.();
  });
  return {
    // Not the stream itself: pino's fatal() flushSync()s a destination that has a flushSync, which
    // for a stdout nobody reads retries EAGAIN every 100 ms for ever. Exits drain instead (drain).
    destination: { write: (line: string) => stream.write(line) },
    droppedLines: () => dropped,
    reportDropsTo(logger) {
      report = (lines) => logger.warn({ droppedLines: lines, maxBytes: STDOUT_LOG_MAX_BYTES }, "log lines dropped: stdout was not read while maxBytes of log waited for it");
    },
    print(text) {
      if (closed) return false;
      const droppedBefore = dropped;
      stream.write(text);
      return dropped === droppedBefore;
    },
    drain(timeoutMs) {
      if (closed) return Promise.resolve(false);
      return new Promise((done) => {
        const timer = setTimeout(() => {
          stream.off("drain", written);
          stream.destroy();
          done(false);
        }, timeoutMs);
        function written(): void {
          clearTimeout(timer);
          done(true);
        }
        onClosed = () => {
          clearTimeout(timer);
          stream.off("drain", written);
          done(false);
        };
        stream.once("drain", written);
        // flush(cb) calls back at once when minLength is 0; an empty write is queued behind what
        // waits, and "drain" follows once it (so everything before it) is written.
        stream.write("");
      });
    },
  };
}
