import { createServer } from "node:http";
import type { Server } from "node:http";
import { BinaryReader, WireType } from "@bufbuild/protobuf/wire";
import { z } from "zod";

/** One span as the collector received it; ids are lower-case hex, attributes as strings. */
export interface ReceivedSpan {
  traceId: string;
  spanId: string;
  parentSpanId: string;
  traceState: string;
  name: string;
  kind: number;
  attributes: Record<string, string>;
  /** The resource's service.name. */
  serviceName: string;
}

/** A local OTLP/HTTP trace collector on port 0: JSON and protobuf bodies, every span kept. */
export interface OtlpCollector {
  /** The traces URL (http://127.0.0.1:<port>/v1/traces). */
  url: string;
  /** The base URL, as OTEL_EXPORTER_OTLP_ENDPOINT takes it. */
  endpoint: string;
  spans: ReceivedSpan[];
  /** Every request body as received, to search for what must never be exported. */
  bodies: Buffer[];
  /** Content types of the export requests, in order. */
  contentTypes: string[];
  /** Resolves when a span matching `match` has arrived, within `timeoutMs`. */
  waitForSpan(match: (span: ReceivedSpan) => boolean, timeoutMs?: number): Promise<ReceivedSpan>;
  close(): Promise<void>;
}

const anyValue = z.object({
  stringValue: z.string().optional(),
  intValue: z.union([z.string(), z.number()]).optional(),
  boolValue: z.boolean().optional(),
  doubleValue: z.number().optional(),
});
const keyValue = z.object({ key: z.string(), value: anyValue.optional() });
const jsonSpan = z.object({
  traceId: z.string(),
  spanId: z.string(),
  parentSpanId: z.string().optional(),
  traceState: z.string().optional(),
  name: z.string(),
  kind: z.number().optional(),
  attributes: z.array(keyValue).optional(),
});
const jsonRequest = z.object({
  resourceSpans: z.array(
    z.object({
      resource: z.object({ attributes: z.array(keyValue).optional() }).optional(),
      scopeSpans: z.array(z.object({ spans: z.array(jsonSpan).optional() })).optional(),
    }),
  ),
});

function valueText(value: z.infer<typeof anyValue> | undefined): string {
  if (value === undefined) return "";
  if (value.stringValue !== undefined) return value.stringValue;
  if (value.intValue !== undefined) return String(value.intValue);
  if (value.boolValue !== undefined) return String(value.boolValue);
  if (value.doubleValue !== undefined) return String(value.doubleValue);
  return "";
}

/** OTLP/JSON: ids are hex strings (the spec's JSON mapping), enums numbers. */
function fromJson(body: Buffer): ReceivedSpan[] {
  const request = jsonRequest.parse(JSON.parse(body.toString("utf8")));
  const out: ReceivedSpan[] = [];
  for (const rs of request.resourceSpans) {
    const serviceName = valueText(rs.resource?.attributes?.find((a) => a.key === "service.name")?.value);
    for (const ss of rs.scopeSpans ?? []) {
      for (const span of ss.spans ?? []) {
        out.push({
          traceId: span.traceId.toLowerCase(),
          spanId: span.spanId.toLowerCase(),
          parentSpanId: (span.parentSpanId ?? "").toLowerCase(),
          traceState: span.traceState ?? "",
          name: span.name,
          kind: span.kind ?? 0,
          attributes: Object.fromEntries((span.attributes ?? []).map((a) => [a.key, valueText(a.value)])),
          serviceName,
        });
      }
    }
  }
  return out;
}

// ---- OTLP/protobuf, read with protobuf-es's wire reader (opentelemetry/proto/trace/v1/trace.proto) ----

/** Calls `field` for each field of the length-delimited message at the reader's position. */
function eachField(reader: BinaryReader, end: number, field: (no: number, wireType: WireType) => void): void {
  while (reader.pos < end) {
    const [no, wireType] = reader.tag();
    field(no, wireType);
  }
}

function readAnyValue(reader: BinaryReader): string {
  const end = reader.uint32() + reader.pos;
  let text = "";
  eachField(reader, end, (no, wt) => {
    if (no === 1) text = reader.string();
    else if (no === 2) text = String(reader.bool());
    else if (no === 3) text = String(reader.int64());
    else if (no === 4) text = String(reader.double());
    else reader.skip(wt);
  });
  return text;
}

