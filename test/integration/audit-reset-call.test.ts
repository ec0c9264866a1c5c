import { connect } from "node:net";
import { newEventId } from "../../src/keys/ids.js";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ADMIN_TOKEN, postJson, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { mongoWireAvailable, startMongoWire } from "../harness/mongo-wire.js";
import type { MongoWire } from "../harness/mongo-wire.js";
import { untilValue } from "../harness/poll.js";
import { requireServer } from "../harness/ports.js";

// A KeyAdmin call whose client reset the TCP connection right after sending it (SO_LINGER 0, or
// any client killed mid-call) is still run: the change is made, so its audit record must be
// written on either store. Node cannot read the peer's address of a socket reset before it was
// first asked for it (getpeername: ENOTCONN), so such a call's source may be "": MongoDB's audit
// schema refused "" (mongoose's `required` on a string), and every record of the call was lost
// (only logged): a key issued, credits added, a plan changed with nothing in the trail, by any
// token holder who resets after each call. keygate now reads the address as it accepts the
// connection, and either store takes "" when even that was too late.

const mongoReady = requireServer("MongoDB-wire server", mongoWireAvailable(), "run .ci/install-mongo-wire.sh");

/** Sends one KeyAdmin JSON call over HTTP/1.1 and resets the connection (RST) at once, without reading the answer. */
async function callAndReset(port: number, method: string, body: unknown): Promise<void> {
  const json = JSON.stringify(body);
  const request =
    `POST /keygate.v1.KeyAdmin/${method} HTTP/1.1\r\nhost: keygate\r\ncontent-type: application/json\r\n` +
    `authorization: Bearer ${ADMIN_TOKEN}\r\ncontent-length: ${Buffer.byteLength(json)}\r\n\r\n${json}`;
  await new Promise<void>((resolve, reject) => {
    const socket = connect(port, "127.0.0.1", () => socket.write(request, () => {
      socket.resetAndDestroy();
      resolve();
    }));
    socket.once("error", reject);
  });
}

async function trail(kg: TestKeygate, ownerId: string): Promise<string[]> {
  const answer = await postJson(kg.ports.admin, "ListAuditEvents", { ownerId });
  expect(answer.status).toBe(200);
  return ((answer.json["events"] as Array<{ action: string }> | undefined) ?? []).map((event) => event.action);
}

const failedAppends = (kg: TestKeygate): number => kg.logLines.filter((line) => line.includes("audit append failed")).length;

/** Waits until `expected` records of the owner are in the trail, or that many appends failed; returns the trail. */
async function settledTrail(kg: TestKeygate, ownerId: string, expected: number): Promise<{ actions: string[]; failed: number }> {
  const failedBefore = failedAppends(kg);
  const { value } = await untilValue(
    async () => ({ actions: await trail(kg, ownerId), failed: failedAppends(kg) - failedBefore }),
    (v) => v.actions.length + v.failed >= expected,
    10_000,
    `${expected} audit records of ${ownerId} appended or failed`,
    { intervalMs: 20, detail: (v) => JSON.stringify(v) },
  );
  return value;
}

describe.runIf(mongoReady)("a KeyAdmin call whose client reset the connection is audited on either store", { timeout: 120_000 }, () => {
  let mongo: MongoWire | undefined;
  const stores: Record<string, TestKeygate> = {};
  beforeAll(async () => {
    mongo = await startMongoWire();
    stores["sqlite"] = await startKeygate();
    stores["mongodb"] = await startKeygate({ env: { KEYGATE_MONGODB_URI: mongo.uri, KEYGATE_PEPPER: "audit-reset-source-pepper-0123456789abcdef" } });
  }, 120_000);
  afterAll(async () => {
    for (const kg of Object.values(stores)) await kg.stop();
    await mongo?.stop();
  });

  it.each([["sqlite"], ["mongodb"]])("%s: CreateKey from a client that reset the connection: the key and its account are in the trail", async (store) => {
    const kg = stores[store]!;
    const ownerId = `reset-create-${store}`;
    await callAndReset(kg.ports.admin, "CreateKey", { ownerId, name: "reset" });
    const settled = await settledTrail(kg, ownerId, 2);
    const keys = await postJson(kg.ports.admin, "ListKeys", { ownerId });
    expect((keys.json["keys"] as unknown[]).length).toBe(1);
    expect(settled).toEqual({ actions: ["account.upsert", "key.create"], failed: 0 });
  });

  it.each([["sqlite"], ["mongodb"]])("%s: AddCredits from a client that reset the connection: the credits added are in the trail", async (store) => {
    const kg = stores[store]!;
    const ownerId = `reset-credits-${store}`;
    expect((await postJson(kg.ports.admin, "UpsertAccount", { ownerId, plan: "pro" })).status).toBe(200);
    await callAndReset(kg.ports.admin, "AddCredits", { ownerId, amount: 1000, reason: "reset" });
    const settled = await settledTrail(kg, ownerId, 2);
    const account = await postJson(kg.ports.admin, "GetAccount", { ownerId });
    expect((account.json["account"] as { topupCredits?: string }).topupCredits).toBe("1000");
    expect(settled).toEqual({ actions: ["account.upsert", "credits.add"], failed: 0 });
  });

  it.each([["sqlite"], ["mongodb"]])("%s: an audit record whose source is \"\" (a peer reset before keygate read it) is kept", async (store) => {
    const kg = stores[store]!;
    const ownerId = `reset-empty-source-${store}`;
    const atMs = Date.now();
    await kg.app.store.appendAudit({ id: newEventId(atMs), atMs, actor: "admin", action: "credits.add", keyId: null, ownerId, changes: { amount: 1 }, source: "" });
    const answer = await postJson(kg.ports.admin, "ListAuditEvents", { ownerId });
    const events = (answer.json["events"] as Array<{ action: string; source?: string }> | undefined) ?? [];
    expect(events.map((event) => [event.action, event.source ?? ""])).toEqual([["credits.add", ""]]);
  });
});
