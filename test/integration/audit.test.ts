import { createHash } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { timestampFromMs, timestampMs } from "@bufbuild/protobuf/wkt";
import { createClient } from "@connectrpc/connect";
import type { Client, Interceptor } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import mongoose from "mongoose";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { stringify } from "yaml";
import { z } from "zod";
import { KeyAdmin } from "../../src/gen/keygate/v1/key_admin_pb.js";
import type { AuditEvent } from "../../src/gen/keygate/v1/key_admin_pb.js";
import { KeyHasher } from "../../src/keys/hasher.js";
import { ADMIN_TOKEN, TEST_POLICY, startKeygate } from "../harness/keygate.js";
import { mongoWireAvailable, startMongoWire } from "../harness/mongo-wire.js";
import { requireServer } from "../harness/ports.js";
import { spawnKeygate } from "../harness/process.js";

// ListAuditEvents and the trail behind it, on both stores: SQLite (keygate in-process) and
// MongoDB (`keygate serve` spawned on the MongoDB-wire server), through the same KeyAdmin client.

const POLICY = { ...TEST_POLICY, plans: { ...TEST_POLICY.plans, basic: { ...TEST_POLICY.plans.basic, monthlyCredits: 10 } } };
const MONGO_PEPPER = "audit-test-pepper-0123456789abcdefghijkl";

/** A keygate on one store, seen through KeyAdmin, with what the security cases look for. */
interface AuditBackend {
  admin: Client<typeof KeyAdmin>;
  pepper: string;
  /** The hash the store itself holds for a key. */
  storedHash(id: string): Promise<string>;
  stop(): Promise<void>;
}

function adminClient(port: number): Client<typeof KeyAdmin> {
  const auth: Interceptor = (next) => (req) => {
    req.header.set("authorization", `Bearer ${ADMIN_TOKEN}`);
    return next(req);
  };
  return createClient(KeyAdmin, createGrpcTransport({ baseUrl: `http://127.0.0.1:${port}`, interceptors: [auth] }));
}

async function startSqlite(): Promise<AuditBackend> {
  const kg = await startKeygate({ policy: POLICY });
  return {
    admin: kg.admin,
    pepper: readFileSync(join(kg.dataDir, "pepper"), "utf8").trim(),
    async storedHash(id) {
      const key = await kg.app.store.getKey(id);
      if (key === null) throw new Error(`${id} is not in the SQLite store`);
      return key.hash;
    },
    stop: () => kg.stop(),
  };
}

const storedKey = z.object({ hash: z.string() });

