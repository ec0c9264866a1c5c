import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Writable } from "node:stream";
import { stringify } from "yaml";
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { loadConfig } from "../../src/config.js";
import { buildKeygate } from "../../src/server/app.js";
import { KeyFormat } from "../../src/keys/key-format.js";
import { redactLogObject } from "../../src/keys/redact.js";
import { createLogger } from "../../src/server/logger.js";
import { ADMIN_TOKEN, TEST_POLICY, checkInit, httpCheck, postJson, startKeygate } from "../harness/keygate.js";

/** A logger sink that keeps every line written to it. */
function captured(): { sink: Writable; lines: string[] } {
  const lines: string[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _encoding, callback) {
      lines.push(chunk.toString("utf8"));
      callback();
    },
  });
  return { sink, lines };
}

/** Parsed JSON log lines whose msg is `msg`. */
function linesWithMsg(lines: readonly string[], msg: string): Array<Record<string, unknown>> {
  return lines.map((line): unknown => JSON.parse(line)).filter((entry): entry is Record<string, unknown> => typeof entry === "object" && entry !== null && "msg" in entry && entry.msg === msg);
}

describe("logger security: redaction", () => {
  const SECRETS = {
    authorization: "Bearer kg_live_AUTHORIZATIONsecretvalue0000000000000",
    apiKey: "kg_live_XAPIKEYsecretvalue00000000000000000000",
    cookie: "session=COOKIEsecretvalue",
    secret: "TOPLEVELsecretvalue",
    nestedSecret: "NESTEDsecretvalue",
  };

  it("redacts authorization, x-api-key and cookie headers, and secret fields, keeping the marker", () => {
    const { sink, lines } = captured();
    const logger = createLogger("debug", sink);
    const headers = { authorization: SECRETS.authorization, "x-api-key": SECRETS.apiKey, cookie: SECRETS.cookie, "user-agent": "curl/8" };
    logger.info({ headers }, "bare headers");
    logger.info({ req: { headers } }, "request headers");
    logger.info({ secret: SECRETS.secret }, "top-level secret");
    logger.info({ created: { id: "key_1", secret: SECRETS.nestedSecret } }, "nested secret");
    logger.debug({ headers, secret: SECRETS.secret }, "at debug too");
    expect(lines).toHaveLength(5);
    const text = lines.join("");
    for (const value of Object.values(SECRETS)) expect(text.includes(value), `${value} reached the log`).toBe(false);
    // The censor marks each field, so a reader sees that something was there.
    const entries = lines.map((line): unknown => JSON.parse(line));
    expect(entries[0]).toMatchObject({ headers: { authorization: "[redacted]", "x-api-key": "[redacted]", cookie: "[redacted]", "user-agent": "curl/8" } });
    expect(entries[1]).toMatchObject({ req: { headers: { authorization: "[redacted]", "x-api-key": "[redacted]", cookie: "[redacted]" } } });
    expect(entries[2]).toMatchObject({ secret: "[redacted]" });
    expect(entries[3]).toMatchObject({ created: { id: "key_1", secret: "[redacted]" } });
    expect(entries[4]).toMatchObject({ secret: "[redacted]", headers: { authorization: "[redacted]" } });
  });
});

describe("logger security: redaction at any depth, in any case, inside text and errors", () => {
  const format = new KeyFormat("kg");
  const key = format.generate("live");
  const hash = "ab".repeat(32);
  const pepper = "pepper-literal-0123456789";
  const adminToken = "admin-token-literal-abcdef";

  it("redacts secret fields nested deep and in mixed case, and secrets quoted inside messages and errors", () => {
    const { sink, lines } = captured();
    const logger = createLogger("debug", sink, [pepper, adminToken]);
    logger.info({ a: { b: { c: { d: { secret: "DEEPsecretvalue" } } } } }, "deep secret");
    logger.info({ req: { headers: { Authorization: "Token MIXEDCASEsecret", "X-Api-Key": "MIXEDKEYsecret", Cookie: "c=MIXEDCOOKIE" } } }, "mixed case headers");
    logger.warn({ err: new Error(`duplicate key: { hash: "${hash}" } for ${key}`, { cause: new Error(`pepper was ${pepper}`) }) }, "store failed");
    logger.info({ note: `called with Bearer ${adminToken} and bearer kgadm_${"x".repeat(43)}`, list: [{ Hash: hash }] }, `message naming ${key}`);
    logger.info({ bytes: Buffer.from(key), at: new Date(0) }, "bytes and dates");
    expect(lines).toHaveLength(5);
    const text = lines.join("");
    for (const value of [key, hash, pepper, adminToken, "DEEPsecretvalue", "MIXEDCASEsecret", "MIXEDKEYsecret", "MIXEDCOOKIE", "kgadm_xxxx"]) {
      expect(text.includes(value), `${value.slice(0, 12)}… reached the log`).toBe(false);
    }
    const entries = lines.map((line) => JSON.parse(line) as Record<string, unknown>);
    expect(entries[0]).toMatchObject({ a: { b: { c: { d: { secret: "[redacted]" } } } } });
    expect(entries[1]).toMatchObject({ req: { headers: { Authorization: "[redacted]", "X-Api-Key": "[redacted]", Cookie: "[redacted]" } } });
    // The error keeps its shape (type, message, stack); only the secrets in it are replaced.
    expect(entries[2]).toMatchObject({ level: 40, err: { type: "Error", message: 'duplicate key: { hash: "[redacted]" } for [redacted]: pepper was [redacted]' } });
    expect(String((entries[2]["err"] as { stack: unknown }).stack)).toMatch(/^Error: duplicate key/);
    expect(entries[3]).toMatchObject({ msg: "message naming [redacted]", note: "called with Bearer [redacted] and bearer [redacted]", list: [{ Hash: "[redacted]" }] });
    expect(entries[4]).toMatchObject({ bytes: `[${key.length} bytes]`, at: "1970-01-01T00:00:00.000Z" });
  });

  it("never lets a key through wherever it sits in a log object, and leaves other values and the input as they were", () => {
    const plain = fc.oneof(fc.integer(), fc.boolean(), fc.constant(null), fc.stringMatching(/^[a-z ]{0,12}$/));
    const fieldName = fc.stringMatching(/^[a-z]{3,8}$/).filter((name) => !["secret", "key", "apikey", "pepper", "hash", "token", "password", "cookie"].includes(name));
    const tree = fc.letrec((tie) => ({
      // Kept shallower than the redactor's depth limit, past which a whole value is replaced on purpose.
      node: fc.oneof({ depthSize: "small", maxDepth: 5 }, plain, fc.array(tie("node"), { maxLength: 3 }), fc.dictionary(fieldName, tie("node"), { maxKeys: 3, noNullPrototype: true })),
    })).node;
    fc.assert(
      fc.property(tree, fc.array(fieldName, { minLength: 1, maxLength: 5 }), fc.stringMatching(/^[a-z ]{0,8}$/), (base, path, around) => {
        // Plant the key, inside some text, at a path of up to five objects.
        let planted: unknown = `${around}${key}${around}`;
        for (const name of [...path].reverse()) planted = { [name]: planted };
        const input = { base, planted };
        const before = JSON.stringify(input);
        const out = redactLogObject(input);
        expect(JSON.stringify(input)).toBe(before);
        expect(JSON.stringify(out).includes(key)).toBe(false);
        expect((out as { base: unknown }).base).toStrictEqual(base);
      }),
      { numRuns: 300, seed: 20261203 },
    );
  });
});

