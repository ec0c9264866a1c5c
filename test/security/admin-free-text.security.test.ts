import { execFile } from "node:child_process";
import { resolve } from "node:path";
import { create } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { serverFailure } from "../../src/cli/errors.js";
import { keyDetails, keyTable } from "../../src/cli/views.js";
import { ApiKeySchema } from "../../src/gen/keygate/v1/key_admin_pb.js";
import { builtCli } from "../harness/built-cli.js";
import { ADMIN_TOKEN, postJson, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

// A key's name and the reason of a revoke, a disable or a top-up are printed to operators as they
// were sent (`keygate keys get`, a terminal, a log viewer). A control character (newline, ESC,
// NUL), a format character (bidi override, zero-width space) or a line or paragraph separator
// there forges a line, runs a terminal escape or hides text. KeyAdmin refuses them, naming the
// field, and writes nothing; the CLI prints any that a store already holds (written by a release
// that let them in) as escapes.

const NOT_PLAIN = "must not contain control or format characters (such as a newline, ESC or a bidi override)";

/** Free text that must never reach an operator as it is, by what it would do there. */
const FORGERIES: ReadonlyArray<readonly [string, string]> = [
  ["a newline forging a line", "leaked\nstate:       active"],
  ["a carriage return", "paid\roverdue"],
  ["ESC (a terminal escape)", "note\u001b[8mhidden"],
  ["NUL", "a\u0000b"],
  ["an OSC-8 hyperlink", "\u001b]8;;https://evil.example\u0007click\u001b]8;;\u0007"],
  ["DEL", "a\u007fb"],
  ["a C1 control (CSI)", "a\u009b31mb"],
  ["a right-to-left override", "\u202eyek-dorp"],
  ["a bidi isolate", "ci\u2066x\u2069"],
  ["a zero-width space", "a\u200bb"],
  ["a byte order mark", "a\ufeffb"],
  ["a line separator", "prod\u2028state: revoked"],
  ["a paragraph separator", "a\u2029b"],
];

/** A revoke reason as a release before the check stored it: a forged state line, then a terminal escape. */
const STORED_REASON = "leaked\nstate:       active\u001b[8m";
/** A name as a release before the check stored it: a right-to-left override, then a screen clear. */
const STORED_NAME = "ops\u202eyek-dorp\u001b[2J";

let kg: TestKeygate;
beforeAll(async () => {
  kg = await startKeygate();
});
afterAll(async () => {
  await kg.stop();
});

/** A key of a new owner on the business plan (five keys), so the plan's cap never refuses a call here. */
async function newKey(ownerId: string, name = "k"): Promise<string> {
  await postJson(kg.ports.admin, "UpsertAccount", { ownerId, plan: "business" });
  const created = await postJson(kg.ports.admin, "CreateKey", { ownerId, name });
  expect(created.status).toBe(200);
  return String((created.json["key"] as Record<string, unknown>)["id"]);
}

/** Everything KeyAdmin shows of an owner and one of its keys: what a refused call must leave as it was. */
async function stateOf(ownerId: string, keyId: string): Promise<unknown> {
  return {
    key: (await postJson(kg.ports.admin, "GetKey", { id: keyId })).json,
    account: (await postJson(kg.ports.admin, "GetAccount", { ownerId })).json,
    audit: (await postJson(kg.ports.admin, "ListAuditEvents", { ownerId, pageSize: 100 })).json,
  };
}

/** A refusal as the tests compare it: HTTP status, Connect code and message. */
async function answerOf(method: string, body: Record<string, unknown>): Promise<{ status: number; code: unknown; message: unknown }> {
  const answer = await postJson(kg.ports.admin, method, body);
  return { status: answer.status, code: answer.json["code"], message: answer.json["message"] };
}

describe("admin free text security: KeyAdmin refuses control and format characters", () => {
  it("RevokeKey, DisableKey and AddCredits: 400 invalid_argument naming reason, for each, and nothing written", async () => {
    const ownerId = "free-text-reasons";
    const id = await newKey(ownerId);
    const before = await stateOf(ownerId, id);
    const seen = [];
    for (const [label, reason] of FORGERIES) {
      // RevokeKey last: were it let through, the key would be revoked and DisableKey refused for that.
      for (const [method, body] of [
        ["DisableKey", { id, reason }],
        ["AddCredits", { ownerId, amount: "5", reason }],
        ["RevokeKey", { id, reason }],
      ] as const) {
        seen.push({ label, method, ...(await answerOf(method, body)) });
      }
    }
    const refused = { status: 400, code: "invalid_argument", message: `reason: ${NOT_PLAIN}` };
    expect(seen).toEqual(FORGERIES.flatMap(([label]) => ["DisableKey", "AddCredits", "RevokeKey"].map((method) => ({ label, method, ...refused }))));
    expect(await stateOf(ownerId, id)).toEqual(before);
  });

  it("CreateKey and UpdateKey: 400 invalid_argument naming name, for each, and nothing written", async () => {
    const ownerId = "free-text-names";
    const id = await newKey(ownerId);
    const before = await stateOf(ownerId, id);
    const seen = [];
    for (const [label, name] of FORGERIES) {
      seen.push({ label, method: "CreateKey", ...(await answerOf("CreateKey", { ownerId, name })) });
      seen.push({ label, method: "UpdateKey", ...(await answerOf("UpdateKey", { id, name })) });
    }
    const refused = { status: 400, code: "invalid_argument", message: `name: ${NOT_PLAIN}` };
    expect(seen).toEqual(FORGERIES.flatMap(([label]) => ["CreateKey", "UpdateKey"].map((method) => ({ label, method, ...refused }))));
    expect(await stateOf(ownerId, id)).toEqual(before);
    const keys = (await postJson(kg.ports.admin, "ListKeys", { ownerId, includeRevoked: true })).json["keys"] as unknown[];
    expect(keys).toHaveLength(1);
  });

  it("CreateKey for an unknown owner with such a name creates neither the key nor the account", async () => {
    const ownerId = "free-text-new-owner";
    expect(await answerOf("CreateKey", { ownerId, name: "\u202eyek-dorp" })).toEqual({ status: 400, code: "invalid_argument", message: `name: ${NOT_PLAIN}` });
    expect((await postJson(kg.ports.admin, "GetAccount", { ownerId })).status).toBe(404);
  });

  it("a reason over 200 characters is still refused for its length", async () => {
    const id = await newKey("free-text-long");
    expect(await answerOf("RevokeKey", { id, reason: "x".repeat(201) })).toEqual({ status: 400, code: "invalid_argument", message: "reason: must be at most 200 characters" });
  });

  it("happy: names and reasons in any script, with accents, symbols, emoji and spaces, are kept as sent", async () => {
    const ownerId = "free-text-happy";
    // Joiners and tag characters are format characters that writing needs: a family emoji (ZWJ),
    // Persian with a zero-width non-joiner, the flag of Scotland (tag characters).
    const name = "Clé de prod — 東京 🔑 👨\u200D👩\u200D👧 می\u200Cخواهم 🏴\u{E0067}\u{E0062}\u{E0073}\u{E0063}\u{E0074}\u{E007F} (v2)";
    const reason = "commande n° 1234 — remboursée ✓ 顧客の依頼";
    const revoked = await newKey(ownerId, name);
    const disabled = await newKey(ownerId, "other");
    const answers = {
      revoke: await postJson(kg.ports.admin, "RevokeKey", { id: revoked, reason }),
      disable: await postJson(kg.ports.admin, "DisableKey", { id: disabled, reason }),
      credits: await postJson(kg.ports.admin, "AddCredits", { ownerId, amount: "5", reason }),
      rename: await postJson(kg.ports.admin, "UpdateKey", { id: disabled, name: `${name} ✓` }),
    };
    expect(Object.values(answers).map((answer) => answer.status)).toEqual([200, 200, 200, 200]);
    const key = answers.revoke.json["key"] as Record<string, unknown>;
    expect({ name: key["name"], revokeReason: key["revokeReason"] }).toEqual({ name, revokeReason: reason });
    const events = (await postJson(kg.ports.admin, "ListAuditEvents", { ownerId, pageSize: 100 })).json["events"] as Array<{ action: string; changes: Record<string, string> }>;
    const reasons = events.filter((event) => event.changes["reason"] !== undefined).map((event) => [event.action, JSON.parse(event.changes["reason"] ?? "null")]);
    expect(reasons).toEqual([
      ["key.revoke", reason],
      ["key.disable", reason],
      ["credits.add", reason],
    ]);
  });
});

describe("admin free text security: the CLI prints control and format characters as escapes", () => {
  const stored = create(ApiKeySchema, {
    id: "key_01K0000000000000000000000A",
    ownerId: "older-release",
    name: STORED_NAME,
    mode: "live",
    state: "revoked",
    start: "kg_live_abcd",
    last4: "wxyz",
    scopes: ["tutor"],
    createdAt: timestampFromMs(Date.UTC(2026, 0, 1)),
    revokedAt: timestampFromMs(Date.UTC(2026, 0, 2)),
    revokeReason: STORED_REASON,
  });

  it("keyDetails: one line per field, the name and reason escaped, no ESC or bidi override", () => {
    const text = keyDetails(stored);
    const lines = text.split("\n");
    expect({
      stateLines: lines.filter((line) => line.startsWith("state:")),
      name: lines.find((line) => line.startsWith("name:")),
      reason: lines.find((line) => line.startsWith("reason:")),
      raw: /[\p{Cc}\p{Cf}\p{Zl}\p{Zp}]/u.test(text.replaceAll("\n", "")),
    }).toEqual({
      stateLines: ["state:       revoked"],
      name: "name:        ops\\u{202e}yek-dorp\\u{1b}[2J",
      reason: "reason:      leaked\\nstate:       active\\u{1b}[8m",
      raw: false,
    });
  });

  it("keyTable: one row per key, the name escaped and the columns still aligned", () => {
    const lines = keyTable([stored]).split("\n");
    expect(lines).toHaveLength(3);
    expect(lines[1]).toContain("ops\\u{202e}yek-dorp\\u{1b}[2J  live");
    expect(/[\p{Cc}\p{Cf}\p{Zl}\p{Zp}]/u.test(lines.join(""))).toBe(false);
  });

  it("an error that quotes a refused value back prints it escaped, on one line", () => {
    const failure = serverFailure(new ConnectError('plan: must be one of basic, pro; got "x\u001b[2J\u202ey"', Code.InvalidArgument), "http://127.0.0.1:1");
    expect(failure.message).toBe('invalid_argument: plan: must be one of basic, pro; got "x\\u{1b}[2J\\u{202e}y"; fix that value; --help lists the options');
  });

  it("`keygate keys get` of a key whose name and revoke reason a release before the check stored prints them escaped", async () => {
    const id = await newKey("free-text-stored");
    // Written past KeyAdmin, as the store holds them from a release that did not check them.
    await kg.app.store.updateKey(id, { name: STORED_NAME });
    await kg.app.store.revokeKey(id, kg.clock.now(), STORED_REASON);
    const env: NodeJS.ProcessEnv = {};
    for (const [name, value] of Object.entries(process.env)) if (!name.startsWith("KEYGATE_")) env[name] = value;
    Object.assign(env, { KEYGATE_URL: `http://127.0.0.1:${kg.ports.admin}`, KEYGATE_ADMIN_TOKEN: ADMIN_TOKEN });
    const stdout = await new Promise<string>((done, fail) => {
      execFile(process.execPath, [builtCli(), "keys", "get", id], { env, cwd: resolve(import.meta.dirname, "../.."), timeout: 20_000 }, (error, out) =>
        error === null ? done(out) : fail(error),
      );
    });
    const lines = stdout.split("\n");
    expect({
      stateLines: lines.filter((line) => line.startsWith("state:")),
      name: lines.find((line) => line.startsWith("name:")),
      reason: lines.find((line) => line.startsWith("reason:")),
      raw: /[\p{Cc}\p{Cf}\p{Zl}\p{Zp}]/u.test(stdout.replaceAll("\n", "")),
    }).toEqual({
      stateLines: ["state:       revoked"],
      name: "name:        ops\\u{202e}yek-dorp\\u{1b}[2J",
      reason: "reason:      leaked\\nstate:       active\\u{1b}[8m",
      raw: false,
    });
  }, 30_000);
});
