import { resolve } from "node:path";
import { parse } from "yaml";
import { readFileSync } from "node:fs";
import { afterEach, describe, expect, it } from "vitest";
import { z } from "zod";
import { loadPolicyFile } from "../../src/config.js";
import { checkInit, httpCheck, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

const errorBodySchema = z.object({ error: z.object({ code: z.string(), message: z.string() }) });
const configDir = resolve(import.meta.dirname, "../../deploy/config");
const load = (name: string): unknown => parse(readFileSync(resolve(configDir, name), "utf8"));

let kg: TestKeygate | undefined;
afterEach(async () => {
  await kg?.stop();
  kg = undefined;
});

async function keyFor(instance: TestKeygate, ownerId: string, account: { plan?: string; role?: string; subscriptionStatus?: string }, scopes: string[] = []): Promise<string> {
  await instance.admin.upsertAccount({ ownerId, ...account });
  return (await instance.admin.createKey({ ownerId, name: "example", scopes })).secret;
}

describe("shipped example configs", () => {
  it.each(["keygate.example.yaml", "daily-message-tiers.yaml", "monthly-credits.yaml", "role-rate-tiers.yaml"])("%s is a valid policy", (name) => {
    expect(() => loadPolicyFile(resolve(configDir, name))).not.toThrow();
  });

  it("keygate.example.yaml: a read key reads under /v1, and every write method needs write", async () => {
    kg = await startKeygate({ policy: load("keygate.example.yaml") });
    const reader = await keyFor(kg, "example-reader", {}, ["read"]);
    const writer = await keyFor(kg, "example-writer", {}, ["read", "write"]);
    const ask = async (method: string, secret: string, path = "/v1/decks/1") => {
      // The Envoy HTTP service's form: the path below /check, the request's own method.
      const res = await fetch(`http://127.0.0.1:${kg?.ports.http ?? 0}/check${path}`, { method, headers: { authorization: `Bearer ${secret}` } });
      const text = await res.text();
      return { status: res.status, error: text === "" ? null : errorBodySchema.parse(JSON.parse(text)).error };
    };
    for (const method of ["GET", "HEAD"]) expect(await ask(method, reader), method).toEqual({ status: 200, error: null });
    for (const method of ["POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PROPFIND"]) {
      expect(await ask(method, reader), method).toEqual({ status: 403, error: expect.objectContaining({ code: "FORBIDDEN", message: 'This API key does not have the "write" scope.' }) });
      expect(await ask(method, writer), method).toEqual({ status: 200, error: null });
    }
    expect((await ask("PUT", reader, "/v1")).status).toBe(403);
    expect(await ask("GET", writer, "/v1/admin/keys")).toEqual({ status: 403, error: expect.objectContaining({ code: "FORBIDDEN", message: 'This API key does not have the "admin" scope.' }) });
  });

  it("daily message tiers: free 5 a day, pro 500, lifetime unlimited", async () => {
    kg = await startKeygate({ policy: load("daily-message-tiers.yaml") });
    kg.clock.freeze("2026-11-22T08:00:00.000Z");
    const free = await keyFor(kg, "tier-free", { plan: "free" });
    for (let i = 0; i < 5; i++) expect((await httpCheck(kg.ports.http, "/check/api/v1/chat", { authorization: `Bearer ${free}` })).status).toBe(200);
    const refused = await httpCheck(kg.ports.http, "/check/api/v1/chat", { authorization: `Bearer ${free}` });
    expect(refused.status).toBe(402);
    expect(JSON.parse(refused.body).error.code).toBe("QUOTA_EXCEEDED");
    const pro = await keyFor(kg, "tier-pro", { plan: "pro" });
    const proAnswer = await httpCheck(kg.ports.http, "/check/api/v1/chat", { authorization: `Bearer ${pro}` });
    expect(proAnswer.headers.get("ratelimit-policy")).toBe('"minute";q=300;w=60, "day";q=500;w=86400');
    const lifetime = await keyFor(kg, "tier-lifetime", { plan: "lifetime" });
    for (let i = 0; i < 20; i++) expect((await httpCheck(kg.ports.http, "/check/api/v1/chat", { authorization: `Bearer ${lifetime}` })).status).toBe(200);
    const decks = await httpCheck(kg.ports.http, "/check/api/v1/decks", { authorization: `Bearer ${lifetime}` });
    expect(JSON.parse(decks.body).error.message).toBe('This API key does not have the "decks" scope.');
  });

  it("daily message tiers: only chat counts; a free account fetches decks all day and is refused its sixth chat message only, in both entry points", async () => {
    kg = await startKeygate({ policy: load("daily-message-tiers.yaml") });
    kg.clock.freeze("2026-11-22T08:00:00.000Z");
    const free = await keyFor(kg, "tier-free-decks", { plan: "free" }, ["tutor", "decks"]);
    const auth = { authorization: `Bearer ${free}` };
    const grpc = async (path: string): Promise<number> => {
      const answer = await kg?.check(checkInit(auth, path));
      return answer?.httpResponse.case === "okResponse" ? 200 : (answer?.httpResponse.case === "deniedResponse" ? (answer.httpResponse.value.status?.code ?? 0) : 0);
    };
    // Decks and other routes, through both entry points, before and between chat messages: free.
    for (let i = 0; i < 10; i++) {
      expect((await httpCheck(kg.ports.http, "/check/api/v1/decks/1", auth)).status).toBe(200);
      expect(await grpc("/api/v1/decks/2")).toBe(200);
    }
    const deck = await httpCheck(kg.ports.http, "/check/api/v1/decks/1", auth);
    expect(deck.headers.get("ratelimit-policy")).toBe('"minute";q=60;w=60');
    for (let i = 0; i < 3; i++) expect((await httpCheck(kg.ports.http, "/check/api/v1/chat", auth)).status).toBe(200);
    for (let i = 0; i < 2; i++) expect(await grpc("/api/v1/chat")).toBe(200);
    const chat = await httpCheck(kg.ports.http, "/check/api/v1/chat", auth);
    expect(chat.status).toBe(402);
    expect(JSON.parse(chat.body).error.code).toBe("QUOTA_EXCEEDED");
    expect(await grpc("/api/v1/chat")).toBe(402);
    // The day's chat is spent; the rest still answers.
    expect((await httpCheck(kg.ports.http, "/check/api/v1/decks/1", auth)).status).toBe(200);
    expect(await grpc("/api/v1/other")).toBe(200);
    const usage = await kg.admin.getUsage({ ownerId: "tier-free-decks", from: "2026-11-22", to: "2026-11-22" });
    // 23 free requests (decks and another route) and 5 chat messages.
    expect(usage.totals?.allowed).toBe(28n);
    expect(usage.totals?.denied).toEqual({ QUOTA_EXCEEDED: 2n });
  });

  it("monthly credits with top-ups: route costs, top-up, and 402 PLAN_REQUIRED without a subscription", async () => {
    kg = await startKeygate({ policy: load("monthly-credits.yaml") });
    kg.clock.freeze("2026-11-22T08:00:00.000Z");
    const secret = await keyFor(kg, "credits-basic", { plan: "basic" }, ["scrape", "crawl"]);
    const crawl = await fetch(`http://127.0.0.1:${kg.ports.http}/check/v1/crawl`, {
      method: "POST",
      headers: { "x-api-key": secret },
    });
    expect(crawl.status).toBe(200);
    expect(crawl.headers.get("x-credits-remaining")).toBe("990");
    expect((await httpCheck(kg.ports.http, "/check/v1/scrape", { "x-api-key": secret })).headers.get("x-credits-remaining")).toBe("989");
    expect((await httpCheck(kg.ports.http, "/check/user", { "x-api-key": secret })).headers.get("x-credits-remaining")).toBe("989");
    const topped = await kg.admin.addCredits({ ownerId: "credits-basic", amount: 500n, reason: "top-up" });
    expect(topped.account?.creditBalance).toBe(1489n);
    await kg.admin.upsertAccount({ ownerId: "credits-basic", subscriptionStatus: "none" });
    const unpaid = await httpCheck(kg.ports.http, "/check/v1/scrape", { "x-api-key": secret });
    expect(unpaid.status).toBe(402);
    expect(JSON.parse(unpaid.body).error.code).toBe("PLAN_REQUIRED");
  });

  it("monthly credits: methods that no route names are guarded by the prefix's scope too", async () => {
    kg = await startKeygate({ policy: load("monthly-credits.yaml") });
    const scraper = await keyFor(kg, "credits-scraper", { plan: "basic" }, ["scrape"]);
    const ask = async (method: string, path: string) =>
      (await fetch(`http://127.0.0.1:${kg?.ports.http ?? 0}/check${path}`, { method, headers: { "x-api-key": scraper } })).status;
    expect(await ask("DELETE", "/v1/scrape/1")).toBe(200);
    for (const [method, path] of [["GET", "/v1/crawl/1"], ["PUT", "/v1/crawl"], ["DELETE", "/v1/crawl/1"], ["PATCH", "/user"], ["DELETE", "/user"]] as const) {
      expect(await ask(method, path), `${method} ${path}`).toBe(403);
    }
    expect(await ask("GET", "/user")).toBe(200);
  });

  it("rate tiers by role: standard 100, premium 500, admin 1000 a minute", async () => {
    kg = await startKeygate({ policy: load("role-rate-tiers.yaml") });
    const limits: Record<string, string> = {};
    for (const role of ["standard", "premium", "admin"]) {
      const secret = await keyFor(kg, `role-${role}`, { role });
      limits[role] = (await httpCheck(kg.ports.http, "/check/anything", { "x-api-key": secret })).headers.get("x-ratelimit-limit") ?? "";
    }
    expect(limits).toEqual({ standard: "100", premium: "500", admin: "1000" });
  });
});
