import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { DEFAULT_POLICY_INPUT, parsePolicy } from "../../src/config.js";
import { DENIALS } from "../../src/authz/reasons.js";
import { CONNECT_REFUSAL, MAX_PATH_LENGTH, METHOD_CASE_REFUSAL, PATH_REFUSALS, ROUTE_CONFIG_REFUSALS, RouteRefusal, RouteTable, asciiCaseReading, canonicalPath } from "../../src/authz/routes.js";

const table = new RouteTable([
  { method: "*", pathPrefix: "/v1/decks", requiredScopes: ["decks"], cost: 1, metered: true },
  { method: "*", pathPrefix: "/v1/decks/export", requiredScopes: ["decks", "export"], cost: 5, metered: true },
  { method: "POST", pathPrefix: "/v1/hooks", requiredScopes: ["webhooks"], cost: 1, metered: true },
]);

/** The requirements, failing the test on a refusal. */
function required(method: string, path: string, extensions?: Record<string, string>) {
  const result = table.requirements(method, path, extensions);
  if (result instanceof RouteRefusal) throw new Error(`refused ${path}: ${result.message}`);
  return result;
}

describe("canonical path happy", () => {
  it("returns an already canonical path as the same string", () => {
    for (const path of ["/", "/v1/decks", "/v1/decks/", "/.hidden/x", "/v1/a.b/c~d_e-f", "/v1/UPPER/42"]) expect(canonicalPath(path)).toBe(path);
  });

  it("cuts the query, decodes unreserved escapes and upper-cases the hex of the others", () => {
    expect(canonicalPath("/v1/decks?x=/../%2F;#")).toBe("/v1/decks");
    expect(canonicalPath("/v1/%64ecks")).toBe("/v1/decks");
    expect(canonicalPath("/v1/%7Euser%2D%5F%41")).toBe("/v1/~user-_A");
    expect(canonicalPath("/v1/a%3ab%40c%20d")).toBe("/v1/a%3Ab%40c%20d");
    expect(canonicalPath("/v1/caf%c3%a9")).toBe("/v1/caf%C3%A9");
    expect(canonicalPath("/v1/%F0%9F%94%91")).toBe("/v1/%F0%9F%94%91");
    expect(canonicalPath("/v1/decks/?q")).toBe("/v1/decks/");
  });

  it("is idempotent, and a canonical path takes the fast path to itself", () => {
    const piece = fc.constantFrom("v1", "decks", "%64", "%7e", "a.b", ".x", "%20x", "%C3%A9", "X", "~", "-");
    const path = fc.array(fc.array(piece, { minLength: 1, maxLength: 3 }).map((p) => p.join("")), { maxLength: 5 }).map((s) => `/${s.join("/")}`);
    fc.assert(
      fc.property(path, fc.constantFrom("", "?q=1", "/"), (p, tail) => {
        const once = canonicalPath(p + tail);
        if (once instanceof RouteRefusal) return;
        expect(canonicalPath(once)).toBe(once);
      }),
      { numRuns: 2000, seed: 12 },
    );
  });
});

