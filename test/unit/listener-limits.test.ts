import { describe, expect, it } from "vitest";
import { ConfigError, loadConfig } from "../../src/config.js";
import { classifyOpening, defaultMaxConnections, listenerLimits } from "../../src/server/connections.js";
import { H2_PREFACE, H2_SETTINGS, h2Frame } from "../harness/sockets.js";

describe("listener limits configuration", () => {
  const base = { KEYGATE_DATA_DIR: "/tmp/keygate-unused" };

  it("defaults: headers 10 s, request 30 s, idle 65 s, cap from the file limit, admin bodies 64 KiB", () => {
    const config = loadConfig(base);
    expect(config.listeners).toEqual({ headersTimeoutMs: 10_000, requestTimeoutMs: 30_000, idleTimeoutMs: 65_000, maxConnections: null });
    expect(config.adminMaxBodyBytes).toBe(65_536);
  });

  it("the default cap keeps the three listeners 256 descriptors under the open-file limit, at most 10,000 each", () => {
    expect(defaultMaxConnections(1024)).toBe(256);
    expect(defaultMaxConnections(20_000)).toBe(6581);
    expect(defaultMaxConnections(1_048_576)).toBe(10_000);
    expect(defaultMaxConnections(null)).toBe(10_000);
    expect(defaultMaxConnections(300)).toBe(16);
  });

  const bad: Array<[Record<string, string>, string]> = [
    [{ KEYGATE_HEADERS_TIMEOUT_SECONDS: "0" }, "KEYGATE_HEADERS_TIMEOUT_SECONDS"],
    [{ KEYGATE_IDLE_TIMEOUT_SECONDS: "soon" }, "KEYGATE_IDLE_TIMEOUT_SECONDS"],
    [{ KEYGATE_REQUEST_TIMEOUT_SECONDS: "5", KEYGATE_HEADERS_TIMEOUT_SECONDS: "6" }, "KEYGATE_HEADERS_TIMEOUT_SECONDS must not exceed KEYGATE_REQUEST_TIMEOUT_SECONDS"],
    [{ KEYGATE_MAX_CONNECTIONS: "0" }, "KEYGATE_MAX_CONNECTIONS"],
    [{ KEYGATE_ADMIN_MAX_BODY_BYTES: "100" }, "KEYGATE_ADMIN_MAX_BODY_BYTES"],
  ];
  it.each(bad)("%o is refused naming %s", (env, variable) => {
    expect(() => loadConfig({ ...base, ...env })).toThrow(ConfigError);
    expect(() => loadConfig({ ...base, ...env })).toThrow(variable);
  });
});

describe("listener limits resolution", () => {
  it("a configured cap is kept; none is derived from the file limit", () => {
    const settings = { headersTimeoutMs: 1, requestTimeoutMs: 2, idleTimeoutMs: 3 };
    expect(listenerLimits({ ...settings, maxConnections: 7 }, 1024)).toEqual({ ...settings, maxConnections: 7 });
    expect(listenerLimits({ ...settings, maxConnections: null }, 1024)).toEqual({ ...settings, maxConnections: 256 });
  });
});

describe("connection opening classification", () => {
  const opening = Buffer.concat([H2_PREFACE, H2_SETTINGS]);
  const withSetting = Buffer.concat([H2_PREFACE, h2Frame(0x4, 0, 0, Buffer.from([0, 3, 0, 0, 0, 100]))]);

  const cases: Array<[string, Buffer, ReturnType<typeof classifyOpening>]> = [
    ["an HTTP/1.1 request line", Buffer.from("GET / HTTP/1.1\r\n"), "http1"],
    ["a first byte that is not P", Buffer.from("G"), "http1"],
    ["P then not R (POST)", Buffer.from("PO"), "http1"],
    ["one byte of the preface", Buffer.from("P"), "incomplete"],
    ["part of the preface", H2_PREFACE.subarray(0, 16), "incomplete"],
    ["the preface alone", H2_PREFACE, "incomplete"],
    ["the preface and part of a frame header", opening.subarray(0, 28), "incomplete"],
    ["the preface and an empty SETTINGS", opening, "http2"],
    ["the preface and a SETTINGS with one setting", withSetting, "http2"],
    ["the preface and a SETTINGS cut short", withSetting.subarray(0, withSetting.length - 1), "incomplete"],
    ["the preface and a SETTINGS ACK", Buffer.concat([H2_PREFACE, h2Frame(0x4, 0x1, 0)]), "invalid"],
    ["the preface and a HEADERS frame", Buffer.concat([H2_PREFACE, h2Frame(0x1, 0x4, 1)]), "invalid"],
    ["the preface and a SETTINGS on a stream", Buffer.concat([H2_PREFACE, h2Frame(0x4, 0, 1)]), "invalid"],
    ["the preface and a SETTINGS of odd length", Buffer.concat([H2_PREFACE, h2Frame(0x4, 0, 0, Buffer.alloc(5))]), "invalid"],
    ["a near-miss preface", Buffer.from("PRI * HTTP/2.1\r\n\r\nSM\r\n\r\n"), "http1"],
  ];
  it.each(cases)("%s is %s", (_name, bytes, expected) => {
    expect(classifyOpening(bytes)).toBe(expected);
  });
});
