import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Redis } from "ioredis";
import { afterAll, beforeAll, describe, expect, it, vi } from "vitest";
import type { CreditState } from "../../src/store/store.js";
import { TestClock } from "../harness/clock.js";
import { checkInit, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { LIMITS_POLICY } from "../harness/limits-policy.js";
import { until } from "../harness/poll.js";
import { requireServer } from "../harness/ports.js";
import { redisCallCount } from "../harness/redis-charge.js";
import { redisAvailable, startRedis } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";

/** Polls every 2 ms: the Check must be seen reaching Redis while its reload is still held back. */
const POLL = { intervalMs: 2 } as const;

const ready = requireServer("redis-server", redisAvailable(), "apt-get install redis-server");

const REPETITIONS = 200;
const ALLOWANCE = 5;
const TOPUP = 1000;
const COST = 1;
/** Every repetition: the month's allowance plus one top-up, less the one charged Check. */
const EXPECTED_BALANCE = ALLOWANCE + TOPUP - COST;

const POLICY = {
  ...LIMITS_POLICY,
  plans: { ...LIMITS_POLICY.plans, metered: { ...LIMITS_POLICY.plans.metered, monthlyCredits: ALLOWANCE } },
};

/**
 * How one repetition orders the top-up (AddCredits: store write, then Redis) against the
 * account's first charged Check (Redis finds no balance, reads the store, seeds Redis):
 * - seed-read-then-topup: the Check reads the store, the whole top-up runs, then the seed lands
 *   (the released version lost the top-up here);
 * - topup-write-then-seed: the top-up writes the store, the whole Check runs, then the top-up
 *   reaches Redis (the released version counted it twice here);
 * - check-then-topup and topup-then-check: one after the other;
 * - concurrent: both at once, ungated; the order they took is recorded.
 */
const VARIANTS = ["seed-read-then-topup", "topup-write-then-seed", "check-then-topup", "topup-then-check", "concurrent"] as const;
type Variant = (typeof VARIANTS)[number];

/** A one-shot pause: the gated call signals `reached` and waits for `release()`. */
class Gate {
  readonly reached: Promise<void>;
  readonly #released: Promise<void>;
  #signal: () => void = () => undefined;
  #open: () => void = () => undefined;

  constructor(readonly ownerId: string) {
    this.reached = new Promise((resolve) => {
      this.#signal = resolve;
    });
    this.#released = new Promise((resolve) => {
      this.#open = resolve;
    });
  }

  async pass(): Promise<void> {
    this.#signal();
    await this.#released;
  }

  release(): void {
    this.#open();
  }
}

/** Gates and an event log on one replica's store: the seed's credit read and the top-up's write. */
class StoreHooks {
  seedGate: Gate | null = null;
  writeGate: Gate | null = null;
  constructor(
    kg: TestKeygate,
    /** Shared by every replica's hooks: the replicas run in this process, so it is in time order. */
    private readonly events: string[],
  ) {
    const store = kg.app.store;
    const getCredits = store.getCredits.bind(store);
    const addCredits = store.addCredits.bind(store);
    vi.spyOn(store, "getCredits").mockImplementation(async (ownerId: string): Promise<CreditState> => {
      const state = await getCredits(ownerId);
      this.events.push(`read:${ownerId}`);
      const gate = this.seedGate;
      if (gate !== null && gate.ownerId === ownerId) {
        this.seedGate = null;
        await gate.pass();
      }
      return state;
    });
    vi.spyOn(store, "addCredits").mockImplementation(async (ownerId: string, amount: number): Promise<CreditState> => {
      const state = await addCredits(ownerId, amount);
      this.events.push(`write:${ownerId}`);
      const gate = this.writeGate;
      if (gate !== null && gate.ownerId === ownerId) {
        this.writeGate = null;
        await gate.pass();
      }
      return state;
    });
  }
}