async function startMongo(): Promise<AuditBackend> {
  const mongo = await startMongoWire();
  const dir = mkdtempSync(join(tmpdir(), "keygate-audit-mongo-"));
  const policy = join(dir, "policy.yaml");
  writeFileSync(policy, stringify(POLICY));
  const started = await spawnKeygate({
    cwd: dir,
    env: {
      KEYGATE_MONGODB_URI: mongo.uri,
      KEYGATE_PEPPER: MONGO_PEPPER,
      KEYGATE_ADMIN_TOKENS: ADMIN_TOKEN,
      KEYGATE_CONFIG: policy,
      KEYGATE_HOST: "127.0.0.1",
      KEYGATE_GRPC_PORT: "0",
      KEYGATE_HTTP_AUTHZ_PORT: "0",
      KEYGATE_ADMIN_PORT: "0",
      // spawnKeygate waits for the info-level "keygate listening" line.
      KEYGATE_LOG_LEVEL: "info",
    },
  }).catch(async (error: unknown) => {
    await mongo.stop();
    throw error;
  });
  // The store's own documents, read past keygate, so the hashes are the ones really kept.
  const client = new mongoose.mongo.MongoClient(mongo.uri, { directConnection: true, serverSelectionTimeoutMS: 5000 });
  await client.connect();
  return {
    admin: adminClient(started.ports.admin),
    pepper: MONGO_PEPPER,
    async storedHash(id) {
      // Keys are stored under their id, not an ObjectId.
      const doc: unknown = await client.db().collection<{ _id: string }>("keys").findOne({ _id: id });
      return storedKey.parse(doc).hash;
    },
    async stop() {
      await client.close();
      await started.stop("SIGTERM");
      await mongo.stop();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

const mongoReady = requireServer("MongoDB-wire server", mongoWireAvailable(), "run .ci/install-mongo-wire.sh");

const BACKENDS = [
  { name: "SQLite (keygate in-process)", ready: true, start: startSqlite },
  { name: "MongoDB (keygate serve on the MongoDB-wire server)", ready: mongoReady, start: startMongo },
];

const tokenId = `tok_${createHash("sha256").update(ADMIN_TOKEN).digest().subarray(0, 4).toString("hex")}`;

/** Every event in the trail, all owners, page by page. */
async function everyEvent(admin: Client<typeof KeyAdmin>): Promise<AuditEvent[]> {
  const events: AuditEvent[] = [];
  let pageToken = "";
  do {
    const page = await admin.listAuditEvents({ pageSize: 100, pageToken });
    events.push(...page.events);
    pageToken = page.nextPageToken;
  } while (pageToken !== "");
  return events;
}

function asText(events: readonly AuditEvent[]): string {
  return JSON.stringify(events, (_k, v: unknown) => (typeof v === "bigint" ? v.toString() : v));
}

for (const { name, ready, start } of BACKENDS) {
  describe.runIf(ready)(`audit trail on ${name}`, { timeout: 60_000 }, () => {
    let backend: AuditBackend;
    beforeAll(async () => {
      backend = await start();
    }, 120_000);
    afterAll(async () => {
      await backend?.stop();
    });

    describe("happy", () => {
      it("records every KeyAdmin change with actor, action, key, owner, changed fields and source", async () => {
        const { admin } = backend;
        const ownerId = "audit-owner";
        await admin.upsertAccount({ ownerId, plan: "business" });
        const created = await admin.createKey({ ownerId, name: "first", scopes: ["tutor"], rateLimit: { limit: 5, windowSeconds: 60 } });
        const id = created.key?.id ?? "";
        await admin.updateKey({ id, name: "renamed", scopes: ["tutor", "decks"] });
        const rotated = await admin.rotateKey({ id, graceDays: 2 });
        await admin.revokeKey({ id: rotated.key?.id ?? "", reason: "leaked" });
        await admin.addCredits({ ownerId, amount: 5n, reason: "order 7" });
        // Reads are not audited.
        await admin.getKey({ id });
        await admin.listKeys({ ownerId });

        const { events, nextPageToken } = await admin.listAuditEvents({ ownerId });
        expect(nextPageToken).toBe("");
        expect(events.map((e) => [e.action, e.keyId])).toEqual([
          ["account.upsert", ""],
          ["key.create", id],
          ["key.update", id],
          ["key.rotate", id],
          // The rotation's new key is issued: its own key.create, naming the key it replaces.
          ["key.create", rotated.key?.id],
          ["key.revoke", rotated.key?.id],
          // The old key was in grace: it follows its successor's revoke.
          ["key.revoke", id],
          ["credits.add", ""],
        ]);
        for (const event of events) {
          expect(event.actor).toBe(tokenId);
          expect(event.ownerId).toBe(ownerId);
          expect(event.source).toMatch(/^(::ffff:)?127\.0\.0\.1$/);
          expect(event.id).toMatch(/^evt_[0-9A-HJKMNP-TV-Z]{26}$/);
        }
        // A new account: the plan it was given and the defaults it took.
        expect(events[0]?.changes).toEqual({ plan: '"business"', subscription_status: '"active"', role: '"standard"' });
        expect(events[1]?.changes).toEqual({
          name: '"first"',
          scopes: '["tutor"]',
          mode: '"live"',
          project_id: "null",
          expires_at: "null",
          rate_limit: '{"limit":5,"windowSeconds":60}',
          metadata: "{}",
        });
        expect(events[2]?.changes).toEqual({ name: '"renamed"', scopes: '["tutor","decks"]' });
        expect(events[3]?.changes["rotated_to_id"]).toBe(JSON.stringify(rotated.key?.id));
        expect(events[3]?.changes["grace_days"]).toBe("2");
        expect(events[4]?.changes).toEqual({
          name: '"renamed"',
          scopes: '["tutor","decks"]',
          mode: '"live"',
          project_id: "null",
          expires_at: "null",
          rate_limit: '{"limit":5,"windowSeconds":60}',
          metadata: "{}",
          rotated_from_id: JSON.stringify(id),
        });
        expect(events[5]?.changes).toEqual({ reason: '"leaked"' });
        expect(events[6]?.changes).toEqual({ reason: '"its successor was revoked"', successor_id: JSON.stringify(rotated.key?.id) });
        expect(events[7]?.changes).toEqual({ amount: "5", reason: '"order 7"' });
      });

      it("a rotation's new key has its key.create under its own id, naming the key it replaces", async () => {
        const { admin } = backend;
        const ownerId = "audit-rotated";
        await admin.upsertAccount({ ownerId, plan: "business" });
        const created = await admin.createKey({ ownerId, name: "k", scopes: ["decks"], metadata: { team: "billing" } });
        const id = created.key?.id ?? "";
        const rotated = await admin.rotateKey({ id, graceDays: 1 });
        const successor = rotated.key?.id ?? "";
        const issued = {
          name: '"k"',
          scopes: '["decks"]',
          mode: '"live"',
          project_id: "null",
          expires_at: "null",
          rate_limit: "null",
          metadata: '{"team":"billing"}',
          rotated_from_id: JSON.stringify(id),
        };
        const bySuccessor = (await admin.listAuditEvents({ keyId: successor })).events;
        expect(bySuccessor.map((e) => [e.action, e.keyId, e.ownerId, e.actor, e.changes])).toEqual([["key.create", successor, ownerId, tokenId, issued]]);
        // The old key's trail is as before: its creation and its rotation.
        expect((await admin.listAuditEvents({ keyId: id })).events.map((e) => e.action)).toEqual(["key.create", "key.rotate"]);

        // A disabled key's successor is issued disabled (from its issue on), and its record says so.
        await admin.disableKey({ id: successor, reason: "card declined" });
        const paused = await admin.rotateKey({ id: successor, graceDays: 1 });
        const third = (await admin.listAuditEvents({ keyId: paused.key?.id ?? "" })).events;
        const disabledAt = paused.key?.disabledAt;
        if (disabledAt === undefined) throw new Error("the successor of a disabled key is not disabled");
        expect(third.map((e) => [e.action, e.changes["rotated_from_id"], e.changes["disabled_at"]])).toEqual([
          ["key.create", JSON.stringify(successor), JSON.stringify(new Date(timestampMs(disabledAt)).toISOString())],
        ]);
      });

      it("filters by key and time, and pages", async () => {
        const { admin } = backend;
        const ownerId = "audit-pages";
        const created = await admin.createKey({ ownerId, name: "k" });
        const id = created.key?.id ?? "";
        for (let i = 0; i < 4; i++) await admin.updateKey({ id, name: `n${i}` });
        const byKey = await admin.listAuditEvents({ keyId: id });
        expect(byKey.events.map((e) => e.action)).toEqual(["key.create", "key.update", "key.update", "key.update", "key.update"]);
        expect(byKey.events.map((e) => e.changes["name"])).toEqual(['"k"', '"n0"', '"n1"', '"n2"', '"n3"']);
        const first = await admin.listAuditEvents({ keyId: id, pageSize: 2 });
        const second = await admin.listAuditEvents({ keyId: id, pageSize: 2, pageToken: first.nextPageToken });
        const third = await admin.listAuditEvents({ keyId: id, pageSize: 2, pageToken: second.nextPageToken });
        expect([first.events.length, second.events.length, third.events.length]).toEqual([2, 2, 1]);
        expect([...first.events, ...second.events, ...third.events].map((e) => e.id)).toEqual(byKey.events.map((e) => e.id));
        expect(third.nextPageToken).toBe("");
        // The owner filter holds the account's key events too, after the account CreateKey made.
        const byOwner = (await admin.listAuditEvents({ ownerId })).events;
        expect(byOwner.map((e) => e.action)).toEqual(["account.upsert", ...byKey.events.map((e) => e.action)]);
        expect(byOwner.slice(1).map((e) => e.id)).toEqual(byKey.events.map((e) => e.id));
        const sinceLast = await admin.listAuditEvents({ keyId: id, since: byKey.events.at(-1)?.time });
        expect(sinceLast.events.map((e) => e.id)).toContain(byKey.events.at(-1)?.id);
        const future = await admin.listAuditEvents({ keyId: id, since: timestampFromMs(Date.now() + 60_000) });
        expect(future.events).toEqual([]);
      });

      it("a call that changes nothing appends nothing: revoking again, disabling again, enabling an enabled key, the same name or plan", async () => {
        const { admin } = backend;
        const ownerId = "audit-unchanged";
        await admin.upsertAccount({ ownerId, plan: "business" });
        await admin.upsertAccount({ ownerId, plan: "business" });
        const revoked = await admin.createKey({ ownerId, name: "revoked" });
        const revokedId = revoked.key?.id ?? "";
        await admin.revokeKey({ id: revokedId, reason: "leaked" });
        const again = await admin.revokeKey({ id: revokedId, reason: "routine cleanup" });
        // The answer is the key as it is: revoked for the first reason.
        expect([again.key?.state, again.key?.revokeReason]).toEqual(["revoked", "leaked"]);
        const paused = await admin.createKey({ ownerId, name: "paused" });
        const pausedId = paused.key?.id ?? "";
        await admin.enableKey({ id: pausedId });
        await admin.disableKey({ id: pausedId, reason: "card declined" });
        await admin.disableKey({ id: pausedId, reason: "second notice" });
        await admin.enableKey({ id: pausedId });
        await admin.enableKey({ id: pausedId });
        await admin.updateKey({ id: pausedId, name: "paused" });

        const { events } = await admin.listAuditEvents({ ownerId, pageSize: 100 });
        expect(events.map((e) => [e.action, e.keyId, e.changes["reason"] ?? e.changes["plan"]])).toEqual([
          ["account.upsert", "", '"business"'],
          ["key.create", revokedId, undefined],
          ["key.revoke", revokedId, '"leaked"'],
          ["key.create", pausedId, undefined],
          ["key.disable", pausedId, '"card declined"'],
          ["key.enable", pausedId, undefined],
        ]);
      });
    });

    describe("error", () => {
      it("refuses a malformed key id or page token", async () => {
        const { admin } = backend;
        await expect(admin.listAuditEvents({ keyId: "nope" })).rejects.toThrow(/key_id: must be a key id/);
        await expect(admin.listAuditEvents({ pageToken: "garbage" })).rejects.toThrow(/page_token/);
      });

      it("a refused change is not audited", async () => {
        const { admin } = backend;
        const before = (await admin.listAuditEvents({ ownerId: "audit-refused" })).events.length;
        await expect(admin.createKey({ ownerId: "audit-refused", name: "" })).rejects.toThrow(/name/);
        expect((await admin.listAuditEvents({ ownerId: "audit-refused" })).events.length).toBe(before);
      });
    });

    describe("security", () => {
      it("no event holds a secret, a key hash, the pepper or the admin token", async () => {
        const { admin } = backend;
        const ownerId = "audit-secrets";
        await admin.upsertAccount({ ownerId, plan: "business" });
        const first = await admin.createKey({ ownerId, name: "s1", scopes: ["tutor"], metadata: { team: "billing" } });
        const second = await admin.createKey({ ownerId, name: "s2", mode: "test" });
        const firstId = first.key?.id ?? "";
        const graced = await admin.rotateKey({ id: firstId, graceDays: 3 });
        const immediate = await admin.rotateKey({ id: second.key?.id ?? "", graceDays: 0 });
        await admin.updateKey({ id: graced.key?.id ?? "", name: "s1-rotated", scopes: ["tutor", "decks"] });
        await admin.revokeKey({ id: graced.key?.id ?? "", reason: "test" });
        expect((await admin.verifyKey({ secret: immediate.secret })).valid).toBe(true);
        await admin.addCredits({ ownerId, amount: 7n, reason: "order 9" });

        const issued = [first, second, graced, immediate].map((answer) => ({ id: answer.key?.id ?? "", secret: answer.secret }));
        const hasher = new KeyHasher(backend.pepper);
        const hashes: string[] = [];
        for (const { id, secret } of issued) {
          expect(secret).toMatch(/^kg_(live|test)_/);
          const hash = await backend.storedHash(id);
          // The hash looked for is the one kept, so the search below could find it.
          expect(hash).toBe(hasher.hash(secret));
          hashes.push(hash);
        }

        const events = await everyEvent(admin);
        expect(events.filter((e) => e.ownerId === ownerId).map((e) => e.action)).toEqual([
          "account.upsert",
          "key.create",
          "key.create",
          "key.rotate",
          "key.create",
          "key.rotate",
          "key.create",
          "key.update",
          "key.update",
          "key.revoke",
          "key.revoke",
          "credits.add",
        ]);
        const trail = asText(events);
        // The trail does name the keys, by id: the searches below look in the right text.
        for (const { id } of issued) expect(trail).toContain(id);
        for (const { secret } of issued) {
          expect(trail).not.toContain(secret);
          // Nor a recognisable part: what a key preview (start…last4) does not already show.
          expect(trail).not.toContain(secret.slice(12, -4));
        }
        for (const hash of hashes) {
          expect(trail).not.toContain(hash);
          expect(trail).not.toContain(hash.slice(0, 16));
        }
        expect(trail).not.toContain(backend.pepper);
        expect(trail).not.toContain(ADMIN_TOKEN);
      });
    });
  });
}
