import { Code } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { KeyFormat } from "../../src/keys/key-format.js";
import { ADMIN_TOKEN, adminRefusal, checkInit, checkOutcome, postJson, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

// README "Audit trail": "Records never hold a secret or a hash." The free text of a change (a
// DisableKey or RevokeKey reason, a top-up reason, a key's name or metadata) is recorded as sent,
// and the trail is read by every audit:read token and exporter. An operator (or a secret-scanning
// hook) that pastes the key it acts on, or an admin token, would put it there, and a disabled key
// comes back with EnableKey: the secret in its key.disable record would work again. KeyAdmin
// refuses such text, naming the field, never quoting the value, and writes nothing.

const NO_SECRET = "must not contain an API key, an admin token or another credential (it would be kept in the audit trail); name a key by its id or start…last4";

let kg: TestKeygate;
beforeAll(async () => {
  kg = await startKeygate();
});
afterAll(async () => kg?.stop());

/** A key of a new owner on the business plan (five keys), and its secret. */
async function newKey(ownerId: string, name = "k"): Promise<{ id: string; secret: string }> {
  await postJson(kg.ports.admin, "UpsertAccount", { ownerId, plan: "business" });
  const created = await postJson(kg.ports.admin, "CreateKey", { ownerId, name });
  expect(created.status).toBe(200);
  return { id: String((created.json["key"] as Record<string, unknown>)["id"]), secret: String(created.json["secret"]) };
}

/** Everything KeyAdmin shows of an owner and one of its keys: what a refused call must leave as it was. */
async function stateOf(ownerId: string, keyId: string): Promise<unknown> {
  return {
    key: (await postJson(kg.ports.admin, "GetKey", { id: keyId })).json,
    keys: (await postJson(kg.ports.admin, "ListKeys", { ownerId, includeRevoked: true })).json,
    account: (await postJson(kg.ports.admin, "GetAccount", { ownerId })).json,
    audit: (await postJson(kg.ports.admin, "ListAuditEvents", { ownerId, pageSize: 100 })).json,
  };
}

/** A refusal as the tests compare it: HTTP status, Connect code and message. */
async function answerOf(method: string, body: Record<string, unknown>): Promise<{ status: number; code: unknown; message: unknown }> {
  const answer = await postJson(kg.ports.admin, method, body);
  return { status: answer.status, code: answer.json["code"], message: answer.json["message"] };
}

async function trailText(ownerId: string): Promise<string> {
  const { events } = await kg.admin.listAuditEvents({ ownerId, pageSize: 100 });
  return JSON.stringify(events.map((e) => e.changes));
}

describe("audit security: a credential in free text is refused, and never reaches the trail", () => {
  it("DisableKey with the key in its reason: INVALID_ARGUMENT naming reason, the key stays enabled, and after EnableKey the trail still lacks it", async () => {
    const ownerId = "audit-secret-reason";
    const { id, secret } = await newKey(ownerId, "prod");
    const before = await stateOf(ownerId, id);
    const refusal = await adminRefusal(kg.admin.disableKey({ id, reason: `found in a public gist: ${secret}` }));
    expect(refusal).toEqual({ code: Code.InvalidArgument, message: `reason: ${NO_SECRET}` });
    expect(await stateOf(ownerId, id)).toEqual(before);
    // The operator's way: name the key by its start and last4; that is kept as sent.
    const start = secret.slice(0, "kg_live_".length + 4);
    const reason = `found in a public gist: ${start}…${secret.slice(-4)}`;
    await kg.admin.disableKey({ id, reason });
    await kg.admin.enableKey({ id });
    expect(checkOutcome(await kg.check(checkInit({ "x-api-key": secret }, "/v1/x"))).code).toBe(null);
    const trail = await trailText(ownerId);
    expect({ secret: trail.includes(secret), body: trail.includes(secret.slice(start.length, -4)), reason: trail.includes(JSON.stringify(JSON.stringify(reason)).slice(1, -1)) }).toEqual({ secret: false, body: false, reason: true });
  });

  it("every free-text field, each credential shape: 400 invalid_argument naming the field, no secret in the message, nothing written", async () => {
    const ownerId = "audit-secret-fields";
    const { id, secret } = await newKey(ownerId);
    const otherPrefix = new KeyFormat("acme").generate("test");
    const credentials: ReadonlyArray<readonly [string, string]> = [
      ["the owner's key", secret],
      ["the key percent-encoded", secret.replaceAll("_", "%5F")],
      ["the key glued to the word before it", `leaked${secret}`],
      ["a key under another prefix", otherPrefix],
      ["the admin token", ADMIN_TOKEN],
      ["a Bearer credential", "Authorization: Bearer ops-token-0123456789abcdef"],
    ];
    const before = await stateOf(ownerId, id);
    const seen = [];
    for (const [label, credential] of credentials) {
      const text = `see ${credential} (pasted)`;
      for (const [method, field, body] of [
        ["DisableKey", "reason", { id, reason: text }],
        ["AddCredits", "reason", { ownerId, amount: "5", reason: text }],
        ["AddCredits", "reason", { ownerId, amount: "5", reason: text, idempotencyKey: `order-${label.length}` }],
        ["CreateKey", "name", { ownerId, name: text }],
        ["UpdateKey", "name", { id, name: text }],
        ["CreateKey", "metadata.note", { ownerId, name: "meta", metadata: { note: text } }],
        // RevokeKey last: were it let through, the key would be revoked and the calls above refused for that.
        ["RevokeKey", "reason", { id, reason: text }],
      ] as const) {
        seen.push({ label, method, field, ...(await answerOf(method, body)) });
      }
    }
    expect(seen).toEqual(
      credentials.flatMap(([label]) =>
        (
          [
            ["DisableKey", "reason"],
            ["AddCredits", "reason"],
            ["AddCredits", "reason"],
            ["CreateKey", "name"],
            ["UpdateKey", "name"],
            ["CreateKey", "metadata.note"],
            ["RevokeKey", "reason"],
          ] as const
        ).map(([method, field]) => ({ label, method, field, status: 400, code: "invalid_argument", message: `${field}: ${NO_SECRET}` })),
      ),
    );
    expect(await stateOf(ownerId, id)).toEqual(before);
    const trail = await trailText(ownerId);
    expect(credentials.filter(([, credential]) => trail.includes(credential)).map(([label]) => label)).toEqual([]);
  });

  it("a metadata key that is a credential: refused as metadata.[redacted], the key never quoted", async () => {
    const ownerId = "audit-secret-metadata-key";
    const { secret } = await newKey(ownerId);
    const answers = [];
    for (const key of [secret, ADMIN_TOKEN]) answers.push(await answerOf("CreateKey", { ownerId, name: "meta", metadata: { [key]: "v" } }));
    expect(answers).toEqual([secret, ADMIN_TOKEN].map(() => ({ status: 400, code: "invalid_argument", message: `metadata.[redacted]: ${NO_SECRET}` })));
    const keys = (await postJson(kg.ports.admin, "ListKeys", { ownerId })).json["keys"] as unknown[];
    expect(keys).toHaveLength(1);
    expect((await trailText(ownerId)).includes(secret)).toBe(false);
  });

  it("CreateKey for an unknown owner with a key in its name creates neither the key nor the account", async () => {
    const ownerId = "audit-secret-new-owner";
    const leaked = new KeyFormat("kg").generate("live");
    expect(await answerOf("CreateKey", { ownerId, name: `copy of ${leaked}` })).toEqual({ status: 400, code: "invalid_argument", message: `name: ${NO_SECRET}` });
    expect((await postJson(kg.ports.admin, "GetAccount", { ownerId })).status).toBe(404);
  });

  it("AddCredits with a key as its idempotency_key (kept in the trail): 400 naming idempotency_key, nothing added or recorded", async () => {
    const ownerId = "audit-secret-idempotency-key";
    const { id, secret } = await newKey(ownerId);
    const before = await stateOf(ownerId, id);
    const answers = [];
    for (const idempotencyKey of [secret, `order-${secret}`, ADMIN_TOKEN]) answers.push(await answerOf("AddCredits", { ownerId, amount: "5", reason: "order", idempotencyKey }));
    expect(answers).toEqual([1, 2, 3].map(() => ({ status: 400, code: "invalid_argument", message: `idempotency_key: ${NO_SECRET}` })));
    expect(await stateOf(ownerId, id)).toEqual(before);
    // The same key is refused again, not answered as a replay of a top-up never made.
    expect(await adminRefusal(kg.admin.addCredits({ ownerId, amount: 5n, reason: "order", idempotencyKey: secret }))).toEqual({ code: Code.InvalidArgument, message: `idempotency_key: ${NO_SECRET}` });
  });

  it("UpsertAccount and CreateKey with a key as owner_id or project_id: 400 naming the field, no account or key made", async () => {
    const leaked = new KeyFormat("kg").generate("live");
    expect(await answerOf("UpsertAccount", { ownerId: leaked, plan: "business" })).toEqual({ status: 400, code: "invalid_argument", message: `owner_id: ${NO_SECRET}` });
    expect(await answerOf("CreateKey", { ownerId: leaked, name: "k" })).toEqual({ status: 400, code: "invalid_argument", message: `owner_id: ${NO_SECRET}` });
    expect(await answerOf("CreateKey", { ownerId: "audit-secret-project", projectId: `proj-${leaked}`, name: "k" })).toEqual({
      status: 400,
      code: "invalid_argument",
      message: `project_id: ${NO_SECRET}`,
    });
    expect((await postJson(kg.ports.admin, "GetAccount", { ownerId: leaked })).status).toBe(404);
    expect((await postJson(kg.ports.admin, "GetAccount", { ownerId: "audit-secret-project" })).status).toBe(404);
    expect((await trailText(leaked)) + (await trailText("audit-secret-project"))).toBe("[][]");
  });

  it("happy: an account whose owner_id holds a key (written by a release before the check) still reads", async () => {
    const leaked = new KeyFormat("kg").generate("live");
    await kg.app.store.upsertAccount({ ownerId: leaked, plan: "business" }, { plan: "basic", subscriptionStatus: "active", role: "standard" }, Date.now());
    const read = await postJson(kg.ports.admin, "GetAccount", { ownerId: leaked });
    expect([read.status, (read.json["account"] as Record<string, unknown>)["plan"]]).toEqual([200, "business"]);
    expect((await postJson(kg.ports.admin, "ListKeys", { ownerId: leaked })).status).toBe(200);
  });

  it("happy: text that names credentials without holding one is kept as sent", async () => {
    const ownerId = "audit-secret-happy";
    const { id, secret } = await newKey(ownerId);
    const start = secret.slice(0, "kg_live_".length + 4);
    const texts = {
      reason: `rotated: ${start}…${secret.slice(-4)} leaked; kg_live_ prefix kept`,
      credits: "kgadm_ tokens rotated; Bearer auth moved to mTLS",
      name: "ci_test_runner01 (kg_test_ keys)",
      digest: `sha256:${"0123456789abcdef".repeat(4)}`,
    };
    const answers = [
      await postJson(kg.ports.admin, "CreateKey", { ownerId, name: texts.name, metadata: { image: texts.digest } }),
      await postJson(kg.ports.admin, "AddCredits", { ownerId, amount: "5", reason: texts.credits }),
      await postJson(kg.ports.admin, "DisableKey", { id, reason: texts.reason }),
    ];
    expect(answers.map((answer) => answer.status)).toEqual([200, 200, 200]);
    const trail = await trailText(ownerId);
    expect(Object.values(texts).filter((text) => !trail.includes(JSON.stringify(JSON.stringify(text)).slice(1, -1)))).toEqual([]);
  });
});
