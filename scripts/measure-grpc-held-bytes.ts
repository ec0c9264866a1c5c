/**
 * What one connection can make keygate's gRPC listener hold: it opens `--streams` Check streams,
 * each sending a message of nearly 4 MiB (the largest accepted) that never ends, and prints how
 * much keygate's process grew (RSS and array buffers, after forced GCs) and how the streams were
 * answered. Run: `node --expose-gc --import tsx scripts/measure-grpc-held-bytes.ts --streams 40`
 * (`--engine grpc-js` for the fallback engine).
 */
import { connect, constants as h2 } from "node:http2";
import { Command } from "commander";
import type { Decision } from "../src/authz/pipeline.js";
import { createGrpcAuthzServer } from "../src/server/grpc-authz.js";
import { MAX_MESSAGE_BYTES } from "../src/server/grpc-h2.js";
import { createLogger } from "../src/server/logger.js";
import { Metrics } from "../src/server/metrics.js";
import { Readiness } from "../src/server/readiness.js";

const options = new Command()
  .option("--streams <n>", "streams on the one connection", "40")
  .option("--engine <engine>", "h2 or grpc-js", "h2")
  .parse()
  .opts<{ streams: string; engine: string }>();
const streams = Number(options.streams);
if (!Number.isInteger(streams) || streams < 1) throw new Error(`--streams must be a positive integer, not ${options.streams}`);
if (options.engine !== "h2" && options.engine !== "grpc-js") throw new Error(`--engine must be h2 or grpc-js, not ${options.engine}`);
const gc = (globalThis as { gc?: () => void }).gc;
if (gc === undefined) throw new Error("run with node --expose-gc");

const DENIAL: Decision = { allow: false, reason: "MISSING_CREDENTIAL", message: "No API key was sent." };
const readiness = new Readiness();
readiness.setReady(true);
const server = await createGrpcAuthzServer({
  pipeline: { decide: () => DENIAL },
  readiness,
  metrics: new Metrics({ defaultMetrics: false }),
  logger: createLogger("silent"),
  nowMs: () => Date.now(),
  limits: { headersTimeoutMs: 10_000, requestTimeoutMs: 30_000, idleTimeoutMs: 65_000, maxConnections: 100 },
  engine: options.engine,
}).start("127.0.0.1", 0);

function memory(): { rss: number; arrayBuffers: number } {
  gc?.();
  gc?.();
  const { rss, arrayBuffers } = process.memoryUsage();
  return { rss, arrayBuffers };
}

const length = MAX_MESSAGE_BYTES - 16;
const prefix = Buffer.alloc(5);
prefix.writeUInt32BE(length, 1);
// The message but its last byte: the call never completes.
const body = Buffer.alloc(length - 1, 0x61);
const before = memory();
const session = connect(`http://127.0.0.1:${server.port}`);
session.on("error", () => undefined);
const answers: Array<string | undefined> = new Array<string | undefined>(streams);
await Promise.all(
  Array.from({ length: streams }, (_, i) => {
    const stream = session.request({ ":method": "POST", ":path": "/envoy.service.auth.v3.Authorization/Check", "content-type": "application/grpc", te: "trailers" });
    stream.on("error", () => undefined);
    stream.write(prefix);
    // Settles once the bytes are written (the call is held), or at keygate's answer.
    return new Promise<void>((resolve) => {
      stream.on("response", (headers) => {
        answers[i] = String(headers["grpc-status"] ?? headers[":status"]);
        resolve();
      });
      stream.write(body, () => {
        // A stream reset before its bytes were written: its RST_STREAM code.
        if (stream.destroyed && answers[i] === undefined) answers[i] = `reset with code ${stream.rstCode ?? "none"}`;
        resolve();
      });
    });
  }),
);
const after = memory();
const mib = (bytes: number): string => `${(bytes / 1048576).toFixed(0)} MiB`;
console.log(`engine ${options.engine}, ${streams} streams of ${mib(length)} that never end, on one connection`);
console.log(`keygate grew: RSS +${mib(after.rss - before.rss)}, array buffers +${mib(after.arrayBuffers - before.arrayBuffers)}`);
const tally = new Map<string, number>();
for (const answer of answers) {
  const label = answer === undefined ? "held, no answer" : answer.startsWith("reset") ? answer : `answered grpc-status ${answer}`;
  tally.set(label, (tally.get(label) ?? 0) + 1);
}
console.log(`streams: ${[...tally].map(([label, count]) => `${count} ${label}`).join(", ")}`);
session.close();
session.destroy(undefined, h2.NGHTTP2_CANCEL);
await server.stop(0);
