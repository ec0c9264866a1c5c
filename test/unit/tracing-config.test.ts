import { describe, expect, it } from "vitest";
import { DEFAULT_OTLP_TRACES_URL, loadConfig } from "../../src/config.js";
import { samplerFor } from "../../src/tracing/otlp.js";
import { pathOnly } from "../../src/tracing/tracing.js";

describe("tracing and access log config happy", () => {
  it("both are off with no environment", () => {
    const config = loadConfig({});
    expect(config.tracing).toBeUndefined();
    expect(config.accessLogSampleRate).toBe(0);
  });

  it("an OTLP endpoint turns tracing on, with the spec's defaults", () => {
    expect(loadConfig({ OTEL_EXPORTER_OTLP_ENDPOINT: "http://collector:4318/" }).tracing).toEqual({
      url: "http://collector:4318/v1/traces",
      protocol: "http/protobuf",
      serviceName: "keygate",
      sampler: "parentbased_always_on",
      samplerRatio: 1,
      scheduleDelayMs: 1000,
    });
  });

  it("OTEL_TRACES_EXPORTER=otlp alone sends to the default collector URL", () => {
    expect(loadConfig({ OTEL_TRACES_EXPORTER: "otlp" }).tracing?.url).toBe(DEFAULT_OTLP_TRACES_URL);
  });

  it("the traces endpoint and protocol win over the general ones, and are used as given", () => {
    const tracing = loadConfig({
      OTEL_EXPORTER_OTLP_ENDPOINT: "http://general:4318",
      OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: "https://traces.example.com/custom",
      OTEL_EXPORTER_OTLP_PROTOCOL: "http/protobuf",
      OTEL_EXPORTER_OTLP_TRACES_PROTOCOL: "http/json",
      OTEL_SERVICE_NAME: "edge-keygate",
      OTEL_TRACES_SAMPLER: "parentbased_traceidratio",
      OTEL_TRACES_SAMPLER_ARG: "0.1",
    }).tracing;
    expect(tracing).toMatchObject({ url: "https://traces.example.com/custom", protocol: "http/json", serviceName: "edge-keygate", sampler: "parentbased_traceidratio", samplerRatio: 0.1 });
  });

  it("OTEL_SDK_DISABLED=true and OTEL_TRACES_EXPORTER=none keep it off; empty variables count as unset", () => {
    expect(loadConfig({ OTEL_SDK_DISABLED: "true", OTEL_TRACES_EXPORTER: "otlp" }).tracing).toBeUndefined();
    expect(loadConfig({ OTEL_SDK_DISABLED: "TRUE", OTEL_TRACES_EXPORTER: "otlp" }).tracing).toBeUndefined();
    expect(loadConfig({ OTEL_TRACES_EXPORTER: "none", OTEL_EXPORTER_OTLP_ENDPOINT: "http://c:4318" }).tracing).toBeUndefined();
    expect(loadConfig({ OTEL_EXPORTER_OTLP_ENDPOINT: "", OTEL_TRACES_EXPORTER: "" }).tracing).toBeUndefined();
    expect(loadConfig({ OTEL_SDK_DISABLED: "false", OTEL_EXPORTER_OTLP_ENDPOINT: "http://c:4318" }).tracing?.url).toBe("http://c:4318/v1/traces");
  });

  it("reads the access log rate", () => {
    expect(loadConfig({ KEYGATE_ACCESS_LOG_SAMPLE: "0.01" }).accessLogSampleRate).toBe(0.01);
    expect(loadConfig({ KEYGATE_ACCESS_LOG_SAMPLE: "1" }).accessLogSampleRate).toBe(1);
  });

  it("builds each sampler OTEL_TRACES_SAMPLER names", () => {
    expect(samplerFor("always_off", 1).toString()).toBe("AlwaysOffSampler");
    expect(samplerFor("traceidratio", 0.25).toString()).toBe("TraceIdRatioBased{0.25}");
    expect(samplerFor("parentbased_always_on", 1).toString()).toContain("ParentBased{root=AlwaysOnSampler");
  });

  it("drops the query string from traced and logged paths", () => {
    expect(pathOnly("/v1/things?api_key=x")).toBe("/v1/things");
    expect(pathOnly("/v1/things")).toBe("/v1/things");
  });
});

describe("tracing and access log config error", () => {
  it("names the variable that is wrong", () => {
    expect(() => loadConfig({ KEYGATE_ACCESS_LOG_SAMPLE: "1.5" })).toThrow(/KEYGATE_ACCESS_LOG_SAMPLE: must be from 0 to 1/);
    expect(() => loadConfig({ KEYGATE_ACCESS_LOG_SAMPLE: "often" })).toThrow(/KEYGATE_ACCESS_LOG_SAMPLE: must be a number from 0 to 1/);
    expect(() => loadConfig({ OTEL_TRACES_EXPORTER: "jaeger" })).toThrow(/OTEL_TRACES_EXPORTER: keygate exports traces with "otlp" only/);
    expect(() => loadConfig({ OTEL_EXPORTER_OTLP_ENDPOINT: "collector:4318" })).toThrow(/OTEL_EXPORTER_OTLP_ENDPOINT: must be an http:\/\/ or https:\/\/ URL/);
    expect(() => loadConfig({ OTEL_EXPORTER_OTLP_PROTOCOL: "grpc" })).toThrow(/OTEL_EXPORTER_OTLP_PROTOCOL: must be one of http\/protobuf, http\/json \(OTLP over gRPC is not supported\)/);
    expect(() => loadConfig({ OTEL_TRACES_SAMPLER: "sometimes" })).toThrow(/OTEL_TRACES_SAMPLER: must be one of always_on/);
    expect(() => loadConfig({ OTEL_TRACES_SAMPLER_ARG: "2" })).toThrow(/OTEL_TRACES_SAMPLER_ARG: must be a ratio from 0 to 1/);
    expect(() => loadConfig({ OTEL_SDK_DISABLED: "yes" })).toThrow(/OTEL_SDK_DISABLED: must be "true" or "false"/);
  });
});
