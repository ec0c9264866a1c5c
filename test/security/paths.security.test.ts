import { readFileSync } from "node:fs";
import { Agent } from "node:http";
import { resolve } from "node:path";
import fc from "fast-check";
import { parse as parseYaml } from "yaml";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { DEFAULT_POLICY_INPUT, parsePolicy } from "../../src/config.js";
import type { CheckResponse } from "../../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import { checkInit, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { requireServer } from "../harness/ports.js";
import { binaryAvailable, startCaddy, startNginx } from "../harness/proxies.js";
import type { RunningProxy } from "../harness/proxies.js";
import { rawRequest, startCountingUpstream } from "../harness/raw-http.js";
import type { CountingUpstream, RawAnswer } from "../harness/raw-http.js";

// Paths that different servers read differently must be refused (400 INVALID_REQUEST), never
// judged as one route and served as another. Each case runs against the HTTP mode and gRPC Check
// on real listeners, and through real nginx and Caddy started from the configs in deploy/.

const EXAMPLE = parsePolicy(parseYaml(readFileSync(resolve(import.meta.dirname, "../../deploy/config/keygate.example.yaml"), "utf8")));

/** The shipped example policy plus a route that a `read` key must not reach: /v1/decks needs `decks`. */
const ROUTE_POLICY = {
  ...EXAMPLE,
  scopes: { catalog: [...EXAMPLE.scopes.catalog, "decks"], default: ["read"] },
  routes: [{ method: "*", pathPrefix: "/v1/decks", requiredScopes: ["decks"], cost: 1 }, ...EXAMPLE.routes],
};

/** What one entry point answered: the status and, for keygate's JSON answers, error.code. */
interface Outcome {
  status: number;
  code: string | null;
}

const REFUSED: Outcome = { status: 400, code: "INVALID_REQUEST" };
const NO_DECKS: Outcome = { status: 403, code: "FORBIDDEN" };
const NO_WRITE: Outcome = { status: 403, code: "FORBIDDEN" };
const SERVED: Outcome = { status: 200, code: null };

/** error.code and error.message of keygate's JSON answer; nulls for anything else (a proxy's own page). */
function errorOf(body: string): { code: string | null; message: string } {
  let parsed: unknown;
  try {
    parsed = JSON.parse(body);
  } catch {
    return { code: null, message: "" };
  }
  if (typeof parsed !== "object" || parsed === null || !("error" in parsed)) return { code: null, message: "" };
  const { error } = parsed;
  if (typeof error !== "object" || error === null) return { code: null, message: "" };
  return {
    code: "code" in error && typeof error.code === "string" ? error.code : null,
    message: "message" in error && typeof error.message === "string" ? error.message : "",
  };
}

const codeOf = (body: string): string | null => errorOf(body).code;

function outcomeOfHttp(answer: RawAnswer): Outcome {
  return { status: answer.status, code: codeOf(answer.body) };
}

function outcomeOfCheck(response: CheckResponse): Outcome & { message: string } {
  if (response.httpResponse.case === "okResponse") return { status: 200, code: null, message: "" };
  if (response.httpResponse.case !== "deniedResponse") throw new Error(`Check answered ${response.httpResponse.case ?? "nothing"}`);
  const body = response.httpResponse.value.body;
  return { status: response.httpResponse.value.status?.code ?? 0, ...errorOf(body) };
}

/** One path class of the issue, with paths that a `read` key sends hoping for /v1/decks (or a write). */
interface AttackClass {
  name: string;
  method: string;
  paths: string[];
}

