import { describe, expect, it } from "vitest";
import type { Deny } from "../../src/authz/pipeline.js";
import { DENIALS, errorBody, MAX_ECHOED_REQUEST_ID } from "../../src/authz/reasons.js";
import { toHttpAnswer, unavailableAnswer } from "../../src/authz/to-http.js";

const SPEC = DENIALS.MISSING_CREDENTIAL;

/** The request id a denial body carries. */
function echoedId(body: string): unknown {
  const parsed: unknown = JSON.parse(body);
  if (typeof parsed !== "object" || parsed === null || !("requestId" in parsed)) throw new Error("denial body without requestId");
  return parsed.requestId;
}

describe("denial body: the request id it echoes", () => {
  describe("happy", () => {
    it("echoes an id of up to 128 printable ASCII characters, as JSON, with the standard and a custom message", () => {
      const longest = "a".repeat(MAX_ECHOED_REQUEST_ID);
      for (const id of ["", "req-1", "3f2b9c1e-8a47-4d2b-9f0e-6c5d4b3a2910", longest, ' !"\\~']) {
        expect(echoedId(errorBody(SPEC, SPEC.message, id))).toBe(id);
        expect(echoedId(errorBody(SPEC, "Another message.", id))).toBe(id);
      }
    });
  });

  describe("security", () => {
    it("echoes an empty id for a longer one or one with any other character, so no client-sized value is reflected", () => {
      const refused = ["a".repeat(MAX_ECHOED_REQUEST_ID + 1), "req\n1", "req\t1", "req\u007f", "req-\u00e9", "req-\u{1f600}", "\u0001".repeat(4 * 1024 * 1024)];
      for (const id of refused) {
        const body = errorBody(SPEC, SPEC.message, id);
        expect(echoedId(body)).toBe("");
        expect(body.length).toBe(errorBody(SPEC, SPEC.message, "").length);
      }
    });

    it("the HTTP mode's denial body is bounded the same way", () => {
      const deny: Deny = { allow: false, reason: "MISSING_CREDENTIAL", message: SPEC.message };
      expect(echoedId(toHttpAnswer(deny, [], "r".repeat(MAX_ECHOED_REQUEST_ID), 0).body)).toBe("r".repeat(MAX_ECHOED_REQUEST_ID));
      expect(echoedId(toHttpAnswer(deny, [], "r".repeat(MAX_ECHOED_REQUEST_ID + 1), 0).body)).toBe("");
    });

    it("the HTTP mode's 503 when a key cannot be checked is bounded the same way", () => {
      expect(echoedId(unavailableAnswer("r".repeat(MAX_ECHOED_REQUEST_ID)).body)).toBe("r".repeat(MAX_ECHOED_REQUEST_ID));
      expect(echoedId(unavailableAnswer("\u0001".repeat(1024)).body)).toBe("");
    });
  });
});
