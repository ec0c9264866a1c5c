import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { RouteConfigError, RouteTable, normalizePath } from "../../src/authz/routes.js";

const table = new RouteTable([
  { method: "*", pathPrefix: "/v1/decks", requiredScopes: ["decks"], cost: 1 },
  { method: "*", pathPrefix: "/v1/decks/export", requiredScopes: ["decks", "export"], cost: 5 },
  { method: "POST", pathPrefix: "/v1/hooks", requiredScopes: ["webhooks"], cost: 1 },
]);

describe("routes", () => {
  it("normalizes dot segments, repeated slashes, encodings and queries", () => {
    expect(normalizePath("/v1//decks/./1/../2?x=/v1")).toBe("/v1/decks/2");
    expect(normalizePath("/v1/%64ecks")).toBe("/v1/decks");
    expect(normalizePath("/../../etc")).toBe("/etc");
    expect(normalizePath("/bad/%zz")).toBe("/bad/%zz");
    expect(normalizePath("/v1/decks/")).toBe("/v1/decks");
    expect(normalizePath("/.hidden/x")).toBe("/.hidden/x");
    expect(normalizePath("/")).toBe("/");
  });

  it("an already normal path comes back as the segment-by-segment normalization gives it", () => {
    const segment = fc.constantFrom("", ".", "..", "v1", "decks", "%64ecks", "%zz", "a.b", ".x", "x?y", "#f", "%2F");
    const path = fc.array(segment, { maxLength: 6 }).map((parts) => `/${parts.join("/")}`);
    fc.assert(
      fc.property(path, (p) => {
        // A "/x/.." prefix always takes the segment-by-segment route, and cancels itself out.
        expect(normalizePath(p)).toBe(normalizePath(`/x/..${p}`));
      }),
      { numRuns: 2000 },
    );
  });

  it("matches the longest prefix on a segment boundary, by method", () => {
    expect(table.requirements("GET", "/v1/decks/export/all", undefined)).toEqual({ requiredScopes: ["decks", "export"], projectId: null, cost: 5 });
    expect(table.requirements("GET", "/v1/decks", undefined).requiredScopes).toEqual(["decks"]);
    expect(table.requirements("GET", "/v1/decksx", undefined).requiredScopes).toEqual([]);
    expect(table.requirements("GET", "/v1/hooks", undefined).requiredScopes).toEqual([]);
    expect(table.requirements("post", "/v1/hooks/1", undefined).requiredScopes).toEqual(["webhooks"]);
  });

  it("context_extensions win field by field", () => {
    expect(table.requirements("GET", "/v1/decks/export", { cost: "0" })).toEqual({ requiredScopes: ["decks", "export"], projectId: null, cost: 0 });
    expect(table.requirements("GET", "/other", { required_scopes: "a,,b ", project_id: "p1" })).toEqual({ requiredScopes: ["a", "b"], projectId: "p1", cost: 1 });
  });

  it("a cost that is not a whole number is a configuration error", () => {
    expect(() => table.requirements("GET", "/", { cost: "-1" })).toThrow(RouteConfigError);
    expect(() => table.requirements("GET", "/", { cost: "1.5" })).toThrow(/context_extensions.cost/);
  });
});