const ATTACKS: AttackClass[] = [
  { name: "; path parameters (servlet containers strip them)", method: "GET", paths: ["/v1/decks;x=1", "/v1/x/..;/decks", "/v1;/decks", "/v1/decks;jsessionid=1/2"] },
  { name: "encoded slash and backslash", method: "GET", paths: ["/v1%2Fdecks", "/v1%2fdecks", "/v1/x/..%2Fdecks", "/v1/x/..%2fdecks", "/v1%5Cdecks", "/v1/x/..%5cdecks"] },
  { name: "raw backslash", method: "GET", paths: ["/v1\\decks", "/v1/x\\..\\decks"] },
  { name: "encoded dots", method: "GET", paths: ["/v1/x/%2e%2e/decks", "/v1/x/%2E%2E/decks", "/v1/x/.%2e/decks", "/v1/%2e/decks"] },
  { name: "encoded NUL and control characters", method: "GET", paths: ["/v1/decks%00", "/v1/decks%00.json", "/v1/decks%0a", "/v1/decks%0D%0A"] },
  { name: "double encoding", method: "GET", paths: ["/v1/x/..%252Fdecks", "/v1%252Fdecks", "/v1/%2564ecks"] },
  { name: "overlong UTF-8 and malformed escapes", method: "GET", paths: ["/v1/x/%C0%AE%C0%AE/decks", "/v1/decks%C0", "/v1/decks%zz", "/v1/decks%"] },
  { name: "trailing dots and spaces (Windows strips them)", method: "GET", paths: ["/v1/decks.", "/v1/decks./1", "/v1/decks..", "/v1/decks%20"] },
  { name: "dot segments and empty segments", method: "GET", paths: ["/v1/x/../decks", "/v1/./decks", "/v1//decks", "//v1/decks", "/v1/things/../decks/1"] },
  { name: "letter case (case-insensitive servers)", method: "GET", paths: ["/V1/decks", "/v1/Decks", "/v1/DECKS/1", "/v1/%44ecks"] },
  { name: "fragment", method: "GET", paths: ["/v1/things#/../decks", "/v1/decks#"] },
  { name: "writes with a path only some servers route", method: "PUT", paths: ["/v1/things;x=1", "/v1/x/..;/things", "/v1\\things", "/v1/things.", "/v1/x/..%2Fthings"] },
];

/** Canonical or equivalent paths that must still be judged, not refused. */
const JUDGED: Array<[method: string, path: string, outcome: Outcome]> = [
  ["GET", "/v1/things", SERVED],
  ["GET", "/v1/decks", NO_DECKS],
  ["GET", "/v1/%64ecks", NO_DECKS],
  ["GET", "/v1/decks/", NO_DECKS],
  ["GET", "/v1/decks?x=..%2F;%00", NO_DECKS],
  ["PUT", "/v1/things", NO_WRITE],
  ["DELETE", "/v1/%74hings", NO_WRITE],
];

/** Every refused request across the attack classes, as [class, method, path]. */
const ATTACK_CASES = ATTACKS.flatMap((c) => c.paths.map((path) => [c.name, c.method, path] as const));

let kg: TestKeygate;
let reader = "";
const agent = new Agent({ keepAlive: true, maxSockets: 4 });

async function keyFor(instance: TestKeygate, ownerId: string, scopes: string[], plan = "basic"): Promise<string> {
  await instance.admin.upsertAccount({ ownerId, plan });
  return (await instance.admin.createKey({ ownerId, name: "paths", scopes })).secret;
}

beforeAll(async () => {
  kg = await startKeygate({ policy: ROUTE_POLICY });
  reader = await keyFor(kg, "paths-reader", ["read"], "business");
});
afterAll(async () => {
  agent.destroy();
  await kg?.stop();
});

describe("paths security: HTTP mode (Envoy HTTP service: the path below /check)", () => {
  it.each(ATTACK_CASES)("%s: %s %s is refused with 400 INVALID_REQUEST", async (_class, method, path) => {
    const answer = await rawRequest(kg.ports.http, method, `/check${path}`, { authorization: `Bearer ${reader}` }, agent);
    expect(outcomeOfHttp(answer)).toEqual(REFUSED);
    expect(answer.headers["content-type"]).toBe("application/json");
  });

  it.each(JUDGED)("%s %s is judged, not refused", async (method, path, outcome) => {
    expect(outcomeOfHttp(await rawRequest(kg.ports.http, method, `/check${path}`, { authorization: `Bearer ${reader}` }, agent))).toEqual(outcome);
  });
});

