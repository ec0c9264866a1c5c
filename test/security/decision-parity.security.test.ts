import { mkdtempSync, rmSync } from "node:fs";
import { request } from "node:http";
import { tmpdir } from "node:os";
import { join } from "node:path";
import fc from "fast-check";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { DEFAULT_POLICY_INPUT } from "../../src/config.js";
import type { CheckResponse } from "../../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import { checkInit, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { requireServer } from "../harness/ports.js";
import { redisAvailable, startRedis } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";

// One client request judged through gRPC Check and through the HTTP mode as Envoy's HTTP
// service, nginx (X-Original-*) and Caddy (X-Forwarded-*) send it gets the same allow/deny,
// status, code and (for allows) identity and limit headers, over generated methods, paths
// (encodings, dot segments, Unicode, queries) and credential placements. Three keygates share
// one data dir and Redis, so they hold the same keys and policy. PARITY_RUNS and PARITY_SEED
// run it longer or elsewhere; the default seed keeps CI's run the same each time.

const POLICY = {
  ...DEFAULT_POLICY_INPUT,
  defaultPlan: "big",
  plans: {
    big: { maxActiveKeys: 10, rateLimit: { limit: 1_000_000, windowSeconds: 60 }, dailyQuota: 1_000_000, quotas: { chat: 1_000_000 }, monthlyCredits: 100_000_000 },
  },
  scopes: { catalog: ["read", "write", "decks", "admin"], default: ["read"] },
  routes: [
    { method: "*", pathPrefix: "/v1/decks", requiredScopes: ["decks"] },
    { method: "POST", pathPrefix: "/v1/decks/import", requiredScopes: ["write"], cost: 3 },
    { method: "GET", pathPrefix: "/v1/notes", requiredScopes: ["read"] },
    { method: "POST", pathPrefix: "/v1/notes", requiredScopes: ["write"], quota: "chat" },
    { method: "*", pathPrefix: "/v1/notes", requiredScopes: ["admin"] },
    { method: "*", pathPrefix: "/v1/free", metered: false },
    { method: "*", pathPrefix: "/v1/admin", minRole: "admin" },
    { method: "*", pathPrefix: "/v1/projects/{project}/jobs", requiredScopes: ["read"] },
    { method: "DELETE", pathPrefix: "/", requiredScopes: ["admin"] },
  ],
};

interface Outcome {
  status: number;
  code: string | null;
  /** Identity headers and stable limit headers of an allow. */
  identity?: Record<string, string>;
}

const IDENTITY = ["x-keygate-key-id", "x-keygate-owner-id", "x-keygate-project-id", "x-keygate-scopes", "x-keygate-plan", "x-keygate-role", "x-keygate-mode"];
const STABLE_LIMITS = ["x-ratelimit-limit", "ratelimit-policy"];

function codeOf(body: string): string | null {
  try {
    const parsed = JSON.parse(body) as { error?: { code?: string } };
    return parsed.error?.code ?? null;
  } catch {
    return `non-json:${body.slice(0, 40)}`;
  }
}

function ofCheck(response: CheckResponse): Outcome {
  if (response.httpResponse.case === "okResponse") {
    const ok = response.httpResponse.value;
    const identity: Record<string, string> = {};
    for (const name of IDENTITY) identity[name] = "";
    for (const h of ok.headers) if (h.header !== undefined && IDENTITY.includes(h.header.key)) identity[h.header.key] = h.header.value;
    const limitNames: string[] = [];
    for (const h of ok.responseHeadersToAdd) {
      if (h.header === undefined) continue;
      limitNames.push(h.header.key);
      if (STABLE_LIMITS.includes(h.header.key)) identity[h.header.key] = h.header.value;
    }
    identity["limit-header-names"] = limitNames.sort().join(",");
    return { status: 200, code: null, identity };
  }
  if (response.httpResponse.case !== "deniedResponse") return { status: -1, code: `grpc:${response.status?.code ?? "?"}` };
  return { status: response.httpResponse.value.status?.code ?? 0, code: codeOf(response.httpResponse.value.body) };
}

