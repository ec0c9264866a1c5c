/**
 * Spaces out a log line that a client can cause at will: the first of each kind (its id) is
 * written at once, the next no sooner than `intervalMs` later, with how many were held back
 * since. At most `maxKinds` kinds are remembered; past that they start over.
 */
export class LogThrottle {
  readonly #logged = new Map<string, { at: number; unlogged: number }>();
  readonly #intervalMs: number;
  readonly #maxKinds: number;
  readonly #nowMs: () => number;

  /** `nowMs` is a monotonic clock (a stepped wall clock must not hold lines back or let them through). */
  constructor(intervalMs: number, maxKinds: number, nowMs: () => number = () => performance.now()) {
    this.#intervalMs = intervalMs;
    this.#maxKinds = maxKinds;
    this.#nowMs = nowMs;
  }

  /** How many lines of `id` were held back since the last one, when one is due now; otherwise null (this one is held back and counted). */
  due(id: string): number | null {
    const now = this.#nowMs();
    const seen = this.#logged.get(id);
    if (seen !== undefined && now - seen.at < this.#intervalMs) {
      seen.unlogged += 1;
      return null;
    }
    if (seen === undefined && this.#logged.size >= this.#maxKinds) this.#logged.clear();
    this.#logged.set(id, { at: now, unlogged: 0 });
    return seen?.unlogged ?? 0;
  }
}

/**
 * An error's kind for a LogThrottle: its name and message with numbers masked, since a message
 * may carry one that differs from call to call (what was left of a budget, a duration), which
 * would make each line a kind of its own.
 */
export function errorKind(error: unknown): string {
  return (error instanceof Error ? `${error.name}\n${error.message}` : String(error)).replace(/\d+(?:\.\d+)?/g, "#");
}
