import { request } from "node:http";
import { connect } from "node:net";
import { join } from "node:path";
import { DatabaseSync } from "node:sqlite";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { Client as GrpcClient, credentials } from "@grpc/grpc-js";
import type { ServiceError } from "@grpc/grpc-js";
import fc from "fast-check";
import { pino } from "pino";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { DecisionPipeline } from "../../src/authz/pipeline.js";
import type { Decision } from "../../src/authz/pipeline.js";
import { DENIALS } from "../../src/authz/reasons.js";
import { RouteTable } from "../../src/authz/routes.js";
import { SnapshotLookup } from "../../src/cache/lookup.js";
import { LocalInvalidationBus, MemoryCache } from "../../src/cache/memory.js";
import { DEFAULT_POLICY_INPUT, parsePolicy } from "../../src/config.js";
import { KeyHasher } from "../../src/keys/hasher.js";
import { KeyFormat } from "../../src/keys/key-format.js";
import { MemoryMeter } from "../../src/limits/memory.js";
import { UsageRecorder } from "../../src/limits/usage.js";
import { LastUsedRecorder } from "../../src/store/last-used.js";
import type { KeySnapshot, KeyStore } from "../../src/store/store.js";
import { ADMIN_TOKEN, checkOutcome, postJson, startKeygate } from "../harness/keygate.js";
import { CheckRequestSchema, CheckResponseSchema } from "../../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import type { TestKeygate } from "../harness/keygate.js";
import { newKeyRecord } from "../../src/store/store.js";
import { RecordHeaders } from "../../src/authz/headers.js";

const format = new KeyFormat("kg");
const hasher = new KeyHasher("p".repeat(32));
/** The one key the spy store knows. */
const VALID = format.generate("live");
/** Well-formed (shape and checksum pass) but unknown to the store. */
const UNKNOWN = format.generate("test");
const CREDENTIAL_HEADERS = ["authorization", "x-api-key"] as const;

const VALID_SNAPSHOT: KeySnapshot = {
  key: newKeyRecord({
    id: "key_01HOSTILEVALID",
    hash: hasher.hash(VALID),
    ownerId: "owner-hostile",
    name: "valid",
    mode: "live",
    start: VALID.slice(0, 12),
    last4: VALID.slice(-4),
    createdAtMs: 0,
  }),
  account: { ownerId: "owner-hostile", plan: "business", subscriptionStatus: "active", role: "standard", createdAtMs: 0, updatedAtMs: 0 },
};

/** A store that knows only VALID and counts how often it is asked: the decision's only I/O. */
function spyStore(): { store: KeyStore; lookups: () => number } {
  let lookups = 0;
  const refuse = (): Promise<never> => Promise.reject(new Error("not used by the decision"));
  const store: KeyStore = {
    kind: "spy",
    findSnapshotByHash: async (hash: string): Promise<KeySnapshot | null> => {
      lookups += 1;
      return hash === VALID_SNAPSHOT.key.hash ? VALID_SNAPSHOT : null;
    },
    upsertAccount: refuse,
    getAccount: refuse,
    countActiveKeys: refuse,
    createKey: refuse,
    getKey: refuse,
    listKeys: refuse,
    updateKey: refuse,
    redisableKey: refuse,
    enableKey: refuse,
    pauseKeysInGrace: refuse,
    revokeKey: refuse,
    rotateKey: refuse,
    getCredits: refuse,
    addCredits: refuse,
    addCreditsOnce: refuse,
    applyUsage: refuse,
    listUsage: refuse,
    listUsagePage: refuse,
    appendAudit: refuse,
    listAudit: refuse,
    lastAuditId: refuse,
    touchLastUsed: refuse,
    claimPepperCheck: refuse,
    claimKeyPrefix: refuse,
    ping: refuse,
    close: async () => undefined,
  };
  return { store, lookups: () => lookups };
}

