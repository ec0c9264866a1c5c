import { resolve } from "node:path";
import { describe, expect, it } from "vitest";
import { ConfigError, ignoredVariables, loadConfig, loadPolicyFile, parsePolicy } from "../../src/config.js";
import { gcThreadNiceFromEnv } from "../../src/server/gc-threads.js";

describe("config", () => {
  it("has working defaults with no environment", () => {
    const config = loadConfig({});
    expect(config).toMatchObject({ dataDir: "./data", keyPrefix: "kg", host: "0.0.0.0", grpcPort: 9191, httpAuthzPort: 8181, adminPort: 8080, gcThreadNice: 0 });
    expect(config.policy.plans["basic"]?.maxActiveKeys).toBe(1);
    expect(config.policy.plans["pro"]?.rateLimit.limit).toBe(500);
    expect(config.policy.plans["business"]?.maxActiveKeys).toBe(5);
  });

  it("names the variable that is wrong", () => {
    expect(() => loadConfig({ KEYGATE_ADMIN_PORT: "99999" })).toThrow(/KEYGATE_ADMIN_PORT/);
    expect(() => loadConfig({ KEYGATE_PEPPER: "short" })).toThrow(/KEYGATE_PEPPER: must be at least 32 characters/);
    expect(() => loadConfig({ KEYGATE_KEY_PREFIX: "KG" })).toThrow(/KEYGATE_KEY_PREFIX/);
    expect(() => loadConfig({ KEYGATE_CHECK_BUDGET_MS: "5" })).toThrow(/KEYGATE_CHECK_BUDGET_MS/);
    expect(() => loadConfig({ KEYGATE_CHECK_BUDGET_MS: "fast" })).toThrow(/KEYGATE_CHECK_BUDGET_MS/);
    for (const nice of ["20", "-1", "1.5", "low"]) {
      expect(() => loadConfig({ KEYGATE_GC_THREAD_NICE: nice })).toThrow(/KEYGATE_GC_THREAD_NICE: must be a whole number from 0 to 19/);
    }
    expect(loadConfig({ KEYGATE_GC_THREAD_NICE: "0" }).gcThreadNice).toBe(0);
    expect(loadConfig({ KEYGATE_GC_THREAD_NICE: "10" }).gcThreadNice).toBe(10);
    expect(() => loadConfig({ KEYGATE_ADMIN_TOKENS: "tooshort" })).toThrow(/KEYGATE_ADMIN_TOKENS/);
    expect(() => loadConfig({ KEYGATE_CONFIG: "/nonexistent.yaml" })).toThrow(ConfigError);
  });

  it("loads the shipped example policy", () => {
    const policy = loadPolicyFile(resolve(import.meta.dirname, "../../deploy/config/keygate.example.yaml"));
    expect(policy.routes).toHaveLength(4);
    expect(policy.routeMatching).toEqual({ caseInsensitive: false });
    expect(policy.scopes.default).toEqual(["read"]);
  });

  it("names the policy field that is wrong", () => {
    const base = { plans: { basic: { maxActiveKeys: 1, rateLimit: { limit: 1, windowSeconds: 1 } } }, scopes: { catalog: ["a"], default: ["a"] } };
    expect(parsePolicy(base).defaultPlan).toBe("basic");
    expect(() => parsePolicy({ ...base, defaultPlan: "gold" })).toThrow(/defaultPlan: unknown plan "gold"/);
    expect(() => parsePolicy({ ...base, scopes: { catalog: ["a"], default: ["b"] } })).toThrow(/scopes.default.0: "b" is not in scopes.catalog/);
    expect(() => parsePolicy({ ...base, routes: [{ pathPrefix: "/x", requiredScopes: ["zz"] }] })).toThrow(/routes.0.requiredScopes.0/);
  });

  it("takes credential headers that are header names a credential can travel in, lower-cased, once each", () => {
    const base = { plans: { basic: { maxActiveKeys: 1, rateLimit: { limit: 1, windowSeconds: 1 } } }, scopes: { catalog: ["a"], default: ["a"] } };
    expect(parsePolicy({ ...base, credentialHeaders: ["Authorization", "X-Api-Key", "x-partner_token"] }).credentialHeaders).toEqual(["authorization", "x-api-key", "x-partner_token"]);
    // An identity header was set for the upstream and then removed as a credential: the upstream
    // got no identity. A framing header would be stripped from every allowed request.
    const refused: Array<[string, RegExp]> = [
      ["", /credentialHeaders.0: a credential header is an HTTP header name/],
      ["x api key", /credentialHeaders.0: a credential header is an HTTP header name/],
      [":authority", /credentialHeaders.0: a credential header is an HTTP header name/],
      ["X-Keygate-Owner-Id", /credentialHeaders.0: a credential header cannot be an x-keygate-\* header/],
      ["Host", /credentialHeaders.0: a credential header cannot be a connection or message header/],
      ["content-length", /credentialHeaders.0: a credential header cannot be a connection or message header/],
    ];
    for (const [name, message] of refused) expect(() => parsePolicy({ ...base, credentialHeaders: [name] }), name).toThrow(message);
    expect(() => parsePolicy({ ...base, credentialHeaders: ["x-api-key", "X-API-Key"] })).toThrow(/credentialHeaders: names must not repeat/);
  });

  it("names the KEYGATE_* variables it does not read, with the known name each may mean, leaving out service links", () => {
    const env = {
      KEYGATE_CONFIG_FILE: "policy.yaml",
      KEYGATE_GPRC_PORT: "9191",
      KEYGATE_ADMN_PORT: "8080",
      KEYGATE_TLS_CERT: "tls.crt",
      keygate_pepper: "p",
      KEYGATE_FEATURE_X: "1",
      KEYGATE_CONFIG: "policy.yaml",
      KEYGATE_URL: "http://127.0.0.1:8080",
      KEYGATE_ADMIN_TOKEN: "t",
      KEYGATE_SERVICE_HOST: "10.96.0.10",
      KEYGATE_SERVICE_PORT_GRPC: "9191",
      KEYGATE_PORT: "tcp://10.96.0.10:8080",
      KEYGATE_PORT_9191_TCP_ADDR: "10.96.0.10",
      KEYGATE_REDIS_PORT: "tcp://10.96.0.11:6379",
      KEYGATE_REDIS_SERVICE_PORT: "6379",
      OTEL_SERVICE_NAME: "keygate",
    };
    expect(ignoredVariables(env)).toEqual([
      { name: "KEYGATE_ADMN_PORT", closest: "KEYGATE_ADMIN_PORT" },
      { name: "KEYGATE_CONFIG_FILE", closest: "KEYGATE_CONFIG" },
      { name: "KEYGATE_FEATURE_X", closest: null },
      { name: "KEYGATE_GPRC_PORT", closest: "KEYGATE_GRPC_PORT" },
      { name: "KEYGATE_TLS_CERT", closest: "KEYGATE_TLS_CERT_FILE" },
      { name: "keygate_pepper", closest: "KEYGATE_PEPPER" },
    ]);
  });

  it("leaves its port variables at their defaults when they hold a service link, and names them", () => {
    // Services named keygate-admin, keygate-grpc and keygate-http-authz set these in every pod of
    // their namespace (enableServiceLinks defaults to true).
    const env = {
      KEYGATE_DATA_DIR: "/tmp/x",
      KEYGATE_ADMIN_PORT: "tcp://10.96.0.10:8080",
      KEYGATE_GRPC_PORT: "tcp://10.96.0.12:9191",
      KEYGATE_HTTP_AUTHZ_PORT: "9999",
    };
    const config = loadConfig(env);
    expect([config.adminPort, config.grpcPort, config.httpAuthzPort]).toEqual([8080, 9191, 9999]);
    expect(ignoredVariables(env)).toEqual([
      { name: "KEYGATE_ADMIN_PORT", closest: null, serviceLink: true },
      { name: "KEYGATE_GRPC_PORT", closest: null, serviceLink: true },
    ]);
    // Anything else in a port variable is still refused, naming it.
    expect(() => loadConfig({ ...env, KEYGATE_ADMIN_PORT: "tcp://10.96.0.10" })).toThrow("KEYGATE_ADMIN_PORT: must be a whole number from 0 to 65535");
    expect(() => loadConfig({ ...env, KEYGATE_ADMIN_PORT: "http://10.96.0.10:8080" })).toThrow("KEYGATE_ADMIN_PORT: must be a whole number from 0 to 65535");
  });

  it("looks defaultPlan up among the plans' own names, never Object.prototype's", () => {
    const base = { plans: { basic: { maxActiveKeys: 1, rateLimit: { limit: 1, windowSeconds: 1 } } }, scopes: { catalog: ["a"], default: ["a"] } };
    for (const name of ["constructor", "toString", "__proto__", "hasOwnProperty"]) {
      const parse = (): unknown => parsePolicy({ ...base, defaultPlan: name }, "KEYGATE_CONFIG (policy.yaml)");
      expect(parse).toThrow(ConfigError);
      expect(parse).toThrow(`invalid KEYGATE_CONFIG (policy.yaml): defaultPlan: unknown plan "${name}"`);
    }
    // A plan of that name is the policy's own, and may be the default.
    expect(parsePolicy({ ...base, plans: { constructor: base.plans.basic }, defaultPlan: "constructor" }).defaultPlan).toBe("constructor");
  });

  it("caps the flush intervals at one day, below where Node timers overflow and fire every 1 ms", () => {
    const base = { plans: { basic: { maxActiveKeys: 1, rateLimit: { limit: 1, windowSeconds: 1 } } }, scopes: { catalog: ["a"], default: ["a"] } };
    const overflow = 2_147_484; // seconds: just past 2^31 - 1 ms
    expect(parsePolicy({ ...base, lastUsedFlushSeconds: 86_400, limits: { usageFlushSeconds: 86_400 } })).toMatchObject({
      lastUsedFlushSeconds: 86_400,
      limits: { usageFlushSeconds: 86_400 },
    });
    for (const seconds of [86_401, overflow]) {
      expect(() => parsePolicy({ ...base, lastUsedFlushSeconds: seconds })).toThrow(/lastUsedFlushSeconds: must be at most 86400 \(one day\); it is in seconds/);
      expect(() => parsePolicy({ ...base, limits: { usageFlushSeconds: seconds } })).toThrow(/limits.usageFlushSeconds: must be at most 86400 \(one day\); it is in seconds/);
    }
    expect(() => parsePolicy({ ...base, lastUsedFlushSeconds: 0 })).toThrow(/lastUsedFlushSeconds/);
  });

  it("keeps last use to the minute unless told otherwise: whole seconds from 0 (every use) to one day", () => {
    const base = { plans: { basic: { maxActiveKeys: 1, rateLimit: { limit: 1, windowSeconds: 1 } } }, scopes: { catalog: ["a"], default: ["a"] } };
    expect(parsePolicy(base).lastUsedResolutionSeconds).toBe(60);
    expect(parsePolicy({ ...base, lastUsedResolutionSeconds: 0 }).lastUsedResolutionSeconds).toBe(0);
    expect(parsePolicy({ ...base, lastUsedResolutionSeconds: 86_400 }).lastUsedResolutionSeconds).toBe(86_400);
    expect(() => parsePolicy({ ...base, lastUsedResolutionSeconds: 86_401 })).toThrow(/lastUsedResolutionSeconds: must be at most 86400 \(one day\); it is in seconds/);
    expect(() => parsePolicy({ ...base, lastUsedResolutionSeconds: -1 })).toThrow(/lastUsedResolutionSeconds/);
    expect(() => parsePolicy({ ...base, lastUsedResolutionSeconds: 1.5 })).toThrow(/lastUsedResolutionSeconds/);
    expect(() => parsePolicy({ ...base, lastUsedResolutionSeconds: "60" })).toThrow(/lastUsedResolutionSeconds/);
  });
});

