import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { RouteTable, PATH_REFUSALS } from "../../src/authz/routes.js";
import { DEFAULT_POLICY_INPUT } from "../../src/config.js";
import { checkInit, checkOutcome, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

// Default routeMatching (case-sensitive): "a path that would match a different route if case were
// ignored is refused" (README, The canonical path). The check only looks at upper-case letters
// within the first #decidingLength characters, taken from the first entry of the table, which is
// the DEEPEST route (most segments), not the one with the longest prefix. A shallower route with a
// longer prefix is then not protected past that length.
const ROUTES = [
  // 3 segments, 11 characters: sorted first, so decidingLength = 12.
  { method: "*", pathPrefix: "/v1/me/keys", requiredScopes: ["read"] },
  // 2 segments, 18 characters: letters at index 12..17 are never looked at.
  { method: "*", pathPrefix: "/v1/administration", requiredScopes: ["admin"] },
];

describe("letter-case refusal covers every prefix, not only the deepest route's length", () => {
  it("RouteTable refuses /v1/administRation like /v1/Administration", () => {
    const table = new RouteTable(ROUTES.map((r) => ({ ...r, cost: 1, metered: true })));
    // Sanity: an upper-case letter early in the path is refused.
    expect(table.requirements("GET", "/v1/Administration", undefined)).toBe(PATH_REFUSALS.letterCase);
    // Same route when case is ignored, letter past index 12: must be refused too.
    expect(table.requirements("GET", "/v1/administRation", undefined)).toBe(PATH_REFUSALS.letterCase);
    expect(table.requirements("GET", "/v1/administratioN/users", undefined)).toBe(PATH_REFUSALS.letterCase);
  });

  let kg: TestKeygate;
  beforeAll(async () => {
    kg = await startKeygate({
      policy: { ...DEFAULT_POLICY_INPUT, scopes: { catalog: ["read", "admin"], default: ["read"] }, routes: ROUTES },
    });
  });
  afterAll(async () => {
    await kg.stop();
  });

  it("a Check for /v1/administRation with a key lacking the admin scope is refused 400, not allowed", async () => {
    await kg.admin.upsertAccount({ ownerId: "case-deep", plan: "business" });
    const { secret } = await kg.admin.createKey({ ownerId: "case-deep", name: "reader" });
    // The exact-case path needs admin: 403.
    expect(checkOutcome(await kg.check(checkInit({ "x-api-key": secret }, "/v1/administration/users")))).toEqual({ status: 403, code: "FORBIDDEN" });
    // An early upper-case letter: refused 400.
    expect(checkOutcome(await kg.check(checkInit({ "x-api-key": secret }, "/v1/Administration/users")))).toEqual({ status: 400, code: "INVALID_REQUEST" });
    // A late upper-case letter: an IIS/ASP.NET upstream serves it as /v1/administration/users.
    expect(checkOutcome(await kg.check(checkInit({ "x-api-key": secret }, "/v1/administRation/users")))).toEqual({ status: 400, code: "INVALID_REQUEST" });
  });
});
