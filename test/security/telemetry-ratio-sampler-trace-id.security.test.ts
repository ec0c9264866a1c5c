import { randomBytes } from "node:crypto";
import { InMemorySpanExporter, SimpleSpanProcessor, TracerProvider } from "@opentelemetry/sdk-trace";
import { describe, expect, it } from "vitest";
import { RecordHeaders } from "../../src/authz/headers.js";
import { samplerFor } from "../../src/tracing/otlp.js";
import { DecisionTracer, STORE_LOOKUP_SPAN, backendAttributes, traceCall } from "../../src/tracing/tracing.js";
import { checkInit, startKeygate } from "../harness/keygate.js";
import { startOtlpCollector } from "../harness/otlp-collector.js";

// README "Tracing": OTEL_TRACES_SAMPLER=traceidratio with OTEL_TRACES_SAMPLER_ARG samples that
// ratio of decisions. Unlike the parent-based samplers (which follow the client's sampled flag),
// it is the setting an operator picks so that clients do not decide what is traced. The SDK's
// TraceIdRatioBasedSampler decides from the trace id alone, and keygate takes the trace id from
// the client's traceparent: a client sending one the SDK samples (000…001) would have every Check
// traced at any ratio (span volume, collector cost and the CPU of a sampled span its to choose),
// and one it never samples would hide its own. keygate's own randomness decides instead.

/** The SDK's sampler keeps 000…001 at any ratio above 0 (its trace id hash is 1)... */
const ALWAYS_SAMPLED_ID = `${"0".repeat(31)}1`;
/** ...and drops ffffffff00…0 at any ratio below 1 (its hash is 0xffffffff). */
const NEVER_SAMPLED_ID = `${"f".repeat(8)}${"0".repeat(24)}`;

describe("a client-chosen trace id does not decide the traceidratio sampler", () => {
  it("the draw decides, whatever trace id and sampled flag the client sent; the parent link stays", async () => {
    const exporter = new InMemorySpanExporter();
    let draw = 0;
    const provider = new TracerProvider({ sampler: samplerFor("traceidratio", 0.5, () => draw), spanProcessors: [new SimpleSpanProcessor({ exporter })] });
    const tracer = new DecisionTracer(provider.getTracer("test"));
    const decide = async (traceId: string, flag: "00" | "01", drawn: number): Promise<string[]> => {
      exporter.reset();
      draw = drawn;
      const trace = tracer.start("grpc", "GET", "/", new RecordHeaders({ traceparent: `00-${traceId}-b7ad6b7169203331-${flag}` }));
      // The backend call's span draws again: it follows its decision span instead.
      draw = 1 - drawn;
      await traceCall(trace, STORE_LOOKUP_SPAN, backendAttributes("sqlite", "find_snapshot"), () => Promise.resolve());
      tracer.finish(trace, { allow: false, reason: "MISSING_CREDENTIAL", message: "m" });
      const spans = exporter.getFinishedSpans();
      for (const span of spans) expect(span.spanContext().traceId).toBe(traceId);
      const check = spans.find((s) => s.name === "keygate.check");
      if (check !== undefined) expect(check.parentSpanContext?.spanId).toBe("b7ad6b7169203331");
      return spans.map((s) => s.name).sort();
    };
    const both = ["keygate.check", "keygate.store.lookup"];
    expect({
      lowIdSampledFlagDrawnOut: await decide(ALWAYS_SAMPLED_ID, "01", 0.9),
      lowIdUnsampledFlagDrawnOut: await decide(ALWAYS_SAMPLED_ID, "00", 0.9),
      highIdUnsampledFlagDrawnIn: await decide(NEVER_SAMPLED_ID, "00", 0.1),
      randomIdDrawnIn: await decide(randomBytes(16).toString("hex"), "01", 0.1),
    }).toEqual({ lowIdSampledFlagDrawnOut: [], lowIdUnsampledFlagDrawnOut: [], highIdUnsampledFlagDrawnIn: both, randomIdDrawnIn: both });
  });

  it("gRPC Check: 20 Checks with trace id 000…001 at ratio 0.0001 are not all exported", async () => {
    const checks = 20;
    const collector = await startOtlpCollector();
    const kg = await startKeygate({
      env: {
        OTEL_EXPORTER_OTLP_ENDPOINT: collector.endpoint,
        OTEL_EXPORTER_OTLP_PROTOCOL: "http/json",
        OTEL_BSP_SCHEDULE_DELAY: "50",
        OTEL_TRACES_SAMPLER: "traceidratio",
        OTEL_TRACES_SAMPLER_ARG: "0.0001",
      },
    });
    try {
      for (let i = 0; i < checks; i++) {
        const traceparent = `00-${ALWAYS_SAMPLED_ID}-${randomBytes(8).toString("hex")}-01`;
        const response = await kg.check(checkInit({ traceparent }));
        expect(response.httpResponse.case).toBe("deniedResponse");
      }
    } finally {
      // Stopping flushes every span the tracer holds.
      await kg.stop();
    }
    const exported = collector.spans.filter((s) => s.traceId === ALWAYS_SAMPLED_ID && s.name === "keygate.check").length;
    await collector.close();
    // The SDK's sampler exported all 20. At 1 in 10,000, 3 or more of 20 are sampled with a chance
    // of about 1e-9 (any one, about 0.2%, too often to assert none).
    expect(exported).toBeLessThanOrEqual(2);
  }, 60_000);
});
