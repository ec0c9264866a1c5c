import { DEFAULT_POLICY_INPUT } from "../../src/config.js";
import { startKeygate } from "./keygate.js";
import type { TestKeygate } from "./keygate.js";
import { startEchoUpstream } from "./proxies.js";
import type { RunningProxy, ShippedProxy } from "./proxies.js";

/** A policy that asks nothing of a request but a key: what is tested behind it is the proxy. */
export const OPEN_POLICY = {
  ...DEFAULT_POLICY_INPUT,
  defaultPlan: "standard",
  plans: { standard: { maxActiveKeys: 10, rateLimit: { limit: 10_000, windowSeconds: 60 }, dailyQuota: null, monthlyCredits: null } },
  scopes: { catalog: ["read"], default: ["read"] },
  routes: [],
};

/** keygate behind one shipped proxy config, an echo upstream behind both, and one key of `ownerId`. */
export interface ProxiedKeygate {
  kg: TestKeygate;
  upstream: Awaited<ReturnType<typeof startEchoUpstream>>;
  proxy: RunningProxy;
  key: string;
  stop(): Promise<void>;
}

export async function startProxiedKeygate(shipped: ShippedProxy, ownerId: string): Promise<ProxiedKeygate> {
  const kg = await startKeygate({ policy: OPEN_POLICY, httpAuthzProxy: shipped.setting });
  const upstream = await startEchoUpstream();
  const proxy = await shipped.start(kg.ports.http, upstream.port);
  await kg.admin.upsertAccount({ ownerId, plan: "standard" });
  const key = (await kg.admin.createKey({ ownerId, name: "proxied" })).secret;
  return {
    kg,
    upstream,
    proxy,
    key,
    async stop() {
      await proxy.stop();
      await upstream.stop();
      await kg.stop();
    },
  };
}
