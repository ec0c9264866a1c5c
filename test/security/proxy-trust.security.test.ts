import { request } from "node:http";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { CONNECT_REFUSAL, METHOD_CASE_REFUSAL, PATH_REFUSALS } from "../../src/authz/routes.js";
import { DEFAULT_POLICY_INPUT } from "../../src/config.js";
import type { HttpAuthzProxy } from "../../src/config.js";
import { startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { shippedProxies, startEchoUpstream } from "../harness/proxies.js";
import type { EchoedRequest, RunningProxy } from "../harness/proxies.js";
import { sendRaw } from "../harness/raw-http.js";

// Finding 1 of issue 12: the route and method keygate judged were chosen by the client. keygate
// read X-Forwarded-Uri before X-Original-URI (and X-Forwarded-Method before X-Original-Method),
// nginx's auth_request passes every client header on, so a `read` key sent GET /v1/decks with
// X-Forwarded-Uri: /public and nginx served /v1/decks. Now the HTTP mode reads exactly one
// source, the one KEYGATE_HTTP_AUTHZ_PROXY names, and refuses a check carrying a disagreeing copy.

const POLICY = {
  ...DEFAULT_POLICY_INPUT,
  defaultPlan: "standard",
  plans: { standard: { maxActiveKeys: 10, rateLimit: { limit: 10_000, windowSeconds: 60 }, dailyQuota: null, monthlyCredits: null } },
  scopes: { catalog: ["read", "write", "decks"], default: ["read"] },
  // /public matches no route, so it needs no scope.
  routes: [
    { method: "*", pathPrefix: "/v1/decks", requiredScopes: ["decks"] },
    { method: "POST", pathPrefix: "/v1/notes", requiredScopes: ["write"] },
  ],
};

const DECKS_MESSAGE = 'This API key does not have the "decks" scope.';
const WRITE_MESSAGE = 'This API key does not have the "write" scope.';

interface ErrorBody {
  success: boolean;
  error: { title: string; message: string; retryable: boolean; statusCode: number; code: string };
  requestId: string;
}

interface Answer {
  status: number;
  contentType: string | undefined;
  text: string;
}

function errorOf(answer: Answer): ErrorBody["error"] {
  expect(answer.contentType, answer.text).toBe("application/json");
  return (JSON.parse(answer.text) as ErrorBody).error;
}

/** One request with node:http, which sends an array value as repeated header lines (fetch joins them). */
function send(port: number, method: string, path: string, headers: Record<string, string | string[]>): Promise<Answer> {
  return new Promise((resolve, reject) => {
    const req = request({ host: "127.0.0.1", port, method, path, headers: { connection: "close", ...headers } }, (res) => {
      let text = "";
      res.setEncoding("utf8");
      res.on("data", (chunk: string) => (text += chunk));
      res.on("end", () => resolve({ status: res.statusCode ?? 0, contentType: res.headers["content-type"], text }));
      res.on("error", reject);
    });
    // An upgrade the far end accepted (101): answered here, so a test fails on it at once.
    req.on("upgrade", (res, socket) => {
      socket.destroy();
      resolve({ status: res.statusCode ?? 0, contentType: res.headers["content-type"], text: "" });
    });
    req.on("error", reject);
    req.end();
  });
}

/**
 * A CONNECT with its authority-form target, on a raw socket (node:http's client hands a CONNECT
 * answer to its tunnel logic); the proxy closes the connection after its answer.
 */
function sendConnect(port: number, target: string, headers: Record<string, string>): Promise<{ status: number; text: string }> {
  return sendRaw(port, `CONNECT ${target} HTTP/1.1`, [["Host", target], ["Connection", "close"], ...Object.entries(headers)]);
}

async function issue(kg: TestKeygate, ownerId: string, scopes: string[]): Promise<string> {
  await kg.admin.upsertAccount({ ownerId, plan: "standard" });
  return (await kg.admin.createKey({ ownerId, name: "trust", scopes })).secret;
}

// ---- through the shipped nginx and Caddy configs ---------------------------------------------------

/** A client's attempt to have keygate judge something other than what the proxy serves. */
interface Spoof {
  name: string;
  method: string;
  path: string;
  headers: Record<string, string>;
  message: string;
}

const SPOOFS: Spoof[] = [
  { name: "X-Forwarded-Uri: /public on GET /v1/decks", method: "GET", path: "/v1/decks", headers: { "X-Forwarded-Uri": "/public" }, message: DECKS_MESSAGE },
  { name: "X-Original-URI: /public on GET /v1/decks", method: "GET", path: "/v1/decks", headers: { "X-Original-URI": "/public" }, message: DECKS_MESSAGE },
  {
    name: "both URI headers: /public on GET /v1/decks/7",
    method: "GET",
    path: "/v1/decks/7",
    headers: { "X-Forwarded-Uri": "/public", "X-Original-URI": "/public" },
    message: DECKS_MESSAGE,
  },
  { name: "X-Forwarded-Method: GET on POST /v1/notes", method: "POST", path: "/v1/notes", headers: { "X-Forwarded-Method": "GET" }, message: WRITE_MESSAGE },
  { name: "X-Original-Method: GET on POST /v1/notes", method: "POST", path: "/v1/notes", headers: { "X-Original-Method": "GET" }, message: WRITE_MESSAGE },
  {
    name: "every header at once on POST /v1/decks",
    method: "POST",
    path: "/v1/decks",
    headers: { "X-Forwarded-Uri": "/public", "X-Original-URI": "/public", "X-Forwarded-Method": "GET", "X-Original-Method": "GET" },
    message: DECKS_MESSAGE,
  },
];

describe.each(shippedProxies())("proxy trust security: behind $name (the shipped config)", ({ available, start, setting, name }) => {
  let kg: TestKeygate;
  let atDefault: TestKeygate;
  let upstream: Awaited<ReturnType<typeof startEchoUpstream>>;
  let proxy: RunningProxy;
  let proxyToDefault: RunningProxy;
  let readKey = "";
  let decksKey = "";

  beforeAll(async () => {
    if (!available) return;
    kg = await startKeygate({ policy: POLICY, httpAuthzProxy: setting });
    atDefault = await startKeygate({ policy: POLICY });
    upstream = await startEchoUpstream();
    proxy = await start(kg.ports.http, upstream.port);
    proxyToDefault = await start(atDefault.ports.http, upstream.port);
    readKey = await issue(kg, `trust-${name}-read`, ["read"]);
    decksKey = await issue(kg, `trust-${name}-decks`, ["read", "decks"]);
  });
  afterAll(async () => {
    if (!available) return;
    await proxy?.stop();
    await proxyToDefault?.stop();
    await upstream?.stop();
    await kg?.stop();
    await atDefault?.stop();
  });

  it.runIf(available).each(SPOOFS)("a read key's $name is judged on what the proxy serves: 403, the upstream never reached", async (spoof) => {
    const before = upstream.requests.length;
    const res = await send(proxy.port, spoof.method, spoof.path, { "x-api-key": readKey, ...spoof.headers });
    expect(res.status, res.text).toBe(403);
    expect(errorOf(res)).toMatchObject({ code: "FORBIDDEN", statusCode: 403, message: spoof.message });
    expect(upstream.requests.length).toBe(before);
  });

  it.runIf(available)("a decks key's GET /v1/decks with every spoof is judged /v1/decks, and the upstream serves exactly that", async () => {
    const before = upstream.requests.length;
    const spoofs = { "X-Forwarded-Uri": "/public", "X-Original-URI": "/public", "X-Forwarded-Method": "DELETE", "X-Original-Method": "DELETE" };
    const res = await send(proxy.port, "GET", "/v1/decks?page=2", { "x-api-key": decksKey, ...spoofs });
    expect(res.status, res.text).toBe(200);
    const seen = JSON.parse(res.text) as EchoedRequest;
    expect({ method: seen.method, url: seen.url, scopes: seen.headers["x-keygate-scopes"] }).toEqual({ method: "GET", url: "/v1/decks?page=2", scopes: "read,decks" });
    expect(upstream.requests.length).toBe(before + 1);
  });

  it.runIf(available)("the upstream gets none of a client's rewrite and method-override headers, nor the key's underscore spelling", async () => {
    // Frameworks and servers that obey one of these would serve another method or path than the
    // one keygate judged; CGI-style servers read X_Api_Key as X-Api-Key.
    const rewrites: Record<string, string> = {
      "X-Original-URI": "/v1/admin",
      "X-Original-Method": "DELETE",
      "X-Original-URL": "/v1/admin",
      "X-Rewrite-URL": "/v1/admin",
      "X-Forwarded-Uri": "/v1/admin",
      "X-Forwarded-Method": "DELETE",
      "X-HTTP-Method-Override": "DELETE",
      "X-HTTP-Method": "DELETE",
      "X-Method-Override": "DELETE",
    };
    const res = await send(proxy.port, "GET", "/v1/decks", { "x-api-key": decksKey, X_Api_Key: decksKey, ...rewrites });
    expect(res.status, res.text).toBe(200);
    const seen = JSON.parse(res.text) as EchoedRequest;
    expect({ method: seen.method, url: seen.url }).toEqual({ method: "GET", url: "/v1/decks" });
    const reached = [...Object.keys(rewrites), "X_Api_Key", "X-Api-Key"].filter((name) => seen.headers[name.toLowerCase()] !== undefined);
    expect(reached).toEqual([]);
  });

  it.runIf(available)("a CONNECT with a valid key is refused 400, and no tunnel to the upstream opens (Caddy passes it on as the path \"/\")", async () => {
    const before = upstream.requests.length;
    const res = await sendConnect(proxy.port, `127.0.0.1:${upstream.port}`, { "x-api-key": decksKey });
    expect(res.status, res.text).toBe(400);
    // nginx refuses an authority-form target itself; Caddy asks keygate, which refuses the method.
    if (name === "caddy") expect(res.text).toContain(JSON.stringify(CONNECT_REFUSAL.message));
    expect(upstream.requests.length).toBe(before);
  });

  it.runIf(available).each([
    ["one Connection line", [["Connection", "close, X-Keygate-Owner-Id, x-keygate-scopes"]]],
    ["a second Connection line", [["Connection", "close"], ["Connection", "X-Keygate-Key-Id"]]],
    ["the underscore spelling", [["Connection", "close, X_Keygate_Owner_Id"]]],
  ] as const)("a Connection header naming x-keygate-* headers never takes keygate's identity off an allowed request (%s)", async (_name, connection) => {
    const before = upstream.requests.length;
    const res = await sendRaw(proxy.port, "GET /v1/decks HTTP/1.1", [["Host", "127.0.0.1"], ["x-api-key", decksKey], ...connection]);
    if (name === "caddy") {
      // Caddy drops what Connection names after the check: refused before it.
      expect(res.status, res.text).toBe(400);
      expect(res.text).toContain('"code":"INVALID_REQUEST"');
      expect(upstream.requests.length).toBe(before);
      return;
    }
    // nginx does not drop what Connection names: the API gets keygate's identity.
    expect(res.status, res.text).toBe(200);
    const seen = upstream.requests.at(-1);
    expect([seen?.headers["x-keygate-owner-id"], seen?.headers["x-keygate-scopes"], typeof seen?.headers["x-keygate-key-id"]]).toEqual([`trust-${name}-decks`, "read,decks", "string"]);
  });

  it.runIf(available)("a path in raw UTF-8 is judged as the UTF-8 the API reads: \"/v1/deckſ\" is refused, never judged as a path with no route", async () => {
    const before = upstream.requests.length;
    // sendRaw writes UTF-8: "ſ" goes as the two bytes C5 BF.
    const res = await sendRaw(proxy.port, "GET /v1/deck\u017f HTTP/1.1", [["Host", "127.0.0.1"], ["Connection", "close"], ["x-api-key", readKey]]);
    expect(res.status, res.text).toBe(400);
    expect(res.text).toContain(JSON.stringify(UNICODE_CASE_MESSAGE));
    expect(upstream.requests.length).toBe(before);
  });

  it.runIf(available)("an h2c upgrade with a valid key never reaches the upstream as an upgrade (Caddy passes it on: keygate refuses it 400)", async () => {
    const before = upstream.requests.length;
    const res = await send(proxy.port, "GET", "/public", { "x-api-key": decksKey, connection: "Upgrade, HTTP2-Settings", upgrade: "h2c", "http2-settings": "AAMAAABkAARAAAAAAAIAAAAA" });
    const upgrades = upstream.requests.slice(before).filter((r) => r.headers["upgrade"] !== undefined);
    expect(upgrades).toEqual([]);
    if (name === "caddy") {
      expect(res.status, res.text).toBe(400);
      expect(errorOf(res)).toMatchObject({ code: "INVALID_REQUEST", message: H2C_MESSAGE });
      expect(upstream.requests.length).toBe(before);
    } else {
      // nginx sends neither Upgrade nor Connection on: a plain GET, judged and served.
      expect(res.status, res.text).toBe(200);
    }
  });

  it.runIf(available)("a read key's GET /public with X-*-Uri: /v1/decks is judged /public: 200, and the upstream serves /public", async () => {
    const res = await send(proxy.port, "GET", "/public", { "x-api-key": readKey, "X-Forwarded-Uri": "/v1/decks", "X-Original-URI": "/v1/decks" });
    expect(res.status, res.text).toBe(200);
    const seen = JSON.parse(res.text) as EchoedRequest;
    expect({ method: seen.method, url: seen.url }).toEqual({ method: "GET", url: "/public" });
  });

  it.runIf(available)("in front of a keygate left at the default (envoy), every check is refused with 500 naming the variable, never judged on a guess", async () => {
    const before = upstream.requests.length;
    const res = await send(proxyToDefault.port, "GET", "/public", { "x-api-key": readKey });
    expect(res.status, res.text).toBe(500);
    const error = errorOf(res);
    expect(error).toMatchObject({ code: "PROXY_MISCONFIGURED", statusCode: 500 });
    expect(error.message).toContain("KEYGATE_HTTP_AUTHZ_PROXY");
    expect(upstream.requests.length).toBe(before);
  });
});

// ---- the HTTP mode directly, for each proxy keygate can be set for ---------------------------------

/** A direct check and the answer it must get: a status and, for a refusal, its code. */
interface DirectCase {
  name: string;
  method: string;
  path: string;
  headers: Record<string, string | string[]>;
  status: number;
  code?: string;
  /** The exact message, or text it must contain. */
  message?: string;
  contains?: string;
}

/** The header pair each setting trusts, and the pair it does not. */
const PAIRS = {
  original: { uri: "X-Original-URI", method: "X-Original-Method" },
  forwarded: { uri: "X-Forwarded-Uri", method: "X-Forwarded-Method" },
} as const;

function headerModeCases(proxy: Exclude<HttpAuthzProxy, "envoy">): DirectCase[] {
  const [t, o] = proxy === "nginx" ? [PAIRS.original, PAIRS.forwarded] : [PAIRS.forwarded, PAIRS.original];
  const trusted = (uri: string | string[], method: string | string[] = "GET"): Record<string, string | string[]> => ({ [t.uri]: uri, [t.method]: method });
  const conflict = (header: string): string => `The request carries ${header}, which disagrees with ${t.uri} and ${t.method}, where keygate reads the request (KEYGATE_HTTP_AUTHZ_PROXY=${proxy}).`;
  return [
    { name: `judges ${t.uri}: /v1/decks`, method: "GET", path: "/check", headers: trusted("/v1/decks"), status: 403, code: "FORBIDDEN", message: DECKS_MESSAGE },
    { name: `judges ${t.uri}: /public`, method: "GET", path: "/check", headers: trusted("/public"), status: 200 },
    { name: `judges ${t.method}: POST, not the check's own GET`, method: "GET", path: "/check", headers: trusted("/v1/notes", "POST"), status: 403, code: "FORBIDDEN", message: WRITE_MESSAGE },
    { name: `judges ${t.method}: GET, not the check's own POST`, method: "POST", path: "/check", headers: trusted("/v1/notes", "GET"), status: 200 },
    // Caddy and Traefik pass a lower-case method on as sent: some servers read "post" as POST.
    { name: `refuses ${t.method}: post where POST has a route of its own`, method: "GET", path: "/check", headers: trusted("/v1/notes", "post"), status: 400, code: "INVALID_REQUEST", message: METHOD_CASE_REFUSAL.message },
    { name: `judges ${t.method}: get where no route depends on it`, method: "GET", path: "/check", headers: trusted("/public", "get"), status: 200 },
    // Caddy passes a CONNECT on as the path "/": a tunnel, not an API request.
    { name: `refuses ${t.method}: CONNECT, whatever the path`, method: "GET", path: "/check", headers: trusted("/", "CONNECT"), status: 400, code: "INVALID_REQUEST", message: CONNECT_REFUSAL.message },
    {
      name: `refuses ${t.uri} repeated with different values`,
      method: "GET",
      path: "/check",
      headers: trusted(["/public", "/v1/decks"]),
      status: 400,
      code: "CONFLICTING_REQUEST",
      message: `The request carries ${t.uri} more than once, with different values.`,
    },
    { name: `accepts ${t.uri} repeated with the same value`, method: "GET", path: "/check", headers: trusted(["/v1/decks", "/v1/decks"]), status: 403, code: "FORBIDDEN" },
    {
      name: `refuses ${t.method} repeated with different values`,
      method: "GET",
      path: "/check",
      headers: trusted("/v1/notes", ["GET", "POST"]),
      status: 400,
      code: "CONFLICTING_REQUEST",
      message: `The request carries ${t.method} more than once, with different values.`,
    },
    { name: `refuses ${o.uri} that disagrees`, method: "GET", path: "/check", headers: { ...trusted("/v1/decks"), [o.uri]: "/public" }, status: 400, code: "CONFLICTING_REQUEST", message: conflict(o.uri) },
    { name: `refuses ${o.method} that disagrees`, method: "GET", path: "/check", headers: { ...trusted("/v1/notes", "POST"), [o.method]: "GET" }, status: 400, code: "CONFLICTING_REQUEST", message: conflict(o.method) },
    { name: `refuses ${o.uri} repeated with different values`, method: "GET", path: "/check", headers: { ...trusted("/v1/decks"), [o.uri]: ["/v1/decks", "/public"] }, status: 400, code: "CONFLICTING_REQUEST" },
    { name: `accepts ${o.uri} and ${o.method} that agree`, method: "GET", path: "/check", headers: { ...trusted("/v1/decks"), [o.uri]: "/v1/decks", [o.method]: "GET" }, status: 403, code: "FORBIDDEN" },
    {
      name: "refuses a path below /check that disagrees",
      method: "GET",
      path: "/check/public",
      headers: trusted("/v1/decks"),
      status: 400,
      code: "CONFLICTING_REQUEST",
      message: `The path below /check disagrees with ${t.uri} and ${t.method}, where keygate reads the request (KEYGATE_HTTP_AUTHZ_PROXY=${proxy}).`,
    },
    // Envoy's shape sent to a keygate set for another proxy: a 400, which Envoy's
    // failure_mode_allow cannot turn into an allow as it would a 5xx.
    { name: "refuses a path below /check without the headers with 400, not 5xx", method: "GET", path: "/check/public", headers: {}, status: 400, code: "CONFLICTING_REQUEST" },
    { name: `refuses a bare /check without ${t.uri} with 500 naming the variable`, method: "GET", path: "/check", headers: {}, status: 500, code: "PROXY_MISCONFIGURED", contains: `KEYGATE_HTTP_AUTHZ_PROXY=${proxy} reads ${t.uri}` },
    { name: `refuses ${t.uri} without ${t.method} with 500`, method: "GET", path: "/check", headers: { [t.uri]: "/public" }, status: 500, code: "PROXY_MISCONFIGURED" },
    { name: `refuses only ${o.uri} and ${o.method} with 500`, method: "GET", path: "/check", headers: { [o.uri]: "/public", [o.method]: "GET" }, status: 500, code: "PROXY_MISCONFIGURED" },
  ];
}

function envoyCases(): DirectCase[] {
  const conflict = (header: string): string =>
    `The request carries ${header}, which disagrees with the path below /check and the request's own method, where keygate reads the request (KEYGATE_HTTP_AUTHZ_PROXY=envoy).`;
  return [
    { name: "judges the path below /check: /v1/decks", method: "GET", path: "/check/v1/decks", headers: {}, status: 403, code: "FORBIDDEN", message: DECKS_MESSAGE },
    { name: "judges the path below /check: /public", method: "GET", path: "/check/public", headers: {}, status: 200 },
    { name: "judges the request's own method: POST", method: "POST", path: "/check/v1/notes", headers: {}, status: 403, code: "FORBIDDEN", message: WRITE_MESSAGE },
    { name: "judges a bare /check as the path /", method: "GET", path: "/check", headers: {}, status: 200 },
    { name: "refuses X-Forwarded-Uri that disagrees", method: "GET", path: "/check/v1/decks", headers: { "X-Forwarded-Uri": "/public" }, status: 400, code: "CONFLICTING_REQUEST", message: conflict("X-Forwarded-Uri") },
    { name: "refuses X-Original-URI that disagrees", method: "GET", path: "/check/v1/decks", headers: { "X-Original-URI": "/public" }, status: 400, code: "CONFLICTING_REQUEST", message: conflict("X-Original-URI") },
    { name: "refuses X-Forwarded-Method that disagrees", method: "POST", path: "/check/v1/notes", headers: { "X-Forwarded-Method": "GET" }, status: 400, code: "CONFLICTING_REQUEST", message: conflict("X-Forwarded-Method") },
    { name: "refuses X-Original-Method that disagrees", method: "POST", path: "/check/v1/notes", headers: { "X-Original-Method": "GET" }, status: 400, code: "CONFLICTING_REQUEST", message: conflict("X-Original-Method") },
    { name: "refuses X-Forwarded-Uri repeated with different values", method: "GET", path: "/check/v1/decks", headers: { "X-Forwarded-Uri": ["/v1/decks", "/public"] }, status: 400, code: "CONFLICTING_REQUEST" },
    { name: "accepts headers that agree with the path below /check", method: "GET", path: "/check/v1/decks", headers: { "X-Original-URI": "/v1/decks", "X-Forwarded-Method": "GET" }, status: 403, code: "FORBIDDEN" },
    {
      name: "refuses a bare /check with X-Original-URI with 500 naming the variable and nginx",
      method: "GET",
      path: "/check",
      headers: { "X-Original-URI": "/public", "X-Original-Method": "GET" },
      status: 500,
      code: "PROXY_MISCONFIGURED",
      message:
        "KEYGATE_HTTP_AUTHZ_PROXY=envoy reads the path below /check and the request's own method, but this request came to a bare /check with X-Original-URI: set KEYGATE_HTTP_AUTHZ_PROXY to the proxy in front of keygate (nginx).",
    },
    { name: "refuses a bare /check with X-Forwarded-Uri with 500 naming caddy or traefik", method: "GET", path: "/check", headers: { "X-Forwarded-Uri": "/public" }, status: 500, code: "PROXY_MISCONFIGURED", contains: "(caddy or traefik)" },
    { name: "refuses a bare /check with only X-Forwarded-Method with 500", method: "GET", path: "/check", headers: { "X-Forwarded-Method": "GET" }, status: 500, code: "PROXY_MISCONFIGURED" },
  ];
}

const H2C_MESSAGE = "The request asks to upgrade its connection to h2c, which would carry later requests to the upstream unchecked, so it is refused.";

/** Upgrade headers, the same in every mode: h2c in any spelling is refused, a WebSocket judged. */
function upgradeCases(proxy: HttpAuthzProxy): DirectCase[] {
  const [method, path, judged] = proxy === "envoy" ? ["GET", "/check/public", {}] : ["GET", "/check", { [PAIRS[proxy === "nginx" ? "original" : "forwarded"].uri]: "/public", [PAIRS[proxy === "nginx" ? "original" : "forwarded"].method]: "GET" }];
  const h2c = (upgrade: string): DirectCase => ({ name: `refuses Upgrade: ${upgrade}`, method, path, headers: { ...judged, upgrade }, status: 400, code: "INVALID_REQUEST", message: H2C_MESSAGE });
  return [h2c("h2c"), h2c("H2C"), h2c("websocket, h2c"), { name: "judges Upgrade: websocket as the request it names", method, path, headers: { ...judged, upgrade: "websocket" }, status: 200 }];
}

const UNICODE_CASE_MESSAGE = PATH_REFUSALS.unicodeCase.message;

/**
 * Raw UTF-8 in the path, as a client can send it through nginx and Caddy (node:http writes each
 * character below U+0100 as one byte): "deck" + C5 BF is "deckſ", which Java and .NET read as
 * "decks" when they ignore case; C3 A9 is "é", read as nothing else; a lone FF is not UTF-8.
 */
function rawUtf8Cases(proxy: HttpAuthzProxy): DirectCase[] {
  // Node's HTTP parser refuses such a request target itself (400, no body): below /check it never reaches the routes step.
  if (proxy === "envoy") return [{ name: "refuses a request target in raw UTF-8 (Node's parser)", method: "GET", path: "/check/v1/deck\u00c5\u00bf", headers: {}, status: 400, code: "INVALID_REQUEST" }];
  const at = (path: string): Pick<DirectCase, "path" | "headers"> => {
    const pair = PAIRS[proxy === "nginx" ? "original" : "forwarded"];
    return { path: "/check", headers: { [pair.uri]: path, [pair.method]: "GET" } };
  };
  return [
    { name: "refuses raw UTF-8 whose case-insensitive reading is another route (deckſ)", method: "GET", ...at("/v1/deck\u00c5\u00bf"), status: 400, code: "INVALID_REQUEST", message: UNICODE_CASE_MESSAGE },
    { name: "judges raw UTF-8 with no ASCII reading as the path it is (café)", method: "GET", ...at("/v1/caf\u00c3\u00a9"), status: 200 },
    { name: "refuses raw bytes that are not UTF-8", method: "GET", ...at("/v1/x\u00ff"), status: 400, code: "INVALID_REQUEST" },
  ];
}

const SETTINGS: Array<{ proxy: HttpAuthzProxy; cases: DirectCase[] }> = [
  { proxy: "envoy", cases: [...envoyCases(), ...upgradeCases("envoy"), ...rawUtf8Cases("envoy")] },
  { proxy: "nginx", cases: [...headerModeCases("nginx"), ...upgradeCases("nginx"), ...rawUtf8Cases("nginx")] },
  { proxy: "caddy", cases: [...headerModeCases("caddy"), ...upgradeCases("caddy"), ...rawUtf8Cases("caddy")] },
  { proxy: "traefik", cases: [...headerModeCases("traefik"), ...upgradeCases("traefik"), ...rawUtf8Cases("traefik")] },
];

describe.each(SETTINGS)("proxy trust security: the HTTP mode with KEYGATE_HTTP_AUTHZ_PROXY=$proxy", ({ proxy, cases }) => {
  let kg: TestKeygate;
  let readKey = "";

  beforeAll(async () => {
    // envoy is the default: that instance runs with the variable unset.
    kg = await startKeygate({ policy: POLICY, ...(proxy === "envoy" ? {} : { httpAuthzProxy: proxy }) });
    readKey = await issue(kg, `direct-${proxy}`, ["read"]);
  });
  afterAll(async () => {
    await kg?.stop();
  });

  it.each(cases)("$name", async (c) => {
    const res = await send(kg.ports.http, c.method, c.path, { "x-api-key": readKey, ...c.headers });
    expect(res.status, res.text).toBe(c.status);
    if (c.code === undefined) {
      expect(res.text).toBe("");
      return;
    }
    const error = errorOf(res);
    expect(error).toMatchObject({ code: c.code, statusCode: c.status, retryable: false });
    if (c.message !== undefined) expect(error.message).toBe(c.message);
    if (c.contains !== undefined) expect(error.message).toContain(c.contains);
  });

  it("refuses a disagreeing copy before looking at the key: no key gets the same 400", async () => {
    const conflicting = proxy === "envoy" ? { "X-Forwarded-Uri": "/public" } : { [proxy === "nginx" ? "X-Original-URI" : "X-Forwarded-Uri"]: ["/a", "/b"] };
    const res = await send(kg.ports.http, "GET", "/check/v1/decks", conflicting);
    expect(res.status, res.text).toBe(400);
    expect(errorOf(res).code).toBe("CONFLICTING_REQUEST");
  });
});