/**
 * The well-formed key a request carries, judged by the test and not by the pipeline: every
 * credential header present once, a Bearer authorization or a bare X-API-Key, every value
 * passing KeyFormat.parse and all of them the same key. Null for anything else. It errs on
 * the lenient side, so "a store call implies a key here" is a real constraint on the pipeline.
 */
function carriedKey(headers: Readonly<Record<string, string | string[] | undefined>>): string | null {
  let carried: string | null = null;
  for (const name of CREDENTIAL_HEADERS) {
    const value = headers[name];
    if (value === undefined) continue;
    if (typeof value !== "string") return null;
    let candidate: string;
    if (name === "authorization") {
      const bearer = /^bearer[ \t]+([\s\S]*)$/i.exec(value);
      if (bearer === null) continue;
      candidate = (bearer[1] ?? "").trim();
    } else {
      candidate = value.trim();
      if (candidate === "") continue;
    }
    if (format.parse(candidate) === null) return null;
    if (carried !== null && carried !== candidate) return null;
    carried = candidate;
  }
  return carried;
}

function pipelineOver(store: KeyStore): DecisionPipeline {
  const logger = pino({ level: "silent" });
  const usage = new UsageRecorder(store, logger, 3_600_000);
  return new DecisionPipeline({
    format,
    hasher,
    lookup: new SnapshotLookup({
      local: new MemoryCache({ maxEntries: 1000, ttlSeconds: 30, negativeMaxEntries: 1000, negativeTtlSeconds: 5 }),
      store,
      bus: new LocalInvalidationBus(),
    }),
    routes: new RouteTable([]),
    credentialHeaders: [...CREDENTIAL_HEADERS],
    lastUsed: new LastUsedRecorder(store, logger, 3_600_000),
    meter: new MemoryMeter(store, usage),
    usage,
    policy: parsePolicy(DEFAULT_POLICY_INPUT),
    nowMs: Date.now,
  });
}

/** Hostile header values: arbitrary text, control bytes, huge values and near-miss keys. */
const hostileValue = fc.oneof(
  fc.string({ maxLength: 200 }),
  fc.string({ unit: "binary", maxLength: 200 }),
  fc.constantFrom("\u0000", "\r\n", "Bearer", "bearer ", "Bearer  \t", "BEARER\t", `bearer\t${VALID}`, `Bearer ${VALID} extra`),
  // Well-formed keys, known and unknown, so that a store call and an allow are possible at all.
  fc.constantFrom(VALID, `Bearer ${VALID}`, ` ${VALID}\t`, UNKNOWN, `Bearer ${UNKNOWN}`, `Basic ${VALID}`),
  fc.constant("x".repeat(65_536)),
  // One character off: wrong length, or one character changed.
  fc.constantFrom(VALID.slice(0, -1), `${VALID}A`, `Bearer ${VALID.slice(1)}`),
  fc.tuple(fc.integer({ min: 0, max: VALID.length - 1 }), fc.constantFrom(..."aZ9_-!é\u0000")).map(([i, ch]) => VALID.slice(0, i) + ch + VALID.slice(i + 1)),
  fc.tuple(fc.constantFrom("Bearer", "bearer", "BeArEr", "Basic", "Token"), fc.constantFrom(" ", "  ", "\t", ""), fc.string({ maxLength: 60 })).map(
    ([scheme, gap, rest]) => `${scheme}${gap}${rest}`,
  ),
);
const hostileHeaders = fc.record(
  {
    authorization: fc.oneof(hostileValue, fc.array(hostileValue, { minLength: 2, maxLength: 3 })),
    "x-api-key": fc.oneof(hostileValue, fc.array(hostileValue, { minLength: 2, maxLength: 3 })),
  },
  { requiredKeys: [] },
);

