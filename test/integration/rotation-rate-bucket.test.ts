import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { TestClock } from "../harness/clock.js";
import { checkInit, checkOutcome, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { LIMITS_POLICY } from "../harness/limits-policy.js";
import { requireServer } from "../harness/ports.js";
import { redisAvailable, startRedis } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";

// A key with a rate bucket of its own (its own rate_limit, or limits.rateLimitPer: key) keeps it
// through RotateKey: the new key takes the old key's bucket, and the old key, in grace, charges
// the new key's. Rotating neither resets the limit nor doubles it for the grace period.

const T0 = "2026-12-03T12:00:00.000Z";

const status = async (kg: TestKeygate, secret: string): Promise<number> => checkOutcome(await kg.check(checkInit({ "x-api-key": secret }, "/v1/things"))).status;

async function statuses(kg: TestKeygate, secret: string, count: number): Promise<number[]> {
  const answers: number[] = [];
  for (let i = 0; i < count; i++) answers.push(await status(kg, secret));
  return answers;
}

/** The cases, on a keygate with its clock frozen at T0 (`perKey`: the same with rateLimitPer: key). */
function rotationCases(instances: () => { kg: TestKeygate; perKey: TestKeygate }, tag: string): void {
  it("a key's own limit, used up, stays used up for the new key and the old key in grace", async () => {
    const { kg } = instances();
    const ownerId = `${tag}-own-limit`;
    await kg.admin.upsertAccount({ ownerId, plan: "small" });
    const created = await kg.admin.createKey({ ownerId, name: "k", rateLimit: { limit: 2, windowSeconds: 3600 } });
    expect(await statuses(kg, created.secret, 3)).toEqual([200, 200, 429]);
    const rotated = await kg.admin.rotateKey({ id: created.key?.id ?? "", graceDays: 7 });
    expect(rotated.key?.rateLimit).toMatchObject({ limit: 2, windowSeconds: 3600 });
    expect([...(await statuses(kg, rotated.secret, 2)), await status(kg, created.secret)]).toEqual([429, 429, 429]);
  });

  it("the old key in grace and the new key share one limit: 4 an hour is 4 across both", async () => {
    const { kg } = instances();
    const ownerId = `${tag}-shared`;
    await kg.admin.upsertAccount({ ownerId, plan: "small" });
    const created = await kg.admin.createKey({ ownerId, name: "k", rateLimit: { limit: 4, windowSeconds: 3600 } });
    expect(await statuses(kg, created.secret, 1)).toEqual([200]);
    const rotated = await kg.admin.rotateKey({ id: created.key?.id ?? "", graceDays: 7 });
    expect(await statuses(kg, created.secret, 1)).toEqual([200]);
    expect(await statuses(kg, rotated.secret, 3)).toEqual([200, 200, 429]);
    expect(await statuses(kg, created.secret, 1)).toEqual([429]);
  });

  it("rateLimitPer: key (10 a minute): the rotated key gets no fresh bucket", async () => {
    const { perKey } = instances();
    const ownerId = `${tag}-per-key`;
    await perKey.admin.upsertAccount({ ownerId, plan: "small" });
    const created = await perKey.admin.createKey({ ownerId, name: "k" });
    expect((await statuses(perKey, created.secret, 11)).filter((s) => s === 200)).toHaveLength(10);
    const rotated = await perKey.admin.rotateKey({ id: created.key?.id ?? "", graceDays: 7 });
    expect(await statuses(perKey, rotated.secret, 3)).toEqual([429, 429, 429]);
  });
}

const PER_KEY_POLICY = { ...LIMITS_POLICY, limits: { ...LIMITS_POLICY.limits, rateLimitPer: "key" } };

function frozenClock(): TestClock {
  const clock = new TestClock();
  clock.freeze(T0);
  return clock;
}

describe("rate bucket through RotateKey, in-process meter", () => {
  let kg: TestKeygate;
  let perKey: TestKeygate;
  beforeAll(async () => {
    [kg, perKey] = await Promise.all([startKeygate({ policy: LIMITS_POLICY, clock: frozenClock() }), startKeygate({ policy: PER_KEY_POLICY, clock: frozenClock() })]);
  });
  afterAll(async () => {
    await Promise.all([kg?.stop(), perKey?.stop()]);
  });
  rotationCases(() => ({ kg, perKey }), "memory");
});

const redisReady = requireServer("redis-server", redisAvailable(), "apt-get install redis-server");

describe.runIf(redisReady)("rate bucket through RotateKey, Redis meter", () => {
  let redis: RedisServer;
  let kg: TestKeygate;
  let perKey: TestKeygate;
  const dirs: string[] = [];
  beforeAll(async () => {
    const started = await startRedis();
    if (started === null) throw new Error("redis-server is not on PATH");
    redis = started;
    const dir = (): string => {
      const made = mkdtempSync(join(tmpdir(), "keygate-rotation-bucket-"));
      dirs.push(made);
      return made;
    };
    // Two instances on one Redis: the owners differ, so their buckets do too.
    [kg, perKey] = await Promise.all([
      startKeygate({ dataDir: dir(), policy: LIMITS_POLICY, clock: frozenClock(), env: { KEYGATE_REDIS_URL: redis.url } }),
      startKeygate({ dataDir: dir(), policy: PER_KEY_POLICY, clock: frozenClock(), env: { KEYGATE_REDIS_URL: redis.url } }),
    ]);
  });
  afterAll(async () => {
    await Promise.all([kg?.stop(), perKey?.stop()]);
    await redis?.stop();
    for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
  });
  rotationCases(() => ({ kg, perKey }), "redis");

  it("nothing fell back to in-process limits", () => {
    expect([...kg.logLines, ...perKey.logLines].filter((line) => line.includes("Redis limits failed") || line.includes("could not take the old key's rate bucket"))).toEqual([]);
  });
});
