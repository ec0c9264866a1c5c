import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { TEST_POLICY, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { binaryAvailable, startEchoUpstream, startNginx } from "../harness/proxies.js";
import type { EchoedRequest, RunningProxy } from "../harness/proxies.js";
import { requireServer } from "../harness/ports.js";

// keygate allows a forwardMetadata name of up to 64 characters, and README ("The decision") has an
// nginx operator add, per name, `auth_request_set $kg_meta_<name> ...` and `proxy_set_header
// X-Keygate-Meta-<Name> $kg_meta_<name>;` to the shipped template. With nginx's default hash
// buckets (one 64-byte cache line) a name of 32 characters or more made nginx refuse the whole
// configuration ("could not build proxy_headers_hash, you should increase
// proxy_headers_hash_bucket_size: 64"; from 39 characters "could not build variables_hash"), so
// a proxy restarted with the new name crash-looped. The template sets both buckets to 128 bytes.
const available = requireServer("nginx", binaryAvailable("nginx", ["-v"]), "apt-get install nginx");

const NAMES = ["a".repeat(32), `b${"-x".repeat(31)}c`.slice(0, 64)];

describe.runIf(available)("a forwarded metadata name of policy-valid length behind the shipped nginx config", () => {
  let kg: TestKeygate;
  let upstream: Awaited<ReturnType<typeof startEchoUpstream>>;
  let proxy: RunningProxy | undefined;
  let startError = "";

  beforeAll(async () => {
    kg = await startKeygate({ policy: { ...TEST_POLICY, forwardMetadata: NAMES }, httpAuthzProxy: "nginx" });
    upstream = await startEchoUpstream();
    try {
      proxy = await startNginx(kg.ports.http, upstream.port, { forwardMetadata: NAMES });
    } catch (error) {
      startError = String(error).split("\n").find((line) => line.includes("emerg")) ?? String(error);
    }
  }, 60_000);
  afterAll(async () => {
    await proxy?.stop();
    await upstream?.stop();
    await kg?.stop();
  });

  it("nginx starts with the README's lines for each name, and the key's values reach the API", async () => {
    expect(NAMES.every((n) => n.length >= 32 && n.length <= 64)).toBe(true);
    expect(startError).toBe("");
    await kg.admin.upsertAccount({ ownerId: "long-meta", plan: "business" });
    const { secret } = await kg.admin.createKey({ ownerId: "long-meta", name: "k", metadata: { [NAMES[0] as string]: "one", [NAMES[1] as string]: "two" } });
    const res = await fetch(`http://127.0.0.1:${proxy?.port}/v1/things`, { headers: { "x-api-key": secret } });
    expect(res.status).toBe(200);
    const seen = ((await res.json()) as EchoedRequest).headers;
    expect([seen[`x-keygate-meta-${NAMES[0]}`], seen[`x-keygate-meta-${NAMES[1]}`]]).toEqual(["one", "two"]);
  });
});
