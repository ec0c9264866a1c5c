import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ADMIN_TOKEN, grpcFrame, grpcJsonCall, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

// JSON may escape half of a surrogate pair alone ("\ud800"), and the decoder quotes what it
// refuses: an unknown or duplicate key, a string where a message or list belongs. connect-es
// percent-encodes a gRPC and gRPC-Web error message with encodeURIComponent, which throws on a
// lone surrogate: the refusal became a bare HTTP 500 (gRPC: no grpc-status at all). Such a body is
// refused like any other mistake, INVALID_ARGUMENT on every protocol (Connect 400, gRPC and
// gRPC-Web grpc-status 3), with the decoder's message, each lone surrogate shown as U+FFFD, and
// nothing written.
//
// A body needs no escape for its refusal to quote half a pair: V8's JSON SyntaxError quotes the
// token it stopped at as one code unit and about ten units of the source, cutting a raw (UTF-8)
// emoji in two. And keygate's own refusals quote the caller's value cut at 64 code units (echo()),
// which split an emoji straddling the cut. Both are answered the same way.

let kg: TestKeygate;
beforeAll(async () => {
  kg = await startKeygate();
});
afterAll(async () => {
  await kg.stop();
});

const OWNER = "surrogate-owner";
const PAIR_OWNER = "surrogate-pair-owner";
const CREATE = "cannot decode message keygate.v1.CreateKeyRequest from JSON: ";
const FIELD = "cannot decode field keygate.v1.CreateKeyRequest.";

/** Request bodies as JSON text (the escapes raw, as a client sends them) and the message each is refused with. */
const CASES: Array<{ name: string; json: string; message: string }> = [
  { name: "an unknown key holding a high surrogate", json: String.raw`{"owner_id":"${OWNER}","\ud800x":1}`, message: `${CREATE}key "\uFFFDx" is unknown` },
  { name: "an unknown key holding a low surrogate", json: String.raw`{"owner_id":"${OWNER}","\udc00":1}`, message: `${CREATE}key "\uFFFD" is unknown` },
  { name: "a key sent twice", json: String.raw`{"owner_id":"${OWNER}","\ud800":1,"\ud800":2}`, message: `${CREATE}duplicate object key "\uFFFD"` },
  { name: "an unknown key of a nested message", json: String.raw`{"owner_id":"${OWNER}","rate_limit":{"\ud800":1}}`, message: 'cannot decode message keygate.v1.RateLimit from JSON: key "\uFFFD" is unknown' },
  { name: "a string where a message belongs", json: String.raw`{"owner_id":"${OWNER}","rate_limit":"\ud800"}`, message: 'cannot decode message keygate.v1.RateLimit from JSON: "\uFFFD"' },
  { name: "a string where a list belongs", json: String.raw`{"owner_id":"${OWNER}","scopes":"\ud800"}`, message: `${FIELD}scopes from JSON: expected Array, got "\uFFFD"` },
  // Values of string fields: refused by name, without the value quoted.
  { name: "an owner_id", json: String.raw`{"owner_id":"${OWNER}\ud800"}`, message: `${FIELD}owner_id from JSON: expected string: invalid UTF8` },
  { name: "a name", json: String.raw`{"owner_id":"${OWNER}","name":"n\udc00"}`, message: `${FIELD}name from JSON: expected string: invalid UTF8` },
  { name: "a metadata key", json: String.raw`{"owner_id":"${OWNER}","metadata":{"\ud800":"v"}}`, message: `${FIELD}metadata from JSON: invalid map key: expected string: invalid UTF8` },
];

function adminUrl(method: string): string {
  return `http://127.0.0.1:${kg.ports.admin}/keygate.v1.KeyAdmin/${method}`;
}

/** A Connect unary call with a JSON body, as curl sends it: the HTTP status and the body's JSON (null when empty). */
async function connectCall(method: string, json: string): Promise<{ status: number; json: unknown }> {
  const res = await fetch(adminUrl(method), { method: "POST", headers: { "content-type": "application/json", authorization: `Bearer ${ADMIN_TOKEN}` }, body: json });
  const text = await res.text();
  return { status: res.status, json: text === "" ? null : JSON.parse(text) };
}

