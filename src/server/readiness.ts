/** Whether this process should receive traffic; health endpoints and gRPC health read it. */
export class Readiness {
  #ready = false;
  #draining = false;
  readonly #listeners = new Set<(serving: boolean) => void>();

  get serving(): boolean {
    return this.#ready && !this.#draining;
  }

  setReady(ready: boolean): void {
    const before = this.serving;
    this.#ready = ready;
    if (before !== this.serving) this.#emit();
  }

  /** Shutdown has begun: report not serving so load balancers stop sending traffic. */
  drain(): void {
    const before = this.serving;
    this.#draining = true;
    if (before !== this.serving) this.#emit();
  }

  onChange(listener: (serving: boolean) => void): () => void {
    this.#listeners.add(listener);
    return () => this.#listeners.delete(listener);
  }

  #emit(): void {
    for (const listener of this.#listeners) listener(this.serving);
  }
}
