import { describe, expect, it } from "vitest";
import { checkInit, startKeygate } from "../harness/keygate.js";

describe("restart", () => {
  it("keys created before a restart still verify after it; revoked ones stay revoked", async () => {
    const first = await startKeygate();
    const kept = await first.admin.createKey({ ownerId: "restart-owner", name: "kept" });
    await first.admin.upsertAccount({ ownerId: "restart-owner", plan: "pro" });
    const gone = await first.admin.createKey({ ownerId: "restart-owner", name: "gone" });
    await first.admin.revokeKey({ id: gone.key?.id ?? "" });
    await first.stop({ keepData: true });

    const second = await startKeygate({ dataDir: first.dataDir });
    try {
      const verified = await second.admin.verifyKey({ secret: kept.secret });
      expect(verified.valid).toBe(true);
      expect(verified.key?.id).toBe(kept.key?.id);
      expect(verified.account?.plan).toBe("pro");
      expect((await second.check(checkInit({ authorization: `Bearer ${kept.secret}` }))).status?.code).toBe(0);
      const refused = await second.check(checkInit({ authorization: `Bearer ${gone.secret}` }));
      expect(refused.httpResponse.case).toBe("deniedResponse");
      expect((await second.admin.verifyKey({ secret: gone.secret })).code).toBe("KEY_REVOKED");
    } finally {
      await second.stop();
    }
  });
});

describe("store failure", () => {
  it("an uncached key is UNAVAILABLE (never allowed) and /readyz turns not-ready when the store is gone", async () => {
    const kg = await startKeygate();
    try {
      const created = await kg.admin.createKey({ ownerId: "fault-owner", name: "k" });
      await kg.app.store.close();
      await expect(kg.check(checkInit({ authorization: `Bearer ${created.secret}` }))).rejects.toMatchObject({ code: 14 });
      const http = await fetch(`http://127.0.0.1:${kg.ports.http}/check`, { headers: { authorization: `Bearer ${created.secret}` } });
      expect(http.status).toBe(503);
      expect(((await http.json()) as { error: { code: string } }).error.code).toBe("UNAVAILABLE");
      expect((await fetch(`http://127.0.0.1:${kg.ports.admin}/readyz`)).status).toBe(503);
      expect((await fetch(`http://127.0.0.1:${kg.ports.admin}/healthz`)).status).toBe(200);
    } finally {
      await kg.stop();
    }
  });
});
