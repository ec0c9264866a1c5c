/** A wall clock that tests can move forward. */
export class TestClock {
  offsetMs = 0;
  readonly now = (): number => Date.now() + this.offsetMs;

  advanceDays(days: number): void {
    this.offsetMs += days * 86_400_000;
  }
}
