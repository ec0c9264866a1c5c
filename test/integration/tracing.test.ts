import { randomBytes } from "node:crypto";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { create } from "@bufbuild/protobuf";
import { Client as GrpcClient, credentials } from "@grpc/grpc-js";
import type { ServiceError } from "@grpc/grpc-js";
import { stringify } from "yaml";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { CheckRequestSchema } from "../../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import type { CheckRequest, CheckResponse } from "../../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import { authorizationDefinition } from "../../src/server/grpc-authz.js";
import { ADMIN_TOKEN, TEST_POLICY, checkInit, httpCheck, postJson, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { startOtlpCollector } from "../harness/otlp-collector.js";
import type { OtlpCollector, ReceivedSpan } from "../harness/otlp-collector.js";
import { embeddedEnv, spawnKeygate } from "../harness/process.js";

const SERVER = 2;
const CLIENT = 3;

/** A fresh W3C trace context, as the proxy would send it. */
function proxyContext(): { traceId: string; spanId: string; traceparent: string } {
  const traceId = randomBytes(16).toString("hex");
  const spanId = randomBytes(8).toString("hex");
  return { traceId, spanId, traceparent: `00-${traceId}-${spanId}-01` };
}

async function issue(kg: TestKeygate, owner: string, scopes: string[] = []): Promise<{ id: string; secret: string }> {
  await kg.admin.upsertAccount({ ownerId: owner, plan: "business" });
  const created = await kg.admin.createKey({ ownerId: owner, name: "traced", scopes });
  if (created.key === undefined) throw new Error("no key");
  return { id: created.key.id, secret: created.secret };
}

const inTrace = (traceId: string, name: string) => (span: ReceivedSpan) => span.traceId === traceId && span.name === name;

describe("tracing happy", () => {
  let collector: OtlpCollector;
  let grpcKg: TestKeygate;
  let httpKg: TestKeygate;

  beforeAll(async () => {
    collector = await startOtlpCollector();
    // gRPC instance: the general endpoint and the default protocol (protobuf).
    grpcKg = await startKeygate({ env: { OTEL_EXPORTER_OTLP_ENDPOINT: collector.endpoint, OTEL_SERVICE_NAME: "keygate-grpc", OTEL_BSP_SCHEDULE_DELAY: "50" } });
    // HTTP instance: the exporter named, the traces endpoint, and JSON.
    httpKg = await startKeygate({
      env: {
        OTEL_TRACES_EXPORTER: "otlp",
        OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: collector.url,
        OTEL_EXPORTER_OTLP_PROTOCOL: "http/json",
        OTEL_SERVICE_NAME: "keygate-http",
        OTEL_BSP_SCHEDULE_DELAY: "50",
      },
    });
  }, 60_000);
  afterAll(async () => {
    await grpcKg.stop();
    await httpKg.stop();
    await collector.close();
  });

  it("gRPC Check: the decision span continues the proxy's trace and the store lookup is its child", async () => {
    const key = await issue(grpcKg, "owner-trace-grpc", ["decks"]);
    const proxy = proxyContext();
    const response = await grpcKg.check(checkInit({ authorization: `Bearer ${key.secret}`, traceparent: proxy.traceparent, tracestate: "envoy=1" }, "/v1/decks/3?page=2"));
    expect(response.status?.code).toBe(0);

    const check = await collector.waitForSpan(inTrace(proxy.traceId, "keygate.check"));
    expect(check.parentSpanId).toBe(proxy.spanId);
    expect(check.traceState).toBe("envoy=1");
    expect(check.kind).toBe(SERVER);
    expect(check.serviceName).toBe("keygate-grpc");
    expect(check.attributes).toEqual({
      "keygate.entry": "grpc",
      "http.request.method": "GET",
      "url.path": "/v1/decks/3",
      "keygate.decision": "allow",
      "keygate.reason": "OK",
      "keygate.code": "OK",
      "keygate.key.id": key.id,
      "keygate.owner.id": "owner-trace-grpc",
      "keygate.route.required_scopes": "decks",
      "keygate.cache.tier": "store",
    });
    const lookup = await collector.waitForSpan(inTrace(proxy.traceId, "keygate.store.lookup"));
    expect(lookup.parentSpanId).toBe(check.spanId);
    expect(lookup.kind).toBe(CLIENT);
    expect(lookup.attributes).toEqual({ "db.system.name": "sqlite", "db.operation.name": "find_snapshot" });
    expect(collector.spans.filter((s) => s.traceId === proxy.traceId).map((s) => s.name).sort()).toEqual(["keygate.check", "keygate.store.lookup"]);
    expect(collector.contentTypes.some((type) => type.startsWith("application/x-protobuf"))).toBe(true);
  });

  it("gRPC Check from L1: the decision span says so and there is no store span", async () => {
    const key = await issue(grpcKg, "owner-trace-l1");
    expect((await grpcKg.check(checkInit({ authorization: `Bearer ${key.secret}` }))).status?.code).toBe(0);
    const proxy = proxyContext();
    expect((await grpcKg.check(checkInit({ authorization: `Bearer ${key.secret}`, traceparent: proxy.traceparent }))).status?.code).toBe(0);
    const check = await collector.waitForSpan(inTrace(proxy.traceId, "keygate.check"));
    expect(check.attributes["keygate.cache.tier"]).toBe("l1");
    // The first Check's spans arrived in an earlier or the same batch as this one's.
    expect(collector.spans.filter((s) => s.traceId === proxy.traceId).map((s) => s.name)).toEqual(["keygate.check"]);
  });

  it("HTTP mode: the same trace shape, exported as OTLP/JSON", async () => {
    const key = await issue(httpKg, "owner-trace-http");
    const proxy = proxyContext();
    const res = await httpCheck(httpKg.ports.http, "/check/v1/things?x=1", { authorization: `Bearer ${key.secret}`, traceparent: proxy.traceparent });
    expect(res.status).toBe(200);
    const check = await collector.waitForSpan(inTrace(proxy.traceId, "keygate.check"));
    expect(check.parentSpanId).toBe(proxy.spanId);
    expect(check.serviceName).toBe("keygate-http");
    expect(check.attributes).toMatchObject({
      "keygate.entry": "http",
      "url.path": "/v1/things",
      "keygate.decision": "allow",
      "keygate.key.id": key.id,
      "keygate.owner.id": "owner-trace-http",
      "keygate.cache.tier": "store",
    });
    const lookup = await collector.waitForSpan(inTrace(proxy.traceId, "keygate.store.lookup"));
    expect(lookup.parentSpanId).toBe(check.spanId);
    expect(collector.contentTypes.some((type) => type.startsWith("application/json"))).toBe(true);
  });

  it("without a traceparent the decision starts its own trace", async () => {
    const key = await issue(httpKg, "owner-trace-root");
    expect((await httpCheck(httpKg.ports.http, "/check/v1/things", { authorization: `Bearer ${key.secret}` })).status).toBe(200);
    const check = await collector.waitForSpan((s) => s.name === "keygate.check" && s.attributes["keygate.key.id"] === key.id);
    expect(check.parentSpanId).toBe("");
    expect(check.traceId).toMatch(/^[0-9a-f]{32}$/);
  });
});

describe("tracing happy, grpc-js engine", () => {
  it("the fallback engine traces Check the same way", async () => {
    const collector = await startOtlpCollector();
    const kg = await startKeygate({ env: { KEYGATE_GRPC_ENGINE: "grpc-js", OTEL_EXPORTER_OTLP_ENDPOINT: collector.endpoint, OTEL_BSP_SCHEDULE_DELAY: "50" } });
    try {
      const key = await issue(kg, "owner-trace-grpcjs");
      const proxy = proxyContext();
      expect((await kg.check(checkInit({ authorization: `Bearer ${key.secret}`, traceparent: proxy.traceparent }))).status?.code).toBe(0);
      const check = await collector.waitForSpan(inTrace(proxy.traceId, "keygate.check"));
      expect(check.parentSpanId).toBe(proxy.spanId);
      expect(check.attributes["keygate.key.id"]).toBe(key.id);
      const lookup = await collector.waitForSpan(inTrace(proxy.traceId, "keygate.store.lookup"));
      expect(lookup.parentSpanId).toBe(check.spanId);
    } finally {
      await kg.stop();
      await collector.close();
    }
  }, 60_000);
});

describe("tracing security", () => {
  it("a denial is traced by reason and code; no secret or credential header reaches the collector", async () => {
    const collector = await startOtlpCollector();
    const kg = await startKeygate({ env: { OTEL_EXPORTER_OTLP_ENDPOINT: collector.endpoint, OTEL_EXPORTER_OTLP_PROTOCOL: "http/json", OTEL_BSP_SCHEDULE_DELAY: "50" } });
    try {
      const key = await issue(kg, "owner-trace-deny");
      const proxy = proxyContext();
      const response = await kg.check(checkInit({ authorization: `Bearer ${key.secret}`, traceparent: proxy.traceparent }, "/v1/decks/1"));
      expect(response.httpResponse.case).toBe("deniedResponse");
      const check = await collector.waitForSpan(inTrace(proxy.traceId, "keygate.check"));
      expect(check.attributes).toMatchObject({ "keygate.decision": "deny", "keygate.reason": "MISSING_SCOPE", "keygate.code": "FORBIDDEN", "keygate.key.id": key.id });
      const unknown = proxyContext();
      const fake = `${key.secret.slice(0, -8)}AAAAAAAA`;
      await kg.check(checkInit({ "x-api-key": fake, traceparent: unknown.traceparent }));
      await collector.waitForSpan(inTrace(unknown.traceId, "keygate.check"));
      const exported = Buffer.concat(collector.bodies).toString("utf8");
      expect(exported).not.toContain(key.secret);
      expect(exported).not.toContain(fake);
      expect(exported).not.toContain("Bearer");
      expect(exported).not.toContain(key.secret.slice(8, 40));
    } finally {
      await kg.stop();
      await collector.close();
    }
  }, 60_000);
});

describe("tracing off", () => {
  it("OTEL_SDK_DISABLED=true keeps tracing off even with an endpoint: nothing is exported", async () => {
    const collector = await startOtlpCollector();
    const kg = await startKeygate({ env: { OTEL_SDK_DISABLED: "true", OTEL_EXPORTER_OTLP_ENDPOINT: collector.endpoint, OTEL_BSP_SCHEDULE_DELAY: "50" } });
    try {
      const key = await issue(kg, "owner-trace-off");
      expect((await kg.check(checkInit({ authorization: `Bearer ${key.secret}`, traceparent: proxyContext().traceparent }))).status?.code).toBe(0);
    } finally {
      // Stopping flushes whatever a tracer would hold: if tracing were on, the span would be out now.
      await kg.stop();
    }
    expect(collector.bodies).toEqual([]);
    await collector.close();
  }, 60_000);
});

describe("tracing shutdown", () => {
  it("SIGTERM sends the spans still batched before the process exits", async () => {
    const collector = await startOtlpCollector();
    const dataDir = mkdtempSync(join(tmpdir(), "keygate-trace-"));
    const policyPath = join(dataDir, "policy.yaml");
    writeFileSync(policyPath, stringify(TEST_POLICY));
    const kg = await spawnKeygate({
      cwd: dataDir,
      env: embeddedEnv({
        dataDir,
        policyFile: policyPath,
        adminToken: ADMIN_TOKEN,
        extra: {
          OTEL_TRACES_EXPORTER: "otlp",
          OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: collector.url,
          OTEL_SDK_DISABLED: "false",
          // A batch would wait a minute: only the shutdown flush can deliver it in time.
          OTEL_BSP_SCHEDULE_DELAY: "60000",
        },
      }),
    });
    const client = new GrpcClient(`127.0.0.1:${kg.ports.grpc}`, credentials.createInsecure());
    try {
      expect((await postJson(kg.ports.admin, "UpsertAccount", { ownerId: "owner-sigterm", plan: "business" })).status).toBe(200);
      const created = await postJson(kg.ports.admin, "CreateKey", { ownerId: "owner-sigterm", name: "k" });
      const secret = created.json["secret"];
      if (typeof secret !== "string") throw new Error("no secret");
      const proxy = proxyContext();
      const request = create(CheckRequestSchema, checkInit({ authorization: `Bearer ${secret}`, traceparent: proxy.traceparent }));
      const def = authorizationDefinition.Check;
      const response = await new Promise<CheckResponse>((resolve, reject) =>
        client.makeUnaryRequest<CheckRequest, CheckResponse>(def.path, def.requestSerialize, def.responseDeserialize, request, (error: ServiceError | null, value?: CheckResponse) =>
          error !== null || value === undefined ? reject(error ?? new Error("no response")) : resolve(value),
        ),
      );
      expect(response.status?.code).toBe(0);
      expect(collector.spans).toEqual([]);
      client.close();
      expect(await kg.stop("SIGTERM")).toBe(0);
      const names = collector.spans.filter((s) => s.traceId === proxy.traceId).map((s) => s.name).sort();
      expect(names).toEqual(["keygate.check", "keygate.store.lookup"]);
    } finally {
      client.close();
      await kg.stop("SIGKILL");
      await collector.close();
      rmSync(dataDir, { recursive: true, force: true });
    }
  }, 90_000);
});