describe("paths security: gRPC Check", () => {
  it.each(ATTACK_CASES)("%s: %s %s is refused with 400 INVALID_REQUEST", async (_class, method, path) => {
    const response = await kg.check(checkInit({ authorization: `Bearer ${reader}` }, path, method));
    expect(outcomeOfCheck(response)).toMatchObject(REFUSED);
    // google.rpc INVALID_ARGUMENT: any non-OK status is a denial to Envoy.
    expect(response.status?.code).toBe(3);
  });

  it.each([["*"], ["v1/decks"], ["http://evil/v1/decks"], ["/v1/decks\u0000"], ["/v1/de\tcks"], ["/v1/decks "], ["/v1/decks\r\nx-evil: 1"]])(
    "the raw path %j (a Check from any client may carry it) is refused",
    async (path) => {
      expect(outcomeOfCheck(await kg.check(checkInit({ authorization: `Bearer ${reader}` }, path)))).toMatchObject(REFUSED);
    },
  );

  it.each(JUDGED)("%s %s is judged, not refused", async (method, path, outcome) => {
    expect(outcomeOfCheck(await kg.check(checkInit({ authorization: `Bearer ${reader}` }, path, method)))).toMatchObject(outcome);
  });

  it("the denial names the problem, and a keyless request is still a 401 whatever its path", async () => {
    const refused = outcomeOfCheck(await kg.check(checkInit({ authorization: `Bearer ${reader}` }, "/v1/x/..;/decks")));
    expect(refused.message).toBe(
      'The request path contains ";" (a path parameter, as in ";x=1" or "..;/"), which servers read differently, so it is refused. Send the path in canonical form.',
    );
    expect(outcomeOfCheck(await kg.check(checkInit({}, "/v1/x/..;/decks")))).toMatchObject({ status: 401, code: "UNAUTHENTICATED" });
  });
});

describe("paths security: routeMatching.caseInsensitive", () => {
  let folded: TestKeygate;
  let key = "";
  beforeAll(async () => {
    folded = await startKeygate({ policy: { ...ROUTE_POLICY, routeMatching: { caseInsensitive: true } } });
    key = await keyFor(folded, "paths-folded", ["read"], "business");
  });
  afterAll(async () => {
    await folded?.stop();
  });

  it.each(["/V1/decks", "/v1/Decks", "/v1/DECKS/1", "/v1/%44ecks"])("%s is judged as /v1/decks: 403 FORBIDDEN on both entry points", async (path) => {
    expect(outcomeOfHttp(await rawRequest(folded.ports.http, "GET", `/check${path}`, { authorization: `Bearer ${key}` }, agent))).toEqual(NO_DECKS);
    expect(outcomeOfCheck(await folded.check(checkInit({ authorization: `Bearer ${key}` }, path)))).toMatchObject(NO_DECKS);
  });
});

// ---- through the shipped proxy configs ----------------------------------------------------------

interface ProxyCase {
  name: string;
  available: boolean;
  start: (keygatePort: number, upstreamPort: number) => Promise<RunningProxy>;
  /** KEYGATE_HTTP_AUTHZ_PROXY for this proxy. */
  setting: string;
  /** Targets the proxy itself refuses (400, its own page) before asking keygate. */
  refusesItself: ReadonlySet<string>;
}

// Both proxies refuse a malformed escape themselves.
const MALFORMED_ESCAPES = ["/v1/decks%zz", "/v1/decks%"];

