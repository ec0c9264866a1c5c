import { DiagLogLevel, TraceFlags, diag, isSpanContextValid, trace } from "@opentelemetry/api";
import type { Context } from "@opentelemetry/api";
import { OTLPTraceExporter as JsonExporter } from "@opentelemetry/exporter-trace-otlp-http";
import { OTLPTraceExporter as ProtobufExporter } from "@opentelemetry/exporter-trace-otlp-proto";
import { resourceFromAttributes } from "@opentelemetry/resources";
import { AlwaysOffSampler, AlwaysOnSampler, BatchSpanProcessor, ParentBasedSampler, SamplingDecision, TraceIdRatioBasedSampler, TracerProvider } from "@opentelemetry/sdk-trace";
import type { Sampler, SamplingResult, SpanExporter } from "@opentelemetry/sdk-trace";
import { ATTR_SERVICE_NAME } from "@opentelemetry/semantic-conventions";
import type { Logger } from "pino";
import type { TraceSampler, TracingSettings } from "../config.js";
import { DecisionTracer } from "./tracing.js";

/** The instrumentation scope spans are reported under. */
const SCOPE = "keygate";
/** How long the last spans may take to reach the collector at shutdown. */
const SHUTDOWN_FLUSH_MS = 5000;
/** The longest span attribute value kept (the SDK's default keeps any length). */
const MAX_ATTRIBUTE_LENGTH = 2048;
/** The SDK's complaints (a collector that does not answer) are logged at most this often. */
const DIAG_LOG_INTERVAL_MS = 60_000;

/**
 * Routes the SDK's own errors and warnings (a failed export, say) to keygate's log, at most one
 * line a minute: a collector that is down costs spans, never a flood of log lines.
 */
function logSdkProblems(logger: Logger): void {
  let lastAtMs = -Infinity;
  const report = (message: string, ...args: unknown[]): void => {
    const now = Date.now();
    if (now - lastAtMs < DIAG_LOG_INTERVAL_MS) return;
    lastAtMs = now;
    const detail = [message, ...args.map((arg) => (arg instanceof Error ? arg.message : String(arg)))].join(" ").slice(0, 500);
    logger.warn({ detail }, "tracing: spans could not be exported (or the SDK reported another problem); further reports wait a minute");
  };
  const ignore = (): void => undefined;
  diag.setLogger({ error: report, warn: report, info: ignore, debug: ignore, verbose: ignore }, { logLevel: DiagLogLevel.WARN, suppressOverrideMessage: true });
}

/**
 * `traceidratio` decided on keygate's own randomness. The SDK's sampler decides from the trace id
 * alone, and a Check's trace id is the client's (its traceparent): a client that sends one the SDK
 * samples (000…001) has every Check traced, at any ratio. Here the client's trace id and sampled
 * flag decide nothing; the span still continues the client's trace. A backend call's span follows
 * its decision span's (its local parent), so a decision is traced whole or not at all.
 */
class KeygateRatioSampler implements Sampler {
  readonly #ratio: number;
  readonly #random: () => number;

  constructor(ratio: number, random: () => number) {
    this.#ratio = ratio;
    this.#random = random;
  }

