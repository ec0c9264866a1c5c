// Errors of writes whose callers report the failure themselves, so the 'error' listener stays quiet about them.
const reportedByCaller = new WeakSet<Error>();

/**
 * Writes `text` to stdout and resolves once it has been handed over, or rejects with the write's
 * error (EPIPE: the reader has gone), which the caller then reports instead of onStdoutError.
 */
export function writeStdout(text: string): Promise<void> {
  return new Promise((written, failed) => {
    // Node calls a failed write's callback before it emits 'error' with the same error.
    process.stdout.write(text, (error) => {
      if (error === null || error === undefined) return written();
      reportedByCaller.add(error);
      failed(error);
    });
  });
}

/**
 * process.stdout's 'error' listener. Without one, a write to a closed pipe (`keygate … | head -c0`)
 * ends the CLI with Node's "Unhandled 'error' event" and a stack trace; this is one line and exit 1.
 */
export function onStdoutError(error: Error): void {
  if (reportedByCaller.has(error)) return;
  const why = "code" in error && error.code === "EPIPE" ? "the program reading it closed the pipe (EPIPE)" : error.message;
  process.stderr.write(`keygate: could not write to stdout: ${why}\n`);
  process.exitCode = 1;
}
