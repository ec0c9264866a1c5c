import { timestampMs } from "@bufbuild/protobuf/wkt";
import { describe, expect, it, vi } from "vitest";
import { lifecycleKeygate } from "../harness/lifecycle-keygate.js";
import { mongoWireAvailable } from "../harness/mongo-wire.js";
import { requireServer } from "../harness/ports.js";

// A rotation's old key A, paused with its new key B (DisableKey(B) disabled A since B's time).
// EnableKey(B) brings A back only while A is still paused with B; DisableKey(A) makes A disabled
// on its own, and EnableKey(B) must then leave it disabled (README, KeyAdmin API reference). Two
// callers at once: billing enables B (the invoice was paid) while security disables A (leaked),
// or disables B again. Each case lets one call run to its answer in a gap of the other, at the
// store call named, and asks for an end state that the two calls made one after the other would
// leave, and that a key DisableKey answered `disabled` for is refused, then and after B is
// disabled and enabled again. Before the fix, EnableKey(B) wrote B, then brought back A when A had
// B's old time, unconditionally: a DisableKey(A) in between saw B enabled, took A for disabled on
// its own and changed nothing, then A (the leaked secret) passed; a DisableKey(B) in between left
// B disabled and A passing.

const mongoReady = requireServer("MongoDB-wire server", mongoWireAvailable(), "run .ci/install-mongo-wire.sh");
const PEPPER = "lifecycle-enable-disable-race-pepper-0123456789";

const BACKENDS = [
  { store: "SQLite", ready: true },
  { store: "MongoDB", ready: mongoReady },
];
const CLOCKS = [
  { clock: "a clock that moves between calls", stepMs: 1000 },
  { clock: "a clock that stays put (every call in one millisecond)", stepMs: 0 },
];

const ALLOWED = { status: 200, code: null };
const DISABLED = { status: 401, code: "KEY_DISABLED" };

