import { randomBytes } from "node:crypto";
import { describe, expect, it } from "vitest";
import { MAX_LOGGED_PATH } from "../../src/tracing/tracing.js";
import { checkInit, httpCheck, startKeygate } from "../harness/keygate.js";
import { startOtlpCollector } from "../harness/otlp-collector.js";

// README (Access log): "What a client chose is bounded before it reaches a log line or a span",
// the method too: Envoy passes the client's method on as it came (HTTP/2 :method or an HTTP/1
// extension method, up to its 60 KiB header limit), and nginx sends $request_method as
// X-Original-Method. One unauthenticated request must not write a log line as large as that.
const LONG_METHOD = "M".repeat(50_000);

describe("telemetry size from a client-chosen method", () => {
  it("the access log's method (gRPC and HTTP mode) stays bounded for an unauthenticated Check", async () => {
    const collector = await startOtlpCollector();
    const kg = await startKeygate({
      httpAuthzProxy: "nginx",
      env: { OTEL_EXPORTER_OTLP_ENDPOINT: collector.endpoint, OTEL_EXPORTER_OTLP_PROTOCOL: "http/json", OTEL_BSP_SCHEDULE_DELAY: "50", KEYGATE_ACCESS_LOG_SAMPLE: "1" },
    });
    try {
      const traceGrpc = randomBytes(16).toString("hex");
      const tp = (t: string) => `00-${t}-${randomBytes(8).toString("hex")}-01`;
      const grpc = await kg.check(checkInit({ traceparent: tp(traceGrpc) }, "/v1/things", LONG_METHOD));
      // nginx: auth_request with proxy_set_header X-Original-Method $request_method.
      const http = await httpCheck(kg.ports.http, "/check", { "x-original-uri": "/v1/things", "x-original-method": LONG_METHOD });
      const span = await collector.waitForSpan((s) => s.traceId === traceGrpc && s.name === "keygate.check");
      const access = kg.logLines.filter((l) => l.includes('"msg":"access"'));
      const observed = {
        grpcAnswered: grpc.status !== undefined,
        httpStatus: http.status,
        accessLines: access.length,
        accessMethodLens: access.map((l) => (JSON.parse(l) as { method: string }).method.length),
        accessLineBytes: access.map((l) => Buffer.byteLength(l)),
        spanMethodLen: String(span.attributes["http.request.method"]).length,
      };
      expect(observed.accessLines).toBe(2);
      for (const len of observed.accessMethodLens) expect(len).toBeLessThanOrEqual(MAX_LOGGED_PATH);
      for (const bytes of observed.accessLineBytes) expect(bytes).toBeLessThanOrEqual(4096);
    } finally {
      await kg.stop();
      await collector.close();
    }
  }, 60_000);
});