describe("hostile input: the decision", () => {
  it("never throws, always answers from the table, calls the store only for a well-formed key, and allows only VALID", async () => {
    const { store, lookups } = spyStore();
    const pipeline = pipelineOver(store);
    let storeCalls = 0;
    let allows = 0;
    await fc.assert(
      fc.asyncProperty(hostileHeaders, fc.string({ maxLength: 100 }), async (headers, path) => {
        const before = lookups();
        let decision: Decision;
        try {
          decision = await pipeline.decide({ method: "GET", path: `/${path}`, headers: new RecordHeaders(headers), contextExtensions: undefined });
        } catch (error) {
          throw new Error(`decide threw: ${String(error)}`);
        }
        const carried = carriedKey(headers);
        if (lookups() > before) {
          storeCalls += 1;
          expect(carried, `store called for ${JSON.stringify(headers).slice(0, 200)}`).not.toBeNull();
        }
        if (decision.allow) {
          allows += 1;
          expect(carried, `allowed ${JSON.stringify(headers).slice(0, 200)}`).toBe(VALID);
          return;
        }
        expect(DENIALS[decision.reason]).toBeDefined();
      }),
      { numRuns: 1500 },
    );
    // The generator reaches both sides of each invariant; otherwise they would hold vacuously.
    expect(storeCalls).toBeGreaterThan(0);
    expect(allows).toBeGreaterThan(0);
  });

  it("garbage never allows, even with VALID known to the store", async () => {
    const { store, lookups } = spyStore();
    const pipeline = pipelineOver(store);
    await fc.assert(
      fc.asyncProperty(hostileHeaders, async (headers) => {
        fc.pre(carriedKey(headers) === null);
        const before = lookups();
        const decision = await pipeline.decide({ method: "GET", path: "/", headers: new RecordHeaders(headers), contextExtensions: undefined });
        expect(decision.allow ? "ALLOW" : decision.reason).not.toBe("ALLOW");
        expect(lookups()).toBe(before);
      }),
      { numRuns: 1500 },
    );
  });

  it("VALID alone, in one clean header, allows; repeated or beside another key it does not", async () => {
    const { store, lookups } = spyStore();
    const pipeline = pipelineOver(store);
    const decide = async (headers: Record<string, string | string[]>): Promise<string> => {
      const decision = await pipeline.decide({ method: "GET", path: "/", headers: new RecordHeaders(headers), contextExtensions: undefined });
      return decision.allow ? "ALLOW" : decision.reason;
    };
    expect(await decide({ authorization: `Bearer ${VALID}` })).toBe("ALLOW");
    expect(lookups()).toBe(1);
    expect(await decide({ "x-api-key": VALID })).toBe("ALLOW");
    expect(await decide({ authorization: `bearer \t${VALID}`, "x-api-key": VALID })).toBe("ALLOW");
    expect(lookups()).toBe(1); // served from L1 after the first load
    expect(await decide({ authorization: [`Bearer ${VALID}`, `Bearer ${VALID}`] })).toBe("MALFORMED_KEY");
    expect(await decide({ "x-api-key": [VALID, VALID] })).toBe("MALFORMED_KEY");
    expect(await decide({ authorization: `Bearer ${VALID}`, "x-api-key": UNKNOWN })).toBe("MALFORMED_KEY");
    expect(await decide({ authorization: `Bearer ${UNKNOWN}` })).toBe("UNKNOWN_KEY");
    expect(lookups()).toBe(2);
  });

  it("every one-character change of a valid key is refused as malformed with no store call", async () => {
    const { store, lookups } = spyStore();
    const pipeline = pipelineOver(store);
    const alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    for (let i = 8; i < VALID.length; i++) {
      for (const ch of alphabet) {
        if (VALID[i] === ch) continue;
        const mutated = VALID.slice(0, i) + ch + VALID.slice(i + 1);
        const decision = await pipeline.decide({ method: "GET", path: "/", headers: new RecordHeaders({ "x-api-key": mutated }), contextExtensions: undefined });
        expect(decision.allow ? "ALLOW" : decision.reason).toBe("MALFORMED_KEY");
      }
    }
    expect(lookups()).toBe(0);
  });
});

