import { resolve } from "node:path";
import { readFileSync } from "node:fs";
import { parse } from "yaml";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { checkInit, httpCheck, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import type { CheckResponse } from "../../src/gen/envoy/service/auth/v3/external_auth_pb.js";

// A revoked key stops working at once. A key that no longer authenticates (revoked, rotated with
// its grace over, expired, disabled) must not keep telling whoever holds it (a leaked secret, a
// former employee) the account's live state: its credit balance, its plan's limit and its request
// rate (X-Credits-Remaining, X-RateLimit-*, RateLimit-Policy, RateLimit).

const configDir = resolve(import.meta.dirname, "../../deploy/config");
const LIMIT_HEADERS = ["x-credits-remaining", "x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset", "ratelimit-policy", "ratelimit"];

let kg: TestKeygate;
beforeAll(async () => {
  kg = await startKeygate({ policy: parse(readFileSync(resolve(configDir, "monthly-credits.yaml"), "utf8")) });
});
afterAll(async () => {
  await kg.stop();
});

function grpcHeaderNames(response: CheckResponse): string[] {
  if (response.httpResponse.case !== "deniedResponse") return ["<allowed>"];
  return response.httpResponse.value.headers.map((h) => h.header?.key ?? "");
}

async function refusalOf(secret: string): Promise<{ status: number; code: string; http: string[]; grpc: string[] }> {
  const answer = await httpCheck(kg.ports.http, "/check/v1/scrape", { authorization: `Bearer ${secret}` });
  const grpc = await kg.check(checkInit({ authorization: `Bearer ${secret}` }, "/v1/scrape"));
  return {
    status: answer.status,
    code: (JSON.parse(answer.body) as { error: { code: string } }).error.code,
    http: LIMIT_HEADERS.filter((name) => answer.headers.get(name) !== null),
    grpc: grpcHeaderNames(grpc).filter((name) => LIMIT_HEADERS.includes(name)),
  };
}

describe("a key that no longer authenticates reveals nothing of its account", () => {
  it("revoked: 401 KEY_REVOKED without the account's balance or rate state", async () => {
    await kg.admin.upsertAccount({ ownerId: "victim-revoked", plan: "business" });
    const { key, secret } = await kg.admin.createKey({ ownerId: "victim-revoked", name: "leaked-on-github" });
    expect((await httpCheck(kg.ports.http, "/check/v1/scrape", { authorization: `Bearer ${secret}` })).status).toBe(200);
    await kg.admin.revokeKey({ id: key?.id ?? "", reason: "leaked" });
    expect(await refusalOf(secret)).toEqual({ status: 401, code: "KEY_REVOKED", http: [], grpc: [] });
  });

  it("rotated with grace 0: the old secret's 401 carries no account state", async () => {
    await kg.admin.upsertAccount({ ownerId: "victim-rotated", plan: "pro" });
    const { key, secret } = await kg.admin.createKey({ ownerId: "victim-rotated", name: "prod" });
    await kg.admin.rotateKey({ id: key?.id ?? "", graceDays: 0 });
    expect(await refusalOf(secret)).toEqual({ status: 401, code: "KEY_REVOKED", http: [], grpc: [] });
  });

  it("expired: 401 KEY_EXPIRED carries no account state", async () => {
    await kg.admin.upsertAccount({ ownerId: "victim-expired", plan: "pro" });
    const expiresAt = { seconds: BigInt(Math.floor(kg.clock.now() / 1000) + 60), nanos: 0 };
    const { secret } = await kg.admin.createKey({ ownerId: "victim-expired", name: "short", expiresAt });
    kg.clock.advanceMs(120_000);
    expect(await refusalOf(secret)).toEqual({ status: 401, code: "KEY_EXPIRED", http: [], grpc: [] });
  });

  it("disabled: 401 KEY_DISABLED carries no account state", async () => {
    await kg.admin.upsertAccount({ ownerId: "victim-disabled", plan: "pro" });
    const { key, secret } = await kg.admin.createKey({ ownerId: "victim-disabled", name: "paused" });
    await kg.admin.disableKey({ id: key?.id ?? "", reason: "investigation" });
    expect(await refusalOf(secret)).toEqual({ status: 401, code: "KEY_DISABLED", http: [], grpc: [] });
  });

  it("a key that authenticates still reads them on a refusal (403, missing scope)", async () => {
    await kg.admin.upsertAccount({ ownerId: "scoped-owner", plan: "pro" });
    const { secret } = await kg.admin.createKey({ ownerId: "scoped-owner", name: "narrow", scopes: ["account"] });
    const answer = await httpCheck(kg.ports.http, "/check/v1/scrape", { authorization: `Bearer ${secret}` });
    expect(answer.status).toBe(403);
    expect(LIMIT_HEADERS.filter((name) => answer.headers.get(name) !== null)).toEqual(LIMIT_HEADERS);
  });
});