/** The message loadConfig refuses `env` with; fails the test when it is accepted. */
function refusal(env: NodeJS.ProcessEnv): string {
  try {
    loadConfig(env);
  } catch (error) {
    if (error instanceof ConfigError) return error.message;
    throw error;
  }
  throw new Error(`accepted ${JSON.stringify(env)}`);
}

// README "Environment": keygate refuses a bad value naming the variable. A variable set but empty
// (compose's `${GRPC_PORT}` with GRPC_PORT unset, a Helm value left blank and `| quote`d) is one:
// read as 0 it was a port the kernel picks, which no proxy is configured for, or a 0 s drain.
const NUMBER_VARIABLES = [
  "KEYGATE_GRPC_PORT",
  "KEYGATE_HTTP_AUTHZ_PORT",
  "KEYGATE_ADMIN_PORT",
  "KEYGATE_SHUTDOWN_GRACE_SECONDS",
  "KEYGATE_SHUTDOWN_DELAY_SECONDS",
  "KEYGATE_STARTUP_WAIT_SECONDS",
  "KEYGATE_ACCESS_LOG_SAMPLE",
  "KEYGATE_GC_THREAD_NICE",
  "KEYGATE_CHECK_BUDGET_MS",
  "KEYGATE_ADMIN_MAX_BODY_BYTES",
  "KEYGATE_HEADERS_TIMEOUT_SECONDS",
  "KEYGATE_REQUEST_TIMEOUT_SECONDS",
  "KEYGATE_IDLE_TIMEOUT_SECONDS",
  "KEYGATE_MAX_CONNECTIONS",
] as const;