const PROXIES: ProxyCase[] = [
  {
    name: "nginx",
    available: requireServer("nginx", binaryAvailable("nginx", ["-v"]), "apt-get install nginx"),
    start: startNginx,
    setting: "nginx",
    // nginx also refuses an escaped NUL and the asterisk form itself.
    refusesItself: new Set([...MALFORMED_ESCAPES, "/v1/decks%00", "/v1/decks%00.json", "*"]),
  },
  {
    name: "caddy",
    available: requireServer("caddy", binaryAvailable("caddy", ["version"]), "apt-get install caddy"),
    start: startCaddy,
    setting: "caddy",
    refusesItself: new Set(MALFORMED_ESCAPES),
  },
];

describe.each(PROXIES)("paths security: behind $name (the shipped config)", ({ name, available, start, setting, refusesItself }) => {
  let behind: TestKeygate;
  let upstream: CountingUpstream;
  let proxy: RunningProxy;
  let key = "";

  beforeAll(async () => {
    if (!available) return;
    behind = await startKeygate({ policy: ROUTE_POLICY, env: { KEYGATE_HTTP_AUTHZ_PROXY: setting } });
    key = await keyFor(behind, `paths-${name}`, ["read"], "business");
    upstream = await startCountingUpstream();
    proxy = await start(behind.ports.http, upstream.port);
  });
  afterAll(async () => {
    if (!available) return;
    await proxy?.stop();
    await upstream?.stop();
    await behind?.stop();
  });

  it.runIf(available).each(ATTACK_CASES)("%s: %s %s never reaches the upstream", async (_class, method, path) => {
    const before = upstream.received.length;
    const answer = await rawRequest(proxy.port, method, path, { authorization: `Bearer ${key}` });
    if (refusesItself.has(path)) expect(outcomeOfHttp(answer)).toEqual({ status: 400, code: null });
    else expect(outcomeOfHttp(answer)).toEqual(REFUSED);
    expect(upstream.received.slice(before)).toEqual([]);
  });

  it.runIf(available)("an asterisk-form target (GET *) never reaches the upstream", async () => {
    const before = upstream.received.length;
    const answer = await rawRequest(proxy.port, "GET", "*", { authorization: `Bearer ${key}` });
    expect(outcomeOfHttp(answer)).toEqual(refusesItself.has("*") ? { status: 400, code: null } : REFUSED);
    expect(upstream.received.slice(before)).toEqual([]);
  });

  it.runIf(available).each(JUDGED)("%s %s is judged, and served only when allowed", async (method, path, outcome) => {
    const before = upstream.received.length;
    expect(outcomeOfHttp(await rawRequest(proxy.port, method, path, { authorization: `Bearer ${key}` }))).toEqual(outcome);
    expect(upstream.received.length - before).toBe(outcome.status === 200 ? 1 : 0);
  });
});

// ---- the property --------------------------------------------------------------------------------

// Every route asks for its own scope and the key holds none of them, so a denial's message names
// the route keygate judged: 403 'does not have the "decks" scope' is /v1/decks, 200 is no route.
const PROPERTY_ROUTES = [
  { method: "*", pathPrefix: "/v1/admin", scope: "admin" },
  { method: "*", pathPrefix: "/v1/decks", scope: "decks" },
  { method: "*", pathPrefix: "/v1/decks/export", scope: "export" },
  { method: "GET", pathPrefix: "/v1", scope: "read" },
  { method: "*", pathPrefix: "/v1", scope: "write" },
  { method: "*", pathPrefix: "/v2/Beta", scope: "beta" },
  { method: "*", pathPrefix: "/public", scope: "public" },
] as const;

const PROPERTY_POLICY = {
  ...DEFAULT_POLICY_INPUT,
  defaultPlan: "unlimited",
  plans: { unlimited: { maxActiveKeys: 10, rateLimit: { limit: 1_000_000, windowSeconds: 60 }, dailyQuota: null, monthlyCredits: null } },
  scopes: { catalog: ["nothing", ...PROPERTY_ROUTES.map((r) => r.scope)], default: ["nothing"] },
  routes: PROPERTY_ROUTES.map((r) => ({ method: r.method, pathPrefix: r.pathPrefix, requiredScopes: [r.scope] })),
};

