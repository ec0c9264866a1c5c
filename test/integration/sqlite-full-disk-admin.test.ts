import { rmSync } from "node:fs";
import { Code } from "@connectrpc/connect";
import { afterAll, beforeAll, expect, it } from "vitest";
import { adminRefusal, checkInit, checkOutcome, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";
import { suiteWithServer } from "../harness/ports.js";
import { fillDisk, tmpfsMounts } from "../harness/tmpfs.js";

// The embedded store's volume fills up while keygate serves. SQLite refuses the KeyAdmin write
// (SQLITE_FULL, at its COMMIT: the WAL frames cannot be appended) and rolls it back, so nothing
// was written; the client must hear UNAVAILABLE (retry later), as when another process holds the
// write lock, not INTERNAL "internal error", which it may not retry. And since SQLite wrote none
// of it, the change is not logged as "outcome unknown" (that is for a COMMIT whose I/O error may
// come after its commit frame). Once space is freed, writes work again.
//
// Needs root (mount -t tmpfs): skipped loudly without it, and failed in CI, which runs as root.
// The mount is removed in afterAll, lazily if it is still busy.

const tmpfs = tmpfsMounts("keygate-full-disk-admin-");
const disk = tmpfs.mount("data", 8);
let kg: TestKeygate | undefined;
let filler: string | null = null;

afterAll(async () => {
  // Freed first: the stop's final flush then succeeds at once instead of retrying for the grace period.
  if (filler !== null) rmSync(filler, { force: true });
  await kg?.stop().catch(() => null);
  tmpfs.remove();
});

const outcomeUnknownLines = (k: TestKeygate): number => k.logLines.filter((line) => line.includes("change outcome unknown")).length;

suiteWithServer("embedded keygate: KeyAdmin writes while the data volume is full", disk, "mounting a tmpfs needs root (mount -t tmpfs)", (mnt) => {
  let revokeTarget: { id: string; secret: string };
  beforeAll(async () => {
    kg = await startKeygate({ dataDir: mnt });
    const created = await kg.admin.createKey({ ownerId: "full-owner", name: "k" });
    revokeTarget = { id: created.key?.id ?? "", secret: created.secret };
    expect(checkOutcome(await kg.check(checkInit({ "x-api-key": created.secret })))).toEqual({ status: 200, code: null });
    filler = fillDisk(mnt);
  }, 60_000);

  it("error: refused writes answer UNAVAILABLE with nothing written, and are not logged as of unknown outcome", async () => {
    const k = kg as TestKeygate;
    const create = await adminRefusal(k.admin.createKey({ ownerId: "on-full-disk", name: "k" }));
    const revoke = await adminRefusal(k.admin.revokeKey({ id: revokeTarget.id }));
    const topUp = await adminRefusal(k.admin.addCredits({ ownerId: "full-owner", amount: 100n, reason: "on a full disk" }));
    expect({ create, revoke, topUp }).toEqual({
      create: { code: Code.Unavailable, message: "the key store is unavailable; retry shortly" },
      revoke: { code: Code.Unavailable, message: "the key store is unavailable; retry shortly" },
      topUp: { code: Code.Unavailable, message: "the key store is unavailable; retry shortly" },
    });
    // Nothing half-written: the revoke did not happen (the key still passes) and no key was made.
    expect(checkOutcome(await k.check(checkInit({ "x-api-key": revokeTarget.secret })))).toEqual({ status: 200, code: null });
    expect((await k.admin.listKeys({ ownerId: "on-full-disk" })).keys).toHaveLength(0);
    expect(outcomeUnknownLines(k)).toBe(0);
  }, 60_000);

  it("happy: once space is freed, writes work again", async () => {
    const k = kg as TestKeygate;
    if (filler !== null) rmSync(filler);
    const created = await k.admin.createKey({ ownerId: "after-free", name: "k" });
    expect(checkOutcome(await k.check(checkInit({ "x-api-key": created.secret })))).toEqual({ status: 200, code: null });
    await k.admin.revokeKey({ id: revokeTarget.id });
    expect(checkOutcome(await k.check(checkInit({ "x-api-key": revokeTarget.secret })))).toEqual({ status: 401, code: "KEY_REVOKED" });
  }, 30_000);
});