describe("canonical path security", () => {
  const refused: Array<[string, RouteRefusal, string[]]> = [
    ["not origin-form", PATH_REFUSALS.notOriginForm, ["", "v1/decks", "*", "http://evil/v1/decks", "%2Fv1"]],
    ["control characters, spaces and NUL", PATH_REFUSALS.control, ["/v1/decks\u0000", "/v1/de\tcks", "/v1/decks ", "/v1 /decks", "/v1/\u007f", "/v1/decks\r\nx: y"]],
    ["a fragment", PATH_REFUSALS.fragment, ["/v1/public#/../decks", "/v1/decks#"]],
    ["a raw backslash", PATH_REFUSALS.backslash, ["/v1\\decks", "/v1/x\\..\\decks", "/v1/decks\\"]],
    ["; path parameters", PATH_REFUSALS.parameter, ["/v1/decks;x=1", "/v1/x/..;/decks", "/v1;/decks", "/v1/decks;"]],
    ["malformed escapes", PATH_REFUSALS.malformedEscape, ["/v1/%zz", "/v1/%", "/v1/%6", "/v1/%6?x", "/v1/%C0%AE", "/v1/%C3", "/v1/%C3%28", "/v1/%ED%A0%80", "/v1/%F5%80%80%80", "/v1/%80"]],
    ["encoded / and \\", PATH_REFUSALS.encodedSlash, ["/v1%2Fdecks", "/v1%2fdecks", "/v1/x/..%2Fdecks", "/v1/x/..%2fdecks", "/v1%5Cdecks", "/v1%5cdecks"]],
    ["encoded dots", PATH_REFUSALS.encodedDot, ["/v1/x/%2E%2E/decks", "/v1/x/%2e%2e/decks", "/v1/%2E/decks", "/v1/decks%2e", "/v1/x/.%2E/decks"]],
    ["encoded NUL and control characters", PATH_REFUSALS.encodedControl, ["/v1/decks%00", "/v1/decks%00.json", "/v1/%0A", "/v1/%0d%0a", "/v1/%7F", "/v1/%1f"]],
    ["encoded %, ;, ? and #", PATH_REFUSALS.encodedDelimiter, ["/v1/%252F", "/v1/decks%3Bx=1", "/v1/decks%3bx", "/v1/decks%3Fx", "/v1/decks%23x"]],
    ["empty segments", PATH_REFUSALS.emptySegment, ["//v1/decks", "/v1//decks", "/v1/decks//", "/v1//"]],
    ["dot segments", PATH_REFUSALS.dotSegment, ["/v1/x/../decks", "/v1/./decks", "/..", "/.", "/../v1/decks", "/v1/decks/.", "/v1/decks/..", "/v1/%78/../decks"]],
    ["segments ending in a dot or a space", PATH_REFUSALS.trailingDot, ["/v1/decks.", "/v1/decks./x", "/v1/decks...", "/v1/decks%20", "/v1/decks%20/x", "/v1/%64ecks."]],
    // What a gRPC Check's path bytes that are not UTF-8 read as (check-request.ts LENIENT_UTF8).
    ["bytes that are not UTF-8", PATH_REFUSALS.notUtf8, ["/v1/d\uFFFDcks", "/\uFFFD", "/v1/decks\uFFFD?q=1"]],
  ];

  it.each(refused)("refuses %s", (_name, refusal, paths) => {
    for (const path of paths) expect(canonicalPath(path), JSON.stringify(path)).toBe(refusal);
  });

  it("every refusal is an INVALID_PATH denial whose message names the problem", () => {
    expect(DENIALS.INVALID_PATH).toMatchObject({ httpStatus: 400, code: "INVALID_REQUEST", retryable: false });
    const messages = new Set<string>();
    for (const refusal of Object.values(PATH_REFUSALS)) {
      expect(refusal).toMatchObject({ allow: false, reason: "INVALID_PATH" });
      expect(refusal.message).toMatch(/^The request path .+, so it is refused\. Send /);
      messages.add(refusal.message);
    }
    expect(messages.size).toBe(Object.keys(PATH_REFUSALS).length);
  });

  it("a query may hold anything: it is cut before the path is judged", () => {
    expect(canonicalPath("/v1/decks?a=%2F&b=..;/\\&c=%zz")).toBe("/v1/decks");
    expect(canonicalPath("/v1/decks?q=\uFFFD")).toBe("/v1/decks");
  });

  it("the routes table refuses what canonicalPath refuses, for every method", () => {
    for (const method of ["GET", "POST", "DELETE"]) {
      expect(table.requirements(method, "/v1/decks;x=1", undefined)).toBe(PATH_REFUSALS.parameter);
      expect(table.match(method, "/v1/x/..%2Fdecks")).toBe(PATH_REFUSALS.encodedSlash);
    }
    // Even an empty table: what the path means is undecidable whatever the routes are.
    expect(new RouteTable([]).requirements("GET", "/v1\\decks", undefined)).toBe(PATH_REFUSALS.backslash);
  });
});