const LIMIT_NAMES = ["x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset", "ratelimit-policy", "ratelimit", "x-credits-remaining"];

/** What the HTTP mode answers a request node:http's parser cannot read (http-authz.ts). */
const UNREADABLE = "could not be read as HTTP/1.1";

function ofHttp(status: number, headers: Record<string, string | string[] | undefined>, body: string): Outcome {
  if (status === 400 && body.includes(UNREADABLE)) return { status, code: "unreadable" };
  if (status !== 200) return { status, code: codeOf(body) };
  const identity: Record<string, string> = {};
  for (const name of IDENTITY) identity[name] = String(headers[name] ?? "");
  for (const name of STABLE_LIMITS) identity[name] = String(headers[name] ?? "");
  identity["limit-header-names"] = LIMIT_NAMES.filter((n) => headers[n] !== undefined)
    .sort()
    .join(",");
  return { status, code: null, identity };
}

/** A string's UTF-8 bytes as latin1 text: what node:http writes byte for byte. */
// U+E0A0 stands for a lone 0xA0 byte (not UTF-8): sent as that byte over HTTP, and read as U+FFFD
// in a gRPC Check (check-request.ts LENIENT_UTF8), as Envoy passes a client's bytes on.
const bytes = (s: string): string => Buffer.from(s, "utf8").toString("latin1").replaceAll("\xee\x82\xa0", "\xa0");
const asGrpc = (s: string): string => s.replaceAll("\ue0a0", "\ufffd");

function send(port: number, method: string, path: string, headers: Array<[string, string]>): Promise<Outcome | "unsendable"> {
  return new Promise((resolve) => {
    let req;
    try {
      const flat: string[] = ["Host", "keygate.internal"];
      for (const [k, v] of headers) flat.push(k, bytes(v));
      req = request({ host: "127.0.0.1", port, method, path: bytes(path), headers: flat, agent: false });
    } catch {
      resolve("unsendable");
      return;
    }
    req.on("response", (res) => {
      let text = "";
      res.setEncoding("utf8");
      res.on("data", (c: string) => (text += c));
      res.on("end", () => resolve(ofHttp(res.statusCode ?? 0, res.headers, text)));
    });
    req.on("error", (e) => resolve({ status: -2, code: `socket:${(e as Error).message}` }));
    req.end();
  });
}

const ready = requireServer("redis-server", redisAvailable(), "apt-get install redis-server");

let redis: RedisServer | null;
let dataDir: string;
let grpc: TestKeygate;
let nginx: TestKeygate;
let caddy: TestKeygate;
const keys: Record<string, string> = {};