describe("hostile input: real listeners", () => {
  let kg: TestKeygate;
  /** Two keys the running instance knows, on accounts with room for a few hundred checks. */
  let keyS = "";
  let keyT = "";
  beforeAll(async () => {
    kg = await startKeygate();
    const issue = async (ownerId: string): Promise<string> => {
      await kg.admin.upsertAccount({ ownerId, plan: "business" });
      return (await kg.admin.createKey({ ownerId, name: "hostile" })).secret;
    };
    keyS = await issue("hostile-http-s");
    keyT = await issue("hostile-http-t");
  });
  afterAll(async () => {
    await kg.stop();
  });

  /** Sends raw bytes as an HTTP request and returns the status code of the answer. */
  function rawRequest(port: number, head: Buffer): Promise<number> {
    return new Promise((resolve, reject) => {
      const socket = connect(port, "127.0.0.1");
      let data = "";
      socket.on("data", (chunk: Buffer) => {
        data += chunk.toString("latin1");
        const match = /^HTTP\/1\.1 (\d{3})/.exec(data);
        if (match?.[1] !== undefined) {
          socket.destroy();
          resolve(Number(match[1]));
        }
      });
      socket.on("error", reject);
      socket.on("close", () => reject(new Error(`closed without a status: ${JSON.stringify(data.slice(0, 100))}`)));
      socket.end(head);
    });
  }

  /** Sends raw bytes as one HTTP request on a fresh connection and returns the whole answer. */
  function rawExchange(port: number, head: string): Promise<{ status: number; code: unknown }> {
    return new Promise((resolve, reject) => {
      const socket = connect(port, "127.0.0.1");
      const chunks: Buffer[] = [];
      socket.on("data", (chunk: Buffer) => chunks.push(chunk));
      socket.on("error", reject);
      socket.on("close", () => {
        const text = Buffer.concat(chunks).toString("utf8");
        const status = /^HTTP\/1\.1 (\d{3})/.exec(text)?.[1];
        if (status === undefined) return reject(new Error(`no status: ${JSON.stringify(text.slice(0, 100))}`));
        // The body may come chunked: the JSON object sits between its first "{" and last "}".
        const body = text.slice(text.indexOf("\r\n\r\n") + 4);
        const json = body.slice(body.indexOf("{"), body.lastIndexOf("}") + 1);
        let code: unknown;
        try {
          const parsed: unknown = JSON.parse(json);
          if (typeof parsed === "object" && parsed !== null && "error" in parsed && typeof parsed.error === "object" && parsed.error !== null && "code" in parsed.error) {
            code = parsed.error.code;
          }
        } catch {
          code = undefined;
        }
        resolve({ status: Number(status), code });
      });
      socket.end(`GET /check/v1/things HTTP/1.1\r\nhost: x\r\nconnection: close\r\n${head}\r\n`);
    });
  }

  it("refuses repeated and conflicting credential headers in HTTP mode (Node keeps only the first Authorization)", async () => {
    const port = kg.ports.http;
    // The control: each key alone is allowed, so the refusals below are about the repeat.
    expect(await rawExchange(port, `Authorization: Bearer ${keyS}\r\n`)).toEqual({ status: 200, code: undefined });
    expect(await rawExchange(port, `X-API-Key: ${keyT}\r\n`)).toEqual({ status: 200, code: undefined });
    expect(await rawExchange(port, `Authorization: Bearer ${keyS}\r\nX-API-Key: ${keyS}\r\n`)).toEqual({ status: 200, code: undefined });
    const refused = { status: 401, code: "UNAUTHENTICATED" };
    const cases = [
      `Authorization: Bearer ${keyS}\r\nAuthorization: Bearer ${keyT}\r\n`,
      `Authorization: Bearer ${keyS}\r\nAuthorization: Bearer junk\r\n`,
      `Authorization: Bearer ${keyS}\r\nauthorization: Bearer ${keyS}\r\n`,
      `X-API-Key: ${keyS}\r\nX-API-Key: ${keyT}\r\n`,
      `X-API-Key: ${keyS}\r\nx-api-key: ${keyS}\r\n`,
      `Authorization: Bearer ${keyS}\r\nX-API-Key: ${keyT}\r\n`,
      `X-API-Key: ${keyT}\r\nAuthorization: Bearer ${keyS}\r\n`,
    ];
    for (const head of cases) expect(await rawExchange(port, head), head.replace(/kg_\w+/g, "<key>")).toEqual(refused);
  });

  it("refuses an array Authorization sent by node:http as two header lines", async () => {
    const status = await new Promise<number>((resolve, reject) => {
      const req = request({ host: "127.0.0.1", port: kg.ports.http, path: "/check" }, (res) => {
        res.resume();
        resolve(res.statusCode ?? 0);
      });
      req.setHeader("authorization", [`Bearer ${keyS}`, `Bearer ${keyT}`]);
      req.on("error", reject);
      req.end();
    });
    expect(status).toBe(401);
  });

  it("HTTP mode with any mix of repeated or conflicting credential headers allows only one agreeing key", async () => {
    const name = fc.constantFrom("Authorization", "authorization", "AUTHORIZATION", "X-API-Key", "x-api-key");
    const value = fc.oneof(
      fc.constantFrom("S", "T", "Bearer S", "Bearer T", "bearer\tS", "Bearer junk", "junk", "Basic dXNlcjpwYXNz", ""),
      fc.stringMatching(/^[\x21-\x7e ]{0,40}$/),
    );
    await fc.assert(
      fc.asyncProperty(fc.array(fc.tuple(name, value), { minLength: 1, maxLength: 4 }), async (lines) => {
        const concrete = lines.map(([n, v]): [string, string] => [n, v.replace(/\bS\b/g, keyS).replace(/\bT\b/g, keyT)]);
        const answer = await rawExchange(kg.ports.http, concrete.map(([n, v]) => `${n}: ${v}\r\n`).join(""));
        const counts = new Map<string, number>();
        for (const [n] of concrete) counts.set(n.toLowerCase(), (counts.get(n.toLowerCase()) ?? 0) + 1);
        const repeated = [...counts.values()].some((count) => count > 1);
        // HTTP strips optional whitespace around a field value before anyone sees it.
        const single: Record<string, string> = Object.fromEntries(concrete.map(([n, v]) => [n.toLowerCase(), v.replace(/^[ \t]+|[ \t]+$/g, "")]));
        const carried = repeated ? null : carriedKey(single);
        const known = carried === keyS || carried === keyT;
        expect(answer, JSON.stringify(lines)).toEqual(known ? { status: 200, code: undefined } : { status: 401, code: "UNAUTHENTICATED" });
      }),
      { numRuns: 200 },
    );
  });

  it("the HTTP mode never allows garbage and always answers a status", async () => {
    await fc.assert(
      fc.asyncProperty(fc.uint8Array({ maxLength: 300 }), fc.constantFrom("authorization: Bearer ", "x-api-key: ", "Authorization: bEaReR\t"), async (bytes, prefix) => {
        const head = Buffer.concat([
          Buffer.from(`GET /check/v1/x HTTP/1.1\r\nhost: x\r\nconnection: close\r\n${prefix}`, "latin1"),
          Buffer.from(bytes),
          Buffer.from("\r\n\r\n", "latin1"),
        ]);
        const status = await rawRequest(kg.ports.http, head);
        expect([400, 401, 431]).toContain(status);
      }),
      { numRuns: 200 },
    );
    const huge = Buffer.from(`GET /check HTTP/1.1\r\nhost: x\r\nconnection: close\r\nx-api-key: ${"k".repeat(65_536)}\r\n\r\n`, "latin1");
    expect(await rawRequest(kg.ports.http, huge)).toBe(431);
  });

  /** Every row of every table, for before/after comparisons. */
  function dumpStore(): string {
    const db = new DatabaseSync(join(kg.dataDir, "keygate.db"), { readOnly: true });
    try {
      const tables = db.prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name").all();
      return JSON.stringify(tables.map(({ name }) => [name, db.prepare(`SELECT * FROM "${name}" ORDER BY rowid`).all()]));
    } finally {
      db.close();
    }
  }

  it("admin JSON with operators, prototype keys, huge arrays or deep nesting is INVALID_ARGUMENT and writes nothing", async () => {
    await kg.admin.createKey({ ownerId: "hostile-existing", name: "existing" });
    const deep = `${'{"a":'.repeat(5000)}1${"}".repeat(5000)}`;
    const bodies: Array<[string, string]> = [
      ["CreateKey", '{"ownerId":{"$ne":null},"name":"n"}'],
      ["CreateKey", '{"ownerId":"o","name":{"$gt":""}}'],
      ["CreateKey", '{"ownerId":"o","name":"n","scopes":{"$in":["tutor"]}}'],
      ["CreateKey", '{"ownerId":"o","name":"n","__proto__":{"isAdmin":true}}'],
      ["CreateKey", '{"ownerId":"o","name":"n","constructor":{"prototype":{"isAdmin":true}}}'],
      ["CreateKey", JSON.stringify({ ownerId: "o", name: "n", scopes: Array.from({ length: 5_000 }, () => "tutor") })],
      ["CreateKey", `{"ownerId":"o","name":"n","metadata":${deep}}`],
      ["UpsertAccount", '{"ownerId":"hostile-existing","plan":{"$set":"business"}}'],
      ["RevokeKey", '{"id":{"$regex":".*"}}'],
      ["ListKeys", '{"ownerId":{"$exists":true}}'],
      ["UpdateKey", '{"id":"key_01ARZ3NDEKTSV4RRFFQ69G5FAV","__proto__":{"name":"x"}}'],
    ];
    const before = dumpStore();
    for (const [method, body] of bodies) {
      const res = await postJson(kg.ports.admin, method, body);
      expect(res.status, `${method} ${body.slice(0, 60)}`).toBe(400);
      expect(res.json["code"]).toBe("invalid_argument");
    }
    expect(dumpStore()).toBe(before);
  });

  /** A Connect JSON call from a chosen local address (the whole of 127.0.0.0/8 is loopback). */
  function postFrom(localAddress: string, port: number, method: string, body: unknown, token: string): Promise<number> {
    return new Promise((resolve, reject) => {
      const payload = JSON.stringify(body);
      const req = request(
        {
          host: "127.0.0.1",
          port,
          localAddress,
          method: "POST",
          path: `/keygate.v1.KeyAdmin/${method}`,
          headers: { "content-type": "application/json", authorization: `Bearer ${token}`, "content-length": String(Buffer.byteLength(payload)) },
        },
        (res) => {
          res.resume();
          resolve(res.statusCode ?? 0);
        },
      );
      req.on("error", reject);
      req.end(payload);
    });
  }

  it("rate-limits failed admin authentication per source, then refuses even the right token for a while", async () => {
    const local = await startKeygate();
    try {
      for (let i = 0; i < 10; i++) {
        expect((await postJson(local.ports.admin, "GetAccount", { ownerId: "x" }, `wrong-token-${i}-0123456789abcdef`)).status).toBe(401);
      }
      const blocked = await postJson(local.ports.admin, "GetAccount", { ownerId: "x" }, ADMIN_TOKEN);
      expect(blocked.status).toBe(429);
      expect(blocked.json["code"]).toBe("resource_exhausted");
      expect(String(blocked.json["message"])).toMatch(/^too many failed admin authentications from this address; retry in \d+ s$/);
      // Another source address is not blocked: the limit is per source, not global.
      expect(await postFrom("127.0.0.2", local.ports.admin, "ListKeys", { ownerId: "x" }, ADMIN_TOKEN)).toBe(200);
      expect(await postFrom("127.0.0.1", local.ports.admin, "ListKeys", { ownerId: "x" }, ADMIN_TOKEN)).toBe(429);
    } finally {
      await local.stop();
    }
  });
});