describe("routes happy", () => {
  it("matches the longest prefix on a segment boundary, by method", () => {
    expect(required("GET", "/v1/decks/export/all")).toEqual({ requiredScopes: ["decks", "export"], projectId: null, cost: 5, metered: true, minRole: null, quota: null });
    expect(required("GET", "/v1/decks").requiredScopes).toEqual(["decks"]);
    expect(required("GET", "/v1/%64ecks/").requiredScopes).toEqual(["decks"]);
    expect(required("GET", "/v1/decksx").requiredScopes).toEqual([]);
    expect(required("GET", "/v1/hooks").requiredScopes).toEqual([]);
    expect(required("POST", "/v1/hooks/1").requiredScopes).toEqual(["webhooks"]);
  });

  it("a HEAD that no route names takes GET's route, as servers answer HEAD with the GET handler", () => {
    const getOnly = new RouteTable([
      { method: "GET", pathPrefix: "/v1/decks", requiredScopes: ["read"], cost: 1, metered: true },
      { method: "POST", pathPrefix: "/v1/decks", requiredScopes: ["write"], cost: 1, metered: true },
    ]);
    expect(getOnly.match("HEAD", "/v1/decks/7")).toMatchObject({ method: "GET", requiredScopes: ["read"] });
    expect(getOnly.match("HEAD", "/other")).toBeNull();
    // A route that names HEAD, or takes every method, still decides.
    const named = new RouteTable([
      { method: "HEAD", pathPrefix: "/v1", requiredScopes: ["peek"], cost: 1, metered: true },
      { method: "GET", pathPrefix: "/v1", requiredScopes: ["read"], cost: 1, metered: true },
    ]);
    expect(named.match("HEAD", "/v1/x")).toMatchObject({ method: "HEAD" });
    const star = new RouteTable([
      { method: "*", pathPrefix: "/v1", requiredScopes: ["write"], cost: 1, metered: true },
      { method: "GET", pathPrefix: "/v1", requiredScopes: ["read"], cost: 1, metered: true },
    ]);
    expect(star.match("HEAD", "/v1/x")).toMatchObject({ method: "*" });
  });

  it("a HEAD is judged on GET's route wherever that route comes before the HEAD or catch-all route, so it never needs less than GET", () => {
    const reports = { method: "GET", pathPrefix: "/v1/reports", requiredScopes: ["reports"], cost: 3, metered: true, quota: "exports" };
    const tables = {
      // The catch-all the README recommends, under a GET-only prefix.
      catchAll: [reports, { method: "*", pathPrefix: "/", requiredScopes: ["read"], cost: 1, metered: true }],
      // deploy/config/keygate.example.yaml's routes, with a GET-only prefix deeper under /v1.
      example: [
        reports,
        { method: "*", pathPrefix: "/v1/admin", requiredScopes: ["admin"], cost: 1, metered: true },
        { method: "GET", pathPrefix: "/v1", requiredScopes: ["read"], cost: 1, metered: true },
        { method: "HEAD", pathPrefix: "/v1", requiredScopes: ["read"], cost: 1, metered: true },
        { method: "*", pathPrefix: "/v1", requiredScopes: ["write"], cost: 1, metered: true },
      ],
      // The same prefix: GET listed before the catch-all, so GET takes it, and HEAD with it.
      samePrefix: [
        { method: "GET", pathPrefix: "/v1", requiredScopes: ["reports"], cost: 1, metered: true },
        { method: "*", pathPrefix: "/v1", requiredScopes: ["read"], cost: 1, metered: true },
      ],
    };
    for (const [name, routes] of Object.entries(tables)) {
      const routeTable = new RouteTable(routes);
      for (const path of ["/v1/reports", "/v1/reports/q3?x=1", "/v1/%72eports/q3", "/v1/other", "/v1/admin/x", "/elsewhere"]) {
        expect(routeTable.requirements("HEAD", path, undefined), `${name} ${path}`).toEqual(routeTable.requirements("GET", path, undefined));
      }
    }
    expect(new RouteTable(tables.catchAll).match("HEAD", "/v1/reports/q3")).toBe(reports);
    expect(new RouteTable(tables.example).requirements("HEAD", "/v1/reports/q3", undefined)).toEqual({
      requiredScopes: ["reports"],
      projectId: null,
      cost: 3,
      metered: true,
      minRole: null,
      quota: "exports",
    });
    // A HEAD route more specific than GET's still decides: the policy names HEAD there.
    const peek = { method: "HEAD", pathPrefix: "/v1/reports/peek", requiredScopes: [], cost: 0, metered: false };
    expect(new RouteTable([...tables.catchAll, peek]).match("HEAD", "/v1/reports/peek/1")).toBe(peek);
    // Lower-case "head" is not HEAD to every server: refused where the readings differ.
    expect(new RouteTable(tables.catchAll).match("head", "/v1/reports/q3")).toBe(METHOD_CASE_REFUSAL);
  });

  it("context_extensions win field by field", () => {
    expect(required("GET", "/v1/decks/export", { cost: "0" })).toEqual({ requiredScopes: ["decks", "export"], projectId: null, cost: 0, metered: true, minRole: null, quota: null });
    expect(required("GET", "/other", { required_scopes: "a,,b ", project_id: "p1" })).toEqual({ requiredScopes: ["a", "b"], projectId: "p1", cost: 1, metered: true, minRole: null, quota: null });
    expect(required("GET", "/v1/decks", { cost: " 7 " }).cost).toBe(7);
  });

  it("blank context_extensions mean not set, so the routes table applies", () => {
    for (const blank of ["", " ", "\t ", "\n"]) {
      expect(required("GET", "/v1/decks/export", { required_scopes: blank, project_id: blank, cost: blank })).toEqual({ requiredScopes: ["decks", "export"], projectId: null, cost: 5, metered: true, minRole: null, quota: null });
    }
    expect(required("GET", "/v1/decks", { required_scopes: "" }).requiredScopes).toEqual(["decks"]);
  });
});

