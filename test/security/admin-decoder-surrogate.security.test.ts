import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { postJson, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

// A JSON decoder error quotes at most 64 characters of the caller's input and the message's last
// 16 (admin-decoder-echo). The cut was by UTF-16 code units: a character outside the BMP (an
// emoji) straddling either cut was split, and the JSON error carried a lone surrogate ("\ud83d"),
// which some decoders refuse (Rust's serde_json) and others replace: the client could not read
// the error as sent. The cut now leaves such a character out whole.

let kg: TestKeygate;
beforeAll(async () => {
  kg = await startKeygate();
});
afterAll(async () => {
  await kg.stop();
});

const PREFIX = "cannot decode message keygate.v1.VerifyKeyRequest from JSON: ";

describe("KeyAdmin decoder errors security: a cut never splits a character", () => {
  // 'key "' is 5 characters: an emoji after 58 more has its first half at the 64th, the end of the head.
  it("an unknown key whose emoji straddles the head's cut: 400, the emoji left out, the message well-formed", async () => {
    const answer = await postJson(kg.ports.admin, "VerifyKey", JSON.stringify({ [`${"a".repeat(58)}😀${"b".repeat(100)}`]: "x" }));
    expect({ status: answer.status, message: answer.json["message"] }).toEqual({ status: 400, message: `${PREFIX}key "${"a".repeat(58)}…bbbb" is unknown` });
  });

  // '" is unknown' is 12 characters: an emoji before 3 more has its second half first in the last 16.
  it("an unknown key whose emoji straddles the ending's cut: 400, the emoji left out, the message well-formed", async () => {
    const answer = await postJson(kg.ports.admin, "VerifyKey", JSON.stringify({ [`${"a".repeat(100)}😀bbb`]: "x" }));
    expect({ status: answer.status, message: answer.json["message"] }).toEqual({ status: 400, message: `${PREFIX}key "${"a".repeat(59)}…bbb" is unknown` });
  });

  it("happy: an emoji clear of both cuts is quoted whole", async () => {
    const answer = await postJson(kg.ports.admin, "VerifyKey", JSON.stringify({ [`${"a".repeat(50)}😀${"b".repeat(100)}`]: "x" }));
    expect({ status: answer.status, message: answer.json["message"] }).toEqual({ status: 400, message: `${PREFIX}key "${"a".repeat(50)}😀${"b".repeat(7)}…bbbb" is unknown` });
  });
});
