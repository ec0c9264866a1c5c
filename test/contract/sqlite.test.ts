import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { SqliteKeyStore } from "../../src/store/sqlite.js";
import { runKeyStoreContract } from "./key-store.contract.js";

runKeyStoreContract("sqlite", async () => {
  const dir = mkdtempSync(join(tmpdir(), "keygate-sqlite-"));
  const store = new SqliteKeyStore(join(dir, "keygate.db"));
  return {
    store,
    async close() {
      await store.close();
      rmSync(dir, { recursive: true, force: true });
    },
  };
});
