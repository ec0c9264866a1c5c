import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { startKeygate } from "../harness/keygate.js";

// One embedded data directory, one serving keygate without Redis: a second on it would keep
// caches and limits of its own over the same database, and a key revoked through one would pass
// through the other. (Processes sharing Redis hear each other's changes, as replicas do:
// test/integration/charge-usage.test.ts runs two on one directory.)

describe("the embedded data directory", () => {
  const dataDir = mkdtempSync(join(tmpdir(), "keygate-data-dir-lock-"));
  afterAll(() => rmSync(dataDir, { recursive: true, force: true }));

  it("is refused to a second keygate while the first serves, and taken again once it has stopped", async () => {
    const first = await startKeygate({ dataDir });
    try {
      await expect(startKeygate({ dataDir })).rejects.toThrow(
        `KEYGATE_DATA_DIR ${dataDir} is in use by another keygate process; without Redis each embedded keygate needs a data directory of its own (replicas share MongoDB and Redis instead)`,
      );
      // The first goes on serving.
      expect((await first.admin.createKey({ ownerId: "lock-owner", name: "k" })).key?.state).toBe("active");
    } finally {
      await first.stop({ keepData: true });
    }
    const second = await startKeygate({ dataDir });
    try {
      expect((await second.admin.listKeys({ ownerId: "lock-owner" })).keys.map((k) => k.name)).toEqual(["k"]);
    } finally {
      await second.stop({ keepData: true });
    }
  });
});