function readKeyValue(reader: BinaryReader): [string, string] {
  const end = reader.uint32() + reader.pos;
  let key = "";
  let value = "";
  eachField(reader, end, (no, wt) => {
    if (no === 1) key = reader.string();
    else if (no === 2) value = readAnyValue(reader);
    else reader.skip(wt);
  });
  return [key, value];
}

const hex = (bytes: Uint8Array): string => Buffer.from(bytes).toString("hex");

function readSpan(reader: BinaryReader, serviceName: string): ReceivedSpan {
  const end = reader.uint32() + reader.pos;
  const span: ReceivedSpan = { traceId: "", spanId: "", parentSpanId: "", traceState: "", name: "", kind: 0, attributes: {}, serviceName };
  eachField(reader, end, (no, wt) => {
    if (no === 1) span.traceId = hex(reader.bytes());
    else if (no === 2) span.spanId = hex(reader.bytes());
    else if (no === 3) span.traceState = reader.string();
    else if (no === 4) span.parentSpanId = hex(reader.bytes());
    else if (no === 5) span.name = reader.string();
    else if (no === 6) span.kind = reader.int32();
    else if (no === 9) {
      const [key, value] = readKeyValue(reader);
      span.attributes[key] = value;
    } else reader.skip(wt);
  });
  return span;
}

function fromProtobuf(body: Buffer): ReceivedSpan[] {
  const reader = new BinaryReader(body);
  const out: ReceivedSpan[] = [];
  eachField(reader, body.byteLength, (no, wt) => {
    if (no !== 1) {
      reader.skip(wt);
      return;
    }
    // ResourceSpans: resource = 1, scope_spans = 2.
    const rsEnd = reader.uint32() + reader.pos;
    let serviceName = "";
    const scopeSpans: Uint8Array[] = [];
    eachField(reader, rsEnd, (rsNo, rsWt) => {
      if (rsNo === 1) {
        const resEnd = reader.uint32() + reader.pos;
        eachField(reader, resEnd, (resNo, resWt) => {
          if (resNo !== 1) {
            reader.skip(resWt);
            return;
          }
          const [key, value] = readKeyValue(reader);
          if (key === "service.name") serviceName = value;
        });
      } else if (rsNo === 2) scopeSpans.push(reader.bytes());
      else reader.skip(rsWt);
    });
    // Resource may come after the scope spans on the wire: spans are read once it is known.
    for (const bytes of scopeSpans) {
      const ss = new BinaryReader(bytes);
      eachField(ss, bytes.byteLength, (ssNo, ssWt) => {
        if (ssNo === 2) out.push(readSpan(ss, serviceName));
        else ss.skip(ssWt);
      });
    }
  });
  return out;
}

/** Starts the collector. It answers every export with 200 and an empty JSON or protobuf response. */
export async function startOtlpCollector(): Promise<OtlpCollector> {
  const spans: ReceivedSpan[] = [];
  const bodies: Buffer[] = [];
  const contentTypes: string[] = [];
  const server: Server = createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on("data", (chunk: Buffer) => chunks.push(chunk));
    req.on("end", () => {
      const body = Buffer.concat(chunks);
      const type = req.headers["content-type"] ?? "";
      bodies.push(body);
      contentTypes.push(type);
      if (req.method !== "POST" || req.url !== "/v1/traces") {
        res.writeHead(404).end();
        return;
      }
      try {
        spans.push(...(type.startsWith("application/json") ? fromJson(body) : fromProtobuf(body)));
      } catch (error) {
        res.writeHead(400, { "content-type": "text/plain" }).end(String(error));
        return;
      }
      if (type.startsWith("application/json")) res.writeHead(200, { "content-type": "application/json" }).end("{}");
      else res.writeHead(200, { "content-type": "application/x-protobuf" }).end();
    });
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const address = server.address();
  if (address === null || typeof address === "string") throw new Error("collector has no port");
  const endpoint = `http://127.0.0.1:${address.port}`;
  return {
    url: `${endpoint}/v1/traces`,
    endpoint,
    spans,
    bodies,
    contentTypes,
    async waitForSpan(match, timeoutMs = 20_000) {
      const deadline = Date.now() + timeoutMs;
      for (;;) {
        const found = spans.find(match);
        if (found !== undefined) return found;
        if (Date.now() > deadline) throw new Error(`no matching span within ${timeoutMs} ms; received: ${spans.map((s) => s.name).join(", ") || "none"}`);
        await new Promise((resolve) => setTimeout(resolve, 20));
      }
    },
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}