describe("routes error", () => {
  it("a cost that is not a whole number is a ROUTE_MISCONFIGURED denial, not an exception", () => {
    for (const cost of ["-1", "1.5", "abc", "1e3", "0x10", "1234567890", "1 2"]) expect(table.requirements("GET", "/v1/decks", { cost })).toBe(ROUTE_CONFIG_REFUSALS.cost);
    expect(DENIALS.ROUTE_MISCONFIGURED).toMatchObject({ httpStatus: 500, retryable: false });
  });

  it("required_scopes that are not scope names are a ROUTE_MISCONFIGURED denial", () => {
    // A value that is not blank but names no scope is a mistake, not "no scope needed".
    for (const scopes of ["Decks", "read write", "read;write", "decks,*", "ünï", ",", " , ", ",,"]) {
      expect(table.requirements("GET", "/v1/decks", { required_scopes: scopes }), scopes).toBe(ROUTE_CONFIG_REFUSALS.requiredScopes);
    }
  });

  it("required_scopes naming a scope outside the policy's catalog is a ROUTE_MISCONFIGURED denial, judged once per value", () => {
    const catalog = new Set(["decks", "export", "webhooks"]);
    expect(table.requirements("GET", "/other", { required_scopes: "decks, export" }, catalog)).toMatchObject({ requiredScopes: ["decks", "export"] });
    for (const scopes of ["deck", "decks,deck", "read"]) {
      expect(table.requirements("GET", "/v1/decks", { required_scopes: scopes }, catalog), scopes).toBe(ROUTE_CONFIG_REFUSALS.unknownScope);
    }
    expect(ROUTE_CONFIG_REFUSALS.unknownScope).toMatchObject({
      reason: "ROUTE_MISCONFIGURED",
      message: 'The gateway\'s per-route "required_scopes" (context_extensions) names a scope that is not in the policy\'s scopes.catalog, so no key can hold it. This is a gateway configuration error.',
    });
    // Not a scope name at all is still that refusal; another catalog judges the same value anew.
    expect(table.requirements("GET", "/v1/decks", { required_scopes: "Deck" }, catalog)).toBe(ROUTE_CONFIG_REFUSALS.requiredScopes);
    expect(table.requirements("GET", "/v1/decks", { required_scopes: "deck" }, new Set(["deck"]))).toMatchObject({ requiredScopes: ["deck"] });
    expect(table.requirements("GET", "/v1/decks", { required_scopes: "deck" }, catalog)).toBe(ROUTE_CONFIG_REFUSALS.unknownScope);
  });

  it("a metered route counts toward the named quota the policy or context_extensions.quota gives; a bad name is ROUTE_MISCONFIGURED", () => {
    const named = new RouteTable([{ method: "*", pathPrefix: "/v1/chat", requiredScopes: [], cost: 1, metered: true, quota: "messages" }]);
    const at = (path: string, extensions?: Record<string, string>) => named.requirements("GET", path, extensions);
    expect(at("/v1/chat/send")).toMatchObject({ quota: "messages" });
    expect(at("/v1/other")).toMatchObject({ quota: null });
    expect(at("/v1/other", { quota: " exports " })).toMatchObject({ quota: "exports" });
    expect(at("/v1/chat", { quota: "Exports!" })).toBe(ROUTE_CONFIG_REFUSALS.quota);
  });

  it("a route's quota must be one some plan lists", () => {
    const plans = { free: { maxActiveKeys: 1, rateLimit: { limit: 10, windowSeconds: 60 }, quotas: { messages: 5 } } };
    const policy = (quota: string) => ({ ...DEFAULT_POLICY_INPUT, defaultPlan: "free", plans, routes: [{ method: "*", pathPrefix: "/v1/chat", quota }] });
    expect(parsePolicy(policy("messages")).routes[0]?.quota).toBe("messages");
    expect(() => parsePolicy(policy("mesages"))).toThrow(/routes\.0\.quota: no plan has a quota "mesages" \(plans' quotas: messages\)/);
  });

  it("a route is metered unless the policy or context_extensions says otherwise", () => {
    const metering = new RouteTable([
      { method: "*", pathPrefix: "/v1/chat", requiredScopes: [], cost: 1, metered: true },
      { method: "*", pathPrefix: "/v1/decks", requiredScopes: [], cost: 1, metered: false },
    ]);
    const of = (path: string, extensions?: Record<string, string>) => {
      const result = metering.requirements("GET", path, extensions);
      if (result instanceof RouteRefusal) throw new Error(result.message);
      return result.metered;
    };
    expect([of("/v1/chat"), of("/v1/decks"), of("/elsewhere")]).toEqual([true, false, true]);
    expect([of("/v1/chat", { metered: "false" }), of("/v1/decks", { metered: "true" }), of("/v1/decks", { metered: " " })]).toEqual([false, true, false]);
    expect(parsePolicy({ ...DEFAULT_POLICY_INPUT, routes: [{ method: "*", pathPrefix: "/v1" }] }).routes[0]?.metered).toBe(true);
  });

  it("a route's lowest role comes from the policy or context_extensions.min_role; an unknown role is ROUTE_MISCONFIGURED", () => {
    const ranked = new RouteTable([{ method: "*", pathPrefix: "/v1/admin", requiredScopes: [], cost: 1, metered: true, minRole: "admin" }]);
    const of = (path: string, extensions?: Record<string, string>) => {
      const result = ranked.requirements("GET", path, extensions);
      return result instanceof RouteRefusal ? result : result.minRole;
    };
    expect([of("/v1/admin"), of("/v1/other"), of("/v1/other", { min_role: " premium " }), of("/v1/admin", { min_role: "" })]).toEqual(["admin", null, "premium", "admin"]);
    for (const value of ["root", "Admin", "admin,premium"]) expect(of("/v1/admin", { min_role: value }), value).toBe(ROUTE_CONFIG_REFUSALS.minRole);
  });

  it("an unusable metered value from the proxy is ROUTE_MISCONFIGURED, never a guess", () => {
    for (const value of ["yes", "1", "TRUE", "false,true"]) expect(table.requirements("GET", "/v1/decks", { metered: value }), value).toBe(ROUTE_CONFIG_REFUSALS.metered);
  });

  it("a path refusal wins over bad per-route settings", () => {
    expect(table.requirements("GET", "/v1/decks;x", { cost: "abc" })).toBe(PATH_REFUSALS.parameter);
  });
});

describe("letter case", () => {
  const routes = [
    { method: "*", pathPrefix: "/v1/decks", requiredScopes: ["decks"], cost: 1, metered: true },
    { method: "*", pathPrefix: "/v1", requiredScopes: ["read"], cost: 1, metered: true },
  ];

  it("by default, matches case exactly and refuses a path that another route would serve with case ignored", () => {
    const exact = new RouteTable(routes);
    expect(exact.match("GET", "/v1/decks/AbC")).toBe(routes[0]);
    expect(exact.match("GET", "/v1/things/AbC")).toBe(routes[1]);
    for (const path of ["/V1/decks", "/v1/Decks", "/v1/DECKS/1", "/V1/things", "/v1/%44ecks"]) expect(exact.match("GET", path), path).toBe(PATH_REFUSALS.letterCase);
    // Case ignored, these still find the same route.
    expect(exact.match("GET", "/v1/Things")).toBe(routes[1]);
    expect(exact.match("GET", "/Other")).toBeNull();
  });

  it("a method not in upper case is refused where upper-casing it picks another route, and judged as sent where it does not", () => {
    const byMethod = new RouteTable([
      { method: "POST", pathPrefix: "/v1/hooks", requiredScopes: ["webhooks"], cost: 1, metered: true },
      { method: "GET", pathPrefix: "/v1/decks", requiredScopes: ["read"], cost: 1, metered: true },
      { method: "*", pathPrefix: "/v1/decks", requiredScopes: ["decks"], cost: 1, metered: true },
    ]);
    // Some servers read "post" as POST, others as a method of its own: no route is right for both.
    for (const [method, path] of [["post", "/v1/hooks/1"], ["Post", "/v1/hooks"], ["get", "/v1/decks"]] as const) expect(byMethod.match(method, path), `${method} ${path}`).toBe(METHOD_CASE_REFUSAL);
    // Either reading finds the same route (or none): nothing to refuse.
    expect(byMethod.match("delete", "/v1/decks")).toMatchObject({ pathPrefix: "/v1/decks", method: "*" });
    expect(byMethod.match("get", "/other")).toBeNull();
    expect(byMethod.match("POST", "/v1/hooks")).toMatchObject({ method: "POST" });
    expect(METHOD_CASE_REFUSAL).toMatchObject({ allow: false, reason: "INVALID_PATH" });
    expect(DENIALS[METHOD_CASE_REFUSAL.reason]).toMatchObject({ httpStatus: 400, code: "INVALID_REQUEST" });
  });

  it("reads characters that case-insensitive servers take for ASCII letters as those letters, raw or escaped", () => {
    // "ſ" and "ı" upper-case to S and I; the Kelvin sign and "İ" lower-case to k and i; "ß" to SS.
    expect(asciiCaseReading("/v1/\u017Fecret")).toBe("/v1/secret");
    expect(asciiCaseReading("/v1/adm\u0131n")).toBe("/v1/admin");
    expect(asciiCaseReading("/v1/\u212Aeys")).toBe("/v1/keys");
    expect(asciiCaseReading("/v1/%E2%84%AAeys/%C4%B0d")).toBe("/v1/keys/id");
    expect(asciiCaseReading("/v1/stra%C3%9Fe")).toBe("/v1/strasse");
    // Nothing to read: ASCII, other escapes, letters without an ASCII case mapping, emoji.
    for (const path of ["/v1/keys", "/v1/a%20b", "/v1/caf%C3%A9", "/v1/\u00E9t\u00E9", "/v1/%F0%9F%98%80", "/v1/\u{1F600}"]) expect(asciiCaseReading(path), path).toBeNull();
  });

  it("a path whose ASCII reading picks another route is refused, in both matching modes; one whose reading picks the same route is judged", () => {
    const routes = [
      { method: "*", pathPrefix: "/v1/secret", requiredScopes: ["admin"], cost: 1, metered: true },
      { method: "*", pathPrefix: "/v1/admin", requiredScopes: ["admin"], cost: 1, metered: true },
      { method: "*", pathPrefix: "/v1", requiredScopes: ["read"], cost: 1, metered: true },
    ];
    for (const caseInsensitive of [false, true]) {
      const table = new RouteTable(routes, { caseInsensitive });
      for (const path of ["/v1/\u017Fecret", "/v1/%C5%BFecret/x", "/v1/adm\u0131n", "/v1/ADM%C4%B1N", "/v1/\u017Fecret?x=1"]) {
        expect(table.match("GET", path), `${path}, caseInsensitive ${caseInsensitive}`).toBe(PATH_REFUSALS.unicodeCase);
      }
      // Read either way, these land on the same route: judged as usual.
      expect(table.match("GET", "/v1/caf%C3%A9")).toMatchObject({ pathPrefix: "/v1" });
      expect(table.match("GET", "/v1/stra%C3%9Fe")).toMatchObject({ pathPrefix: "/v1" });
      expect(table.match("GET", "/v1/secret/\u017F")).toMatchObject({ pathPrefix: "/v1/secret" });
    }
    expect(DENIALS[PATH_REFUSALS.unicodeCase.reason]).toMatchObject({ httpStatus: 400, code: "INVALID_REQUEST" });
  });

  it("a format suffix whose bare path picks another route (or none) is refused, in both matching modes; one that names its own route, or lands on the same one, is judged", () => {
    const routes = [
      { method: "*", pathPrefix: "/v1/chat", requiredScopes: ["tutor"], cost: 1, metered: true },
      { method: "GET", pathPrefix: "/v1/export.csv", requiredScopes: ["export"], cost: 1, metered: true },
      { method: "*", pathPrefix: "/v1/files", requiredScopes: ["files"], cost: 1, metered: true },
      { method: "*", pathPrefix: "/projects/{project}/report.pdf", requiredScopes: ["reports"], cost: 1, metered: true },
      { method: "*", pathPrefix: "/", requiredScopes: [], cost: 0, metered: false },
    ];
    for (const caseInsensitive of [false, true]) {
      const table = new RouteTable(routes, { caseInsensitive });
      // Rails reads each of these as /v1/chat (or /v1/chat/x): the catch-all would judge them.
      for (const [method, path] of [
        ["POST", "/v1/chat.json"],
        ["HEAD", "/v1/chat.xml"],
        ["GET", "/v1/chat.json?x=1"],
        ["GET", "/v1/chat.tar.gz"],
        ["GET", "/v1/export.csv.json"],
        ["GET", "/v1/chat.json/"],
      ] as const) {
        expect(table.match(method, path), `${method} ${path}, caseInsensitive ${caseInsensitive}`).toBe(PATH_REFUSALS.formatSuffix);
      }
      // The same route either way, a route naming the suffixed segment, a leading dot, a dot
      // before the last segment: judged as usual.
      expect(table.match("GET", "/v1/files/report.pdf")).toMatchObject({ pathPrefix: "/v1/files" });
      expect(table.match("GET", "/v1/chat/messages.json")).toMatchObject({ pathPrefix: "/v1/chat" });
      expect(table.match("GET", "/v1/export.csv")).toMatchObject({ pathPrefix: "/v1/export.csv" });
      expect(table.match("GET", "/projects/p1/report.pdf")).toMatchObject({ pathPrefix: "/projects/{project}/report.pdf" });
      expect(table.match("GET", "/favicon.ico")).toMatchObject({ pathPrefix: "/" });
      expect(table.match("GET", "/v1/.well-known")).toMatchObject({ pathPrefix: "/" });
      expect(table.match("GET", "/v1.2/chat")).toMatchObject({ pathPrefix: "/" });
    }
    // Letter case ignored and the suffix cut, together (Spring's case-insensitive matcher).
    const secret = new RouteTable([
      { method: "*", pathPrefix: "/v1/secret", requiredScopes: ["admin"], cost: 1, metered: true },
      { method: "*", pathPrefix: "/", requiredScopes: [], cost: 0, metered: false },
    ]);
    for (const path of ["/v1/Secret.json", "/v1/SECRET.xml/", "/v1/\u017Fecret.json"]) expect(secret.match("GET", path), path).toBe(PATH_REFUSALS.formatSuffix);
    // A {project} route whose tail holds a dot elsewhere still has its last segment's suffix read.
    const versioned = new RouteTable([
      { method: "*", pathPrefix: "/projects/{project}/v1.0", requiredScopes: [], cost: 0, metered: false },
      { method: "*", pathPrefix: "/projects/{project}/v1.0/admin", requiredScopes: ["admin"], cost: 1, metered: true },
    ]);
    expect(versioned.match("GET", "/projects/p1/v1.0/admin.json")).toBe(PATH_REFUSALS.formatSuffix);
    expect(versioned.match("GET", "/projects/p1/v1.0")).toMatchObject({ pathPrefix: "/projects/{project}/v1.0" });
    // A suffix on the {project} segment: Rails reads project "acme", not "acme.json".
    const project = new RouteTable([{ method: "*", pathPrefix: "/projects/{project}", requiredScopes: [], cost: 1, metered: true }]);
    expect(project.requirements("GET", "/projects/acme.json", undefined)).toBe(PATH_REFUSALS.projectSuffix);
    expect(PATH_REFUSALS.projectSuffix.message).not.toMatch(/another route|name the suffixed path/);
    expect(project.requirements("GET", "/projects/acme.json/jobs", undefined)).toMatchObject({ projectId: "acme.json" });
    expect(project.requirements("GET", "/projects/acme/export.csv", undefined)).toMatchObject({ projectId: "acme" });
    // No route but the suffixed one's bare path: "none" is another route too.
    const bare = new RouteTable([{ method: "*", pathPrefix: "/v1/admin", requiredScopes: ["admin"], cost: 1, metered: true }]);
    expect(bare.match("GET", "/v1/admin.json")).toBe(PATH_REFUSALS.formatSuffix);
    expect(bare.match("GET", "/v1/other.json")).toBeNull();
    expect(DENIALS[PATH_REFUSALS.formatSuffix.reason]).toMatchObject({ httpStatus: 400, code: "INVALID_REQUEST" });
    expect(DENIALS[PATH_REFUSALS.projectSuffix.reason]).toMatchObject({ httpStatus: 400, code: "INVALID_REQUEST" });
  });

  it("a path longer than MAX_PATH_LENGTH before its query is refused; a long query is not the path's length", () => {
    expect(canonicalPath(`/${"a".repeat(MAX_PATH_LENGTH - 1)}`)).toBe(`/${"a".repeat(MAX_PATH_LENGTH - 1)}`);
    expect(canonicalPath(`/${"a".repeat(MAX_PATH_LENGTH)}`)).toBe(PATH_REFUSALS.tooLong);
    expect(canonicalPath(`/${"%C5%BF".repeat(700_000)}`)).toBe(PATH_REFUSALS.tooLong);
    expect(canonicalPath(`/v1/x?${"q".repeat(MAX_PATH_LENGTH * 2)}`)).toBe("/v1/x");
  });

  it("CONNECT is refused in any letter case, with routes or without, before a route is picked", () => {
    const table = new RouteTable([{ method: "*", pathPrefix: "/v1", requiredScopes: ["read"], cost: 1, metered: true }]);
    for (const method of ["CONNECT", "connect", "Connect"]) {
      for (const path of ["/", "/v1/x"]) {
        expect(table.match(method, path), `${method} ${path}`).toBe(CONNECT_REFUSAL);
        expect(new RouteTable([]).match(method, path), `${method} ${path}, no routes`).toBe(CONNECT_REFUSAL);
      }
    }
    expect(table.requirements("CONNECT", "/", undefined)).toBe(CONNECT_REFUSAL);
    expect(DENIALS[CONNECT_REFUSAL.reason]).toMatchObject({ httpStatus: 400, code: "INVALID_REQUEST" });
    expect(table.match("OPTIONS", "/v1/x")).toMatchObject({ pathPrefix: "/v1" });
  });

  it("a mixed-case prefix is held to the same rule, even for a lower-case path", () => {
    const mixed = new RouteTable([
      { method: "*", pathPrefix: "/v1/Admin", requiredScopes: ["admin"], cost: 1, metered: true },
      { method: "*", pathPrefix: "/v1", requiredScopes: ["read"], cost: 1, metered: true },
    ]);
    expect(mixed.match("GET", "/v1/admin")).toBe(PATH_REFUSALS.letterCase);
    expect(mixed.match("GET", "/v1/Admin")).toMatchObject({ pathPrefix: "/v1/Admin" });
  });

  it("routeMatching.caseInsensitive folds letter case instead of refusing", () => {
    const folded = new RouteTable(routes, { caseInsensitive: true });
    for (const path of ["/V1/decks", "/v1/Decks", "/V1/DECKS/1", "/v1/%44ecks"]) expect(folded.match("GET", path), path).toBe(routes[0]);
    expect(folded.match("GET", "/V1/things")).toBe(routes[1]);
  });

  it("is a policy option, off by default", () => {
    expect(parsePolicy(DEFAULT_POLICY_INPUT).routeMatching).toEqual({ caseInsensitive: false });
    expect(parsePolicy({ ...DEFAULT_POLICY_INPUT, routeMatching: { caseInsensitive: true } }).routeMatching).toEqual({ caseInsensitive: true });
    expect(() => parsePolicy({ ...DEFAULT_POLICY_INPUT, routeMatching: { caseInsensitive: "yes" } })).toThrow(/routeMatching\.caseInsensitive/);
  });
});

describe("route prefixes in the policy", () => {
  const withPrefix = (pathPrefix: string) => ({ ...DEFAULT_POLICY_INPUT, routes: [{ method: "*", pathPrefix, requiredScopes: ["read"] }] });

  it("accepts canonical prefixes of unreserved characters", () => {
    for (const prefix of ["/", "/v1", "/v1/", "/v1/decks", "/api/v1.2/x_y-z~", "/.well-known"]) expect(() => parsePolicy(withPrefix(prefix)), prefix).not.toThrow();
  });

  it("refuses a prefix that no canonical path could match segment for segment", () => {
    for (const prefix of ["/v1//decks", "/v1/./decks", "/v1/../decks", "/v1/decks.", "/v1/%64ecks", "/v1/a;b", "/v1\\decks", "/v1/a b", "/v1/a:b", "//"]) {
      expect(() => parsePolicy(withPrefix(prefix)), prefix).toThrow(/routes\.0\.pathPrefix: a path prefix is "\/" or "\/"-separated segments/);
    }
  });
});

describe("project from the path", () => {
  const routes = [
    { method: "*", pathPrefix: "/projects/{project}/jobs", requiredScopes: ["read"], cost: 2, metered: true },
    { method: "*", pathPrefix: "/projects/shared/jobs", requiredScopes: ["read"], cost: 1, metered: true },
    { method: "*", pathPrefix: "/projects/{project}", requiredScopes: [], cost: 1, metered: true },
    { method: "*", pathPrefix: "/v1", requiredScopes: [], cost: 1, metered: true },
  ];
  const projects = new RouteTable(routes);
  const project = (path: string, extensions?: Record<string, string>, on = projects) => {
    const result = on.requirements("GET", path, extensions);
    if (result instanceof RouteRefusal) throw new Error(`refused ${path}: ${result.message}`);
    return result.projectId;
  };

  it("a {project} segment matches any one segment and names the project the key is held to", () => {
    expect(projects.match("GET", "/projects/proj_a/jobs")).toBe(routes[0]);
    expect(project("/projects/proj_a/jobs")).toBe("proj_a");
    expect(project("/projects/proj_b/jobs/42/logs?x=1")).toBe("proj_b");
    expect(project("/projects/proj_b")).toBe("proj_b");
    expect(project("/projects/proj_b/other")).toBe("proj_b");
    expect(projects.match("GET", "/projects/proj_b/other")).toBe(routes[2]);
    // An escaped unreserved character is the same segment the upstream reads.
    expect(project("/projects/proj%5Fa/jobs")).toBe("proj_a");
    expect(project("/v1/projects/proj_a/jobs")).toBeNull();
    expect(project("/projects")).toBeNull();
  });

  it("a literal segment wins over {project} at the same depth", () => {
    expect(projects.match("GET", "/projects/shared/jobs/1")).toBe(routes[1]);
    expect(project("/projects/shared/jobs/1")).toBeNull();
    expect(project("/projects/shared")).toBe("shared");
  });

  it("a path that escapes a slash or dot-segments its way to another project is refused, not read as one", () => {
    for (const path of ["/projects/proj_a%2F..%2Fproj_b/jobs", "/projects/proj_a/../proj_b/jobs", "/projects//jobs", "/projects/proj_a;x=1/jobs", "/projects/./jobs"]) {
      expect(projects.requirements("GET", path, undefined), path).toBeInstanceOf(RouteRefusal);
    }
  });

  it("context_extensions.project_id may only agree with the path's project", () => {
    expect(project("/projects/proj_a/jobs", { project_id: "proj_a" })).toBe("proj_a");
    expect(projects.requirements("GET", "/projects/proj_a/jobs", { project_id: "proj_b" })).toBe(ROUTE_CONFIG_REFUSALS.projectId);
    expect(DENIALS[ROUTE_CONFIG_REFUSALS.projectId.reason].httpStatus).toBe(500);
    expect(project("/v1/x", { project_id: "proj_b" })).toBe("proj_b");
  });

  it("with case ignored, routes match folded but the project keeps the path's own letters", () => {
    const folded = new RouteTable(routes, { caseInsensitive: true });
    expect(folded.match("GET", "/Projects/Proj_A/JOBS")).toBe(routes[0]);
    expect(project("/Projects/Proj_A/JOBS", undefined, folded)).toBe("Proj_A");
  });

  it("with case exact, a path another route would serve case-folded is refused, past the project too", () => {
    expect(projects.match("GET", "/projects/proj_a/JOBS")).toBe(PATH_REFUSALS.letterCase);
    expect(projects.match("GET", "/projects/Proj_A/jobs")).toBe(routes[0]);
  });

  it("the policy takes one {project} segment, and not beside a fixed projectId", () => {
    const withRoute = (route: Record<string, unknown>) => ({ ...DEFAULT_POLICY_INPUT, routes: [{ method: "*", requiredScopes: ["read"], ...route }] });
    expect(parsePolicy(withRoute({ pathPrefix: "/projects/{project}/jobs" })).routes[0]?.pathPrefix).toBe("/projects/{project}/jobs");
    expect(parsePolicy(withRoute({ pathPrefix: "/{project}" })).routes[0]?.pathPrefix).toBe("/{project}");
    expect(() => parsePolicy(withRoute({ pathPrefix: "/a/{project}/b/{project}" }))).toThrow(/routes\.0\.pathPrefix: at most one \{project\} segment/);
    expect(() => parsePolicy(withRoute({ pathPrefix: "/a/{project}", projectId: "p" }))).toThrow(/routes\.0\.projectId: a route whose path names the project/);
    for (const prefix of ["/a/{projects}", "/a/x{project}", "/a/{project}x", "/a/{Project}"]) {
      expect(() => parsePolicy(withRoute({ pathPrefix: prefix })), prefix).toThrow(/routes\.0\.pathPrefix: a path prefix is/);
    }
  });
});