describe("hostile input: gRPC Check bytes that are not UTF-8", () => {
  // Envoy copies a client's header values into the CheckRequest as they came, and HTTP/1.1 lets a
  // client send bytes 0x80-0xFF in a value (obs-text): not UTF-8. A gRPC error for them would be
  // the client's to cause, and Envoy's failure_mode_allow turns an error into an allow.
  let kg: TestKeygate;
  let grpc: GrpcClient;
  let secret = "";
  beforeAll(async () => {
    kg = await startKeygate();
    await kg.admin.upsertAccount({ ownerId: "hostile-latin1", plan: "business" });
    secret = (await kg.admin.createKey({ ownerId: "hostile-latin1", name: "latin1" })).secret;
    grpc = new GrpcClient(`127.0.0.1:${kg.ports.grpc}`, credentials.createInsecure());
  });
  afterAll(async () => {
    grpc.close();
    await kg.stop();
  });

  /** A CheckRequest with `headers`, in which the value of `header` ends in the Latin-1 byte 0xE9 ("é"). */
  function latin1Request(headers: Record<string, string>, header: string): Buffer {
    const marked = { ...headers, [header]: `${headers[header] ?? "caf"}@` };
    const bytes = Buffer.from(toBinary(CheckRequestSchema, create(CheckRequestSchema, { attributes: { request: { http: { id: "latin1", method: "GET", path: "/v1/things", headers: marked } } } })));
    const at = bytes.indexOf(`${marked[header]}`) + (marked[header]?.length ?? 0) - 1;
    expect(bytes[at]).toBe(0x40);
    bytes[at] = 0xe9;
    return bytes;
  }

  /** The Check's status and code, and a denial's message; or the gRPC error's code. */
  function send(bytes: Buffer): Promise<{ status: number; code: string | null; message?: string } | { grpcError: number }> {
    return new Promise((resolve) => {
      grpc.makeUnaryRequest<Buffer, Buffer>(
        "/envoy.service.auth.v3.Authorization/Check",
        (b: Buffer) => b,
        (b: Buffer) => b,
        bytes,
        (error: ServiceError | null, response?: Buffer) => {
          if (error !== null || response === undefined) return resolve({ grpcError: error?.code ?? -1 });
          const answer = fromBinary(CheckResponseSchema, response);
          const outcome = checkOutcome(answer);
          if (answer.httpResponse.case !== "deniedResponse") return resolve(outcome);
          resolve({ ...outcome, message: (JSON.parse(answer.httpResponse.value.body) as { error: { message: string } }).error.message });
        },
      );
    });
  }

  it("in another header, without a key: denied 401, not a gRPC error", async () => {
    expect(await send(latin1Request({}, "x-note"))).toEqual({ status: 401, code: "UNAUTHENTICATED", message: DENIALS.MISSING_CREDENTIAL.message });
  });

  it("in another header, with a valid key: allowed", async () => {
    expect(await send(latin1Request({ "x-api-key": secret }, "x-note"))).toEqual({ status: 200, code: null });
  });

  it("in the credential itself: denied 401 as a malformed key", async () => {
    expect(await send(latin1Request({ "x-api-key": secret }, "x-api-key"))).toEqual({ status: 401, code: "UNAUTHENTICATED", message: DENIALS.MALFORMED_KEY.message });
  });
});
