import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { grpcJsonCall, grpcWebJsonCall, postJson, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

// KeyAdmin decodes a request before any of keygate's code runs, and the decoder's error quotes
// what it could not read: a JSON field named by an API key, a key sent where a number goes.
// keygate never repeats a secret, the caller's own included, in any protocol's error.

let kg: TestKeygate;
let secret = "";
beforeAll(async () => {
  kg = await startKeygate();
  secret = (await kg.admin.createKey({ ownerId: "echo-owner", name: "s" })).secret;
});
afterAll(async () => {
  await kg.stop();
});

/** Whether `text` holds the key, or a long run of it. */
const holdsKey = (text: string): boolean => text.includes(secret) || text.includes(secret.slice(8, 30));

describe("KeyAdmin errors never repeat a key", () => {
  const cases = (): Array<[string, string, string]> => [
    ["VerifyKey", "a field named by the key", JSON.stringify({ [secret]: "x" })],
    ["VerifyKey", "the key as an int64 (cost)", JSON.stringify({ secret: "x", cost: secret, idempotencyKey: "a" })],
    ["AddCredits", "the key as an int64 (amount)", JSON.stringify({ ownerId: "o", amount: secret })],
    ["ListKeys", "the key as an int32 (pageSize)", JSON.stringify({ ownerId: "o", pageSize: secret })],
    ["VerifyKey", "the key in malformed JSON", `{"secret" "${secret}"}`],
    ["VerifyKey", "the key in an array where a string goes", JSON.stringify({ secret: [secret] })],
  ];

  it("Connect JSON: 400 invalid_argument, the message naming the problem with the key replaced", async () => {
    for (const [method, label, body] of cases()) {
      const answer = await postJson(kg.ports.admin, method, body);
      const text = JSON.stringify(answer.json);
      expect({ label, status: answer.status, code: answer.json["code"], holdsKey: holdsKey(text) }).toEqual({ label, status: 400, code: "invalid_argument", holdsKey: false });
    }
    const unknown = await postJson(kg.ports.admin, "VerifyKey", JSON.stringify({ [secret]: "x" }));
    expect(unknown.json["message"]).toBe('cannot decode message keygate.v1.VerifyKeyRequest from JSON: key "[redacted]" is unknown');
  });

  it("gRPC with the JSON codec: the grpc-message holds no key", async () => {
    const answer = await grpcJsonCall(kg.ports.admin, "VerifyKey", JSON.stringify({ [secret]: "x" }));
    expect({ status: answer.status, holdsKey: holdsKey(answer.message), redacted: answer.message.includes("[redacted]") }).toEqual({ status: "3", holdsKey: false, redacted: true });
  });

  it("gRPC-Web with the JSON codec: the trailer frame holds no key", async () => {
    const bytes = await grpcWebJsonCall(kg.ports.admin, "VerifyKey", JSON.stringify({ [secret]: "x" }));
    // The last frame is the trailer frame: flag 0x80, its length, then header lines.
    expect(bytes[0]).toBe(0x80);
    expect(bytes.readUInt32BE(1)).toBe(bytes.length - 5);
    const trailers = bytes.subarray(5).toString("utf8");
    expect({ status: /grpc-status: ?(\d+)/.exec(trailers)?.[1], holdsKey: holdsKey(trailers), redacted: trailers.includes("[redacted]") }).toEqual({ status: "3", holdsKey: false, redacted: true });
  });

  it("an answer that is not an error is left whole: CreateKey's secret comes back", async () => {
    const created = await postJson(kg.ports.admin, "CreateKey", { ownerId: "echo-other-owner", name: "whole" });
    expect(created.status).toBe(200);
    expect(String(created.json["secret"])).toMatch(/^[a-z]+_live_[0-9A-Za-z]+/);
  });
});
