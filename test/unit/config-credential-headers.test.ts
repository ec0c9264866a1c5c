import { describe, expect, it } from "vitest";
import { DEFAULT_POLICY_INPUT, parsePolicy } from "../../src/config.js";

// README "The decision": each `credentialHeaders` name must not be an x-keygate-* header nor "one
// that frames the message or belongs to the proxy (`host`, `connection`, `content-length`,
// `x-forwarded-*`, `x-original-*`, ...)": every one a request carries is removed before the
// upstream on allow. Only a fixed list was refused, so x-forwarded-client-cert (Envoy's mTLS
// identity) was read as an API key and taken off the request, as were `cookie` and the `_`
// spelling of an identity header, which WSGI and PHP read as the real one.

describe("credentialHeaders refuses proxy, message and identity headers", () => {
  for (const name of ["x-forwarded-prefix", "x-forwarded-port", "x-forwarded-client-cert", "x-original-url", "cookie", "forwarded", "via", "x_keygate_owner_id", "X_Keygate_Key_Id"]) {
    it(`refuses ${name}`, () => {
      expect(() => parsePolicy({ ...DEFAULT_POLICY_INPUT, credentialHeaders: [name] })).toThrow(/credentialHeaders\.0: a credential header cannot be/);
    });
  }

  it("takes a header of the API's own (x-api-key, x-goog-api-key, apikey)", () => {
    expect(parsePolicy({ ...DEFAULT_POLICY_INPUT, credentialHeaders: ["x-api-key", "x-goog-api-key", "apikey"] }).credentialHeaders).toEqual(["x-api-key", "x-goog-api-key", "apikey"]);
  });
});
