import { randomBytes } from "node:crypto";
import { describe, expect, it } from "vitest";
import { MAX_PATH_LENGTH } from "../../src/authz/routes.js";
import { MAX_ECHOED_REQUEST_ID } from "../../src/authz/reasons.js";
import { checkInit, httpCheck, startKeygate } from "../harness/keygate.js";
import { startOtlpCollector } from "../harness/otlp-collector.js";

// Telemetry taken from client input stays bounded: a client with no key can send a 60 KiB path
// or X-Request-Id, and each would otherwise go whole into spans and access-log lines (a path
// keeps 1,024 characters at most, a request id 128 printable ones or is replaced).
const LONG_PATH = "/v1/" + "ab-cd/".repeat(10_000); // 60,004 chars, no query

describe("telemetry size from client-chosen paths", () => {
  it("url.path (span) and path (access log) stay bounded for an unauthenticated long-path Check", async () => {
    const collector = await startOtlpCollector();
    const kg = await startKeygate({
      env: { OTEL_EXPORTER_OTLP_ENDPOINT: collector.endpoint, OTEL_EXPORTER_OTLP_PROTOCOL: "http/json", OTEL_BSP_SCHEDULE_DELAY: "50", KEYGATE_ACCESS_LOG_SAMPLE: "1" },
    });
    try {
      const traceGrpc = randomBytes(16).toString("hex");
      const traceHttp = randomBytes(16).toString("hex");
      const tp = (t: string) => `00-${t}-${randomBytes(8).toString("hex")}-01`;
      // No credential at all.
      await kg.check(checkInit({ traceparent: tp(traceGrpc) }, LONG_PATH));
      const http = await httpCheck(kg.ports.http, `/check${LONG_PATH}`, { traceparent: tp(traceHttp) });
      const a = await collector.waitForSpan((s) => s.traceId === traceGrpc && s.name === "keygate.check");
      const b = await collector.waitForSpan((s) => s.traceId === traceHttp && s.name === "keygate.check");
      const access = kg.logLines.filter((l) => l.includes('"msg":"access"')).map((l) => JSON.parse(l) as { path: string; reason: string });
      const observed = {
        httpStatus: http.status,
        grpcSpanPathLen: String(a.attributes["url.path"]).length,
        httpSpanPathLen: String(b.attributes["url.path"]).length,
        accessLines: access.length,
        accessPathLens: access.map((l) => l.path.length),
        accessLineBytes: kg.logLines.filter((l) => l.includes('"msg":"access"')).map((l) => Buffer.byteLength(l)),
        reasons: access.map((l) => l.reason),
      };
      console.log("observed", JSON.stringify(observed));
      expect(observed.grpcSpanPathLen).toBeLessThanOrEqual(MAX_PATH_LENGTH);
      expect(observed.httpSpanPathLen).toBeLessThanOrEqual(MAX_PATH_LENGTH);
      for (const len of observed.accessPathLens) expect(len).toBeLessThanOrEqual(MAX_PATH_LENGTH);
    } finally {
      await kg.stop();
      await collector.close();
    }
  }, 60_000);
});

// Same class, second field: in HTTP mode the access log's requestId is the client's own
// X-Request-Id (nginx/Caddy pass client headers on to the auth subrequest) with no length bound.
describe("telemetry size from a client-chosen X-Request-Id", () => {
  it("the access log's requestId stays bounded for an unauthenticated Check", async () => {
    const kg = await startKeygate({ env: { KEYGATE_ACCESS_LOG_SAMPLE: "1" } });
    try {
      const rid = "r-".repeat(30_000); // 60,000 chars
      const res = await httpCheck(kg.ports.http, "/check/v1/things", { "x-request-id": rid });
      const lines = kg.logLines.filter((l) => l.includes('"msg":"access"'));
      const ridLens = lines.map((l) => (JSON.parse(l) as { requestId: string }).requestId.length);
      console.log("observed", JSON.stringify({ status: res.status, accessLines: lines.length, requestIdLens: ridLens, lineBytes: lines.map((l) => Buffer.byteLength(l)), answerBodyBytes: Buffer.byteLength(res.body) }));
      expect(lines.length).toBe(1);
      // keygate's own answer already refuses to echo ids over MAX_ECHOED_REQUEST_ID (128); the log should bound it too.
      for (const len of ridLens) expect(len).toBeLessThanOrEqual(MAX_ECHOED_REQUEST_ID);
    } finally {
      await kg.stop();
    }
  }, 60_000);
});
