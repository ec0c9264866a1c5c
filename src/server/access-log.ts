import type { Logger } from "pino";
import type { Decision } from "../authz/pipeline.js";
import { DENIALS } from "../authz/reasons.js";
import { methodOnly, pathOnly } from "../tracing/tracing.js";
import type { EntryPoint } from "../tracing/tracing.js";

/**
 * The sampled access log (KEYGATE_ACCESS_LOG_SAMPLE): one info line for a share of Checks, allowed
 * and denied alike, with the key by id and the path without its query string. Never the
 * credential, never a header. Built only when the rate is above 0, so with it off a Check pays one
 * comparison.
 */
export class AccessLog {
  readonly #logger: Logger;
  readonly #sampleRate: number;

  constructor(logger: Logger, sampleRate: number) {
    this.#logger = logger;
    this.#sampleRate = sampleRate;
  }

  /** An access log at `sampleRate`, or undefined when the rate is 0 (off). */
  static create(logger: Logger, sampleRate: number): AccessLog | undefined {
    return sampleRate > 0 ? new AccessLog(logger, sampleRate) : undefined;
  }

  /** Logs a decided Check, if this one is in the sample. */
  decided(entry: EntryPoint, decision: Decision, method: string, path: string, requestId: string, startedAt: number): void {
    if (this.#sampleRate < 1 && Math.random() >= this.#sampleRate) return;
    const latencyUs = Math.round((performance.now() - startedAt) * 1000);
    const snapshot = decision.snapshot;
    const denial = decision.allow ? undefined : DENIALS[decision.reason];
    this.#logger.info(
      {
        entry,
        requestId,
        method: methodOnly(method),
        path: pathOnly(path),
        decision: decision.allow ? "allow" : "deny",
        reason: decision.allow ? "OK" : decision.reason,
        code: denial === undefined ? "OK" : denial.code,
        status: denial === undefined ? 200 : denial.httpStatus,
        keyId: snapshot?.key.id ?? null,
        ownerId: snapshot?.account.ownerId ?? null,
        latencyUs,
      },
      "access",
    );
  }

  /** Logs a Check that could not be decided (answered UNAVAILABLE; `reason` as keygate_checks_total counts it), if this one is in the sample. */
  failed(entry: EntryPoint, method: string, path: string, requestId: string, startedAt: number, reason: "UNAVAILABLE" | "INTERNAL"): void {
    if (this.#sampleRate < 1 && Math.random() >= this.#sampleRate) return;
    const latencyUs = Math.round((performance.now() - startedAt) * 1000);
    this.#logger.info(
      { entry, requestId, method: methodOnly(method), path: pathOnly(path), decision: "unavailable", reason, code: "UNAVAILABLE", status: 503, keyId: null, ownerId: null, latencyUs },
      "access",
    );
  }
}
