import { Writable } from "node:stream";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { z } from "zod";
import type { Decision } from "../../src/authz/pipeline.js";
import { AccessLog } from "../../src/server/access-log.js";
import { createLogger } from "../../src/server/logger.js";
import { checkInit, httpCheck, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

const accessLine = z.object({
  level: z.literal(30),
  msg: z.literal("access"),
  entry: z.enum(["grpc", "http"]),
  requestId: z.string().min(1),
  method: z.string(),
  path: z.string(),
  decision: z.enum(["allow", "deny", "unavailable"]),
  reason: z.string(),
  code: z.string(),
  status: z.number().int(),
  keyId: z.string().nullable(),
  ownerId: z.string().nullable(),
  latencyUs: z.number().int().min(0),
});
type AccessLine = z.infer<typeof accessLine>;

/** The access lines among `lines`, each checked against the schema. */
function accessLines(lines: readonly string[]): AccessLine[] {
  return lines
    .flatMap((chunk) => chunk.split("\n"))
    .filter((line) => line.includes('"msg":"access"'))
    .map((line) => accessLine.parse(JSON.parse(line)));
}

async function issue(kg: TestKeygate, owner: string, scopes: string[] = []): Promise<{ id: string; secret: string }> {
  await kg.admin.upsertAccount({ ownerId: owner, plan: "business" });
  const created = await kg.admin.createKey({ ownerId: owner, name: "logged", scopes });
  if (created.key === undefined) throw new Error("no key");
  return { id: created.key.id, secret: created.secret };
}

describe("access log happy", () => {
  let kg: TestKeygate;
  beforeAll(async () => {
    kg = await startKeygate({ env: { KEYGATE_ACCESS_LOG_SAMPLE: "1" } });
  }, 60_000);
  afterAll(async () => {
    await kg.stop();
  });

  it("logs every Check at rate 1: allows and denials, gRPC and HTTP, by key id, without the query string", async () => {
    const key = await issue(kg, "owner-access-1", ["tutor"]);
    const before = kg.logLines.length;
    expect((await kg.check({ ...checkInit({ authorization: `Bearer ${key.secret}` }, "/v1/things?api_key=abc", "POST") })).status?.code).toBe(0);
    expect((await httpCheck(kg.ports.http, "/check/v1/decks/1?page=2", { "x-api-key": key.secret, "x-request-id": "req-http-1" })).status).toBe(403);
    expect((await httpCheck(kg.ports.http, "/check/v1/things", {})).status).toBe(401);
    const lines = accessLines(kg.logLines.slice(before));
    expect(lines).toHaveLength(3);
    const [grpc, denied, keyless] = lines;
    expect(grpc).toMatchObject({ entry: "grpc", requestId: "req-1", method: "POST", path: "/v1/things", decision: "allow", reason: "OK", code: "OK", status: 200, keyId: key.id, ownerId: "owner-access-1" });
    expect(denied).toMatchObject({ entry: "http", requestId: "req-http-1", method: "GET", path: "/v1/decks/1", decision: "deny", reason: "MISSING_SCOPE", code: "FORBIDDEN", status: 403, keyId: key.id, ownerId: "owner-access-1" });
    expect(keyless).toMatchObject({ entry: "http", path: "/v1/things", decision: "deny", reason: "MISSING_CREDENTIAL", code: "UNAUTHENTICATED", status: 401, keyId: null, ownerId: null });
  });
});

describe("access log security", () => {
  it("no secret, no credential header and no query string appears anywhere in the log", async () => {
    const kg = await startKeygate({ env: { KEYGATE_ACCESS_LOG_SAMPLE: "1" } });
    try {
      const key = await issue(kg, "owner-access-secret");
      const fake = `${key.secret.slice(0, -8)}AAAAAAAA`;
      await kg.check(checkInit({ authorization: `Bearer ${key.secret}` }, `/v1/things?token=${key.secret}`));
      await kg.check(checkInit({ authorization: `Bearer ${fake}` }));
      await httpCheck(kg.ports.http, `/check/v1/things?key=${key.secret}`, { authorization: `Bearer ${key.secret}` });
      await httpCheck(kg.ports.http, "/check/v1/things", { "x-api-key": key.secret });
      expect(accessLines(kg.logLines)).toHaveLength(4);
      const log = kg.logLines.join("");
      expect(log).not.toContain(key.secret);
      expect(log).not.toContain(key.secret.slice(8, 40));
      expect(log).not.toContain(fake);
      expect(log).not.toContain("Bearer");
      expect(log.toLowerCase()).not.toContain("authorization");
      expect(log).not.toContain("x-api-key");
      expect(log).not.toContain("token=");
    } finally {
      await kg.stop();
    }
  }, 60_000);
});

describe("access log off", () => {
  it("writes no access line by default", async () => {
    const kg = await startKeygate();
    try {
      const key = await issue(kg, "owner-access-off");
      expect((await kg.check(checkInit({ authorization: `Bearer ${key.secret}` }))).status?.code).toBe(0);
      expect((await httpCheck(kg.ports.http, "/check/v1/things", { authorization: `Bearer ${key.secret}` })).status).toBe(200);
      // The debug "check" lines prove both Checks were logged at all.
      expect(kg.logLines.filter((line) => line.includes('"msg":"check"'))).toHaveLength(2);
      expect(accessLines(kg.logLines)).toEqual([]);
    } finally {
      await kg.stop();
    }
  }, 60_000);
});

describe("access log sampling", () => {
  const unknownKey: Decision = { allow: false, reason: "UNKNOWN_KEY", message: "unknown" };

  it("logs about the configured share of Checks", () => {
    const lines: string[] = [];
    const sink = new Writable({
      write(chunk: Buffer, _encoding, callback) {
        lines.push(chunk.toString("utf8"));
        callback();
      },
    });
    const log = new AccessLog(createLogger("info", sink), 0.25);
    for (let i = 0; i < 4000; i++) log.decided("grpc", unknownKey, "GET", "/", `r${i}`, performance.now());
    // Binomial(4000, 0.25): mean 1000, standard deviation about 27; the bounds are 9 deviations out.
    expect(lines.length).toBeGreaterThan(750);
    expect(lines.length).toBeLessThan(1250);
  });

  it("is not built at rate 0", () => {
    expect(AccessLog.create(createLogger("info"), 0)).toBeUndefined();
    expect(AccessLog.create(createLogger("info"), 0.5)).toBeInstanceOf(AccessLog);
  });
});
