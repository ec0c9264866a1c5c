import { SpanStatusCode } from "@opentelemetry/api";
import { AlwaysOnSampler, InMemorySpanExporter, SimpleSpanProcessor, TracerProvider } from "@opentelemetry/sdk-trace";
import { describe, expect, it } from "vitest";
import { DecisionTracer, STORE_LOOKUP_SPAN, backendAttributes, traceCall } from "../../src/tracing/tracing.js";
import { RecordHeaders } from "../../src/authz/headers.js";

function setup(): { tracer: DecisionTracer; exporter: InMemorySpanExporter } {
  const exporter = new InMemorySpanExporter();
  const provider = new TracerProvider({ sampler: new AlwaysOnSampler(), spanProcessors: [new SimpleSpanProcessor({ exporter })] });
  return { tracer: new DecisionTracer(provider.getTracer("test")), exporter };
}

describe("decision trace error", () => {
  it("a Check that could not be decided ends its span as an error, naming only the error's class", async () => {
    const { tracer, exporter } = setup();
    const trace = tracer.start("grpc", "GET", "/v1/x?token=abc", new RecordHeaders({ traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01" }));
    trace.cacheTier = "store";
    const failing = Promise.reject(new TypeError("store said kg_live_secretsecretsecretsecretsecretse1234 is bad"));
    await expect(traceCall(trace, STORE_LOOKUP_SPAN, backendAttributes("mongodb", "find_snapshot"), () => failing)).rejects.toThrow(TypeError);
    tracer.fail(trace, new Error("boom kg_live_x"));
    const [lookup, check] = exporter.getFinishedSpans();
    expect(lookup?.name).toBe("keygate.store.lookup");
    expect(lookup?.status).toEqual({ code: SpanStatusCode.ERROR, message: "TypeError" });
    expect(lookup?.attributes).toEqual({ "db.system.name": "mongodb", "db.operation.name": "find_snapshot", "error.type": "TypeError" });
    expect(lookup?.parentSpanContext?.spanId).toBe(check?.spanContext().spanId);
    expect(check?.name).toBe("keygate.check");
    expect(check?.parentSpanContext?.spanId).toBe("b7ad6b7169203331");
    expect(check?.status).toEqual({ code: SpanStatusCode.ERROR, message: "Error" });
    expect(check?.attributes).toEqual({
      "keygate.entry": "grpc",
      "http.request.method": "GET",
      "url.path": "/v1/x",
      "keygate.decision": "unavailable",
      "keygate.cache.tier": "store",
      "error.type": "Error",
    });
    expect(JSON.stringify(exporter.getFinishedSpans().map((s) => [s.attributes, s.status, s.events]))).not.toContain("kg_live");
  });

  it("a call that throws at once still ends its span, and the error goes on", () => {
    const { tracer, exporter } = setup();
    const trace = tracer.start("http", "GET", "/", new RecordHeaders({}));
    expect(() =>
      traceCall(trace, "keygate.redis.charge", backendAttributes("redis", "charge"), () => {
        throw new RangeError("x");
      }),
    ).toThrow(RangeError);
    expect(exporter.getFinishedSpans().map((s) => [s.name, s.status.code])).toEqual([["keygate.redis.charge", SpanStatusCode.ERROR]]);
  });

  it("a malformed traceparent starts a new trace instead of failing the Check", () => {
    const { tracer, exporter } = setup();
    const trace = tracer.start("grpc", "GET", "/", new RecordHeaders({ traceparent: "00-zzzz-not-a-context" }));
    tracer.finish(trace, { allow: false, reason: "MISSING_CREDENTIAL", message: "m" });
    const [check] = exporter.getFinishedSpans();
    expect(check?.parentSpanContext).toBeUndefined();
    expect(check?.attributes).toMatchObject({ "keygate.decision": "deny", "keygate.reason": "MISSING_CREDENTIAL", "keygate.code": "UNAUTHENTICATED" });
  });
});