describe("logger happy: the level follows KEYGATE_LOG_LEVEL", () => {
  it("defaults to info and reads KEYGATE_LOG_LEVEL", () => {
    expect(loadConfig({}).logLevel).toBe("info");
    expect(loadConfig({ KEYGATE_LOG_LEVEL: "debug" }).logLevel).toBe("debug");
    expect(() => loadConfig({ KEYGATE_LOG_LEVEL: "loud" })).toThrow(/KEYGATE_LOG_LEVEL/);
  });

  it("at debug, one Check logs one JSON check line with requestId, keyId and decision", async () => {
    const kg = await startKeygate();
    try {
      await kg.admin.upsertAccount({ ownerId: "logger-owner", plan: "business" });
      const created = await kg.admin.createKey({ ownerId: "logger-owner", name: "log" });
      const keyId = created.key?.id ?? "";
      const before = linesWithMsg(kg.logLines, "check").length;
      await kg.check(checkInit({ authorization: `Bearer ${created.secret}` }));
      const checks = linesWithMsg(kg.logLines, "check").slice(before);
      expect(checks).toHaveLength(1);
      expect(checks[0]).toMatchObject({ level: 20, requestId: "req-1", keyId, decision: "OK", mode: "grpc" });
      await httpCheck(kg.ports.http, "/check", { "x-api-key": created.secret, "x-request-id": "http-req-1" });
      expect(linesWithMsg(kg.logLines, "check").slice(before + 1)).toEqual([expect.objectContaining({ requestId: "http-req-1", keyId, decision: "OK", mode: "http" })]);
      expect(kg.logLines.join("").includes(created.secret)).toBe(false);
    } finally {
      await kg.stop();
    }
  });

  it("at info (the default), a Check writes no check line", async () => {
    const dataDir = mkdtempSync(join(tmpdir(), "keygate-logger-"));
    const policyPath = join(dataDir, "policy.yaml");
    writeFileSync(policyPath, stringify(TEST_POLICY));
    const config = loadConfig({
      KEYGATE_DATA_DIR: dataDir,
      KEYGATE_CONFIG: policyPath,
      KEYGATE_ADMIN_TOKENS: ADMIN_TOKEN,
      KEYGATE_HOST: "127.0.0.1",
      KEYGATE_GRPC_PORT: "0",
      KEYGATE_HTTP_AUTHZ_PORT: "0",
      KEYGATE_ADMIN_PORT: "0",
      KEYGATE_LOG_LEVEL: "info",
    });
    const { sink, lines } = captured();
    // The same wiring as `keygate serve`: the logger's level is config.logLevel.
    const app = await buildKeygate(config, { logger: createLogger(config.logLevel, sink), defaultMetrics: false });
    try {
      const ports = await app.start();
      await postJson(ports.admin, "UpsertAccount", { ownerId: "logger-info", plan: "business" });
      const created = await postJson(ports.admin, "CreateKey", { ownerId: "logger-info", name: "log" });
      const secret = String(created.json["secret"]);
      expect((await httpCheck(ports.http, "/check", { "x-api-key": secret })).status).toBe(200);
      expect((await httpCheck(ports.http, "/check", { "x-api-key": "junk" })).status).toBe(401);
      // A warning still gets through, so the sink is live and the missing line is the level's doing.
      expect((await postJson(ports.admin, "ListKeys", { ownerId: "x" }, "wrong-admin-token-0123456789abcdef")).status).toBe(401);
      expect(linesWithMsg(lines, "admin authentication failed")).toHaveLength(1);
      expect(linesWithMsg(lines, "check")).toEqual([]);
      expect(lines.some((line) => line.includes('"level":20'))).toBe(false);
    } finally {
      await app.stop();
      rmSync(dataDir, { recursive: true, force: true });
    }
  });
});
