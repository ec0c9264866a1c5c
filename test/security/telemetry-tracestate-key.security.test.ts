import { randomBytes } from "node:crypto";
import { AlwaysOnSampler, InMemorySpanExporter, SimpleSpanProcessor, TracerProvider } from "@opentelemetry/sdk-trace";
import { describe, expect, it } from "vitest";
import { RecordHeaders } from "../../src/authz/headers.js";
import { DecisionTracer } from "../../src/tracing/tracing.js";
import { checkInit, httpCheck, startKeygate } from "../harness/keygate.js";
import { startOtlpCollector } from "../harness/otlp-collector.js";

// README "Tracing": "A span never holds the key, a header or the query string". The decision
// span's method and path are scrubbed of key-shaped text (span-method-key, span-path), but the
// client's `tracestate` becomes the trace state of keygate's spans, the decision span's and every
// backend call's, and the exporter sends it as it came: a key a client (or its SDK) put there
// would reach the collector whole. A tracestate holding anything redactText recognises as a
// secret is dropped; the parent link, which comes from traceparent, stays.
describe("a key in the client's tracestate never reaches the collector", () => {
  it("gRPC and HTTP mode: the spans keep the client's parent, drop its tracestate, and export no part of the key", async () => {
    const collector = await startOtlpCollector();
    const kg = await startKeygate({
      env: { OTEL_EXPORTER_OTLP_ENDPOINT: collector.endpoint, OTEL_EXPORTER_OTLP_PROTOCOL: "http/json", OTEL_BSP_SCHEDULE_DELAY: "50" },
    });
    try {
      await kg.admin.upsertAccount({ ownerId: "tracestate-owner", plan: "business" });
      const created = await kg.admin.createKey({ ownerId: "tracestate-owner", name: "t" });
      const secret = created.secret;
      const traceA = randomBytes(16).toString("hex");
      const traceB = randomBytes(16).toString("hex");
      const spanA = randomBytes(8).toString("hex");
      const spanB = randomBytes(8).toString("hex");
      // The key in a later list member, after a vendor's own.
      const tracestate = `envoy=1,vendor=${secret}`;
      const grpc = await kg.check(checkInit({ "x-api-key": secret, traceparent: `00-${traceA}-${spanA}-01`, tracestate }));
      expect(grpc.status?.code).toBe(0);
      const http = await httpCheck(kg.ports.http, "/check/v1/things", { "x-api-key": secret, traceparent: `00-${traceB}-${spanB}-01`, tracestate });
      expect(http.status).toBe(200);
      const a = await collector.waitForSpan((s) => s.traceId === traceA && s.name === "keygate.check");
      const b = await collector.waitForSpan((s) => s.traceId === traceB && s.name === "keygate.check");
      // The first Check read the key from the store: its lookup span inherits the trace state too.
      const lookup = await collector.waitForSpan((s) => s.traceId === traceA && s.name === "keygate.store.lookup");
      expect([a.parentSpanId, b.parentSpanId, lookup.parentSpanId]).toEqual([spanA, spanB, a.spanId]);
      expect([a.traceState, b.traceState, lookup.traceState]).toEqual(["", "", ""]);
      // What the documented display hint shows: prefix, mode and 4 body characters ("kg_live_AbCd").
      // Anything past that, here the next 12 random characters, is the secret.
      const beyondHint = secret.slice(12, 24);
      expect(Buffer.concat(collector.bodies).toString("utf8").includes(beyondHint)).toBe(false);
    } finally {
      await kg.stop();
      await collector.close();
    }
  }, 60_000);

  it("each secret shape redactText knows drops the tracestate; one without keeps it", () => {
    const exporter = new InMemorySpanExporter();
    const provider = new TracerProvider({ sampler: new AlwaysOnSampler(), spanProcessors: [new SimpleSpanProcessor({ exporter })] });
    const tracer = new DecisionTracer(provider.getTracer("test"));
    const key = `kg_live_${randomBytes(24).toString("base64url").replace(/[-_]/g, "x")}`;
    const traceStateOf = (tracestate: string): string | undefined => {
      exporter.reset();
      const traceparent = `00-${randomBytes(16).toString("hex")}-b7ad6b7169203331-01`;
      const trace = tracer.start("grpc", "GET", "/", new RecordHeaders({ traceparent, tracestate }));
      tracer.finish(trace, { allow: false, reason: "MISSING_CREDENTIAL", message: "m" });
      const [check] = exporter.getFinishedSpans();
      expect(check?.parentSpanContext?.spanId).toBe("b7ad6b7169203331");
      return check?.spanContext().traceState?.serialize();
    };
    expect({
      key: traceStateOf(`vendor=${key}`),
      percentEncoded: traceStateOf(`vendor=${key.replaceAll("_", "%5F")}`),
      adminToken: traceStateOf(`a=1,vendor=kgadm_${randomBytes(12).toString("hex")}`),
      keyHash: traceStateOf(`vendor=${randomBytes(32).toString("hex")}`),
      bearer: traceStateOf(`vendor=Bearer ${randomBytes(12).toString("hex")}`),
      plain: traceStateOf("envoy=1,rojo=00f067aa0ba902b7"),
    }).toEqual({ key: undefined, percentEncoded: undefined, adminToken: undefined, keyHash: undefined, bearer: undefined, plain: "envoy=1,rojo=00f067aa0ba902b7" });
  });
});
