/**
 * Waiting in tests: poll for a condition until it holds, never sleep for a fixed time. Every
 * suite and harness module waits through this one module so that timeouts, intervals and the
 * timeout message behave the same everywhere.
 */

/** How {@link until} and {@link untilValue} poll. */
export interface PollOptions<T> {
  /**
   * Pause between attempts, in ms (default 5). Suites that measure how long something takes
   * to propagate keep it small; ones that only wait for a server to come back poll slower so
   * that they do not load a 2-core machine.
   */
  readonly intervalMs?: number;
  /**
   * When true an attempt that throws or rejects counts as "not yet" (a server still starting
   * or restarting); by default it fails the wait at once, as an unexpected error should.
   */
  readonly retryErrors?: boolean;
  /**
   * Appended verbatim to the timeout error, to say what was seen instead (e.g. the last
   * answer). `last` is the last value `attempt` returned, undefined if none did.
   */
  readonly detail?: (last: T | undefined) => string;
}

/**
 * Calls `attempt` every `intervalMs` until `done` accepts its value; returns that value and
 * the milliseconds from the start to the attempt that succeeded. Throws
 * "`what`: not within `timeoutMs` ms" (plus `detail`) once `timeoutMs` has passed after an
 * attempt that did not succeed; `what` names the awaited condition positively.
 */
export async function untilValue<T>(
  attempt: () => T | Promise<T>,
  done: (value: T) => boolean,
  timeoutMs: number,
  what: string,
  options: PollOptions<T> = {},
): Promise<{ value: T; elapsedMs: number }> {
  const { intervalMs = 5, retryErrors = false, detail } = options;
  const started = performance.now();
  let last: T | undefined;
  for (;;) {
    try {
      const value = await attempt();
      last = value;
      if (done(value)) return { value, elapsedMs: performance.now() - started };
    } catch (error) {
      if (!retryErrors) throw error;
    }
    if (performance.now() - started > timeoutMs) throw new Error(`${what}: not within ${timeoutMs} ms${detail === undefined ? "" : detail(last)}`);
    await new Promise((resolve) => setTimeout(resolve, intervalMs));
  }
}

/**
 * Polls `probe` every `intervalMs` (default 5) until it is true; returns the elapsed
 * milliseconds to the probe that was. Throws "`what`: not within `timeoutMs` ms" after
 * `timeoutMs`. See {@link untilValue} for the options.
 */
export async function until(probe: () => boolean | Promise<boolean>, timeoutMs: number, what: string, options: PollOptions<boolean> = {}): Promise<number> {
  return (await untilValue(probe, (ok) => ok, timeoutMs, what, options)).elapsedMs;
}