/**
 * Letter case as Java's equalsIgnoreCase ignores it, character by character: upper-cased, then
 * lower-cased, so "ſ" (upper S), "ı" (upper I) and the Kelvin sign (lower k) match ASCII letters.
 */
const unicodeFold = (s: string): string => [...s].map((c) => c.toUpperCase().toLowerCase()).join("");

/** The route (its scope) a server picks for an already-decoded path, or "none". */
function servedRoute(method: string, path: string, caseInsensitive: boolean | "unicode"): string {
  const fold = (s: string): string => (caseInsensitive === "unicode" ? unicodeFold(s) : caseInsensitive ? s.toLowerCase() : s);
  const target = fold(path);
  const byLength = [...PROPERTY_ROUTES].sort((a, b) => b.pathPrefix.length - a.pathPrefix.length);
  for (const route of byLength) {
    if (route.method !== "*" && route.method !== method) continue;
    const prefix = fold(route.pathPrefix);
    if (target === prefix || target.startsWith(`${prefix}/`)) return route.scope;
  }
  return "none";
}

const UNRESERVED = /^[A-Za-z0-9._~-]$/;
const cutQuery = (p: string): string => p.split("?")[0] ?? "";
const cutFragment = (p: string): string => p.split("#")[0] ?? "";
/**
 * A format suffix taken off the last segment, as Rails' optional "(.:format)" (at the last dot)
 * or Spring MVC's suffix patterns before 5.3 (at the first) read it; a leading dot is a name.
 */
const cutFormat = (p: string, at: "first" | "last"): string => {
  const start = p.lastIndexOf("/") + 2;
  const dot = at === "first" ? p.indexOf(".", start) : p.lastIndexOf(".");
  return dot >= start ? p.slice(0, dot) : p;
};
const decodeUnreserved = (p: string): string =>
  p.replace(/%([0-9A-Fa-f]{2})/g, (escape, hex: string) => {
    const char = String.fromCharCode(parseInt(hex, 16));
    return UNRESERVED.test(char) ? char : escape;
  });
/** Decodes runs of escapes as UTF-8, as Java and .NET servers do (a malformed run decodes to U+FFFD). */
const decodeUtf8 = (p: string): string => p.replace(/(?:%[0-9A-Fa-f]{2})+/g, (run) => Buffer.from(run.replace(/%/g, ""), "hex").toString("utf8"));
const decodeAll = (p: string): string => p.replace(/%([0-9A-Fa-f]{2})/g, (_escape, hex: string) => String.fromCharCode(parseInt(hex, 16)));
const backslashes = (p: string): string => p.replace(/\\/g, "/");
const stripParameters = (p: string): string => p.split("/").map((s) => s.split(";")[0] ?? "").join("/");
const cutAtNul = (p: string): string => p.split("\u0000")[0] ?? "";

/** RFC 3986 dot-segment removal with merged slashes; `stripTrailing` drops trailing dots and spaces as Windows does. */
function resolveDots(p: string, stripTrailing = false): string {
  const out: string[] = [];
  for (const raw of p.split("/")) {
    const segment = stripTrailing && raw !== "." && raw !== ".." ? raw.replace(/[. ]+$/, "") : raw;
    if (segment === "" || segment === ".") continue;
    if (segment === "..") out.pop();
    else out.push(segment);
  }
  return `/${out.join("/")}`;
}

/** How some real upstream reads a raw path: the path it serves, and whether it ignores case. */
interface Reading {
  name: string;
  serve: (raw: string) => string;
  caseInsensitive: boolean | "unicode";
}