  shouldSample(context: Context): SamplingResult {
    const parent = trace.getSpanContext(context);
    if (parent !== undefined && isSpanContextValid(parent) && parent.isRemote !== true) {
      return { decision: (parent.traceFlags & TraceFlags.SAMPLED) === TraceFlags.SAMPLED ? SamplingDecision.RECORD_AND_SAMPLED : SamplingDecision.NOT_RECORD };
    }
    // random() is in [0, 1): a ratio of 0 samples nothing, and 1 everything.
    return { decision: this.#random() < this.#ratio ? SamplingDecision.RECORD_AND_SAMPLED : SamplingDecision.NOT_RECORD };
  }

  // Described as the SDK's sampler: it is the setting OTEL_TRACES_SAMPLER names, at that ratio.
  toString(): string {
    return `TraceIdRatioBased{${this.#ratio}}`;
  }
}

/**
 * The sampler an OTEL_TRACES_SAMPLER value names; `random` (tests pass their own) is where
 * `traceidratio` draws from.
 */
export function samplerFor(name: TraceSampler, ratio: number, random: () => number = Math.random): Sampler {
  switch (name) {
    case "always_on":
      return new AlwaysOnSampler();
    case "always_off":
      return new AlwaysOffSampler();
    case "traceidratio":
      return new KeygateRatioSampler(ratio, random);
    case "parentbased_always_on":
      return new ParentBasedSampler({ root: new AlwaysOnSampler() });
    case "parentbased_always_off":
      return new ParentBasedSampler({ root: new AlwaysOffSampler() });
    case "parentbased_traceidratio":
      // The SDK's sampler decides only a trace that starts here, whose id keygate drew itself.
      return new ParentBasedSampler({ root: new TraceIdRatioBasedSampler(ratio) });
  }
}

/** Decision tracing while it runs, and how to send what is left when keygate stops. */
export interface Tracing {
  readonly tracer: DecisionTracer;
  /** Sends the spans still batched and stops exporting (SIGTERM path). */
  shutdown(): Promise<void>;
}

/**
 * Builds decision tracing from the OTEL_* settings, or for tests and the benchmark, around a given
 * exporter and sampler. The provider is not registered globally: keygate hands its tracer down
 * to the entry points, so no other library's instrumentation starts emitting through it.
 */
export function createTracing(
  settings: Pick<TracingSettings, "serviceName" | "sampler" | "samplerRatio" | "scheduleDelayMs"> & Partial<Pick<TracingSettings, "url" | "protocol">>,
  logger: Logger,
  exporter?: SpanExporter,
): Tracing {
  logSdkProblems(logger);
  const out = exporter ?? otlpExporter(settings);
  const provider = new TracerProvider({
    resource: resourceFromAttributes({ [ATTR_SERVICE_NAME]: settings.serviceName }),
    sampler: samplerFor(settings.sampler, settings.samplerRatio),
    spanProcessors: [new BatchSpanProcessor({ exporter: out, scheduledDelayMillis: settings.scheduleDelayMs })],
    forceFlushTimeoutMillis: SHUTDOWN_FLUSH_MS,
    // keygate's own attributes are short (pathOnly keeps 1,024 characters of a path); this bounds
    // any other, so a queue of spans cannot grow with what clients send.
    spanLimits: { attributeValueLengthLimit: MAX_ATTRIBUTE_LENGTH },
  });
  const tracer = new DecisionTracer(provider.getTracer(SCOPE));
  return {
    tracer,
    async shutdown() {
      // provider.shutdown waits for the exporter's own timeout (10 s by default, or
      // OTEL_EXPORTER_OTLP_TIMEOUT): a collector that takes the request and never answers must not
      // hold SIGTERM past the SHUTDOWN_FLUSH_MS promised.
      let timer: NodeJS.Timeout | undefined;
      const late = new Promise<"late">((resolve) => {
        timer = setTimeout(() => resolve("late"), SHUTDOWN_FLUSH_MS);
        timer.unref();
      });
      try {
        if ((await Promise.race([provider.shutdown(), late])) === "late") {
          logger.warn(`the last trace spans were not sent within ${SHUTDOWN_FLUSH_MS} ms of the shutdown; they are dropped`);
        }
      } catch (error) {
        logger.warn({ err: error }, "could not send the last trace spans");
      } finally {
        clearTimeout(timer);
      }
    },
  };
}

/**
 * The OTLP/HTTP exporter. Its URL comes from keygate's config; headers, timeout, compression and
 * TLS files come from the exporter's own OTEL_EXPORTER_OTLP_* variables.
 */
function otlpExporter(settings: Partial<Pick<TracingSettings, "url" | "protocol">>): SpanExporter {
  const config = settings.url === undefined ? {} : { url: settings.url };
  return settings.protocol === "http/json" ? new JsonExporter(config) : new ProtobufExporter(config);
}
