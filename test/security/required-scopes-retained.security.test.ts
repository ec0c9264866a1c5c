import { describe, expect, it } from "vitest";
import { ROUTE_CONFIG_REFUSALS, RouteTable } from "../../src/authz/routes.js";
import { retainedMiB } from "../harness/heap.js";

// RouteTable keeps its judgment of each distinct required_scopes value (context_extensions), so a
// proxy route's value is parsed once. A Check on keygate's gRPC port may carry a value of up to
// the 4 MiB message limit, after only the key's public CRC32 check: were every distinct value a
// key of that cache (1024 before it is cleared), made-up values, refused or not, would pin ~4 GiB.
// Values longer than every proxy route's are judged each time and never kept.

const MiB = 1024 * 1024;

describe("required_scopes values a client makes up are not kept", () => {
  const catalog = new Set(["decks"]);
  const newTable = () => new RouteTable([{ method: "*", pathPrefix: "/v1/decks", requiredScopes: ["decks"], cost: 1, metered: true }]);

  it("RouteTable keeps none of 48 distinct 1 MiB required_scopes values it refused", () => {
    const table = newTable();
    const kept = retainedMiB(() => {
      for (let i = 0; i < 48; i++) {
        // A fresh string each time, as the decoder reads one from each Check.
        const value = `${i.toString().padStart(8, "0")}${"a".repeat(MiB)}`;
        expect(table.requirements("GET", "/v1/decks", { required_scopes: value }, catalog)).toBe(ROUTE_CONFIG_REFUSALS.requiredScopes);
      }
    });
    // Unbounded, 48 MiB; 8 leaves room for the heap's own noise.
    expect(kept).toBeLessThan(8);
  }, 60_000);

  it("nor 16 distinct 1 MiB values that parse (one scope named over and over)", () => {
    const table = newTable();
    const names = Math.floor(MiB / 6);
    const kept = retainedMiB(() => {
      for (let i = 0; i < 16; i++) {
        const value = `decks${" ".repeat(i + 1)}${",decks".repeat(names)}`;
        expect(table.requirements("GET", "/v1/decks", { required_scopes: value }, catalog)).toHaveProperty("requiredScopes.length", names + 1);
      }
    });
    // Unbounded, each value and its array of ~175,000 names: over 32 MiB.
    expect(kept).toBeLessThan(8);
  }, 60_000);

  it("a short value is judged as before, whichever way it goes", () => {
    const table = newTable();
    for (let round = 0; round < 2; round++) {
      expect(table.requirements("GET", "/v1/decks", { required_scopes: " decks " }, catalog)).toMatchObject({ requiredScopes: ["decks"] });
      expect(table.requirements("GET", "/v1/decks", { required_scopes: "deck" }, catalog)).toBe(ROUTE_CONFIG_REFUSALS.unknownScope);
      expect(table.requirements("GET", "/v1/decks", { required_scopes: "Decks" }, catalog)).toBe(ROUTE_CONFIG_REFUSALS.requiredScopes);
    }
  });
});
