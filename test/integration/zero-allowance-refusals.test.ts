import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { z } from "zod";
import { DEFAULT_POLICY_INPUT } from "../../src/config.js";
import { TestClock } from "../harness/clock.js";
import { checkInit, httpCheck, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { until } from "../harness/poll.js";
import { requireServer } from "../harness/ports.js";
import { redisAvailable, startRedis } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";

// An allowance of 0 is configuration the schema accepts and a product sells: `quotas: { exports: 0 }`
// ("exports are not on this plan"), `dailyQuota: 0`, `testMode.dailyQuota: 0`, and
// `monthlyCredits: 0` (top-ups only). Its refusal keeps the status and code of DESIGN's table
// (402 QUOTA_EXCEEDED, 402 INSUFFICIENT_CREDITS), but promises nothing that will not come: a
// quota of 0 is 0 again after midnight, so it sends no Retry-After, says `retryable: false` and
// names no reset. Before, it answered `Retry-After` (seconds to midnight), `retryable: true` and
// "It resets at <midnight>", and a client honouring them retried every night forever. A plan
// without monthly credits does not tell the caller to wait for a renewal that adds none. The limit
// headers stay as they are: the quota's entry says q=0. Both meters: in-process and Redis.

const NOON = "2026-11-22T12:00:00.000Z";
const rateLimit = { limit: 100, windowSeconds: 60 };
const POLICY = {
  ...DEFAULT_POLICY_INPUT,
  defaultPlan: "free",
  plans: {
    free: { maxActiveKeys: 5, rateLimit, dailyQuota: null, monthlyCredits: null, quotas: { exports: 0 } },
    pro: { maxActiveKeys: 5, rateLimit, dailyQuota: null, monthlyCredits: null, quotas: { exports: 1 } },
    closed: { maxActiveKeys: 5, rateLimit, dailyQuota: 0, monthlyCredits: null },
    topup: { maxActiveKeys: 5, rateLimit, dailyQuota: null, monthlyCredits: 0 },
  },
  testMode: { dailyQuota: 0 },
  scopes: { catalog: ["read"], default: ["read"] },
  routes: [{ method: "*", pathPrefix: "/v1/exports", quota: "exports" }],
};

const errorSchema = z.strictObject({ title: z.string(), message: z.string(), retryable: z.boolean(), statusCode: z.number(), code: z.string() });
const bodySchema = z.object({ error: errorSchema });

/** What a client is told: the status, the headers it plans a retry from, and the error (null on an allow). */
interface Told {
  status: number;
  retryAfter: string | null;
  policy: string | null;
  state: string | null;
  error: z.infer<typeof errorSchema> | null;
}

function told(status: number, header: (name: string) => string | null, body: string): Told {
  return {
    status,
    retryAfter: header("retry-after"),
    policy: header("ratelimit-policy"),
    state: header("ratelimit"),
    error: status === 200 ? null : bodySchema.parse(JSON.parse(body)).error,
  };
}

/** The same request through gRPC Check and the HTTP mode. */
async function bothEntryPoints(kg: TestKeygate, secret: string, path: string): Promise<{ grpc: Told; http: Told }> {
  const response = await kg.check(checkInit({ "x-api-key": secret }, path));
  let grpc: Told;
  if (response.httpResponse.case === "deniedResponse") {
    const denied = response.httpResponse.value;
    const headers = new Map(denied.headers.map((h) => [h.header?.key ?? "", h.header?.value ?? ""]));
    grpc = told(denied.status?.code ?? 0, (name) => headers.get(name) ?? null, denied.body);
  } else if (response.httpResponse.case === "okResponse") {
    const headers = new Map(response.httpResponse.value.responseHeadersToAdd.map((h) => [h.header?.key ?? "", h.header?.value ?? ""]));
    grpc = told(200, (name) => headers.get(name) ?? null, "");
  } else {
    throw new Error("a Check answered neither allow nor deny");
  }
  const answer = await httpCheck(kg.ports.http, `/check${path}`, { "x-api-key": secret });
  return { grpc, http: told(answer.status, (name) => answer.headers.get(name), answer.body) };
}

/** The value of one keygate_checks_total series on /metrics, or 0 when it has none. */
async function checksCounted(kg: TestKeygate, labels: string): Promise<number> {
  const text = await (await fetch(`http://127.0.0.1:${kg.ports.admin}/metrics`)).text();
  const line = text.split("\n").find((l) => l.startsWith(`keygate_checks_total{${labels}}`));
  return line === undefined ? 0 : Number(line.split(" ")[1]);
}

const QUOTA_OF_ZERO = { title: "Quota exceeded", retryable: false, statusCode: 402, code: "QUOTA_EXCEEDED" };

function zeroAllowanceCases(start: () => Promise<TestKeygate>): void {
  let kg: TestKeygate;
  beforeAll(async () => {
    kg = await start();
  });
  afterAll(async () => kg?.stop());

  it("a named quota of 0 is 402 QUOTA_EXCEEDED without Retry-After, not retryable, naming no reset, on gRPC and HTTP", async () => {
    const ownerId = `zero-named-${kg.ports.http}`;
    await kg.admin.upsertAccount({ ownerId, plan: "free" });
    const { secret } = await kg.admin.createKey({ ownerId, name: "app" });
    const refusal: Told = {
      status: 402,
      retryAfter: null,
      // Truthful as they were: no exports a day, none left; the rate slot was not charged.
      policy: '"minute";q=100;w=60, "exports";q=0;w=86400',
      state: '"minute";r=100;t=0, "exports";r=0;t=43200',
      error: { ...QUOTA_OF_ZERO, message: 'The plan includes no "exports" requests (a daily quota of 0).' },
    };
    expect(await bothEntryPoints(kg, secret, "/v1/exports/csv")).toEqual({ grpc: refusal, http: refusal });
    // Routes that count toward no named quota are not refused: the plan has no dailyQuota.
    expect((await bothEntryPoints(kg, secret, "/v1/other")).http.status).toBe(200);
    // Counted under its reason, as any QUOTA_EXCEEDED.
    await until(async () => (await checksCounted(kg, 'decision="deny",reason="QUOTA_EXCEEDED",mode="http"')) === 1, 5000, "the HTTP refusal counted");
    expect(await checksCounted(kg, 'decision="deny",reason="QUOTA_EXCEEDED",mode="grpc"')).toBe(1);

    // A backend charge against the quota, and a charging VerifyKey: no Retry-After either.
    const charge = await kg.admin.chargeUsage({ ownerId, cost: 0n, idempotencyKey: "export-1", quota: "exports" });
    expect([charge.charged, charge.code, charge.message, charge.headers["retry-after"] ?? null]).toEqual([
      false,
      "QUOTA_EXCEEDED",
      'The plan includes no "exports" requests (a daily quota of 0).',
      null,
    ]);
    const verify = await kg.admin.verifyKey({ secret, cost: 0n, idempotencyKey: "export-2", quota: "exports" });
    expect([verify.valid, verify.code, verify.message, verify.headers["retry-after"] ?? null]).toEqual([
      false,
      "QUOTA_EXCEEDED",
      'The plan includes no "exports" requests (a daily quota of 0).',
      null,
    ]);
  });

  it("a plan's dailyQuota of 0, and testMode.dailyQuota of 0, are refused the same way", async () => {
    const ownerId = `zero-daily-${kg.ports.http}`;
    await kg.admin.upsertAccount({ ownerId, plan: "closed" });
    const live = (await kg.admin.createKey({ ownerId, name: "live" })).secret;
    const closed: Told = {
      status: 402,
      retryAfter: null,
      policy: '"minute";q=100;w=60, "day";q=0;w=86400',
      state: '"minute";r=100;t=0, "day";r=0;t=43200',
      error: { ...QUOTA_OF_ZERO, message: "The plan includes no requests (a daily quota of 0)." },
    };
    expect(await bothEntryPoints(kg, live, "/v1/things")).toEqual({ grpc: closed, http: closed });

    // A test key of the "free" plan (no dailyQuota) meets testMode's quota of 0.
    const testOwner = `zero-test-${kg.ports.http}`;
    await kg.admin.upsertAccount({ ownerId: testOwner, plan: "free" });
    const test = (await kg.admin.createKey({ ownerId: testOwner, name: "test", mode: "test" })).secret;
    const testRefusal: Told = { ...closed, error: { ...QUOTA_OF_ZERO, message: "Test-mode keys include no requests (a daily quota of 0)." } };
    expect(await bothEntryPoints(kg, test, "/v1/things")).toEqual({ grpc: testRefusal, http: testRefusal });
  });

  it("a quota above 0 that is used up still names its reset: Retry-After, retryable", async () => {
    const ownerId = `one-export-${kg.ports.http}`;
    await kg.admin.upsertAccount({ ownerId, plan: "pro" });
    const { secret } = await kg.admin.createKey({ ownerId, name: "app" });
    expect((await kg.check(checkInit({ "x-api-key": secret }, "/v1/exports/csv"))).httpResponse.case).toBe("okResponse");
    const usedUp: Told = {
      status: 402,
      retryAfter: "43200",
      policy: '"minute";q=100;w=60, "exports";q=1;w=86400',
      state: '"minute";r=99;t=1, "exports";r=0;t=43200',
      error: { ...QUOTA_OF_ZERO, retryable: true, message: 'The daily "exports" quota of 1 is used up. It resets at 2026-11-23T00:00:00.000Z.' },
    };
    expect(await bothEntryPoints(kg, secret, "/v1/exports/csv")).toEqual({ grpc: usedUp, http: usedUp });
  });

  it("monthlyCredits of 0 (top-ups only) says to add credits, not to wait for a renewal that adds none", async () => {
    const ownerId = `topup-only-${kg.ports.http}`;
    await kg.admin.upsertAccount({ ownerId, plan: "topup" });
    const { secret } = await kg.admin.createKey({ ownerId, name: "app" });
    const message = "This request costs 1 credit and the account has 0 left. Add credits.";
    const { grpc, http } = await bothEntryPoints(kg, secret, "/v1/things");
    expect([grpc.status, grpc.error?.code, grpc.error?.message, grpc.error?.retryable, grpc.retryAfter]).toEqual([402, "INSUFFICIENT_CREDITS", message, false, null]);
    expect(http.error).toEqual(grpc.error);
    const charge = await kg.admin.chargeUsage({ ownerId, cost: 3n, idempotencyKey: "job-1" });
    expect([charge.charged, charge.code, charge.message]).toEqual([false, "INSUFFICIENT_CREDITS", "This request costs 3 credits and the account has 0 left. Add credits."]);
    // A top-up is what lets it through.
    await kg.admin.addCredits({ ownerId, amount: 1n, reason: "order 1" });
    expect((await bothEntryPoints(kg, secret, "/v1/things")).grpc.status).toBe(200);
  });

  // Last: it moves the clock on.
  it("after midnight a quota of 0 is refused the same: there was no reset to come back for", async () => {
    const ownerId = `zero-tomorrow-${kg.ports.http}`;
    await kg.admin.upsertAccount({ ownerId, plan: "free" });
    const { secret } = await kg.admin.createKey({ ownerId, name: "app" });
    const today = await bothEntryPoints(kg, secret, "/v1/exports/csv");
    kg.clock.advanceMs(12 * 3_600_000 + 1000);
    const tomorrow: Told = { ...today.http, state: '"minute";r=100;t=0, "exports";r=0;t=86399' };
    expect([today.http.status, today.http.retryAfter, today.http.error?.retryable]).toEqual([402, null, false]);
    expect(await bothEntryPoints(kg, secret, "/v1/exports/csv")).toEqual({ grpc: tomorrow, http: tomorrow });
  });
}

function noonClock(): TestClock {
  const clock = new TestClock();
  clock.freeze(NOON);
  return clock;
}

describe("refusals of an allowance of 0, in-process meter", () => {
  zeroAllowanceCases(() => startKeygate({ policy: POLICY, clock: noonClock() }));
});

const redisReady = requireServer("redis-server", redisAvailable(), "apt-get install redis-server");

describe.runIf(redisReady)("refusals of an allowance of 0, Redis meter", () => {
  let redis: RedisServer;
  afterAll(async () => redis?.stop());
  zeroAllowanceCases(async () => {
    const started = await startRedis();
    if (started === null) throw new Error("redis-server is not on PATH");
    redis = started;
    return startKeygate({ policy: POLICY, clock: noonClock(), env: { KEYGATE_REDIS_URL: redis.url } });
  });
});
