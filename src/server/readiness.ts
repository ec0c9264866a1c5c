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

/** How long one store ping's answer stands for every /readyz, and how long a ping may take. */
export const READINESS_PING_FRESH_MS = 1000;
export const READINESS_PING_TIMEOUT_MS = 2000;

/**
 * The store ping behind /readyz, shared: /readyz needs no token, and each ping is a command on the
 * connections the key lookups use, so a flood of them queued ahead of the lookups (MongoDB's pool
 * and its wait queue) and cold keys' Checks ran out of their budget. Requests while a ping runs
 * wait for it, its answer stands for READINESS_PING_FRESH_MS, and a ping that has not answered in
 * READINESS_PING_TIMEOUT_MS fails (a frozen store is reported, not waited on): at most one ping a
 * second, whatever the rate of probes. `onFailure` hears each failed ping once.
 */
export function sharedPing(ping: () => Promise<void>, onFailure: (error: unknown) => void, nowMs: () => number = () => performance.now()): () => Promise<void> {
  let running: Promise<void> | null = null;
  let settledAtMs = Number.NEGATIVE_INFINITY;
  let lastError: unknown = null;
  return () => {
    if (running !== null) return running;
    if (nowMs() - settledAtMs < READINESS_PING_FRESH_MS) return lastError === null ? Promise.resolve() : Promise.reject(lastError);
    let timer: NodeJS.Timeout | undefined;
    const deadline = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`the store did not answer a ping within ${READINESS_PING_TIMEOUT_MS} ms`)), READINESS_PING_TIMEOUT_MS);
      timer.unref();
    });
    const current = Promise.race([ping(), deadline]).then(
      () => {
        lastError = null;
      },
      (error: unknown) => {
        lastError = error;
        onFailure(error);
        throw error;
      },
    );
    running = current.finally(() => {
      clearTimeout(timer);
      settledAtMs = nowMs();
      running = null;
    });
    // Every caller handles the rejection; this copy only keeps it from counting as unhandled.
    running.catch(() => undefined);
    return running;
  };
}
