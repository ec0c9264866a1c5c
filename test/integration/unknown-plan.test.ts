import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { stringify } from "yaml";
import { z } from "zod";
import type { CheckResponse } from "../../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import { checkInit, httpCheck, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

// An account keeps the name of its plan; the policy may stop having it (a plan renamed or
// removed, in a reload or a new deploy). Judged on the default plan, such an account would get
// that plan's limits: with the built-in one, unmetered and without a daily quota, free use.
const rate = { limit: 1000, windowSeconds: 60 };
const basic = { maxActiveKeys: 5, rateLimit: rate, dailyQuota: null, monthlyCredits: null };
const payg = { maxActiveKeys: 5, rateLimit: rate, dailyQuota: 1, monthlyCredits: 1 };
const base = { defaultPlan: "basic", scopes: { catalog: ["read"], default: ["read"] }, routes: [] };
const WITH_PAYG = { ...base, plans: { basic, payg } };
const WITHOUT_PAYG = { ...base, plans: { basic } };

const UNKNOWN_PLAN = {
  status: 402,
  code: "PLAN_REQUIRED",
  message: "This API key is valid, but its account is on a plan that is not configured. Ask the API's owner to move the account to a configured plan.",
};

const errorBodySchema = z.object({ error: z.object({ code: z.string(), message: z.string() }) });

function outcome(response: CheckResponse): { status: number; code: string | null; message: string | null } {
  if (response.httpResponse.case === "okResponse") return { status: 200, code: null, message: null };
  if (response.httpResponse.case !== "deniedResponse") throw new Error("a Check answered neither allow nor deny");
  const { error } = errorBodySchema.parse(JSON.parse(response.httpResponse.value.body));
  return { status: response.httpResponse.value.status?.code ?? 0, ...error };
}

/** The value of one keygate_checks_total series on /metrics, or undefined when it has none. */
async function checksCounted(kg: TestKeygate, labels: string): Promise<number | undefined> {
  const text = await (await fetch(`http://127.0.0.1:${kg.ports.admin}/metrics`)).text();
  const line = text.split("\n").find((l) => l.startsWith(`keygate_checks_total{${labels}}`));
  return line === undefined ? undefined : Number(line.split(" ")[1]);
}

/** Puts `policy` in force as a live reload does (SIGHUP, or the file watcher). */
function reload(kg: TestKeygate, policy: unknown): void {
  writeFileSync(join(kg.dataDir, "policy.yaml"), stringify(policy));
  expect(kg.app.reload().policy).toBe("applied");
}

let kg: TestKeygate | undefined;
afterEach(async () => {
  await kg?.stop();
  kg = undefined;
});

async function accountOnPayg(instance: TestKeygate, ownerId: string): Promise<{ keyId: string; secret: string }> {
  await instance.admin.upsertAccount({ ownerId, plan: "payg" });
  const created = await instance.admin.createKey({ ownerId, name: "payg" });
  if (created.key === undefined) throw new Error("CreateKey returned no key");
  return { keyId: created.key.id, secret: created.secret };
}

describe("an account whose plan the policy no longer has: error", () => {
  it("a reload that drops the plan: Checks on both entry points, VerifyKey and ChargeUsage are 402 PLAN_REQUIRED at once, counted as UNKNOWN_PLAN", async () => {
    kg = await startKeygate({ policy: WITH_PAYG });
    const { secret, keyId } = await accountOnPayg(kg, "payg-reload");
    const auth = { authorization: `Bearer ${secret}` };
    // The key's snapshot is in L1 from here on: the reload alone must change its answer.
    expect(outcome(await kg.check(checkInit(auth)))).toEqual({ status: 200, code: null, message: null });

    reload(kg, WITHOUT_PAYG);
    for (let i = 0; i < 3; i++) expect(outcome(await kg.check(checkInit(auth)))).toEqual(UNKNOWN_PLAN);
    const http = await httpCheck(kg.ports.http, "/check/v1/work", auth);
    expect({ status: http.status, ...errorBodySchema.parse(JSON.parse(http.body)).error }).toEqual(UNKNOWN_PLAN);
    const verified = await kg.admin.verifyKey({ secret });
    expect([verified.valid, verified.code, verified.message]).toEqual([false, UNKNOWN_PLAN.code, UNKNOWN_PLAN.message]);
    const charge = await kg.admin.chargeUsage({ keyId, cost: 1n, idempotencyKey: "after-reload" });
    expect([charge.charged, charge.code, charge.message]).toEqual([false, UNKNOWN_PLAN.code, UNKNOWN_PLAN.message]);
    // Apart from a lapsed subscription's PLAN_REQUIRED, so an alert can tell the operator's mistake.
    expect(await checksCounted(kg, 'decision="deny",reason="UNKNOWN_PLAN",mode="grpc"')).toBe(3);
    expect(await checksCounted(kg, 'decision="deny",reason="UNKNOWN_PLAN",mode="http"')).toBe(1);
    expect(await checksCounted(kg, 'decision="deny",reason="PLAN_REQUIRED",mode="grpc"')).toBeUndefined();

    // The plan back: the account is judged on it again, with its quota of 1 already used.
    reload(kg, WITH_PAYG);
    expect(outcome(await kg.check(checkInit(auth)))).toMatchObject({ status: 402, code: "QUOTA_EXCEEDED" });
  });

  it("a restart without the plan: refused, never judged on the default plan's unlimited use", async () => {
    const first = await startKeygate({ policy: WITH_PAYG });
    const { secret } = await accountOnPayg(first, "payg-restart");
    const ask = async (instance: TestKeygate) => outcome(await instance.check(checkInit({ authorization: `Bearer ${secret}` }, "/v1/work")));
    expect((await ask(first)).status).toBe(200);
    expect((await ask(first)).status).toBe(402);
    const dataDir = first.dataDir;
    await first.stop({ keepData: true });

    kg = await startKeygate({ policy: WITHOUT_PAYG, dataDir });
    for (let i = 0; i < 3; i++) expect(await ask(kg)).toEqual(UNKNOWN_PLAN);
  });

  it("GetAccount shows no limits for it, never the default plan's", async () => {
    kg = await startKeygate({ policy: WITH_PAYG });
    await accountOnPayg(kg, "payg-view");
    reload(kg, WITHOUT_PAYG);
    const { account } = await kg.admin.getAccount({ ownerId: "payg-view" });
    expect({
      plan: account?.plan,
      maxActiveKeys: account?.maxActiveKeys,
      dailyQuota: account?.dailyQuota,
      monthlyCredits: account?.monthlyCredits,
      rateLimit: { limit: account?.rateLimit?.limit, windowSeconds: account?.rateLimit?.windowSeconds },
    }).toEqual({ plan: "payg", maxActiveKeys: 0, dailyQuota: 0n, monthlyCredits: 0n, rateLimit: { limit: 0, windowSeconds: 60 } });
    // An account on the default plan itself still shows it.
    await kg.admin.upsertAccount({ ownerId: "basic-view", plan: "basic" });
    const onBasic = (await kg.admin.getAccount({ ownerId: "basic-view" })).account;
    expect([onBasic?.maxActiveKeys, onBasic?.dailyQuota, onBasic?.rateLimit?.limit]).toEqual([5, undefined, 1000]);
  });
});
