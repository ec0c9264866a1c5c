import { describe, expect, it } from "vitest";
import { PresentCredentialHeaders } from "../../src/authz/credential.js";
import { RecordHeaders } from "../../src/authz/headers.js";

// README (Security model): "no credential header reaches the upstream, nor its spellings with `_`
// for `-` (`x_api_key`, which CGI-style servers read as `X-Api-Key`)". For a configured
// credential header with four or more dashes only the all-dash and all-underscore spellings are
// listed, so a mixed spelling (which WSGI/PHP/Rack read as the same header) is not removed.
describe("credential header spellings removed upstream", () => {
  it("lists every _-for-- spelling of a configured header with four dashes", () => {
    const present = new PresentCredentialHeaders(["authorization", "x-acme-org-api-key"]);
    const key = "kg_live_0123456789abcdefghijklmnopqrstuvwxyzAB";
    for (const spelling of ["x_acme-org-api-key", "x-acme_org_api-key", "x_acme_org_api-key"]) {
      expect(present.of(new RecordHeaders({ [spelling]: key }))).toEqual([spelling]);
    }
  });
});
