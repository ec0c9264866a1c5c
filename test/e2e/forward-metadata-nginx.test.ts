import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { TEST_POLICY, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { binaryAvailable, startEchoUpstream, startNginx } from "../harness/proxies.js";
import type { EchoedRequest, RunningProxy } from "../harness/proxies.js";
import { requireServer } from "../harness/ports.js";

// Forwarded key metadata behind real nginx: the shipped config plus the two lines the README
// gives per forwarded name (nginx copies a fixed list of headers).
const available = requireServer("nginx", binaryAvailable("nginx", ["-v"]), "apt-get install nginx");

describe.runIf(available)("forwarded metadata behind nginx", () => {
  let kg: TestKeygate;
  let upstream: { port: number; stop(): Promise<void> };
  let proxy: RunningProxy;
  beforeAll(async () => {
    kg = await startKeygate({ policy: { ...TEST_POLICY, forwardMetadata: ["team", "cost-center"] }, httpAuthzProxy: "nginx" });
    upstream = await startEchoUpstream();
    proxy = await startNginx(kg.ports.http, upstream.port, { forwardMetadata: ["team", "cost-center"] });
  });
  afterAll(async () => {
    await proxy?.stop();
    await upstream?.stop();
    await kg?.stop();
  });

  const seen = async (secret: string, extra: Record<string, string> = {}): Promise<EchoedRequest["headers"]> => {
    const res = await fetch(`http://127.0.0.1:${proxy.port}/v1/things`, { headers: { "x-api-key": secret, ...extra } });
    expect(res.status).toBe(200);
    return ((await res.json()) as EchoedRequest).headers;
  };

  it("the key's listed entries reach the upstream, and a client's copies of them never do", async () => {
    await kg.admin.upsertAccount({ ownerId: "meta-nginx", plan: "business" });
    const full = (await kg.admin.createKey({ ownerId: "meta-nginx", name: "a", metadata: { team: "billing", "cost-center": "cc-42", note: "kept in keygate" } })).secret;
    const headers = await seen(full, { "x-keygate-meta-team": "evil" });
    expect([headers["x-keygate-meta-team"], headers["x-keygate-meta-cost-center"], headers["x-keygate-meta-note"]]).toEqual(["billing", "cc-42", undefined]);
    // A key without the entries: the client's copies are cleared, not passed on.
    const bare = (await kg.admin.createKey({ ownerId: "meta-nginx", name: "b" })).secret;
    const cleared = await seen(bare, { "x-keygate-meta-team": "evil", "X-Keygate-Meta-Cost-Center": "evil" });
    expect([cleared["x-keygate-meta-team"], cleared["x-keygate-meta-cost-center"]]).toEqual([undefined, undefined]);
  });
});
