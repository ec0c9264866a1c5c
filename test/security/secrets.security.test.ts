import { chmodSync, closeSync, mkdtempSync, openSync, readdirSync, readFileSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { loadConfig } from "../../src/config.js";
import { KeyHasher } from "../../src/keys/hasher.js";
import { buildKeygate } from "../../src/server/app.js";
import { createLogger } from "../../src/server/logger.js";
import { SqliteKeyStore } from "../../src/store/sqlite.js";
import { ADMIN_TOKEN, checkInit, httpCheck, postJson, startKeygate } from "../harness/keygate.js";

describe("secrets never travel", () => {
  it("no key, hash, pepper or admin token appears in any log line (debug level) or error message", async () => {
    const kg = await startKeygate();
    const seen: string[] = [];
    const secrets: string[] = [ADMIN_TOKEN];
    try {
      const pepper = readFileSync(join(kg.dataDir, "pepper"), "utf8").trim();
      secrets.push(pepper);
      const created = await kg.admin.createKey({ ownerId: "secrets-owner", name: "s", scopes: ["tutor"] });
      secrets.push(created.secret);
      const rotated = await kg.admin.rotateKey({ id: created.key?.id ?? "", graceDays: 1 });
      secrets.push(rotated.secret);
      const auth = (key: string) => ({ authorization: `Bearer ${key}` });
      await kg.check(checkInit(auth(created.secret)));
      await kg.check(checkInit(auth(rotated.secret), "/v1/decks"));
      await httpCheck(kg.ports.http, "/check", { "x-api-key": created.secret });
      await httpCheck(kg.ports.http, "/check", { "x-api-key": `${created.secret}x` });
      await httpCheck(kg.ports.http, "/check", { authorization: `Bearer ${created.secret}`, "x-api-key": rotated.secret });
      seen.push(JSON.stringify((await kg.admin.verifyKey({ secret: created.secret.slice(0, -1) })).message));
      // Errors: wrong token, a key used as an admin token, bad input naming fields.
      seen.push(JSON.stringify((await postJson(kg.ports.admin, "GetAccount", { ownerId: "x" }, `${ADMIN_TOKEN}x`)).json));
      seen.push(JSON.stringify((await postJson(kg.ports.admin, "GetAccount", { ownerId: "x" }, created.secret)).json));
      seen.push(JSON.stringify((await postJson(kg.ports.admin, "CreateKey", { ownerId: "o", name: "n", scopes: [created.secret] })).json));
      seen.push(JSON.stringify((await postJson(kg.ports.admin, "CreateKey", { ownerId: "o", name: "n", mode: created.secret })).json));
      seen.push(JSON.stringify((await postJson(kg.ports.admin, "UpsertAccount", { ownerId: "o", plan: ADMIN_TOKEN })).json));
      seen.push(JSON.stringify((await postJson(kg.ports.admin, "CreateKey", { ownerId: "o", name: "n", metadata: { [`${created.secret}!`]: "v" } })).json));
      seen.push(JSON.stringify((await postJson(kg.ports.admin, "VerifyKey", { secret: "x".repeat(2000) })).json));
      await kg.admin.revokeKey({ id: rotated.key?.id ?? "", reason: "test" });
      await kg.check(checkInit(auth(rotated.secret)));
      // A store failure logs the error; it must not carry the key either.
      const third = await kg.admin.createKey({ ownerId: "secrets-owner-2", name: "t" });
      secrets.push(third.secret);
      await kg.app.store.close();
      await kg.check(checkInit(auth(third.secret))).catch((error: unknown) => seen.push(String(error)));
    } finally {
      await kg.stop();
    }
    const hasher = new KeyHasher(secrets[1] ?? "");
    const hashes = secrets.slice(2).map((key) => hasher.hash(key));
    const logText = kg.logLines.join("");
    expect(kg.logLines.length).toBeGreaterThan(10);
    expect(logText).toContain('"level":20'); // debug lines were captured
    for (const needle of [...secrets, ...hashes]) {
      expect(logText.includes(needle), "a secret reached the log").toBe(false);
      for (const text of seen) expect(text.includes(needle), `a secret reached an error message: ${text.slice(0, 300)}`).toBe(false);
    }
    // The key's body, even without its prefix, is not there either.
    for (const key of secrets.slice(2)) expect(logText.includes(key.slice(12, 30))).toBe(false);
  });

  it("creates every file in the data directory owner-only: the database, its WAL files and the pepper", async () => {
    const kg = await startKeygate();
    try {
      // A write makes sure the WAL and shared-memory files exist.
      await kg.admin.createKey({ ownerId: "modes-owner", name: "m" });
      const modes = Object.fromEntries(
        readdirSync(kg.dataDir)
          .filter((name) => name !== "policy.yaml") // written by the test harness, not by keygate
          .map((name) => [name, (statSync(join(kg.dataDir, name)).mode & 0o777).toString(8)]),
      );
      expect(Object.keys(modes).sort()).toEqual(expect.arrayContaining(["keygate.db", "keygate.db-shm", "keygate.db-wal", "pepper"]));
      for (const [name, mode] of Object.entries(modes)) expect(mode, name).toBe("600");
      expect((statSync(kg.dataDir).mode & 0o777).toString(8)).toBe("700");
    } finally {
      await kg.stop();
    }
  });

  it("tightens a world-readable database and WAL files left by an older version", async () => {
    const dir = mkdtempSync(join(tmpdir(), "keygate-modes-"));
    const path = join(dir, "keygate.db");
    try {
      const old = new SqliteKeyStore(path);
      await old.close();
      for (const file of [path, `${path}-wal`, `${path}-shm`]) {
        closeSync(openSync(file, "a"));
        chmodSync(file, 0o644);
      }
      const store = new SqliteKeyStore(path);
      for (const file of [path, `${path}-wal`, `${path}-shm`]) expect((statSync(file).mode & 0o777).toString(8), file).toBe("600");
      await store.close();
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it("refuses to start with MongoDB and no explicit pepper or admin tokens, naming the variable", async () => {
    const logger = createLogger("silent");
    const base = { KEYGATE_MONGODB_URI: "mongodb://127.0.0.1:1/keygate" };
    await expect(buildKeygate(loadConfig(base), { logger })).rejects.toThrow("KEYGATE_PEPPER is required when KEYGATE_MONGODB_URI is set");
    await expect(
      buildKeygate(loadConfig({ ...base, KEYGATE_PEPPER: "p".repeat(32) }), { logger }),
    ).rejects.toThrow("KEYGATE_ADMIN_TOKENS (or KEYGATE_ADMIN_TOKENS_FILE) is required when KEYGATE_MONGODB_URI is set");
  });
});
