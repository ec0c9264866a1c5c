import { connect } from "node:net";
import { join } from "node:path";
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
import { Database } from "../../src/store/sqlite-driver.js";
import type { KeySnapshot, KeyStore } from "../../src/store/store.js";
import { ADMIN_TOKEN, postJson, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

const format = new KeyFormat("kg");
const VALID = format.generate("live");

/** A store that knows no key and counts how often it is asked: the decision's only I/O. */
function spyStore(): { store: KeyStore; lookups: () => number } {
  let lookups = 0;
  const refuse = (): Promise<never> => Promise.reject(new Error("not used by the decision"));
  const store: KeyStore = {
    kind: "spy",
    findSnapshotByHash: async (): Promise<KeySnapshot | null> => {
      lookups += 1;
      return null;
    },
    upsertAccount: refuse,
    getAccount: refuse,
    countActiveKeys: refuse,
    createKey: refuse,
    getKey: refuse,
    listKeys: refuse,
    updateKey: refuse,
    revokeKey: refuse,
    rotateKey: refuse,
    getCredits: refuse,
    addCredits: refuse,
    applyUsage: refuse,
    listUsage: refuse,
    appendAudit: refuse,
    listAudit: refuse,
    touchLastUsed: refuse,
    ping: refuse,
    close: async () => undefined,
  };
  return { store, lookups: () => lookups };
}

function pipelineOver(store: KeyStore): DecisionPipeline {
  const logger = pino({ level: "silent" });
  const usage = new UsageRecorder(store, logger, 3_600_000);
  return new DecisionPipeline({
    format,
    hasher: new KeyHasher("p".repeat(32)),
    lookup: new SnapshotLookup({
      local: new MemoryCache({ maxEntries: 1000, ttlSeconds: 30, negativeMaxEntries: 1000, negativeTtlSeconds: 5 }),
      store,
      bus: new LocalInvalidationBus(),
    }),
    routes: new RouteTable([]),
    credentialHeaders: ["authorization", "x-api-key"],
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
  it("never throws, never allows, always answers from the table, and a malformed key costs no store call", async () => {
    const { store, lookups } = spyStore();
    const pipeline = pipelineOver(store);
    await fc.assert(
      fc.asyncProperty(hostileHeaders, fc.string({ maxLength: 100 }), async (headers, path) => {
        const before = lookups();
        let decision: Decision;
        try {
          decision = await pipeline.decide({ method: "GET", path: `/${path}`, headers, contextExtensions: undefined });
        } catch (error) {
          throw new Error(`decide threw: ${String(error)}`);
        }
        expect(decision.allow).toBe(false);
        if (decision.allow) return;
        expect(DENIALS[decision.reason]).toBeDefined();
        if (decision.reason === "MISSING_CREDENTIAL" || decision.reason === "MALFORMED_KEY") expect(lookups()).toBe(before);
      }),
      { numRuns: 1500 },
    );
  });

  it("every one-character change of a valid key is refused as malformed with no store call", async () => {
    const { store, lookups } = spyStore();
    const pipeline = pipelineOver(store);
    const alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    for (let i = 8; i < VALID.length; i++) {
      for (const ch of alphabet) {
        if (VALID[i] === ch) continue;
        const mutated = VALID.slice(0, i) + ch + VALID.slice(i + 1);
        const decision = await pipeline.decide({ method: "GET", path: "/", headers: { "x-api-key": mutated }, contextExtensions: undefined });
        expect(decision.allow ? "ALLOW" : decision.reason).toBe("MALFORMED_KEY");
      }
    }
    expect(lookups()).toBe(0);
  });
});

describe("hostile input: real listeners", () => {
  let kg: TestKeygate;
  beforeAll(async () => {
    kg = await startKeygate();
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
    const db = new Database(join(kg.dataDir, "keygate.db"), { readonly: true });
    try {
      const tables = db.prepare<[], { name: string }>("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name").all();
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
      ["CreateKey", JSON.stringify({ ownerId: "o", name: "n", scopes: Array.from({ length: 100_000 }, () => "tutor") })],
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
    } finally {
      await local.stop();
    }
  });
});