describe("config: number variables.error", () => {
  it.each(NUMBER_VARIABLES)("%s set to an empty or blank value is refused naming it, never read as 0", (name) => {
    for (const value of ["", " ", "\t\n"]) {
      expect(refusal({ [name]: value }), JSON.stringify(value)).toBe(`invalid environment: ${name}: must not be empty`);
    }
  });

  it.each(["KEYGATE_GRPC_PORT", "KEYGATE_HTTP_AUTHZ_PORT", "KEYGATE_ADMIN_PORT"])("%s takes decimal digits only, from 0 to 65535", (name) => {
    for (const value of ["0x1F90", "1e3", "8080.0", "+8080", "-1", "65536", "0b1", "Infinity", "not-a-port"]) {
      expect(refusal({ [name]: value }), value).toBe(`invalid environment: ${name}: must be a whole number from 0 to 65535`);
    }
  });

  it("the other whole-number variables refuse hex and exponent forms alike", () => {
    expect(refusal({ KEYGATE_CHECK_BUDGET_MS: "1e3" })).toBe("invalid environment: KEYGATE_CHECK_BUDGET_MS: must be a whole number from 10 to 60000");
    expect(refusal({ KEYGATE_MAX_CONNECTIONS: "0x10" })).toBe("invalid environment: KEYGATE_MAX_CONNECTIONS: must be a whole number from 1 to 1000000");
    expect(refusal({ KEYGATE_ADMIN_MAX_BODY_BYTES: "1e5" })).toBe("invalid environment: KEYGATE_ADMIN_MAX_BODY_BYTES: must be a whole number from 1024 to 16777216");
    expect(refusal({ KEYGATE_GC_THREAD_NICE: "0x10" })).toBe("invalid environment: KEYGATE_GC_THREAD_NICE: must be a whole number from 0 to 19");
    // Read before the configuration, so a form it refuses must not lower any thread's priority.
    expect(gcThreadNiceFromEnv({ KEYGATE_GC_THREAD_NICE: "0x10" })).toBe(0);
    expect(gcThreadNiceFromEnv({ KEYGATE_GC_THREAD_NICE: "1e1" })).toBe(0);
    expect(gcThreadNiceFromEnv({ KEYGATE_GC_THREAD_NICE: "10" })).toBe(10);
  });

  it("seconds and shares take a decimal fraction, never an exponent or hex", () => {
    expect(refusal({ KEYGATE_SHUTDOWN_GRACE_SECONDS: "1e1" })).toBe("invalid environment: KEYGATE_SHUTDOWN_GRACE_SECONDS: must be a number of seconds from 0 to 300");
    expect(refusal({ KEYGATE_SHUTDOWN_DELAY_SECONDS: "301" })).toBe("invalid environment: KEYGATE_SHUTDOWN_DELAY_SECONDS: must be a number of seconds from 0 to 300");
    expect(refusal({ KEYGATE_IDLE_TIMEOUT_SECONDS: "0x10" })).toBe("invalid environment: KEYGATE_IDLE_TIMEOUT_SECONDS: must be a number of seconds above 0, at most 3600");
    expect(refusal({ KEYGATE_ACCESS_LOG_SAMPLE: "1e-2" })).toBe("invalid environment: KEYGATE_ACCESS_LOG_SAMPLE: must be a number from 0 to 1");
  });
});

