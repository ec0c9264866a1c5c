import type { CheckInput, Decision } from "../../src/authz/pipeline.js";
import type { StartedServer } from "../../src/server/grpc-authz.js";
import { createHttpAuthzServer } from "../../src/server/http-authz.js";
import type { HttpAuthzDeps } from "../../src/server/http-authz.js";
import { createLogger } from "../../src/server/logger.js";
import { Metrics } from "../../src/server/metrics.js";
import { Readiness } from "../../src/server/readiness.js";

/** What a HeldPipeline decides once released: the missing-credential denial. */
const DENIAL: Decision = { allow: false, reason: "MISSING_CREDENTIAL", message: "No API key was sent." };

/** A pipeline whose every decision waits until the test releases it, then denies. */
export class HeldPipeline {
  decided = 0;
  readonly #waiting: Array<() => void> = [];
  #onDecide: (() => void) | undefined;
  decide(_input: CheckInput): Promise<Decision> {
    this.decided += 1;
    this.#onDecide?.();
    return new Promise((resolve) => this.#waiting.push(() => resolve(DENIAL)));
  }
  release(): void {
    for (const go of this.#waiting.splice(0)) go();
  }
  /** Resolves once `count` decisions have started. */
  reached(count: number): Promise<void> {
    return new Promise((resolve) => {
      const check = (): void => {
        if (this.decided >= count) resolve();
      };
      this.#onDecide = check;
      check();
    });
  }
}

/** Starts the HTTP authorization server alone on 127.0.0.1:0 (Envoy mode, ready, silent) over `pipeline`; the caller stops it. */
export function startHttpAuthzOver(pipeline: HttpAuthzDeps["pipeline"]): Promise<StartedServer> {
  const readiness = new Readiness();
  readiness.setReady(true);
  return createHttpAuthzServer({
    pipeline,
    readiness,
    metrics: new Metrics({ defaultMetrics: false }),
    logger: createLogger("silent"),
    nowMs: () => Date.now(),
    proxy: "envoy",
    limits: { headersTimeoutMs: 10_000, requestTimeoutMs: 30_000, idleTimeoutMs: 60_000, maxConnections: 1000 },
  }).start("127.0.0.1", 0);
}