describe.runIf(ready)("a top-up racing an account's first charged Check (Redis)", () => {
  let redis: RedisServer;
  const dirs: string[] = [];
  const instances: TestKeygate[] = [];

  beforeAll(async () => {
    const started = await startRedis();
    if (started === null) throw new Error("redis-server is not on PATH");
    redis = started;
  });

  afterAll(async () => {
    vi.restoreAllMocks();
    await Promise.allSettled(instances.map((kg) => kg.stop()));
    for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
    await redis?.stop();
  });

  /** Replicas sharing one SQLite file, one Redis (unless `embedded`) and one clock. */
  async function replicas(count: number, embedded = false): Promise<TestKeygate[]> {
    const dataDir = mkdtempSync(join(tmpdir(), "keygate-credits-race-"));
    dirs.push(dataDir);
    const clock = new TestClock();
    clock.freeze("2026-11-22T12:00:00.000Z");
    const started: TestKeygate[] = [];
    // One after the other: the first start writes the pepper the others read.
    for (let i = 0; i < count; i++) {
      const kg = await startKeygate({ dataDir, policy: POLICY, clock, env: embedded ? {} : { KEYGATE_REDIS_URL: redis.url } });
      instances.push(kg);
      started.push(kg);
    }
    return started;
  }

  /** Runs the race REPETITIONS times: Checks through `checker`, top-ups through `topper`. */
  async function race(label: string, checker: TestKeygate, topper: TestKeygate): Promise<void> {
    const events: string[] = [];
    const checkerHooks = new StoreHooks(checker, events);
    const topperHooks = checker === topper ? checkerHooks : new StoreHooks(topper, events);
    const hits = new Map<string, number>();
    const wrong: string[] = [];

    for (let i = 0; i < REPETITIONS; i++) {
      const variant: Variant = VARIANTS[i % VARIANTS.length] ?? "concurrent";
      const ownerId = `race-${label.replace(" ", "-")}-${i}`;
      await topper.admin.upsertAccount({ ownerId, plan: "metered" });
      const { secret } = await topper.admin.createKey({ ownerId, name: "race" });
      const charge = async (): Promise<void> => {
        const answer = await checker.check(checkInit({ "x-api-key": secret }, "/v1/x"));
        if (answer.httpResponse.case !== "okResponse") throw new Error(`${ownerId}: the first Check was refused`);
      };
      const topUp = async (): Promise<void> => {
        await topper.admin.addCredits({ ownerId, amount: BigInt(TOPUP), reason: `race ${i}` });
      };

      let seen: string = variant;
      switch (variant) {
        case "seed-read-then-topup": {
          const gate = new Gate(ownerId);
          checkerHooks.seedGate = gate;
          const checking = charge();
          await gate.reached;
          await topUp();
          gate.release();
          await checking;
          break;
        }
        case "topup-write-then-seed": {
          const gate = new Gate(ownerId);
          topperHooks.writeGate = gate;
          const topping = topUp();
          await gate.reached;
          await charge();
          gate.release();
          await topping;
          break;
        }
        case "check-then-topup":
          await charge();
          await topUp();
          break;
        case "topup-then-check":
          await topUp();
          await charge();
          break;
        case "concurrent": {
          // Alternate which starts first, so both orders get their chance.
          await Promise.all(Math.floor(i / VARIANTS.length) % 2 === 0 ? [charge(), topUp()] : [topUp(), charge()]);
          const firstRead = events.indexOf(`read:${ownerId}`);
          const write = events.indexOf(`write:${ownerId}`);
          seen = `concurrent, ${firstRead !== -1 && firstRead < write ? "seed read first" : "store write first"}`;
          break;
        }
      }
      hits.set(seen, (hits.get(seen) ?? 0) + 1);

      const account = await topper.admin.getAccount({ ownerId });
      const balance = Number(account.account?.creditBalance ?? -1n);
      if (balance !== EXPECTED_BALANCE) wrong.push(`${ownerId} (${seen}): balance ${balance}`);
    }

    console.log(`credits race, ${label}: ${REPETITIONS} repetitions, ${REPETITIONS - wrong.length} exact; ${JSON.stringify(Object.fromEntries(hits))}`);
    expect(wrong).toEqual([]);
  }

  it("one replica: the balance is exact in all 200 repetitions, whatever the interleaving", async () => {
    const [kg] = await replicas(1);
    if (kg === undefined) throw new Error("no replica");
    await race("one replica", kg, kg);
  }, 300_000);

  it("two replicas sharing Redis and the store: Checks on one, top-ups on the other, exact in all 200", async () => {
    const [a, b] = await replicas(2);
    if (a === undefined || b === undefined) throw new Error("no replicas");
    await race("two replicas", a, b);
  }, 300_000);

  it("a balance reloaded into Redis while a usage flush is being written counts that spend exactly once", async () => {
    const [kg] = await replicas(1);
    if (kg === undefined) throw new Error("no replica");
    const ownerId = "race-flush";
    await kg.admin.upsertAccount({ ownerId, plan: "metered" });
    const { secret } = await kg.admin.createKey({ ownerId, name: "flush" });
    const charge = async (): Promise<void> => {
      const answer = await kg.check(checkInit({ "x-api-key": secret }, "/v1/x"));
      if (answer.httpResponse.case !== "okResponse") throw new Error("the Check was refused");
    };
    await charge();

    // A flush that has taken its batch (the Check's spend) but not yet written it.
    const store = kg.app.store;
    const applyUsage = store.applyUsage.bind(store);
    const gate = new Gate(ownerId);
    const flushing = vi.spyOn(store, "applyUsage").mockImplementation(async (usage, credits) => {
      await gate.pass();
      return applyUsage(usage, credits);
    });
    const report = kg.admin.getUsage({ ownerId, from: "2026-11-22", to: "2026-11-22" });
    await gate.reached;
    // Redis loses the balance (restart, eviction, expiry): the next Check reloads it from the store.
    const probe = new Redis(redis.url, { lazyConnect: true, maxRetriesPerRequest: 1 });
    await probe.connect();
    expect(await probe.del(`kg:c:${ownerId}`)).toBe(1);
    probe.disconnect();
    const chargesBefore = await redisCallCount(kg, "charge");
    const reloading = charge();
    // The Check's charge found no balance in Redis; what follows at once is the reload from the
    // store, which must not read the store while the held batch is in neither place.
    await until(async () => (await redisCallCount(kg, "charge")) > chargesBefore, 10_000, "the Check reaching Redis", POLL);
    await new Promise((resolve) => setImmediate(resolve));
    gate.release();
    await Promise.all([reloading, report]);
    flushing.mockRestore();

    expect(Number((await kg.admin.getAccount({ ownerId })).account?.creditBalance ?? -1n)).toBe(ALLOWANCE - 2 * COST);
  });

  it("a credit hash missing its top-up total but expiring (partial, or altered by hand) is not taken as loaded, and the hash expires when idle", async () => {
    const [kg] = await replicas(1);
    if (kg === undefined) throw new Error("no replica");
    const ownerId = "race-partial";
    await kg.admin.upsertAccount({ ownerId, plan: "metered" });
    const { secret } = await kg.admin.createKey({ ownerId, name: "partial" });
    const charge = async (): Promise<void> => {
      const answer = await kg.check(checkInit({ "x-api-key": secret }, "/v1/x"));
      if (answer.httpResponse.case !== "okResponse") throw new Error("the Check was refused");
    };
    await charge();
    await kg.admin.getUsage({ ownerId, from: "2026-11-22", to: "2026-11-22" });
    const probe = new Redis(redis.url, { lazyConnect: true, maxRetriesPerRequest: 1 });
    await probe.connect();
    try {
      const hash = `kg:c:${ownerId}`;
      // Charged accounts keep their balance for the idle lifetime (at least an hour), not forever.
      const ttlMs = await probe.pttl(hash);
      expect(ttlMs).toBeGreaterThan(3_000_000);
      expect(ttlMs).toBeLessThanOrEqual(3_600_000);
      // A wrong balance without the field that says the hash is whole, on a hash that expires (an
      // earlier release's never does; rolling-upgrade-credits adopts those): reloaded from the store.
      await probe.hset(hash, "topup", 999_999);
      await probe.hdel(hash, "seen");
      await charge();
      expect(Number((await kg.admin.getAccount({ ownerId })).account?.creditBalance ?? -1n)).toBe(ALLOWANCE - 2 * COST);
      expect(await probe.hget(hash, "topup")).toBe("0");
    } finally {
      probe.disconnect();
    }
  });

  it("embedded (no Redis, in-process balances): exact in all 200", async () => {
    const [kg] = await replicas(1, true);
    if (kg === undefined) throw new Error("no replica");
    await race("embedded", kg, kg);
  }, 300_000);
});