describe("config: number variables.happy", () => {
  it("an explicit 0 stays valid where it was: ports the system picks, no drain, no delay, no sampling, nice 0", () => {
    const config = loadConfig({
      KEYGATE_GRPC_PORT: "0",
      KEYGATE_HTTP_AUTHZ_PORT: "0",
      KEYGATE_ADMIN_PORT: "0",
      KEYGATE_SHUTDOWN_GRACE_SECONDS: "0",
      KEYGATE_SHUTDOWN_DELAY_SECONDS: "0",
      KEYGATE_ACCESS_LOG_SAMPLE: "0",
      KEYGATE_GC_THREAD_NICE: "0",
    });
    expect(config).toMatchObject({ grpcPort: 0, httpAuthzPort: 0, adminPort: 0, shutdownGraceSeconds: 0, shutdownDelaySeconds: 0, accessLogSampleRate: 0, gcThreadNice: 0 });
  });

  it("reads decimal values, fractions where seconds or shares take them, and ignores surrounding blanks", () => {
    const config = loadConfig({
      KEYGATE_GRPC_PORT: " 9000 ",
      KEYGATE_ADMIN_PORT: "08080",
      KEYGATE_SHUTDOWN_GRACE_SECONDS: "2.5",
      KEYGATE_IDLE_TIMEOUT_SECONDS: ".5",
      KEYGATE_ACCESS_LOG_SAMPLE: "0.25",
      KEYGATE_MAX_CONNECTIONS: "1000",
    });
    expect(config).toMatchObject({ grpcPort: 9000, adminPort: 8080, shutdownGraceSeconds: 2.5, accessLogSampleRate: 0.25 });
    expect(config.listeners).toMatchObject({ idleTimeoutMs: 500, maxConnections: 1000 });
  });
});
