import { timestampMs } from "@bufbuild/protobuf/wkt";
import type { Timestamp } from "@bufbuild/protobuf/wkt";
import { afterAll, beforeAll, describe, expect, it, vi } from "vitest";
import { TestClock } from "../harness/clock.js";
import { TEST_POLICY, checkInit, checkOutcome, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { until } from "../harness/poll.js";

// A rotation's old key, while in grace, is the customer's old secret for the same access: what
// is done to the new key (revoke, disable, enable, rescope) holds for the old one too, or the
// old secret would stay wider than the key that replaced it.
let kg: TestKeygate;
let seq = 0;
const owner = (): string => `owner-grace-${++seq}`;

// A plan with room for more keys than one page of an owner's keys (1,000).
const POLICY = {
  ...TEST_POLICY,
  plans: { ...TEST_POLICY.plans, bulk: { maxActiveKeys: 1100, rateLimit: { limit: 1000, windowSeconds: 60 }, dailyQuota: null, monthlyCredits: null } },
};

beforeAll(async () => {
  kg = await startKeygate({ policy: POLICY });
});
afterAll(async () => {
  await kg.stop();
});

const check = async (secret: string, path = "/v1/things"): Promise<{ status: number; code: string | null }> =>
  checkOutcome(await kg.check(checkInit({ authorization: `Bearer ${secret}` }, path)));

const ALLOWED = { status: 200, code: null };

interface Rotated {
  old: { id: string; secret: string };
  next: { id: string; secret: string };
}

/** A business-plan key with `scopes`, rotated with 7 days of grace; both secrets pass a Check. */
async function rotated(ownerId: string, scopes: string[] = ["tutor"]): Promise<Rotated> {
  await kg.admin.upsertAccount({ ownerId, plan: "business" });
  const created = await kg.admin.createKey({ ownerId, name: "grace test", scopes });
  if (created.key === undefined) throw new Error("CreateKey answered no key");
  const rotation = await kg.admin.rotateKey({ id: created.key.id, graceDays: 7 });
  if (rotation.key === undefined) throw new Error("RotateKey answered no key");
  const pair = { old: { id: created.key.id, secret: created.secret }, next: { id: rotation.key.id, secret: rotation.secret } };
  expect(await check(pair.old.secret)).toEqual(ALLOWED);
  expect(await check(pair.next.secret)).toEqual(ALLOWED);
  return pair;
}

async function stateOf(id: string): Promise<string | undefined> {
  return (await kg.admin.getKey({ id })).key?.state;
}

describe("a key in grace follows its successor", () => {
  it("revoking the new key revokes the old one at once (401 KEY_REVOKED), audited with the successor's id", async () => {
    const ownerId = owner();
    const { old, next } = await rotated(ownerId);
    await kg.admin.revokeKey({ id: next.id, reason: "customer offboarded" });
    expect(await check(next.secret)).toEqual({ status: 401, code: "KEY_REVOKED" });
    expect(await check(old.secret)).toEqual({ status: 401, code: "KEY_REVOKED" });
    const oldKey = (await kg.admin.getKey({ id: old.id })).key;
    expect(oldKey?.state).toBe("revoked");
    expect(oldKey?.revokeReason).toBe("its successor was revoked");
    const events = (await kg.admin.listAuditEvents({ keyId: old.id })).events.map((e) => ({ action: e.action, changes: e.changes }));
    expect(events.at(-1)).toEqual({ action: "key.revoke", changes: { reason: '"its successor was revoked"', successor_id: JSON.stringify(next.id) } });
  });

  it("disabling the new key disables the old one (401 KEY_DISABLED); enabling it lets both through again", async () => {
    const { old, next } = await rotated(owner());
    const disabled = await kg.admin.disableKey({ id: next.id, reason: "card declined" });
    expect(await check(next.secret)).toEqual({ status: 401, code: "KEY_DISABLED" });
    expect(await check(old.secret)).toEqual({ status: 401, code: "KEY_DISABLED" });
    expect((await kg.admin.getKey({ id: old.id })).key?.disabledAt).toEqual(disabled.key?.disabledAt);
    await kg.admin.enableKey({ id: next.id });
    expect(await check(next.secret)).toEqual(ALLOWED);
    expect(await check(old.secret)).toEqual(ALLOWED);
    expect(await stateOf(old.id)).toBe("grace");
  });

  it("an old key disabled on its own stays disabled when the new key is disabled and enabled again", async () => {
    const { old, next } = await rotated(owner());
    await kg.admin.disableKey({ id: old.id, reason: "leaked" });
    kg.clock.advanceMs(60_000);
    await kg.admin.disableKey({ id: next.id, reason: "card declined" });
    await kg.admin.enableKey({ id: next.id });
    expect(await check(next.secret)).toEqual(ALLOWED);
    expect(await check(old.secret)).toEqual({ status: 401, code: "KEY_DISABLED" });
  });

  it("narrowing the new key's scopes narrows the old one's (403 FORBIDDEN on the scope taken away)", async () => {
    const { old, next } = await rotated(owner(), ["tutor", "decks"]);
    expect(await check(old.secret, "/v1/decks/1")).toEqual(ALLOWED);
    await kg.admin.updateKey({ id: next.id, scopes: ["tutor"] });
    expect(await check(next.secret, "/v1/decks/1")).toEqual({ status: 403, code: "FORBIDDEN" });
    expect(await check(old.secret, "/v1/decks/1")).toEqual({ status: 403, code: "FORBIDDEN" });
    expect((await kg.admin.getKey({ id: old.id })).key?.scopes).toEqual(["tutor"]);
    expect(await check(old.secret)).toEqual(ALLOWED);
  });

  it("renaming the new key leaves the old one's name, and changes nothing else about it", async () => {
    const { old, next } = await rotated(owner());
    const before = (await kg.admin.getKey({ id: old.id })).key;
    await kg.admin.updateKey({ id: next.id, name: "renamed" });
    expect((await kg.admin.getKey({ id: old.id })).key).toEqual(before);
  });

  it("a disabled old key in grace is revoked by the next rotation, so enabling it cannot bring back a second key in grace", async () => {
    const { old, next } = await rotated(owner());
    await kg.admin.disableKey({ id: old.id, reason: "" });
    await kg.admin.rotateKey({ id: next.id, graceDays: 7 });
    expect(await stateOf(old.id)).toBe("revoked");
    await expect(kg.admin.enableKey({ id: old.id })).rejects.toThrow(/is revoked/);
    expect(await check(old.secret)).toEqual({ status: 401, code: "KEY_REVOKED" });
  });

  it("an owner with more keys than a page finds the key in grace past the first page", { timeout: 120_000 }, async () => {
    const ownerId = owner();
    await kg.admin.upsertAccount({ ownerId, plan: "bulk" });
    // Keys list by id, in the order they were made: 1,000 made first fill the first page.
    for (let batch = 0; batch < 20; batch++) {
      await Promise.all(Array.from({ length: 50 }, (_, i) => kg.admin.createKey({ ownerId, name: `filler ${batch * 50 + i}` })));
    }
    const created = await kg.admin.createKey({ ownerId, name: "rotated" });
    const next = await kg.admin.rotateKey({ id: created.key?.id ?? "", graceDays: 7 });
    expect(await check(created.secret)).toEqual(ALLOWED);
    await kg.admin.revokeKey({ id: next.key?.id ?? "", reason: "" });
    expect(await check(created.secret)).toEqual({ status: 401, code: "KEY_REVOKED" });
  });

  it("once the grace has ended the old key no longer follows: revoking the new key leaves it rotated", async () => {
    const { old, next } = await rotated(owner());
    kg.clock.advanceMs(8 * 86_400_000);
    await kg.admin.revokeKey({ id: next.id, reason: "" });
    const oldKey = (await kg.admin.getKey({ id: old.id })).key;
    expect(oldKey?.state).toBe("rotated");
    expect(oldKey?.revokeReason).toBe("");
  });
});

// "EnableKey lets it through again (unless it was disabled on its own before)": a key in grace
// comes back with its successor only when it was paused with it. Each case runs on a clock that
// moves between calls and on one that stays put (two calls in one millisecond), where equal times
// must never read as "paused together".
describe.each([
  { clock: "a clock that moves between calls", stepMs: 60_000 },
  { clock: "a clock that stays put between calls", stepMs: 0 },
])("a key disabled on its own stays disabled when its successor is enabled, on $clock", ({ stepMs }) => {
  let gate: TestKeygate;
  let seqHere = 0;
  beforeAll(async () => {
    const clock = new TestClock();
    clock.freeze("2026-06-01T12:00:00Z");
    gate = await startKeygate({ policy: POLICY, clock });
  });
  afterAll(async () => {
    await gate.stop();
  });

  const tick = (): void => gate.clock.advanceMs(stepMs);
  const checkHere = async (secret: string): Promise<{ status: number; code: string | null }> =>
    checkOutcome(await gate.check(checkInit({ authorization: `Bearer ${secret}` })));
  const ms = (at: Timestamp | undefined): number => (at === undefined ? Number.NaN : timestampMs(at));
  const DISABLED = { status: 401, code: "KEY_DISABLED" };

  async function created(): Promise<{ ownerId: string; id: string; secret: string }> {
    const ownerId = `owner-own-disable-${stepMs}-${++seqHere}`;
    await gate.admin.upsertAccount({ ownerId, plan: "business" });
    const key = await gate.admin.createKey({ ownerId, name: "own disable" });
    return { ownerId, id: key.key?.id ?? "", secret: key.secret };
  }

  async function rotatedHere(id: string): Promise<{ id: string; secret: string; createdAtMs: number; disabledAtMs: number | null }> {
    const rotation = await gate.admin.rotateKey({ id, graceDays: 7 });
    const disabledAt = rotation.key?.disabledAt;
    return {
      id: rotation.key?.id ?? "",
      secret: rotation.secret,
      createdAtMs: ms(rotation.key?.createdAt),
      disabledAtMs: disabledAt === undefined ? null : timestampMs(disabledAt),
    };
  }

  /** The old key as Check, VerifyKey and GetKey see it. */
  async function seen(secret: string, id: string): Promise<{ check: { status: number; code: string | null }; verify: [boolean | undefined, string]; state: string | undefined }> {
    const verified = await gate.admin.verifyKey({ secret });
    return { check: await checkHere(secret), verify: [verified.valid, verified.code], state: (await gate.admin.getKey({ id })).key?.state };
  }

  async function trail(id: string): Promise<Array<[string, unknown, unknown]>> {
    const { events } = await gate.admin.listAuditEvents({ keyId: id });
    return events.map((e) => [e.action, e.changes["reason"], e.changes["successor_id"]]);
  }

  it("a key disabled, then rotated: its successor is disabled from its issue, and enabling it leaves the old key refused KEY_DISABLED", async () => {
    const old = await created();
    const disabled = await gate.admin.disableKey({ id: old.id, reason: "suspected leak" });
    tick();
    const next = await rotatedHere(old.id);
    // After its issue and apart from the old key's own time, on either clock.
    expect(next.disabledAtMs).toBeGreaterThan(next.createdAtMs);
    expect(next.disabledAtMs).not.toBe(ms(disabled.key?.disabledAt));
    expect(await checkHere(next.secret)).toEqual(DISABLED);
    tick();
    await gate.admin.enableKey({ id: next.id });
    expect(await checkHere(next.secret)).toEqual(ALLOWED);
    expect(await seen(old.secret, old.id)).toEqual({ check: DISABLED, verify: [false, "KEY_DISABLED"], state: "disabled" });
    expect(await trail(old.id)).toEqual([
      ["key.create", undefined, undefined],
      ["key.disable", JSON.stringify("suspected leak"), undefined],
      ["key.rotate", undefined, undefined],
    ]);
    expect((await trail(next.id)).map(([action]) => action)).toEqual(["key.create", "key.enable"]);
  });

  it("a key in grace paused with its successor, then disabled on its own, moves to its own time (audited) and stays refused once the successor is enabled", async () => {
    const old = await created();
    const next = await rotatedHere(old.id);
    const paused = await gate.admin.disableKey({ id: next.id, reason: "card declined" });
    expect((await gate.admin.getKey({ id: old.id })).key?.disabledAt).toEqual(paused.key?.disabledAt);
    tick();
    const own = await gate.admin.disableKey({ id: old.id, reason: "leaked" });
    expect(own.key?.state).toBe("disabled");
    expect(ms(own.key?.disabledAt)).toBeGreaterThan(ms(paused.key?.disabledAt));
    tick();
    await gate.admin.enableKey({ id: next.id });
    expect(await checkHere(next.secret)).toEqual(ALLOWED);
    expect(await seen(old.secret, old.id)).toEqual({ check: DISABLED, verify: [false, "KEY_DISABLED"], state: "disabled" });
    expect(await trail(old.id)).toEqual([
      ["key.create", undefined, undefined],
      ["key.rotate", undefined, undefined],
      ["key.disable", JSON.stringify("card declined"), JSON.stringify(next.id)],
      ["key.disable", JSON.stringify("leaked"), undefined],
    ]);
  });

  it("a key in grace disabled on its own before its successor is disabled stays refused once the successor is enabled", async () => {
    const old = await created();
    const next = await rotatedHere(old.id);
    const own = await gate.admin.disableKey({ id: old.id, reason: "leaked" });
    tick();
    const paused = await gate.admin.disableKey({ id: next.id, reason: "card declined" });
    expect(ms(paused.key?.disabledAt)).toBeGreaterThan(ms(own.key?.disabledAt));
    await gate.admin.enableKey({ id: next.id });
    expect(await checkHere(next.secret)).toEqual(ALLOWED);
    expect(await seen(old.secret, old.id)).toEqual({ check: DISABLED, verify: [false, "KEY_DISABLED"], state: "disabled" });
  });

  it("a key in grace paused with its successor comes back with it (grace), and disabling it again then is no change", async () => {
    const old = await created();
    const next = await rotatedHere(old.id);
    await gate.admin.disableKey({ id: next.id, reason: "card declined" });
    tick();
    await gate.admin.disableKey({ id: next.id, reason: "second notice" });
    tick();
    await gate.admin.enableKey({ id: next.id });
    expect(await seen(old.secret, old.id)).toEqual({ check: ALLOWED, verify: [true, "OK"], state: "grace" });
    const own = await gate.admin.disableKey({ id: old.id, reason: "leaked" });
    tick();
    const again = await gate.admin.disableKey({ id: old.id, reason: "leaked again" });
    expect(again.key?.disabledAt).toEqual(own.key?.disabledAt);
    expect((await trail(old.id)).map(([action, reason]) => [action, reason])).toEqual([
      ["key.create", undefined],
      ["key.rotate", undefined],
      ["key.disable", JSON.stringify("card declined")],
      ["key.enable", undefined],
      ["key.disable", JSON.stringify("leaked")],
    ]);
  });

  it("a successor issued with the disabled old key's own time (as releases before this one did), disabled and rotated in one millisecond, leaves the old key refused once enabled", async () => {
    const old = await created();
    await gate.admin.disableKey({ id: old.id, reason: "suspected leak" });
    tick();
    const next = await rotatedHere(old.id);
    // Such a release disabled at the call's time and gave the successor that time: both keys
    // disabled since the rotation's millisecond, which a key paused with its successor never is.
    await gate.app.store.redisableKey(old.id, next.createdAtMs);
    await gate.app.store.redisableKey(next.id, next.createdAtMs);
    await gate.admin.enableKey({ id: next.id });
    expect(await checkHere(next.secret)).toEqual(ALLOWED);
    expect(await seen(old.secret, old.id)).toEqual({ check: DISABLED, verify: [false, "KEY_DISABLED"], state: "disabled" });
  });

  // Two operators, or a script disabling an owner's keys in parallel: each call reads the other
  // key's time as none and picks the same millisecond. Either call may start first, and the other
  // a few event-loop turns later, so each of them may be the one that reads the other's write.
  it("security: a key in grace and its successor disabled at once keep times apart: enabling the successor leaves the key in grace refused, audited once as disabled on its own", async () => {
    const outcomes = [];
    for (const oldFirst of [true, false]) {
      for (const lagTurns of [0, 1, 2, 3, 4, 6, 8, 12]) {
        const old = await created();
        const next = await rotatedHere(old.id);
        const disableOld = (): Promise<unknown> => gate.app.lifecycle.disableKey({ id: old.id, reason: "leaked" });
        const disableNext = (): Promise<unknown> => gate.app.lifecycle.disableKey({ id: next.id, reason: "card declined" });
        const [first, second] = oldFirst ? [disableOld, disableNext] : [disableNext, disableOld];
        const firstCall = first();
        for (let turn = 0; turn < lagTurns; turn += 1) await new Promise((resolve) => setImmediate(resolve));
        await Promise.all([firstCall, second()]);
        const times = [(await gate.app.lifecycle.getKey(old.id)).disabledAtMs, (await gate.app.lifecycle.getKey(next.id)).disabledAtMs];
        tick();
        await gate.admin.enableKey({ id: next.id });
        outcomes.push({
          oldFirst,
          lagTurns,
          apart: times[0] !== null && times[1] !== null && times[0] !== times[1],
          next: await checkHere(next.secret),
          old: await seen(old.secret, old.id),
          ownDisables: (await trail(old.id)).filter(([action, , successorId]) => action === "key.disable" && successorId === undefined),
          nextTrail: (await trail(next.id)).map(([action, reason]) => [action, reason]),
        });
      }
    }
    expect(outcomes).toEqual(
      outcomes.map(({ oldFirst, lagTurns }) => ({
        oldFirst,
        lagTurns,
        apart: true,
        next: ALLOWED,
        old: { check: DISABLED, verify: [false, "KEY_DISABLED"], state: "disabled" },
        ownDisables: [["key.disable", JSON.stringify("leaked"), undefined]],
        nextTrail: [
          ["key.create", undefined],
          ["key.disable", JSON.stringify("card declined")],
          ["key.enable", undefined],
        ],
      })),
    );
  });

  it("security: when only the successor's call finds the two times equal (the key in grace's call answered before the successor's write), the successor moves to a time of its own", async () => {
    const old = await created();
    const next = await rotatedHere(old.id);
    const store = gate.app.store;
    const redisableKey = store.redisableKey.bind(store);
    let release = (): void => undefined;
    const held = new Promise<void>((resolve) => (release = resolve));
    // The successor's write waits until the key in grace's DisableKey has answered.
    const spy = vi.spyOn(store, "redisableKey").mockImplementation(async (id, atMs, whileAtMs) => {
      if (id === next.id) await held;
      return redisableKey(id, atMs, whileAtMs);
    });
    let times: Array<number | null>;
    try {
      const nextCall = gate.app.lifecycle.disableKey({ id: next.id, reason: "card declined" });
      await until(() => spy.mock.calls.some(([id]) => id === next.id), 5000, "the successor's DisableKey to reach its write");
      const oldDisabled = await gate.app.lifecycle.disableKey({ id: old.id, reason: "leaked" });
      release();
      const nextDisabled = await nextCall;
      times = [oldDisabled.disabledAtMs, nextDisabled.disabledAtMs];
    } finally {
      release();
      spy.mockRestore();
    }
    expect(times[0]).not.toBeNull();
    expect(times[1]).not.toBeNull();
    expect(times[1]).not.toBe(times[0]);
    expect([(await gate.app.lifecycle.getKey(old.id)).disabledAtMs, (await gate.app.lifecycle.getKey(next.id)).disabledAtMs]).toEqual(times);
    tick();
    await gate.admin.enableKey({ id: next.id });
    expect(await checkHere(next.secret)).toEqual(ALLOWED);
    expect(await seen(old.secret, old.id)).toEqual({ check: DISABLED, verify: [false, "KEY_DISABLED"], state: "disabled" });
    expect(await trail(old.id)).toEqual([
      ["key.create", undefined, undefined],
      ["key.rotate", undefined, undefined],
      ["key.disable", JSON.stringify("leaked"), undefined],
    ]);
    expect((await trail(next.id)).map(([action, reason]) => [action, reason])).toEqual([
      ["key.create", undefined],
      ["key.disable", JSON.stringify("card declined")],
      ["key.enable", undefined],
    ]);
  });
});
