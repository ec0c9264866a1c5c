import { describe, expect, it, vi } from "vitest";
import { lifecycleKeygate } from "../harness/lifecycle-keygate.js";
import { mongoWireAvailable } from "../harness/mongo-wire.js";
import { until } from "../harness/poll.js";
import { requireServer } from "../harness/ports.js";

// README: "a key that DisableKey answered `disabled` for stays refused whatever EnableKey of its
// successor runs beside it". DisableKey(A) (the leaked old key in grace) and DisableKey(B) (its
// successor) in one millisecond each read the other enabled, so both write the same time T: for a
// moment A reads as paused with B, and an EnableKey(B) then brings A back. DisableKey(A) checked
// the record its own write returned (A at T, stale), found no clash and answered `disabled` while
// A was enabled: the leaked key passed. Now it reads A again and disables it at a time of its own.

const mongoReady = requireServer("MongoDB-wire server", mongoWireAvailable(), "run .ci/install-mongo-wire.sh");
const PEPPER = "lifecycle-disable-pair-pepper-0123456789abcde";

const ALLOWED = { status: 200, code: null };
const DISABLED = { status: 401, code: "KEY_DISABLED" };

for (const { store, ready } of [
  { store: "SQLite", ready: true },
  { store: "MongoDB", ready: mongoReady },
]) {
  describe.runIf(ready)(`DisableKey(A) and DisableKey(B) in one millisecond, EnableKey(B) between their writes and their answers, on ${store}`, { timeout: 60_000 }, () => {
    const suite = lifecycleKeygate(store === "MongoDB" ? { pepper: PEPPER } : null, { frozenAt: "2026-06-01T12:00:00Z" });
    const { check } = suite;

    describe("security", () => {
      it("A, which DisableKey(A) answered disabled for, stays refused, then and after another EnableKey(B)", async () => {
        const ownerId = `owner-disable-pair-${store}`;
        await suite.kg.admin.upsertAccount({ ownerId, plan: "business" });
        const created = await suite.kg.admin.createKey({ ownerId, name: "pair", scopes: ["tutor"] });
        const a = { id: created.key?.id ?? "", secret: created.secret };
        suite.kg.clock.advanceMs(1000);
        const rotated = await suite.kg.admin.rotateKey({ id: a.id, graceDays: 7 });
        const b = { id: rotated.key?.id ?? "", secret: rotated.secret };
        suite.kg.clock.advanceMs(1000);
        expect([await check(a.secret), await check(b.secret)]).toEqual([ALLOWED, ALLOWED]);

        const st = suite.kg.app.store;
        const redisableKey = st.redisableKey.bind(st);
        let bReached = false;
        let aWritten = false;
        let releaseAnswers = (): void => undefined;
        const answers = new Promise<void>((resolve) => (releaseAnswers = resolve));
        let firstA = true;
        let firstB = true;
        // Both DisableKeys read (each finds the other enabled) before either writes; A's write goes
        // first, then B's; each write's answer is held until EnableKey(B) has run.
        vi.spyOn(st, "redisableKey").mockImplementation(async (id, atMs, whileAtMs) => {
          if (id === a.id && firstA) {
            firstA = false;
            await until(() => bReached, 10_000, "DisableKey(B) at its write");
            const written = await redisableKey(id, atMs, whileAtMs);
            aWritten = true;
            await answers;
            return written;
          }
          if (id === b.id && firstB) {
            firstB = false;
            bReached = true;
            await until(() => aWritten, 10_000, "DisableKey(A)'s write");
            const written = await redisableKey(id, atMs, whileAtMs);
            await answers;
            return written;
          }
          return redisableKey(id, atMs, whileAtMs);
        });
        const disableA = suite.kg.admin.disableKey({ id: a.id, reason: "leaked" });
        const disableB = suite.kg.admin.disableKey({ id: b.id, reason: "card declined" });
        await until(async () => (await st.getKey(b.id))?.disabledAtMs !== null && aWritten, 10_000, "both writes made");
        // Billing enables B (the invoice was paid) while both DisableKeys are still finishing.
        await suite.kg.admin.enableKey({ id: b.id });
        releaseAnswers();
        const [answeredA, answeredB] = await Promise.all([disableA, disableB]);
        vi.restoreAllMocks();
        const storedA = await st.getKey(a.id);
        const storedB = await st.getKey(b.id);
        expect({
          answeredA: answeredA.key?.state,
          storedA: storedA?.disabledAtMs === null ? "enabled" : "disabled",
          apartFromB: storedA?.disabledAtMs !== storedB?.disabledAtMs,
          checkA: await check(a.secret),
          // DisableKey(B) answered after EnableKey(B): B ends as that order leaves it.
          answeredB: answeredB.key?.state,
          checkB: await check(b.secret),
        }).toEqual({ answeredA: "disabled", storedA: "disabled", apartFromB: true, checkA: DISABLED, answeredB: "disabled", checkB: DISABLED });

        // Disabled on its own, not paused with B: enabling B again leaves it refused.
        await suite.kg.admin.enableKey({ id: b.id });
        expect({ checkA: await check(a.secret), checkB: await check(b.secret) }).toEqual({ checkA: DISABLED, checkB: ALLOWED });
      });
    });
  });
}
