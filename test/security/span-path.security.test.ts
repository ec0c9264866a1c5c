import { randomBytes } from "node:crypto";
import { describe, expect, it } from "vitest";
import { checkInit, httpCheck, startKeygate } from "../harness/keygate.js";
import { startOtlpCollector } from "../harness/otlp-collector.js";

// A span never holds the key, a header or the query string: a key the client put in the path is
// replaced in the decision span's url.path, as in the access log.
describe("a key in the request path never reaches a span", () => {
  it("gRPC and HTTP mode: url.path of keygate.check holds no key", async () => {
    const collector = await startOtlpCollector();
    const kg = await startKeygate({ env: { OTEL_EXPORTER_OTLP_ENDPOINT: collector.endpoint, OTEL_EXPORTER_OTLP_PROTOCOL: "http/json", OTEL_BSP_SCHEDULE_DELAY: "50", KEYGATE_ACCESS_LOG_SAMPLE: "1" } });
    try {
      const created = await kg.admin.createKey({ ownerId: "span-path-owner", name: "p" });
      const secret = created.secret;
      const traceA = randomBytes(16).toString("hex");
      const traceB = randomBytes(16).toString("hex");
      const tp = (t: string) => `00-${t}-${randomBytes(8).toString("hex")}-01`;
      // The client sent the key in the path (a webhook-style URL, a misconfigured SDK) as well as the header.
      await kg.check(checkInit({ "x-api-key": secret, traceparent: tp(traceA) }, `/v1/things/${secret}`));
      await httpCheck(kg.ports.http, `/check/v1/things/${secret}`, { "x-api-key": secret, traceparent: tp(traceB) });
      const a = await collector.waitForSpan((s) => s.traceId === traceA && s.name === "keygate.check");
      const b = await collector.waitForSpan((s) => s.traceId === traceB && s.name === "keygate.check");
      const exported = Buffer.concat(collector.bodies).toString("utf8");
      const logText = kg.logLines.join("");
      expect({
        accessLogged: logText.includes('"msg":"access"'),
        logLeaks: logText.includes(secret),
        grpcSpanPathLeaks: String(a.attributes["url.path"]).includes(secret),
        httpSpanPathLeaks: String(b.attributes["url.path"]).includes(secret),
        exportLeaks: exported.includes(secret),
      }).toEqual({ accessLogged: true, logLeaks: false, grpcSpanPathLeaks: false, httpSpanPathLeaks: false, exportLeaks: false });
    } finally {
      await kg.stop();
      await collector.close();
    }
  }, 60_000);
});
