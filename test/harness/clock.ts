/** A wall clock that tests can move forward, or stop at a chosen instant. */
export class TestClock {
  offsetMs = 0;
  #frozenAtMs: number | null = null;
  readonly now = (): number => (this.#frozenAtMs ?? Date.now()) + this.offsetMs;

  advanceDays(days: number): void {
    this.offsetMs += days * 86_400_000;
  }

  /** Stops the clock at `atMs` (ISO text or epoch ms); `advanceMs` then moves it. */
  freeze(at: number | string): void {
    this.#frozenAtMs = typeof at === "string" ? Date.parse(at) : at;
    this.offsetMs = 0;
  }

  advanceMs(ms: number): void {
    this.offsetMs += ms;
  }

  unfreeze(): void {
    this.#frozenAtMs = null;
    this.offsetMs = 0;
  }
}