/** A gRPC-Web call with the JSON codec: the HTTP status, the flag of its only frame, and that frame's grpc-status and decoded grpc-message. */
async function grpcWebCall(method: string, json: string): Promise<{ status: number; frames: Array<{ flags: number; status?: string; message?: string }> }> {
  const res = await fetch(adminUrl(method), {
    method: "POST",
    headers: { "content-type": "application/grpc-web+json", authorization: `Bearer ${ADMIN_TOKEN}` },
    body: grpcFrame(json),
  });
  const bytes = Buffer.from(await res.arrayBuffer());
  const frames: Array<{ flags: number; status?: string; message?: string }> = [];
  for (let at = 0; at + 5 <= bytes.length; at += 5 + bytes.readUInt32BE(at + 1)) {
    const flags = bytes[at] ?? 0;
    if ((flags & 0x80) === 0) {
      frames.push({ flags });
      continue;
    }
    const lines = bytes.subarray(at + 5, at + 5 + bytes.readUInt32BE(at + 1)).toString("utf8");
    const field = (name: string): string | undefined => new RegExp(`^${name}: ?(.*)$`, "m").exec(lines)?.[1]?.trim();
    frames.push({ flags, status: field("grpc-status"), message: decodeURIComponent(field("grpc-message") ?? "") });
  }
  return { status: res.status, frames };
}

async function ownersKeys(): Promise<number> {
  return (await kg.admin.listKeys({ ownerId: OWNER, includeRevoked: true })).keys.length;
}

describe("KeyAdmin error: JSON holding a lone surrogate is INVALID_ARGUMENT on every protocol", () => {
  for (const { name, json, message } of CASES) {
    it(`${name}: Connect 400 invalid_argument, the lone surrogate shown as U+FFFD`, async () => {
      expect(await connectCall("CreateKey", json)).toEqual({ status: 400, json: { code: "invalid_argument", message } });
    });

    it(`${name}: gRPC-Web 200 with one trailer frame, grpc-status 3`, async () => {
      expect(await grpcWebCall("CreateKey", json)).toEqual({ status: 200, frames: [{ flags: 0x80, status: "3", message }] });
    });

    it(`${name}: gRPC grpc-status 3`, async () => {
      expect(await grpcJsonCall(kg.ports.admin, "CreateKey", json)).toEqual({ status: "3", message });
    });
  }

  it("nothing was written, and no call failed inside keygate", async () => {
    expect(await ownersKeys()).toBe(0);
    expect(kg.logLines.filter((line) => line.includes("KeyAdmin handler failed"))).toEqual([]);
  });
});

describe("KeyAdmin happy: escaped surrogate pairs are characters like any other", () => {
  it("an unknown key holding an escaped pair is quoted with its character", async () => {
    const json = String.raw`{"owner_id":"${PAIR_OWNER}","\ud83d\ude00":1}`;
    expect(await grpcWebCall("CreateKey", json)).toEqual({ status: 200, frames: [{ flags: 0x80, status: "3", message: `${CREATE}key "😀" is unknown` }] });
  });

  it("a name holding an escaped pair is written as its character, over gRPC-Web", async () => {
    const answer = await grpcWebCall("CreateKey", String.raw`{"owner_id":"${PAIR_OWNER}","name":"n\ud83d\ude00"}`);
    expect(answer).toEqual({ status: 200, frames: [{ flags: 0 }, { flags: 0x80, status: "0", message: "" }] });
    const { keys } = await kg.admin.listKeys({ ownerId: PAIR_OWNER });
    expect(keys.map((key) => key.name)).toEqual(["n😀"]);
  });
});

/** Bodies with a JSON syntax error beside raw emoji, sent as UTF-8, and the refusal, each half an emoji V8 quotes shown as U+FFFD. */
const SYNTAX_CASES: Array<{ name: string; json: string; message: string }> = [
  { name: "an emoji where a value belongs (the token quoted)", json: "[😀😀😀😀😀😀😀😀😀😀 x", message: `${CREATE}Unexpected token '\uFFFD', "[😀😀😀😀😀"... is not valid JSON` },
  { name: "an emoji as the token after a literal's first letters", json: "tru😀😀😀😀😀😀😀😀 x", message: `${CREATE}Unexpected token '\uFFFD', "tru😀😀😀😀😀"... is not valid JSON` },
  { name: "an emoji cut by the source's quoted start", json: "a😀😀😀😀😀😀😀😀😀😀 x", message: `${CREATE}Unexpected token 'a', "a😀😀😀😀\uFFFD"... is not valid JSON` },
  { name: "a lone emoji", json: "😀", message: `${CREATE}Unexpected token '\uFFFD', "😀" is not valid JSON` },
];

