import { request } from "node:http";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { shippedProxies } from "../harness/proxies.js";
import { startProxiedKeygate } from "../harness/proxied-keygate.js";
import type { ProxiedKeygate } from "../harness/proxied-keygate.js";
import type { EchoedRequest } from "../harness/proxies.js";

// CGI-style servers (WSGI, PHP through Caddy's php_fastcgi, Rack/Puma) read every "_" in a
// header name as "-", in any case: X-Api_Key, x_api-key and X_HTTP_Method_Override are X-Api-Key
// and X-HTTP-Method-Override to them. No such spelling of a credential, rewrite or method-override
// header reaches the API through a shipped proxy: nginx ignores names with "_", and the Caddyfile
// drops them all before the check.


/** What a CGI-style server makes of a header name: upper case, "-" and "_" the same. */
const cgi = (name: string): string => name.toUpperCase().replaceAll("-", "_");

const CREDENTIAL = ["Authorization", "X-Api-Key"].map(cgi);
const REWRITES = [
  "X-Original-URI",
  "X-Original-Method",
  "X-Original-URL",
  "X-Rewrite-URL",
  "X-Forwarded-Uri",
  "X-Forwarded-Method",
  "X-HTTP-Method-Override",
  "X-HTTP-Method",
  "X-Method-Override",
].map(cgi);

function send(port: number, method: string, path: string, headers: Record<string, string>): Promise<{ status: number; text: string }> {
  return new Promise((resolve, reject) => {
    const req = request({ host: "127.0.0.1", port, method, path, headers: { connection: "close", ...headers } }, (res) => {
      let text = "";
      res.setEncoding("utf8");
      res.on("data", (chunk: string) => (text += chunk));
      res.on("end", () => resolve({ status: res.statusCode ?? 0, text }));
      res.on("error", reject);
    });
    req.on("error", reject);
    req.end();
  });
}

describe.each(shippedProxies())("underscore spellings behind $name (the shipped config)", (shipped) => {
  const { available } = shipped;
  let running: ProxiedKeygate;
  beforeAll(async () => {
    if (available) running = await startProxiedKeygate(shipped, `us-${shipped.name}`);
  });
  afterAll(async () => {
    await running?.stop();
  });

  it.runIf(available)("no mixed '-'/'_' spelling of a credential header reaches the upstream (the key, or a value keygate never checked)", async () => {
    const res = await send(running.proxy.port, "GET", "/v1/things", { "X-Api-Key": running.key, "x-api_key": running.key, "x_api-key": "kg_unchecked_value" });
    expect(res.status, res.text).toBe(200);
    const seen = JSON.parse(res.text) as EchoedRequest;
    const reached = Object.keys(seen.headers).filter((header) => CREDENTIAL.includes(cgi(header)));
    expect(reached).toEqual([]);
    const values = Object.values(seen.headers).flatMap((v) => (v === undefined ? [] : Array.isArray(v) ? v : [v]));
    expect(values.filter((v) => v.includes(running.key.slice(-12))).length, "the key reached the upstream").toBe(0);
  });

  it.runIf(available)("no underscore spelling of a rewrite or method-override header reaches the upstream (keygate judged POST /v1/things)", async () => {
    const res = await send(running.proxy.port, "POST", "/v1/things", {
      "x-api-key": running.key,
      "content-length": "0",
      X_HTTP_Method_Override: "DELETE",
      X_HTTP_Method: "DELETE",
      X_Method_Override: "DELETE",
      X_Original_URL: "/v1/admin",
      X_Rewrite_URL: "/v1/admin",
      X_Original_URI: "/v1/admin",
      X_Original_Method: "DELETE",
      X_Forwarded_Uri: "/v1/admin",
      X_Forwarded_Method: "DELETE",
    });
    expect(res.status, res.text).toBe(200);
    const seen = JSON.parse(res.text) as EchoedRequest;
    expect({ method: seen.method, url: seen.url }).toEqual({ method: "POST", url: "/v1/things" });
    const reached = Object.keys(seen.headers).filter((header) => REWRITES.includes(cgi(header)));
    expect(reached).toEqual([]);
  });
});
