import { randomBytes } from "node:crypto";
import { describe, expect, it } from "vitest";
import { checkInit, httpCheck, startKeygate } from "../harness/keygate.js";
import { startOtlpCollector } from "../harness/otlp-collector.js";

// README "Tracing": "A span never holds the key". url.path goes through redactText (a key a client
// put in the path is replaced, test/security/span-path.security.test.ts), and the access log's
// method is scrubbed by the logger; the span's http.request.method is only cut to 32 characters,
// so a key sent as the method (gRPC: Envoy passes the client's method as it came; nginx:
// X-Original-Method) reaches the collector with 24 of its 32 random characters.
describe("a key in the request method never reaches a span", () => {
  it("gRPC and nginx HTTP mode: http.request.method of keygate.check holds no part of the key beyond its start", async () => {
    const collector = await startOtlpCollector();
    const kg = await startKeygate({
      httpAuthzProxy: "nginx",
      env: { OTEL_EXPORTER_OTLP_ENDPOINT: collector.endpoint, OTEL_EXPORTER_OTLP_PROTOCOL: "http/json", OTEL_BSP_SCHEDULE_DELAY: "50", KEYGATE_ACCESS_LOG_SAMPLE: "1" },
    });
    try {
      const created = await kg.admin.createKey({ ownerId: "span-method-owner", name: "m" });
      const secret = created.secret;
      const traceA = randomBytes(16).toString("hex");
      const traceB = randomBytes(16).toString("hex");
      const tp = (t: string) => `00-${t}-${randomBytes(8).toString("hex")}-01`;
      await kg.check(checkInit({ "x-api-key": secret, traceparent: tp(traceA) }, "/v1/things", secret));
      await httpCheck(kg.ports.http, "/check", { "x-original-uri": "/v1/things", "x-original-method": secret, "x-api-key": secret, traceparent: tp(traceB) });
      const a = await collector.waitForSpan((s) => s.traceId === traceA && s.name === "keygate.check");
      const b = await collector.waitForSpan((s) => s.traceId === traceB && s.name === "keygate.check");
      // What the documented display hint shows: prefix, mode and 4 body characters ("kg_live_AbCd").
      // Anything past that, here the next 12 random characters, is the secret.
      const beyondHint = secret.slice(12, 24);
      const exported = Buffer.concat(collector.bodies).toString("utf8");
      const logText = kg.logLines.join("");
      expect({
        logLeaks: logText.includes(beyondHint),
        grpcSpanMethodLeaks: String(a.attributes["http.request.method"]).includes(beyondHint),
        httpSpanMethodLeaks: String(b.attributes["http.request.method"]).includes(beyondHint),
        exportLeaks: exported.includes(beyondHint),
      }).toEqual({ logLeaks: false, grpcSpanMethodLeaks: false, httpSpanMethodLeaks: false, exportLeaks: false });
    } finally {
      await kg.stop();
      await collector.close();
    }
  }, 60_000);
});