describe("KeyAdmin error: a JSON syntax error beside raw emoji is INVALID_ARGUMENT on every protocol", () => {
  for (const { name, json, message } of SYNTAX_CASES) {
    it(`${name}: Connect 400 invalid_argument, the half emoji shown as U+FFFD`, async () => {
      expect(await connectCall("CreateKey", json)).toEqual({ status: 400, json: { code: "invalid_argument", message } });
    });

    it(`${name}: gRPC-Web 200 with one trailer frame, grpc-status 3`, async () => {
      expect(await grpcWebCall("CreateKey", json)).toEqual({ status: 200, frames: [{ flags: 0x80, status: "3", message }] });
    });

    it(`${name}: gRPC grpc-status 3`, async () => {
      expect(await grpcJsonCall(kg.ports.admin, "CreateKey", json)).toEqual({ status: "3", message });
    });
  }

  it("no call failed inside keygate", () => {
    expect(kg.logLines.filter((line) => line.includes("KeyAdmin handler failed"))).toEqual([]);
  });
});

// 63 code units (no run that SECRET_LIKE would redact), then an emoji across units 64 and 65.
const HEAD_63 = `${"a.".repeat(31)}a`;
const STRADDLING = `${HEAD_63}😀`;

/** Bodies keygate refuses after decoding, quoting STRADDLING through echo(), and the refusal: the emoji left out whole. */
const ECHO_CASES: Array<{ name: string; method: string; json: string; message: string }> = [
  { name: "an unknown scope", method: "CreateKey", json: JSON.stringify({ owner_id: OWNER, name: "k", scopes: [STRADDLING] }), message: `scopes[0]: unknown scope "${HEAD_63}"; known scopes: tutor, decks, progress, webhooks` },
  { name: "a metadata key outside its alphabet", method: "CreateKey", json: JSON.stringify({ owner_id: OWNER, name: "k", metadata: { [STRADDLING]: "v" } }), message: `metadata.${HEAD_63}: keys are 1-64 letters, digits, _ . -` },
  { name: "an unknown plan", method: "UpsertAccount", json: JSON.stringify({ owner_id: OWNER, plan: STRADDLING }), message: `plan: must be one of basic, pro, business; got "${HEAD_63}"` },
];

describe("KeyAdmin error: keygate's own refusal never quotes half an emoji", () => {
  for (const { name, method, json, message } of ECHO_CASES) {
    it(`${name}: Connect 400 invalid_argument, the value cut before the emoji`, async () => {
      expect(await connectCall(method, json)).toEqual({ status: 400, json: { code: "invalid_argument", message } });
    });

    it(`${name}: gRPC-Web 200 with one trailer frame, grpc-status 3`, async () => {
      expect(await grpcWebCall(method, json)).toEqual({ status: 200, frames: [{ flags: 0x80, status: "3", message }] });
    });

    it(`${name}: gRPC grpc-status 3`, async () => {
      expect(await grpcJsonCall(kg.ports.admin, method, json)).toEqual({ status: "3", message });
    });
  }

  it("happy: an emoji that ends within 64 code units is quoted whole", async () => {
    const scope = `${"a.".repeat(31)}😀`;
    const json = JSON.stringify({ owner_id: OWNER, name: "k", scopes: [scope] });
    expect(await grpcJsonCall(kg.ports.admin, "CreateKey", json)).toEqual({ status: "3", message: `scopes[0]: unknown scope "${scope}"; known scopes: tutor, decks, progress, webhooks` });
  });

  it("nothing was written, and no call failed inside keygate", async () => {
    expect(await ownersKeys()).toBe(0);
    expect(kg.logLines.filter((line) => line.includes("KeyAdmin handler failed"))).toEqual([]);
  });
});
