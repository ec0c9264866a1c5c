import { randomBytes } from "node:crypto";
import { setFlagsFromString } from "node:v8";
import { runInNewContext } from "node:vm";
import { ExportResultCode } from "@opentelemetry/core";
import type { ExportResult } from "@opentelemetry/core";
import type { ReadableSpan, SpanExporter } from "@opentelemetry/sdk-trace";
import { pino } from "pino";
import { describe, expect, it } from "vitest";
import { RecordHeaders } from "../../src/authz/headers.js";
import { createTracing } from "../../src/tracing/otlp.js";

// A collector that takes exports and never answers (a black-holed network, an overloaded one)
// costs the spans, "a batch waits in a queue of 2,048 at most", and the queue must not grow with
// what clients send: the W3C propagator keeps the client's whole raw `tracestate` in each span's
// context (only 512 characters of it are ever exported), and ids cut from a long `traceparent`
// are views of it. Unbounded, every queued span (2,048 plus a batch of 512 in flight) would hold
// the header the client sent, up to the proxy's limit (Envoy 60 KiB, the HTTP mode 64 KiB) each:
// over 150 MB of unauthenticated requests against a 512Mi pod limit.
const SPANS = 1500;
const TRACESTATE_CHARS = 48_000;

function hangingExporter(): { exporter: SpanExporter; release(): void; received(): number } {
  const pending: Array<(result: ExportResult) => void> = [];
  let received = 0;
  return {
    exporter: {
      export(spans: ReadableSpan[], done: (result: ExportResult) => void) {
        received += spans.length;
        pending.push(done);
      },
      shutdown: () => Promise.resolve(),
    },
    release() {
      for (const done of pending.splice(0)) done({ code: ExportResultCode.SUCCESS });
    },
    received: () => received,
  };
}

/** A distinct large tracestate, as each client request carries its own header value. */
function bigTracestate(chars = TRACESTATE_CHARS): string {
  const parts: string[] = [];
  let length = 0;
  for (let j = 0; length < chars; j++) {
    const entry = `v${j}=${randomBytes(24).toString("hex")}`;
    parts.push(entry);
    length += entry.length + 1;
  }
  return parts.join(",");
}

describe("client tracestate held by queued spans", () => {
  it("spans waiting for a collector that never answers do not keep the client's whole tracestate", () => {
    setFlagsFromString("--expose-gc");
    const gc = runInNewContext("gc") as () => void;
    const hangs = [hangingExporter(), hangingExporter()];
    const retained = (hang: ReturnType<typeof hangingExporter>, tracestate: () => string): number => {
      const tracing = createTracing({ serviceName: "keygate", sampler: "parentbased_always_on", samplerRatio: 1, scheduleDelayMs: 60_000 }, pino({ level: "silent" }), hang.exporter);
      gc();
      const before = process.memoryUsage().heapUsed;
      for (let i = 0; i < SPANS; i++) {
        const traceparent = `00-${randomBytes(16).toString("hex")}-${randomBytes(8).toString("hex")}-01`;
        const trace = tracing.tracer.start("http", "GET", "/v1/things", new RecordHeaders({ traceparent, tracestate: tracestate() }));
        tracing.tracer.finish(trace, { allow: false, reason: "MISSING_CREDENTIAL", message: "m" });
      }
      gc();
      return (process.memoryUsage().heapUsed - before) / 1024 / 1024;
    };
    try {
      // Control: the same spans with a tracestate under 512 characters (what is exported at most).
      const controlMb = retained(hangs[0]!, () => bigTracestate(450));
      const retainedMb = retained(hangs[1]!, bigTracestate);
      expect(hangs[1]!.received()).toBeGreaterThan(0);
      expect(controlMb).toBeLessThan(16);
      // A span's own state (ids, a few short attributes, a tracestate kept to its 512 exported
      // characters) is a few KB at most: 1,500 spans fit in 16 MB with room.
      expect(retainedMb).toBeLessThan(16);
    } finally {
      for (const hang of hangs) hang.release();
    }
  }, 60_000);

  it("nor the client's whole traceparent (a future version may carry more fields; only the ids are used)", () => {
    setFlagsFromString("--expose-gc");
    const gc = runInNewContext("gc") as () => void;
    const hang = hangingExporter();
    const tracing = createTracing({ serviceName: "keygate", sampler: "parentbased_always_on", samplerRatio: 1, scheduleDelayMs: 60_000 }, pino({ level: "silent" }), hang.exporter);
    try {
      gc();
      const before = process.memoryUsage().heapUsed;
      for (let i = 0; i < SPANS; i++) {
        // Version 01 (not 00): the propagator accepts trailing fields, and the traceId it keeps is a
        // V8 slice of this whole header.
        const traceparent = `01-${randomBytes(16).toString("hex")}-${randomBytes(8).toString("hex")}-01-${randomBytes(TRACESTATE_CHARS / 2).toString("hex")}`;
        const trace = tracing.tracer.start("http", "GET", "/v1/things", new RecordHeaders({ traceparent }));
        tracing.tracer.finish(trace, { allow: false, reason: "MISSING_CREDENTIAL", message: "m" });
      }
      gc();
      const retainedMb = (process.memoryUsage().heapUsed - before) / 1024 / 1024;
      expect(hang.received()).toBeGreaterThan(0);
      expect(retainedMb).toBeLessThan(16);
    } finally {
      hang.release();
    }
  }, 60_000);
});