describe.runIf(ready)("decision parity: gRPC Check and the HTTP mode (envoy, nginx, caddy)", () => {
  beforeAll(async () => {
    redis = await startRedis();
    if (redis === null) throw new Error("redis-server is required");
    dataDir = mkdtempSync(join(tmpdir(), "keygate-parity-"));
    const env = { KEYGATE_REDIS_URL: redis.url };
    grpc = await startKeygate({ dataDir, policy: POLICY, env });
    nginx = await startKeygate({ dataDir, policy: POLICY, env, httpAuthzProxy: "nginx" });
    caddy = await startKeygate({ dataDir, policy: POLICY, env, httpAuthzProxy: "caddy" });
    const a = grpc.admin;
    await a.upsertAccount({ ownerId: "o_all", plan: "big" });
    keys["all"] = (await a.createKey({ ownerId: "o_all", name: "all", scopes: ["read", "write", "decks", "admin"] })).secret;
    await a.upsertAccount({ ownerId: "o_read", plan: "big" });
    keys["read"] = (await a.createKey({ ownerId: "o_read", name: "read", scopes: ["read"] })).secret;
    await a.upsertAccount({ ownerId: "o_proj", plan: "big" });
    keys["proj"] = (await a.createKey({ ownerId: "o_proj", name: "proj", projectId: "alpha", scopes: ["read", "write", "decks"] })).secret;
    await a.upsertAccount({ ownerId: "o_adm", plan: "big", role: "admin" });
    keys["adm"] = (await a.createKey({ ownerId: "o_adm", name: "adm", scopes: ["read"] })).secret;
  }, 60_000);

  afterAll(async () => {
    await caddy?.stop({ keepData: true });
    await nginx?.stop({ keepData: true });
    await grpc?.stop({ keepData: true });
    await redis?.stop();
    if (dataDir !== undefined) rmSync(dataDir, { recursive: true, force: true });
  });

  const segment = fc.constantFrom(
    "v1", "v1", "v1", "decks", "decks", "import", "notes", "notes", "free", "admin", "projects", "alpha", "beta", "jobs", "x",
    "Decks", "NOTES", "%64ecks", "%6Eotes", "%2F", "%2e", "..", ".", "", "ſ", "%C5%BF", "ı", "~", "a;b", "%7E", "%20", "é", "%C3%A9", "a%00", "\\", "%zz",
  );
  const path = fc
    .record({
      segs: fc.array(segment, { minLength: 0, maxLength: 5 }),
      lead: fc.constantFrom("/", "/", "/", "//", ""),
      trail: fc.constantFrom("", "", "/", "."),
      query: fc.constantFrom("", "", "?a=1", "?api_key=KEY", "?x=/v1/free", "?%ff", "#frag", "?q#f"),
    })
    .map(({ segs, lead, trail, query }) => `${lead}${segs.join("/")}${trail}${query}`);
  const method = fc.constantFrom("GET", "GET", "HEAD", "POST", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "get", "post", "Post", "head", "delete", "PROPFIND", "TRACE");
  const who = fc.constantFrom("all", "read", "proj", "adm");
  // Credential placements, as [name, value] lines (repeats are separate lines on HTTP, joined with
  // "," in Envoy's headers map).
  const placement = fc.constantFrom(
    "auth", "auth-lower", "auth-spaces", "auth-tab", "xkey", "xkey-spaces", "both-same", "both-diff", "basic+xkey", "none", "query-only", "dup-xkey", "dup-auth",
    "xkey-upper-name", "auth-no-space", "xkey-nbsp", "xkey-bom", "xkey-latin1-nbsp", "auth-nbsp", "xkey-empty+auth", "xkey-underscore", "auth-comma",
  );

  function credentialLines(kind: string, key: string, other: string): Array<[string, string]> {
    switch (kind) {
      case "auth": return [["authorization", `Bearer ${key}`]];
      case "auth-lower": return [["authorization", `bearer ${key}`]];
      case "auth-spaces": return [["authorization", `BEARER    ${key}  `]];
      case "auth-tab": return [["authorization", `Bearer\t${key}`]];
      case "auth-no-space": return [["authorization", `Bearer${key}`]];
      case "xkey": return [["x-api-key", key]];
      case "xkey-spaces": return [["x-api-key", `  ${key} `]];
      case "xkey-upper-name": return [["X-API-KEY", key]];
      case "both-same": return [["authorization", `Bearer ${key}`], ["x-api-key", key]];
      case "both-diff": return [["authorization", `Bearer ${key}`], ["x-api-key", other]];
      case "basic+xkey": return [["authorization", "Basic dXNlcjpwYXNz"], ["x-api-key", key]];
      case "dup-xkey": return [["x-api-key", key], ["x-api-key", key]];
      case "dup-auth": return [["authorization", `Bearer ${key}`], ["authorization", `Bearer ${key}`]];
      case "xkey-nbsp": return [["x-api-key", `${key}\u00a0`]];
      case "xkey-bom": return [["x-api-key", `\ufeff${key}`]];
      case "xkey-latin1-nbsp": return [["x-api-key", `${key}\ue0a0`]];
      case "auth-nbsp": return [["authorization", `Bearer ${key}\u00a0`]];
      case "xkey-empty+auth": return [["x-api-key", ""], ["authorization", `Bearer ${key}`]];
      case "xkey-underscore": return [["x_api_key", key]];
      case "auth-comma": return [["authorization", `Bearer ${key}, Bearer ${key}`]];
      default: return [];
    }
  }

  /** Envoy's headers map: lower-case names, repeats joined with ",", values trimmed as Envoy's codec does. */
  function envoyMap(lines: Array<[string, string]>): Record<string, string> {
    const out: Record<string, string> = {};
    for (const [k, v] of lines) {
      const name = k.toLowerCase();
      const value = asGrpc(v).replace(/^[ \t]+|[ \t]+$/g, "");
      out[name] = out[name] === undefined ? value : `${out[name]},${value}`;
    }
    return out;
  }

  it("every entry point gives the same answer", async () => {
    const divergences: string[] = [];
    await fc.assert(
      fc.asyncProperty(path, method, who, placement, async (p, m, w, kind) => {
        const key = keys[w] as string;
        const other = keys[w === "all" ? "read" : "all"] as string;
        const target = p.replace("KEY", key);
        const lines = credentialLines(kind, key, other);
        const viaGrpc = ofCheck(await grpc.check(checkInit(envoyMap(lines), target, m)));
        const viaNginx = await send(nginx.ports.http, "GET", "/check", [...lines, ["X-Original-URI", target], ["X-Original-Method", m]]);
        const viaCaddy = await send(caddy.ports.http, "GET", "/check", [...lines, ["X-Forwarded-Uri", target], ["X-Forwarded-Method", m]]);
        const answers: Array<[string, Outcome | "unsendable"]> = [["nginx", viaNginx], ["caddy", viaCaddy]];
        // Envoy's HTTP service sends the client's own method and path below /check; only for
        // methods a real proxy forwards (upper-case tokens) and targets node:http can send.
        if (m === m.toUpperCase() && target.startsWith("/") && !target.includes("#")) {
          answers.push(["envoy-http", await send(grpc.ports.http, m, `/check${target}`, lines)]);
        }
        for (const [name, answer] of answers) {
          if (answer === "unsendable") continue;
          // node:http's own parser refusing a target (raw non-ASCII, "\\"): a 400 before the decision, stricter only.
          // (A HEAD answer carries no body to tell it by: its target holds what the parser refuses.)
          if (name === "envoy-http" && (answer.code === "unreadable" || (m === "HEAD" && answer.status === 400 && /[^\x21-\x7e]|\\/.test(target)))) continue;
          // A HEAD answer has no body: compare the status only.
          if (name === "envoy-http" && m === "HEAD" && answer.status !== 200) {
            if (answer.status !== viaGrpc.status) divergences.push(`${m} ${JSON.stringify(p)} ${w}/${kind}: grpc=${viaGrpc.status} ${name}=${answer.status}`);
            continue;
          }
          // nginx and Caddy never send an empty URI: the 500 PROXY_MISCONFIGURED for it is theirs.
          if (target === "" && name !== "envoy-http") continue;
          const a = JSON.stringify(viaGrpc);
          const b = JSON.stringify(answer);
          if (a !== b) divergences.push(`${m} ${JSON.stringify(p)} ${w}/${kind}: grpc=${a} ${name}=${b}`);
        }
      }),
      { numRuns: Number(process.env["PARITY_RUNS"] ?? 400), seed: Number(process.env["PARITY_SEED"] ?? 42) },
    );
    // Distinct shapes only, for the report.
    const uniq = [...new Set(divergences)];
    if (uniq.length > 0) console.log(`${uniq.length} divergences:\n${uniq.slice(0, 60).join("\n")}`);
    expect(uniq).toEqual([]);
  }, 600_000);
});
