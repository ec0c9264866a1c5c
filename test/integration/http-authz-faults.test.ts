import { afterEach, describe, expect, it } from "vitest";
import type { CheckInput, Decision } from "../../src/authz/pipeline.js";
import type { StartedServer } from "../../src/server/grpc-authz.js";
import { createHttpAuthzServer } from "../../src/server/http-authz.js";
import { createLogger } from "../../src/server/logger.js";
import { Metrics } from "../../src/server/metrics.js";
import { Readiness } from "../../src/server/readiness.js";
import type { DecisionTracer } from "../../src/tracing/tracing.js";
import { FailingTracer, UnrecordableTracer } from "../harness/tracers.js";

// Faults around a decision in the HTTP authorization mode (nginx auth_request, Caddy
// forward_auth, Envoy's HTTP service): a fault before the decision is the Check's 503, counted,
// and a fault while recording an answered Check changes no answer. Neither may throw out of the
// request handler, where it would end the process.

const DENIAL: Decision = { allow: false, reason: "MISSING_CREDENTIAL", message: "No API key was sent." };

/** Decides every Check as the missing-credential denial: at once, or later with x-test-later. */
class DenyingPipeline {
  decided = 0;
  decide(input: CheckInput): Decision | Promise<Decision> {
    this.decided += 1;
    return input.headers.get("x-test-later") === "1" ? new Promise<Decision>((resolve) => setImmediate(() => resolve(DENIAL))) : DENIAL;
  }
}

interface Running {
  server: StartedServer;
  pipeline: DenyingPipeline;
  metrics: Metrics;
  url: string;
}

const running: StartedServer[] = [];

afterEach(async () => {
  for (const server of running.splice(0)) await server.stop(0);
});

async function start(tracer: DecisionTracer): Promise<Running> {
  const pipeline = new DenyingPipeline();
  const readiness = new Readiness();
  readiness.setReady(true);
  const metrics = new Metrics({ defaultMetrics: false });
  const http = createHttpAuthzServer({
    pipeline,
    readiness,
    metrics,
    tracer,
    logger: createLogger("silent"),
    nowMs: () => Date.now(),
    proxy: "envoy",
    limits: { headersTimeoutMs: 10_000, requestTimeoutMs: 30_000, idleTimeoutMs: 60_000, maxConnections: 1000 },
  });
  const server = await http.start("127.0.0.1", 0);
  running.push(server);
  return { server, pipeline, metrics, url: `http://127.0.0.1:${server.port}` };
}

/** keygate_checks_total's cells as reason → count. */
async function counted(entry: Running): Promise<Record<string, number>> {
  const values = (await entry.metrics.registry.getSingleMetric("keygate_checks_total")?.get())?.values ?? [];
  return Object.fromEntries(values.map((v) => [String(v.labels["reason"]), v.value]));
}

async function ask(entry: Running, headers: Record<string, string> = {}): Promise<{ status: number; code: unknown }> {
  const response = await fetch(`${entry.url}/check/v1/decks`, { headers });
  const body: unknown = await response.json();
  const code = typeof body === "object" && body !== null && "error" in body && typeof body.error === "object" && body.error !== null && "code" in body.error ? body.error.code : undefined;
  return { status: response.status, code };
}

describe("HTTP authorization mode, faults around a decision", () => {
  it("a Check whose trace cannot be opened is a 503, counted, and the next is served", async () => {
    const entry = await start(new FailingTracer());
    expect(await ask(entry)).toEqual({ status: 503, code: "UNAVAILABLE" });
    expect(await ask(entry)).toEqual({ status: 503, code: "UNAVAILABLE" });
    expect(entry.pipeline.decided).toBe(0);
    expect(await counted(entry)).toEqual({ UNAVAILABLE: 2 });
  });

  it("a Check whose answer cannot be recorded is still answered, decided at once or later", async () => {
    const entry = await start(new UnrecordableTracer());
    expect(await ask(entry)).toEqual({ status: 401, code: "UNAUTHENTICATED" });
    expect(await ask(entry, { "x-test-later": "1" })).toEqual({ status: 401, code: "UNAUTHENTICATED" });
    expect(await ask(entry)).toEqual({ status: 401, code: "UNAUTHENTICATED" });
    expect(entry.pipeline.decided).toBe(3);
    expect(await counted(entry)).toEqual({ MISSING_CREDENTIAL: 3 });
  });
});
