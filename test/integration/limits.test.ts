import { Code } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { adminRefusal, checkInit, httpCheck, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { LIMITS_POLICY } from "../harness/limits-policy.js";

let kg: TestKeygate;
let seq = 0;
const T0 = "2026-11-22T12:00:00.000Z";

beforeAll(async () => {
  kg = await startKeygate({ policy: LIMITS_POLICY });
  kg.clock.freeze(T0);
});
afterAll(async () => {
  await kg.stop();
});

async function issue(plan: string, extra: { scopes?: string[]; role?: string; rateLimit?: { limit: number; windowSeconds: number } } = {}) {
  const ownerId = `limits-${++seq}`;
  await kg.admin.upsertAccount({ ownerId, plan, role: extra.role });
  const created = await kg.admin.createKey({ ownerId, name: "k", scopes: extra.scopes ?? [], rateLimit: extra.rateLimit });
  return { ownerId, id: created.key?.id ?? "", secret: created.secret };
}

const get = (secret: string, path = "/v1/x", headers: Record<string, string> = {}) =>
  httpCheck(kg.ports.http, `/check${path}`, { "x-api-key": secret, ...headers });

describe("rate limits", () => {
  it("exactly `limit` of 3 x limit concurrent checks pass; the rest get 429 RATE_LIMITED with Retry-After", async () => {
    kg.clock.freeze(T0);
    const key = await issue("small");
    const answers = await Promise.all(Array.from({ length: 30 }, () => get(key.secret)));
    const allowed = answers.filter((a) => a.status === 200);
    const limited = answers.filter((a) => a.status === 429);
    expect(allowed).toHaveLength(10);
    expect(limited).toHaveLength(20);
    for (const answer of limited) {
      const body = JSON.parse(answer.body) as { error: { code: string; message: string; retryable: boolean } };
      expect(body.error.code).toBe("RATE_LIMITED");
      expect(body.error.retryable).toBe(true);
      expect(body.error.message).toBe("Rate limit of 10 requests per minute exceeded. Retry in 6 seconds.");
      expect(answer.headers.get("retry-after")).toBe("6");
      expect(answer.headers.get("x-ratelimit-limit")).toBe("10");
      expect(answer.headers.get("x-ratelimit-remaining")).toBe("0");
      expect(answer.headers.get("ratelimit-policy")).toBe('"minute";q=10;w=60');
      expect(answer.headers.get("ratelimit")).toBe('"minute";r=0;t=60');
    }
    // One slot comes back every 6 seconds.
    kg.clock.advanceMs(6000);
    expect((await get(key.secret)).status).toBe(200);
    expect((await get(key.secret)).status).toBe(429);
  });

  it("headers on allow count down", async () => {
    kg.clock.freeze(T0);
    const key = await issue("small");
    const first = await get(key.secret);
    expect(first.status).toBe(200);
    expect(first.headers.get("x-ratelimit-limit")).toBe("10");
    expect(first.headers.get("x-ratelimit-remaining")).toBe("9");
    expect(first.headers.get("x-ratelimit-reset")).toBe("6");
    expect(first.headers.get("ratelimit-policy")).toBe('"minute";q=10;w=60');
    expect(first.headers.get("ratelimit")).toBe('"minute";r=9;t=6');
    const second = await get(key.secret);
    expect(second.headers.get("x-ratelimit-remaining")).toBe("8");
    expect(second.headers.get("ratelimit")).toBe('"minute";r=8;t=12');
  });

  it("gRPC Check carries the same headers to the client in response_headers_to_add", async () => {
    kg.clock.freeze(T0);
    const key = await issue("small");
    const response = await kg.check(checkInit({ "x-api-key": key.secret }));
    if (response.httpResponse.case !== "okResponse") throw new Error("expected allow");
    const toClient = Object.fromEntries(response.httpResponse.value.responseHeadersToAdd.map((h) => [h.header?.key, h.header?.value]));
    expect(toClient).toEqual({
      "x-ratelimit-limit": "10",
      "x-ratelimit-remaining": "9",
      "x-ratelimit-reset": "6",
      "ratelimit-policy": '"minute";q=10;w=60',
      ratelimit: '"minute";r=9;t=6',
    });
  });

  it("is per account by default: two keys share a bucket; a key with its own limit has its own", async () => {
    kg.clock.freeze(T0);
    const a = await issue("small");
    const second = await kg.admin.createKey({ ownerId: a.ownerId, name: "second" });
    const own = await kg.admin.createKey({ ownerId: a.ownerId, name: "own", rateLimit: { limit: 2, windowSeconds: 60 } });
    for (let i = 0; i < 5; i++) expect((await get(a.secret)).status).toBe(200);
    for (let i = 0; i < 5; i++) expect((await get(second.secret)).status).toBe(200);
    expect((await get(a.secret)).status).toBe(429);
    expect((await get(own.secret)).headers.get("x-ratelimit-limit")).toBe("2");
    expect((await get(own.secret)).status).toBe(200);
    expect((await get(own.secret)).status).toBe(429);
  });

  it("role tiers replace the plan's limit", async () => {
    kg.clock.freeze(T0);
    const admin = await issue("small", { role: "admin" });
    expect((await get(admin.secret)).headers.get("x-ratelimit-limit")).toBe("20");
    expect((await kg.admin.getAccount({ ownerId: admin.ownerId })).account?.rateLimit).toMatchObject({ limit: 20, windowSeconds: 60 });
  });

  it("refused requests are never charged", async () => {
    kg.clock.freeze(T0);
    const key = await issue("small", { scopes: ["read"] });
    for (let i = 0; i < 15; i++) {
      const refused = await get(key.secret, "/write");
      expect(refused.status).toBe(403);
      // A refusal of a known key still reports the limits, uncharged.
      expect(refused.headers.get("x-ratelimit-remaining")).toBe("10");
      expect(refused.headers.get("ratelimit")).toBe('"minute";r=10;t=0');
    }
    const after = await get(key.secret);
    expect(after.status).toBe(200);
    expect(after.headers.get("x-ratelimit-remaining")).toBe("9");
  });
});

describe("daily quota", () => {
  it("402 QUOTA_EXCEEDED past the quota, with the reset time, and a reset at midnight UTC", async () => {
    kg.clock.freeze("2026-11-22T23:59:00.000Z");
    const key = await issue("quota");
    for (let i = 0; i < 5; i++) {
      const ok = await get(key.secret);
      expect(ok.status).toBe(200);
      expect(ok.headers.get("ratelimit-policy")).toBe('"minute";q=100;w=60, "day";q=5;w=86400');
      // Each request takes 0.6 s of the minute bucket (100 a minute).
      expect(ok.headers.get("ratelimit")).toBe(`"minute";r=${99 - i};t=${Math.ceil(0.6 * (i + 1) - 1e-9)}, "day";r=${4 - i};t=60`);
    }
    const refused = await get(key.secret);
    expect(refused.status).toBe(402);
    const body = JSON.parse(refused.body) as { error: { code: string; message: string; statusCode: number } };
    expect(body.error).toMatchObject({ code: "QUOTA_EXCEEDED", statusCode: 402 });
    expect(body.error.message).toBe("The daily quota of 5 requests is used up. It resets at 2026-11-23T00:00:00.000Z.");
    expect(refused.headers.get("retry-after")).toBe("60");
    // The refused request took nothing from the rate bucket.
    expect(refused.headers.get("ratelimit")).toBe('"minute";r=95;t=3, "day";r=0;t=60');
    kg.clock.advanceMs(59_000);
    expect((await get(key.secret)).status).toBe(402);
    kg.clock.advanceMs(1000);
    const nextDay = await get(key.secret);
    expect(nextDay.status).toBe(200);
    expect(nextDay.headers.get("ratelimit")).toBe('"minute";r=99;t=1, "day";r=4;t=86400');
  });
});

describe("credits", () => {
  it("charges the route's cost, refuses past the balance, and a top-up adds", async () => {
    kg.clock.freeze(T0);
    const key = await issue("metered");
    const first = await get(key.secret, "/expensive");
    expect(first.status).toBe(200);
    expect(first.headers.get("x-credits-remaining")).toBe("1");
    const refused = await get(key.secret, "/expensive");
    expect(refused.status).toBe(402);
    const body = JSON.parse(refused.body) as { error: { code: string; message: string } };
    expect(body.error.code).toBe("INSUFFICIENT_CREDITS");
    expect(body.error.message).toBe("This request costs 2 credits and the account has 1 left. Add credits or wait for the monthly renewal.");
    expect(refused.headers.get("retry-after")).toBeNull();
    expect(refused.headers.get("x-ratelimit-limit")).toBe("100");
    expect((await get(key.secret, "/free")).status).toBe(200);
    const topped = await kg.admin.addCredits({ ownerId: key.ownerId, amount: 5n, reason: "order 1" });
    expect(topped.account?.creditBalance).toBe(6n);
    const again = await kg.admin.addCredits({ ownerId: key.ownerId, amount: 4n, reason: "order 2" });
    expect(again.account?.creditBalance).toBe(10n);
    expect(again.account?.topupCredits).toBe(9n);
    expect((await get(key.secret, "/expensive")).headers.get("x-credits-remaining")).toBe("8");
    // context_extensions.cost wins over the routes table.
    const viaEnvoy = await kg.check(checkInit({ "x-api-key": key.secret }, "/expensive", "GET", { cost: "5" }));
    expect(viaEnvoy.status?.code).toBe(0);
    expect((await kg.admin.getAccount({ ownerId: key.ownerId })).account?.creditBalance).toBe(3n);
  });

  it("the monthly renewal restores the allowance and keeps top-ups", async () => {
    kg.clock.freeze("2026-11-30T23:00:00.000Z");
    const key = await issue("metered");
    await kg.admin.addCredits({ ownerId: key.ownerId, amount: 1n, reason: "gift" });
    for (let i = 0; i < 4; i++) expect((await get(key.secret)).status).toBe(200);
    expect((await get(key.secret)).status).toBe(402);
    kg.clock.freeze("2026-12-01T00:00:01.000Z");
    const renewed = await get(key.secret);
    expect(renewed.status).toBe(200);
    expect(renewed.headers.get("x-credits-remaining")).toBe("2");
  });

  it("a top-up repeated with its idempotency key adds once and answers the first account again; another key or owner adds", async () => {
    const key = await issue("metered");
    const other = await issue("metered");
    const first = await kg.admin.addCredits({ ownerId: key.ownerId, amount: 5n, reason: "order 7", idempotencyKey: "pay_7" });
    expect([first.account?.topupCredits, first.replayed]).toEqual([5n, false]);
    // The retry of a call whose answer was lost, and a concurrent pair: nothing more is added.
    const [retry, concurrent] = await Promise.all([
      kg.admin.addCredits({ ownerId: key.ownerId, amount: 5n, reason: "order 7", idempotencyKey: "pay_7" }),
      kg.admin.addCredits({ ownerId: key.ownerId, amount: 5n, reason: "order 7", idempotencyKey: "pay_7" }),
    ]);
    expect([retry.replayed, concurrent.replayed]).toEqual([true, true]);
    expect([retry.account?.topupCredits, concurrent.account?.topupCredits]).toEqual([5n, 5n]);
    expect((await kg.admin.getAccount({ ownerId: key.ownerId })).account?.topupCredits).toBe(5n);
    // A keyed top-up's record is named after it (its time and key), so two of the same
    // millisecond are in no set order: the clock, frozen, moves on between them.
    kg.clock.advanceMs(1);
    expect((await kg.admin.addCredits({ ownerId: key.ownerId, amount: 2n, idempotencyKey: "pay_8" })).account?.topupCredits).toBe(7n);
    // The key is the owner's own: another owner's top-up with the same key adds.
    expect((await kg.admin.addCredits({ ownerId: other.ownerId, amount: 3n, idempotencyKey: "pay_7" })).replayed).toBe(false);
    expect((await kg.admin.getAccount({ ownerId: other.ownerId })).account?.topupCredits).toBe(3n);
    // Without a key every call adds, as before.
    await kg.admin.addCredits({ ownerId: key.ownerId, amount: 1n });
    await kg.admin.addCredits({ ownerId: key.ownerId, amount: 1n });
    expect((await kg.admin.getAccount({ ownerId: key.ownerId })).account?.topupCredits).toBe(9n);
    const audited = (await kg.admin.listAuditEvents({ ownerId: key.ownerId })).events.filter((e) => e.action === "credits.add");
    expect(audited.map((e) => e.changes["idempotency_key"])).toEqual(['"pay_7"', '"pay_8"', undefined, undefined]);
  });

  it("refuses a keyed top-up past 1,000 for the account in 24 hours, naming when a place frees, and adds nothing", async () => {
    // After the test above (December): a keyed top-up's time is never before the trail's newest
    // record, so a clock stepped back to T0 would put these at December and age the bulk out.
    kg.clock.freeze("2026-12-02T12:00:00.000Z");
    const key = await issue("metered");
    // The account's first 1,000 keyed top-ups, written to the store as AddCredits writes them.
    for (let i = 0; i < 1000; i++) await kg.app.store.addCreditsOnce(key.ownerId, 1, `bulk-${i}`, kg.clock.now());
    const before = (await kg.admin.getAccount({ ownerId: key.ownerId })).account?.topupCredits;
    expect(before).toBe(1000n);
    expect(await adminRefusal(kg.admin.addCredits({ ownerId: key.ownerId, amount: 5n, idempotencyKey: "order-1001" }))).toEqual({
      code: Code.FailedPrecondition,
      message: `account "${key.ownerId}" has had 1000 top-ups with an idempotency_key in 24 hours, as many as keygate keeps; nothing was added: retry after 2026-12-03T12:00:00.000Z`,
    });
    expect((await kg.admin.getAccount({ ownerId: key.ownerId })).account?.topupCredits).toBe(1000n);
    // A repeat of a key held is still answered, and a top-up without a key still adds.
    expect((await kg.admin.addCredits({ ownerId: key.ownerId, amount: 1n, idempotencyKey: "bulk-0" })).replayed).toBe(true);
    expect((await kg.admin.addCredits({ ownerId: key.ownerId, amount: 5n })).account?.topupCredits).toBe(1005n);
  });

  it("rejects a bad top-up, naming the field, and adds nothing", async () => {
    const key = await issue("metered");
    const before = (await kg.admin.getAccount({ ownerId: key.ownerId })).account?.creditBalance;
    await expect(kg.admin.addCredits({ ownerId: key.ownerId, amount: 0n })).rejects.toThrow(/amount: must be a whole number from 1 to 1000000000/);
    await expect(kg.admin.addCredits({ ownerId: key.ownerId, amount: -5n })).rejects.toThrow(/amount/);
    await expect(kg.admin.addCredits({ ownerId: "nobody-at-all", amount: 5n })).rejects.toMatchObject({ code: 5 });
    await expect(kg.admin.addCredits({ ownerId: key.ownerId, amount: 5n, idempotencyKey: "x".repeat(201) })).rejects.toThrow(/idempotency_key: must be 1-200 printable ASCII characters/);
    await expect(kg.admin.addCredits({ ownerId: key.ownerId, amount: 5n, idempotencyKey: "pay\n1" })).rejects.toThrow(/idempotency_key/);
    expect((await kg.admin.getAccount({ ownerId: key.ownerId })).account?.creditBalance).toBe(before);
  });
});

describe("usage", () => {
  it("GetUsage totals and the by-key breakdown per day, and they survive a restart", async () => {
    const local = await startKeygate({ policy: LIMITS_POLICY });
    local.clock.freeze("2026-11-22T10:00:00.000Z");
    const ownerId = "usage-owner";
    await local.admin.upsertAccount({ ownerId, plan: "metered" });
    const a = await local.admin.createKey({ ownerId, name: "a", scopes: ["read"] });
    const b = await local.admin.createKey({ ownerId, name: "b", scopes: ["read"] });
    const call = (secret: string, path: string) => httpCheck(local.ports.http, `/check${path}`, { "x-api-key": secret });
    expect((await call(a.secret, "/v1")).status).toBe(200);
    expect((await call(a.secret, "/v1")).status).toBe(200);
    expect((await call(a.secret, "/write")).status).toBe(403);
    local.clock.freeze("2026-11-23T10:00:00.000Z");
    expect((await call(b.secret, "/expensive")).status).toBe(402);
    expect((await call(b.secret, "/v1")).status).toBe(200);
    await local.stop({ keepData: true });

    const restarted = await startKeygate({ policy: LIMITS_POLICY, dataDir: local.dataDir });
    try {
      restarted.clock.freeze("2026-11-23T11:00:00.000Z");
      const usage = await restarted.admin.getUsage({ ownerId, from: "2026-11-22", to: "2026-11-23" });
      expect(usage.totals).toMatchObject({ allowed: 3n, creditsUsed: 3n, denied: { FORBIDDEN: 1n, INSUFFICIENT_CREDITS: 1n } });
      expect(usage.byKey.map((k) => [k.day, k.keyId, k.usage?.allowed, k.usage?.denied, k.usage?.creditsUsed])).toEqual([
        ["2026-11-22", a.key?.id, 2n, { FORBIDDEN: 1n }, 2n],
        ["2026-11-23", b.key?.id, 1n, { INSUFFICIENT_CREDITS: 1n }, 1n],
      ]);
      // The spent credits survived too: 3 of 3 are gone this month.
      expect((await restarted.admin.getAccount({ ownerId })).account?.creditBalance).toBe(0n);
      expect((await httpCheck(restarted.ports.http, "/check/v1", { "x-api-key": b.secret })).status).toBe(402);
      await expect(restarted.admin.getUsage({ ownerId, from: "2026-11-23", to: "2026-11-22" })).rejects.toThrow(/to: must not be before from/);
      await expect(restarted.admin.getUsage({ ownerId, from: "22/11/2026", to: "2026-11-22" })).rejects.toThrow(/from: must be a UTC day/);
    } finally {
      await restarted.stop();
    }
  });

  it("today's quota count survives a restart", async () => {
    const local = await startKeygate({ policy: LIMITS_POLICY });
    local.clock.freeze(T0);
    await local.admin.upsertAccount({ ownerId: "quota-restart", plan: "quota" });
    const key = await local.admin.createKey({ ownerId: "quota-restart", name: "q" });
    for (let i = 0; i < 3; i++) expect((await httpCheck(local.ports.http, "/check", { "x-api-key": key.secret })).status).toBe(200);
    await local.stop({ keepData: true });
    const restarted = await startKeygate({ policy: LIMITS_POLICY, dataDir: local.dataDir });
    try {
      restarted.clock.freeze(T0);
      for (let i = 0; i < 2; i++) expect((await httpCheck(restarted.ports.http, "/check", { "x-api-key": key.secret })).status).toBe(200);
      expect((await httpCheck(restarted.ports.http, "/check", { "x-api-key": key.secret })).status).toBe(402);
    } finally {
      await restarted.stop();
    }
  });
});
