import { Writable } from "node:stream";
import type { Logger } from "pino";
import type { DecisionPipeline } from "../../src/authz/pipeline.js";
import { createAuthzCore } from "../../src/server/grpc-authz.js";
import type { AuthzCore } from "../../src/server/grpc-authz.js";
import { createLogger } from "../../src/server/logger.js";
import { Metrics } from "../../src/server/metrics.js";
import { Readiness } from "../../src/server/readiness.js";

/** keygate's logger writing to memory: each line as written, scrubbed of `secrets` as in production. */
export function collectingLogger(secrets: readonly string[] = []): { logger: Logger; lines: string[] } {
  const lines: string[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _encoding, callback) {
      lines.push(chunk.toString("utf8"));
      callback();
    },
  });
  return { logger: createLogger("info", sink, secrets), lines };
}

/** The gRPC mode's Check core in process over `pipeline`, ready, with metrics of its own and a log clock the caller holds. */
export function readyAuthzCore(pipeline: Pick<DecisionPipeline, "decide">, logger: Logger, logClockMs: () => number = () => 0): { core: AuthzCore; metrics: Metrics } {
  const readiness = new Readiness();
  readiness.setReady(true);
  const metrics = new Metrics({ defaultMetrics: false });
  return { core: createAuthzCore({ pipeline, readiness, metrics, logger, nowMs: () => Date.now(), logClockMs }, false), metrics };
}