for (const { store, ready } of BACKENDS) {
  describe.runIf(ready).each(CLOCKS)(`EnableKey of a rotation's new key racing a DisableKey, on ${store}, on $clock`, { timeout: 60_000 }, ({ stepMs }) => {
    const suite = lifecycleKeygate(store === "MongoDB" ? { pepper: PEPPER } : null, { frozenAt: "2026-06-01T12:00:00Z" });
    const { check } = suite;
    let seq = 0;

    const tick = (): void => suite.kg.clock.advanceMs(stepMs);

    interface Pair {
      a: { id: string; secret: string };
      b: { id: string; secret: string };
    }

    /** A key rotated with 7 days of grace (A) to a new key (B); with `paused`, B disabled and A paused with it. */
    async function rotatedPair(paused: boolean): Promise<Pair> {
      const ownerId = `owner-race-${stepMs}-${++seq}`;
      await suite.kg.admin.upsertAccount({ ownerId, plan: "business" });
      const created = await suite.kg.admin.createKey({ ownerId, name: "pair", scopes: ["tutor"] });
      const a = { id: created.key?.id ?? "", secret: created.secret };
      tick();
      const rotated = await suite.kg.admin.rotateKey({ id: a.id, graceDays: 7 });
      const b = { id: rotated.key?.id ?? "", secret: rotated.secret };
      tick();
      if (paused) {
        await suite.kg.admin.disableKey({ id: b.id, reason: "card declined" });
        expect(await check(a.secret)).toEqual(DISABLED);
        tick();
      }
      return { a, b };
    }

    const disabledAtMs = async (id: string): Promise<number | null> => {
      const at = (await suite.kg.admin.getKey({ id })).key?.disabledAt;
      return at === undefined ? null : timestampMs(at);
    };

    /** Both keys as Check sees them, and whether A is paused with B (the same time). */
    async function outcome(pair: Pair): Promise<{ a: unknown; b: unknown; pausedTogether: boolean }> {
      const times = [await disabledAtMs(pair.a.id), await disabledAtMs(pair.b.id)];
      return { a: await check(pair.a.secret), b: await check(pair.b.secret), pausedTogether: times[0] !== null && times[0] === times[1] };
    }

    /** A, disabled on its own, stays refused when B is disabled and enabled again. */
    async function staysDisabledOnItsOwn(pair: Pair): Promise<{ status: number; code: string | null }> {
      tick();
      await suite.kg.admin.disableKey({ id: pair.b.id, reason: "card declined again" });
      tick();
      await suite.kg.admin.enableKey({ id: pair.b.id });
      expect(await check(pair.b.secret)).toEqual(ALLOWED);
      return check(pair.a.secret);
    }

    describe("security", () => {
      it("DisableKey(A) between EnableKey(B)'s write and its audit: A ends disabled on its own", async () => {
        const pair = await rotatedPair(true);
        const original = suite.kg.app.store.appendAudit.bind(suite.kg.app.store);
        let disableA: Promise<{ key?: { state: string } | undefined }> | undefined;
        vi.spyOn(suite.kg.app.store, "appendAudit").mockImplementation(async (record) => {
          if (disableA === undefined && record.action === "key.enable" && record.keyId === pair.b.id) {
            disableA = suite.kg.admin.disableKey({ id: pair.a.id, reason: "leaked" });
            await disableA;
          }
          return original(record);
        });
        await suite.kg.admin.enableKey({ id: pair.b.id });
        vi.restoreAllMocks();
        expect((await disableA)?.key?.state).toBe("disabled");
        expect(await outcome(pair)).toEqual({ a: DISABLED, b: ALLOWED, pausedTogether: false });
        expect(await staysDisabledOnItsOwn(pair)).toEqual(DISABLED);
      });

      it("DisableKey(A) after EnableKey(B) read the keys in grace, before its store write: A ends disabled on its own", async () => {
        const pair = await rotatedPair(true);
        const original = suite.kg.app.store.enableKey.bind(suite.kg.app.store);
        let disableA: Promise<{ key?: { state: string } | undefined }> | undefined;
        vi.spyOn(suite.kg.app.store, "enableKey").mockImplementation(async (id, inGraceIds) => {
          if (disableA === undefined && id === pair.b.id) {
            disableA = suite.kg.admin.disableKey({ id: pair.a.id, reason: "leaked" });
            await disableA;
          }
          return original(id, inGraceIds);
        });
        await suite.kg.admin.enableKey({ id: pair.b.id });
        vi.restoreAllMocks();
        expect((await disableA)?.key?.state).toBe("disabled");
        expect(await outcome(pair)).toEqual({ a: DISABLED, b: ALLOWED, pausedTogether: false });
        expect(await staysDisabledOnItsOwn(pair)).toEqual(DISABLED);
      });

      it("EnableKey(B) between DisableKey(A)'s reads and its write: A ends disabled on its own", async () => {
        const pair = await rotatedPair(true);
        const original = suite.kg.app.store.redisableKey.bind(suite.kg.app.store);
        let enableB: Promise<unknown> | undefined;
        vi.spyOn(suite.kg.app.store, "redisableKey").mockImplementation(async (id, atMs, whileAtMs) => {
          if (enableB === undefined && id === pair.a.id) {
            enableB = suite.kg.admin.enableKey({ id: pair.b.id });
            await enableB;
          }
          return original(id, atMs, whileAtMs);
        });
        const disabled = await suite.kg.admin.disableKey({ id: pair.a.id, reason: "leaked" });
        vi.restoreAllMocks();
        expect(enableB).toBeDefined();
        expect(disabled.key?.state).toBe("disabled");
        expect(await outcome(pair)).toEqual({ a: DISABLED, b: ALLOWED, pausedTogether: false });
        expect(await staysDisabledOnItsOwn(pair)).toEqual(DISABLED);
      });

      it("DisableKey(B) between EnableKey(B)'s write and its audit: both end disabled, paused together (DisableKey after EnableKey)", async () => {
        const pair = await rotatedPair(true);
        const original = suite.kg.app.store.appendAudit.bind(suite.kg.app.store);
        let disableB: Promise<unknown> | undefined;
        vi.spyOn(suite.kg.app.store, "appendAudit").mockImplementation(async (record) => {
          if (disableB === undefined && record.action === "key.enable" && record.keyId === pair.b.id) {
            disableB = suite.kg.admin.disableKey({ id: pair.b.id, reason: "card declined again" });
            await disableB;
          }
          return original(record);
        });
        await suite.kg.admin.enableKey({ id: pair.b.id });
        vi.restoreAllMocks();
        expect(disableB).toBeDefined();
        expect(await outcome(pair)).toEqual({ a: DISABLED, b: DISABLED, pausedTogether: true });
        tick();
        await suite.kg.admin.enableKey({ id: pair.b.id });
        expect(await outcome(pair)).toEqual({ a: ALLOWED, b: ALLOWED, pausedTogether: false });
      });

      it("DisableKey(B) after EnableKey(B) read the keys in grace, before its store write: both end enabled (EnableKey after DisableKey)", async () => {
        const pair = await rotatedPair(true);
        const original = suite.kg.app.store.enableKey.bind(suite.kg.app.store);
        let disableB: Promise<unknown> | undefined;
        vi.spyOn(suite.kg.app.store, "enableKey").mockImplementation(async (id, inGraceIds) => {
          if (disableB === undefined && id === pair.b.id) {
            disableB = suite.kg.admin.disableKey({ id: pair.b.id, reason: "card declined again" });
            await disableB;
          }
          return original(id, inGraceIds);
        });
        await suite.kg.admin.enableKey({ id: pair.b.id });
        vi.restoreAllMocks();
        expect(disableB).toBeDefined();
        expect(await outcome(pair)).toEqual({ a: ALLOWED, b: ALLOWED, pausedTogether: false });
      });

      it("EnableKey(B) between DisableKey(B)'s write and its pause of A: both end enabled (EnableKey after DisableKey)", async () => {
        const pair = await rotatedPair(false);
        const original = suite.kg.app.store.pauseKeysInGrace.bind(suite.kg.app.store);
        let enableB: Promise<unknown> | undefined;
        vi.spyOn(suite.kg.app.store, "pauseKeysInGrace").mockImplementation(async (id, inGraceIds) => {
          if (enableB === undefined && id === pair.b.id) {
            enableB = suite.kg.admin.enableKey({ id: pair.b.id });
            await enableB;
          }
          return original(id, inGraceIds);
        });
        const disabled = await suite.kg.admin.disableKey({ id: pair.b.id, reason: "card declined" });
        vi.restoreAllMocks();
        expect(enableB).toBeDefined();
        expect(disabled.key?.state).toBe("disabled");
        expect(await outcome(pair)).toEqual({ a: ALLOWED, b: ALLOWED, pausedTogether: false });
      });
    });
  });
}
