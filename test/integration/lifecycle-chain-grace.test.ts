import { Code, ConnectError } from "@connectrpc/connect";
import { describe, expect, it, vi } from "vitest";
import { StoreBusyError, StoreUnavailableError } from "../../src/store/errors.js";
import { CHAIN_GRACE_ENDED } from "../../src/store/store.js";
import { lifecycleKeygate } from "../harness/lifecycle-keygate.js";
import { mongoWireAvailable } from "../harness/mongo-wire.js";
import { requireServer } from "../harness/ports.js";

// README (KeyAdmin API reference, RotateKey): "a key still in grace from the rotation before is
// revoked, so a chain keeps one key in grace". RotateKey(B -> C), with A still in grace from A -> B,
// revoked A only after the rotation was saved, and a store that refused that one revoke (SQLite's
// write lock held past its wait; MongoDB unreachable for a moment) was only logged: RotateKey
// answered OK and A kept passing for the rest of its grace (up to 30 days), and no retry could
// repair it (B no longer active: FAILED_PRECONDITION). Now SQLite revokes A in the rotation's
// transaction; MongoDB revokes it before the new key goes in, and a failure there undoes the
// rotation and answers UNAVAILABLE, so the caller's retry finishes it.

const mongoReady = requireServer("MongoDB-wire server", mongoWireAvailable(), "run .ci/install-mongo-wire.sh");
const PEPPER = "lifecycle-chain-grace-pepper-0123456789abcdef";

const BACKENDS = [
  // One transaction: the rotation and the revoke of A are made together, so a revoke of A's own is
  // never asked of the store (the spy below is never reached) and the first call answers OK.
  { store: "SQLite", ready: true, refusal: (): Error => new StoreBusyError("database is locked (held past the 5 s wait)"), first: "OK" },
  { store: "MongoDB", ready: mongoReady, refusal: (): Error => new StoreUnavailableError("MongoDB is unreachable"), first: "Unavailable" },
];

const ALLOWED = { status: 200, code: null };
const REVOKED = { status: 401, code: "KEY_REVOKED" };

for (const { store, ready, refusal, first } of BACKENDS) {
  describe.runIf(ready)(`a chain of rotations keeps one key in grace, on ${store}`, { timeout: 60_000 }, () => {
    const suite = lifecycleKeygate(store === "MongoDB" ? { pepper: PEPPER } : null);
    const { check } = suite;
    let seq = 0;

    const stateOf = async (id: string): Promise<string | undefined> => (await suite.kg.admin.getKey({ id })).key?.state;

    /** A basic-plan key A rotated with 7 days of grace to B; both pass. */
    async function chain(): Promise<{ ownerId: string; a: { id: string; secret: string }; b: { id: string; secret: string } }> {
      const ownerId = `owner-chain-${++seq}`;
      const { a, b } = await suite.rotatedAtOnce(ownerId, "basic", "chain");
      expect([await check(a.secret), await check(b.secret)]).toEqual([ALLOWED, ALLOWED]);
      return { ownerId, a, b };
    }

    /** RotateKey(id) with 7 days of grace: "OK" and the new secret, or the refusal's code. */
    async function rotate(id: string): Promise<{ answer: string; secret: string }> {
      try {
        const rotated = await suite.kg.admin.rotateKey({ id, graceDays: 7 });
        return { answer: "OK", secret: rotated.secret };
      } catch (error) {
        if (error instanceof ConnectError) return { answer: Code[error.code], secret: "" };
        throw error;
      }
    }

    async function revokeTrail(id: string): Promise<unknown[]> {
      const { events } = await suite.kg.admin.listAuditEvents({ keyId: id });
      return events.filter((event) => event.action === "key.revoke").map((event) => event.changes["reason"]);
    }

    describe("security", () => {
      it("a store refusing the earlier key's revoke once (nothing written): no OK leaves it in grace, and the retry finishes the rotation", async () => {
        const { ownerId, a, b } = await chain();
        const original = suite.kg.app.store.revokeKey.bind(suite.kg.app.store);
        let refused = 0;
        vi.spyOn(suite.kg.app.store, "revokeKey").mockImplementation(async (id, nowMs, reason) => {
          if (id === a.id && refused === 0) {
            refused += 1;
            throw refusal();
          }
          return original(id, nowMs, reason);
        });
        const firstCall = await rotate(b.id);
        const afterFirst = { answer: firstCall.answer, a: await check(a.secret), b: await stateOf(b.id) };
        const retried = firstCall.answer === "OK" ? firstCall : await rotate(b.id);
        vi.restoreAllMocks();
        expect({ refused, afterFirst, retry: retried.answer }).toEqual(
          first === "OK"
            ? { refused: 0, afterFirst: { answer: "OK", a: REVOKED, b: "grace" }, retry: "OK" }
            : // Not rotated: B is active again and A still in grace, both as before the call.
              { refused: 1, afterFirst: { answer: "Unavailable", a: ALLOWED, b: "active" }, retry: "OK" },
        );
        expect({ a: [await stateOf(a.id), await check(a.secret)], b: [await stateOf(b.id), await check(b.secret)], c: await check(retried.secret) }).toEqual({
          a: ["revoked", REVOKED],
          b: ["grace", ALLOWED],
          c: ALLOWED,
        });
        expect((await suite.kg.admin.getKey({ id: a.id })).key?.revokeReason).toBe(CHAIN_GRACE_ENDED);
        expect(await revokeTrail(a.id)).toEqual([JSON.stringify(CHAIN_GRACE_ENDED)]);
        expect((await suite.kg.admin.getAccount({ ownerId })).account?.activeKeyCount).toBe(1);
      });

      it("the earlier key's revoke made and its answer lost: it is refused at once, and the retry finishes the rotation", async () => {
        const { ownerId, a, b } = await chain();
        const original = suite.kg.app.store.revokeKey.bind(suite.kg.app.store);
        let lost = 0;
        vi.spyOn(suite.kg.app.store, "revokeKey").mockImplementation(async (id, nowMs, reason) => {
          const revoked = await original(id, nowMs, reason);
          if (id === a.id && lost === 0) {
            lost += 1;
            throw new StoreUnavailableError("MongoDB is unreachable");
          }
          return revoked;
        });
        const firstCall = await rotate(b.id);
        const afterFirst = { answer: firstCall.answer, a: await check(a.secret), b: await stateOf(b.id) };
        const retried = firstCall.answer === "OK" ? firstCall : await rotate(b.id);
        vi.restoreAllMocks();
        expect({ lost, afterFirst, retry: retried.answer }).toEqual(
          first === "OK" ? { lost: 0, afterFirst: { answer: "OK", a: REVOKED, b: "grace" }, retry: "OK" } : { lost: 1, afterFirst: { answer: "Unavailable", a: REVOKED, b: "active" }, retry: "OK" },
        );
        expect({ a: await check(a.secret), b: [await stateOf(b.id), await check(b.secret)], c: await check(retried.secret) }).toEqual({ a: REVOKED, b: ["grace", ALLOWED], c: ALLOWED });
        expect((await suite.kg.admin.getAccount({ ownerId })).account?.activeKeyCount).toBe(1);
      });
    });
  });
}