const READINGS: Reading[] = [
  { name: "RFC 3986 (Envoy normalize_path + merge_slashes)", serve: (p) => resolveDots(decodeUnreserved(cutFragment(cutQuery(p)))), caseInsensitive: false },
  { name: "servlet (;-parameters stripped, then decoded)", serve: (p) => resolveDots(decodeAll(stripParameters(cutFragment(cutQuery(p))))), caseInsensitive: false },
  { name: "%2F-decoding framework", serve: (p) => resolveDots(decodeAll(cutFragment(cutQuery(p)))), caseInsensitive: false },
  { name: "double decoding", serve: (p) => resolveDots(decodeAll(decodeAll(cutFragment(cutQuery(p))))), caseInsensitive: false },
  { name: "backslash as slash", serve: (p) => resolveDots(backslashes(decodeAll(backslashes(cutFragment(cutQuery(p)))))), caseInsensitive: false },
  { name: "trailing dots stripped", serve: (p) => resolveDots(decodeAll(cutFragment(cutQuery(p))), true), caseInsensitive: false },
  { name: "NUL-terminated (C strings)", serve: (p) => resolveDots(cutAtNul(decodeAll(cutFragment(cutQuery(p))))), caseInsensitive: false },
  { name: "# taken literally", serve: (p) => resolveDots(decodeAll(cutQuery(p))), caseInsensitive: false },
  { name: "case-insensitive (RFC 3986)", serve: (p) => resolveDots(decodeUnreserved(cutFragment(cutQuery(p)))), caseInsensitive: true },
  {
    name: "IIS-like (backslash, decoded, trailing dots stripped, case ignored)",
    serve: (p) => resolveDots(backslashes(decodeAll(backslashes(cutFragment(cutQuery(p))))), true),
    caseInsensitive: true,
  },
  { name: "Java/.NET ignoring case (UTF-8 decoded, Unicode case mapping)", serve: (p) => resolveDots(decodeUtf8(cutFragment(cutQuery(p)))), caseInsensitive: "unicode" },
  { name: "format suffix at the last dot (Rails)", serve: (p) => cutFormat(resolveDots(decodeUnreserved(cutFragment(cutQuery(p)))), "last"), caseInsensitive: false },
  { name: "format suffix at the first dot (Spring MVC before 5.3)", serve: (p) => cutFormat(resolveDots(decodeUnreserved(cutFragment(cutQuery(p)))), "first"), caseInsensitive: false },
  { name: "format suffix, letter case ignored (Spring's case-insensitive matcher)", serve: (p) => cutFormat(resolveDots(decodeUnreserved(cutFragment(cutQuery(p)))), "first"), caseInsensitive: true },
];

// Pieces of the paths: names of the routes in several spellings (letter case, escaped letters),
// and the risky pieces of the issue. Plain pieces are likelier, so that many paths reach a route.
const FIRST = fc.constantFrom("v1", "V1", "%76%31", "v2", "public", "Public", "x");
// "deck%C5%BF" is "deckſ" and "adm%C4%B1n" "admın": "decks" and "admin" to a server ignoring case.
const PLAIN = fc.constantFrom("decks", "DECKS", "Decks", "admin", "Admin", "%61dmin", "%64ecks", "%44ecks", "export", "beta", "Beta", "x", "d%65cks", "%7Ex", "a%20b", "v1", "deck%C5%BF", "adm%C4%B1n", "caf%C3%A9");
const RISKY = fc.constantFrom(
  ".", "..", "%2e%2e", "%2E", "..;", "decks;x=1", ";x=1", "decks.", "decks..", "decks%20", "decks%00", "%00", "%2F", "%2f", "%5C", "\\",
  "%252F", "..%2F", "..%2f", "%C0%AE", "decks%3Bx", "admin%23", "decks.json", "admin.xml", "export.csv.json", "x.json", "Decks.json", "ADMIN.XML",
);
const SEGMENT = fc.oneof({ arbitrary: PLAIN, weight: 5 }, { arbitrary: RISKY, weight: 2 });
const SEPARATOR = fc.oneof(
  { arbitrary: fc.constant("/"), weight: 8 },
  { arbitrary: fc.constantFrom("//", "\\", "%2F", "%2f", "%5c", "/./", "/../", "/..;/", "/;x/", "/%2e%2e/"), weight: 2 },
);
const TAIL = fc.oneof(
  { arbitrary: fc.constantFrom("", "/", "?q=..%2F;"), weight: 6 },
  { arbitrary: fc.constantFrom(".", "..", ";", ";x=1", "%00", "%20", "#f", "#/../admin", "%2F", "\\"), weight: 2 },
);

