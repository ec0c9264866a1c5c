import { readFileSync } from "node:fs";
import { resolve } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { TEST_POLICY, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { binaryAvailable, startCaddy, startEchoUpstream } from "../harness/proxies.js";
import type { EchoedRequest, RunningProxy } from "../harness/proxies.js";
import { requireServer } from "../harness/ports.js";

// README "The decision": with forwardMetadata, add each forwarded name to Caddy's copy_headers
// line (X-Keygate-Meta-Team). Caddy 2.6 (the shipped Caddyfile's own comment) copies a listed
// header the answer lacks as its literal placeholder text, so keygate sent, for a key WITHOUT a
// team, nothing, and the API received x-keygate-meta-team:
// "{http.reverse_proxy.header.X-Keygate-Meta-Team}". The HTTP answer now carries every forwarded
// name, empty where the key has no value, as it does x-keygate-project-id.
const available = requireServer("caddy", binaryAvailable("caddy", ["version"]), "apt-get install caddy");

describe.runIf(available)("forwarded metadata behind Caddy, configured as the README says", () => {
  let kg: TestKeygate;
  let upstream: Awaited<ReturnType<typeof startEchoUpstream>>;
  let proxy: RunningProxy;

  beforeAll(async () => {
    kg = await startKeygate({ policy: { ...TEST_POLICY, forwardMetadata: ["team"] }, httpAuthzProxy: "caddy" });
    upstream = await startEchoUpstream();
    const shipped = readFileSync(resolve(import.meta.dirname, "../../deploy/caddy/Caddyfile"), "utf8");
    const anchor = "copy_headers X-Keygate-Key-Id ";
    expect(shipped).toContain(anchor);
    // README: "and `X-Keygate-Meta-Team` on Caddy's `copy_headers` line".
    proxy = await startCaddy(kg.ports.http, upstream.port, { caddyfile: shipped.replace(anchor, `${anchor}X-Keygate-Meta-Team `) });
  }, 60_000);
  afterAll(async () => {
    await proxy?.stop();
    await upstream?.stop();
    await kg?.stop();
  });

  const seen = async (secret: string): Promise<EchoedRequest["headers"]> => {
    const res = await fetch(`http://127.0.0.1:${proxy.port}/v1/things`, { headers: { "x-api-key": secret } });
    expect(res.status).toBe(200);
    return ((await res.json()) as EchoedRequest).headers;
  };

  it("a key with the entry forwards it", async () => {
    await kg.admin.upsertAccount({ ownerId: "meta-caddy", plan: "business" });
    const withTeam = (await kg.admin.createKey({ ownerId: "meta-caddy", name: "a", metadata: { team: "billing" } })).secret;
    expect((await seen(withTeam))["x-keygate-meta-team"]).toBe("billing");
  });

  it("a key without the entry, or with a value keygate will not put in a header, reaches the API with an empty team, never Caddy's placeholder or the client's copy", async () => {
    await kg.admin.upsertAccount({ ownerId: "meta-caddy-bare", plan: "business" });
    const bare = (await kg.admin.createKey({ ownerId: "meta-caddy-bare", name: "b" })).secret;
    const declined = (await kg.admin.createKey({ ownerId: "meta-caddy-bare", name: "c", metadata: { team: "b\u00e9ta" } })).secret;
    expect([(await seen(bare))["x-keygate-meta-team"], (await seen(declined))["x-keygate-meta-team"]]).toEqual(["", ""]);
    const spoofed = await fetch(`http://127.0.0.1:${proxy.port}/v1/things`, { headers: { "x-api-key": bare, "x-keygate-meta-team": "admins" } });
    expect(spoofed.status).toBe(200);
    expect(((await spoofed.json()) as EchoedRequest).headers["x-keygate-meta-team"]).toBe("");
  });
});
