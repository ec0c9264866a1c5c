import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { grpcJsonCall, grpcWebJsonCall, postJson, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

// KeyAdmin decodes a request before any of keygate's code runs, and the JSON decoder's error
// quotes the caller's input whole: 60 KB of unknown key sent, 60 KB came back in the message.
// keygate's own messages quote at most 64 characters of a bad value (echo()); the decoder's now
// keep 64 characters of what follows "from JSON: ", an ellipsis, and their last 16, on every
// protocol. The cut is by length: a key may hold the quote that would seem to end it.

let kg: TestKeygate;
beforeAll(async () => {
  kg = await startKeygate();
});
afterAll(async () => {
  await kg.stop();
});

const LONG_KEY = "X".repeat(60_000);
const UNKNOWN_KEY = `cannot decode message keygate.v1.VerifyKeyRequest from JSON: key "${"X".repeat(59)}…XXXX" is unknown`;

describe("KeyAdmin decoder errors quote a bounded part of the input", () => {
  it("Connect JSON, a 60,000-character unknown key: 400, the message cut to 64 characters and its ending", async () => {
    const answer = await postJson(kg.ports.admin, "VerifyKey", JSON.stringify({ [LONG_KEY]: "x" }));
    expect({ status: answer.status, json: answer.json }).toEqual({ status: 400, json: { code: "invalid_argument", message: UNKNOWN_KEY } });
  });

  it("Connect JSON, a key holding quotes and spaces: cut by length all the same", async () => {
    const key = `a" b ${"y ".repeat(20_000)}`;
    const answer = await postJson(kg.ports.admin, "VerifyKey", JSON.stringify({ [key]: "x" }));
    const detail = `key "a" b ${"y ".repeat(27)}`;
    expect(answer.json["message"]).toBe(`cannot decode message keygate.v1.VerifyKeyRequest from JSON: ${detail}…y y " is unknown`);
  });

  it("Connect JSON, a 3,000-digit int64: the value cut the same way", async () => {
    const answer = await postJson(kg.ports.admin, "AddCredits", JSON.stringify({ ownerId: "o", amount: "9".repeat(3000) }));
    expect(answer.json["message"]).toBe(`cannot decode field keygate.v1.AddCreditsRequest.amount from JSON: expected bigint (int64): ${"9".repeat(39)}…999 out of range`);
  });

  it("gRPC with the JSON codec: grpc-message 3, cut the same way", async () => {
    const answer = await grpcJsonCall(kg.ports.admin, "VerifyKey", JSON.stringify({ [LONG_KEY]: "x" }));
    expect(answer).toEqual({ status: "3", message: UNKNOWN_KEY });
  });

  it("gRPC-Web with the JSON codec: the trailer frame's grpc-message, cut the same way", async () => {
    const bytes = await grpcWebJsonCall(kg.ports.admin, "VerifyKey", JSON.stringify({ [LONG_KEY]: "x" }));
    // The only frame is the trailer frame: flag 0x80, its length, then header lines.
    expect(bytes[0]).toBe(0x80);
    expect(bytes.readUInt32BE(1)).toBe(bytes.length - 5);
    const trailers = bytes.subarray(5).toString("utf8");
    const field = (name: string): string | undefined => new RegExp(`^${name}: ?(.*)$`, "m").exec(trailers)?.[1]?.trim();
    expect({ status: field("grpc-status"), message: decodeURIComponent(field("grpc-message") ?? "") }).toEqual({ status: "3", message: UNKNOWN_KEY });
  });

  it("happy: a short unknown key is quoted whole", async () => {
    const answer = await postJson(kg.ports.admin, "VerifyKey", JSON.stringify({ nope: "x" }));
    expect(answer.json["message"]).toBe('cannot decode message keygate.v1.VerifyKeyRequest from JSON: key "nope" is unknown');
  });
});