const riskyPath = fc
  .tuple(FIRST, fc.array(fc.tuple(SEPARATOR, SEGMENT), { maxLength: 3 }), TAIL)
  .map(([first, rest, tail]) => `/${first}${rest.map(([separator, segment]) => separator + segment).join("")}${tail}`);

/** keygate's verdict from an answer: "refused", the judged route's scope, or "none". */
function verdict(outcome: Outcome & { message: string }): string {
  if (outcome.status === 400 && outcome.code === "INVALID_REQUEST") return "refused";
  if (outcome.status === 200) return "none";
  const scope = /^This API key does not have the "([a-z]+)" scope\.$/.exec(outcome.message)?.[1];
  if (outcome.status === 403 && scope !== undefined) return scope;
  throw new Error(`unexpected answer ${JSON.stringify(outcome)}`);
}

describe.each([
  { matching: "exact letter case (the default)", caseInsensitive: false },
  { matching: "routeMatching.caseInsensitive", caseInsensitive: true },
])("paths security property: $matching", ({ caseInsensitive }) => {
  let instance: TestKeygate;
  let key = "";
  beforeAll(async () => {
    instance = await startKeygate({ policy: { ...PROPERTY_POLICY, routeMatching: { caseInsensitive } } });
    key = await keyFor(instance, `paths-property-${String(caseInsensitive)}`, [], "unlimited");
  });
  afterAll(async () => {
    await instance?.stop();
  });

  it("for every risky path, keygate refuses it, or judges the route every normalizing upstream serves", async () => {
    // An operator who declares the upstream case-insensitive is held to the case-insensitive readings.
    const readings = caseInsensitive ? READINGS.map((r) => ({ ...r, caseInsensitive: r.caseInsensitive === false ? true : r.caseInsensitive })) : READINGS;
    const judged = new Map<string, number>();
    await fc.assert(
      fc.asyncProperty(riskyPath, fc.constantFrom("GET", "DELETE"), async (path, method) => {
        const viaHttp = await rawRequest(instance.ports.http, method, `/check${path}`, { authorization: `Bearer ${key}` }, agent);
        const http = verdict({ status: viaHttp.status, ...errorOf(viaHttp.body) });
        const grpc = verdict(outcomeOfCheck(await instance.check(checkInit({ authorization: `Bearer ${key}` }, path, method))));
        expect(grpc, `gRPC and HTTP disagree on ${method} ${path}`).toBe(http);
        judged.set(http, (judged.get(http) ?? 0) + 1);
        if (http === "refused") return;
        for (const reading of readings) {
          expect(servedRoute(method, reading.serve(path), reading.caseInsensitive), `${method} ${path}: keygate judged "${http}", ${reading.name} serves`).toBe(http);
        }
      }),
      { seed: 20_240_612, numRuns: 2000 },
    );
    // Neither side holds vacuously: many paths are refused, and many are judged, across routes.
    expect(judged.get("refused") ?? 0).toBeGreaterThan(500);
    const routesJudged = [...judged.keys()].filter((v) => v !== "refused");
    expect(routesJudged.length).toBeGreaterThanOrEqual(5);
    expect([...judged.entries()].filter(([v]) => v !== "refused").reduce((n, [, count]) => n + count, 0)).toBeGreaterThan(500);
  });
});
