import { chmodSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it, vi } from "vitest";
import { ConfigError } from "../../src/config.js";
import { PEPPER_MIN_LENGTH, loadSecrets } from "../../src/server/secrets.js";

// The embedded pepper file: used whatever its length (a released keygate may have made keys with
// it), its problems reported for the start to log; refused, naming it, when it cannot be read.
// Tests run as root in CI, where every file is readable: a read refused for permissions is
// simulated for the pepper files of directories named UNREADABLE (at the open: keygate reads the
// file through the descriptor it checked); every other open is the real one.

const UNREADABLE = "unreadable-data";

vi.mock("node:fs", async (importOriginal) => {
  const fs = await importOriginal<typeof import("node:fs")>();
  const openSync = ((...args: Parameters<typeof fs.openSync>) => {
    if (String(args[0]).endsWith(`${UNREADABLE}/pepper`)) {
      throw Object.assign(new Error(`EACCES: permission denied, open '${String(args[0])}'`), { code: "EACCES" });
    }
    return fs.openSync(...args);
  }) as typeof fs.openSync;
  return { ...fs, openSync, default: { ...fs, openSync } };
});

const root = mkdtempSync(join(tmpdir(), "keygate-pepper-unit-"));
afterAll(() => rmSync(root, { recursive: true, force: true }));

/** A fresh data directory whose pepper file holds `pepper` with `mode`. */
function dataDirWithPepper(pepper: string, mode: number, name = "data"): string {
  const dataDir = join(mkdtempSync(join(root, "case-")), name);
  mkdirSync(dataDir, { mode: 0o700 });
  const pepperFile = join(dataDir, "pepper");
  writeFileSync(pepperFile, `${pepper}\n`, { mode });
  chmodSync(pepperFile, mode);
  return dataDir;
}

const FROM_FILE = { pepper: undefined, adminTokens: ["kgadm_test_token_0123456789abcdefghij"], adminTokensFile: undefined };

describe("the embedded pepper file: happy", () => {
  it("reports nothing for a generated pepper", () => {
    const dataDir = mkdtempSync(join(root, "generated-"));
    const secrets = loadSecrets(dataDir, FROM_FILE);
    expect(secrets.pepper.length).toBeGreaterThanOrEqual(PEPPER_MIN_LENGTH);
    expect(secrets.pepperFileProblems).toEqual([]);
  });

  it("uses a pepper one character short of the minimum, reporting only that", () => {
    const pepper = "x".repeat(PEPPER_MIN_LENGTH - 1);
    const secrets = loadSecrets(dataDirWithPepper(pepper, 0o600), FROM_FILE);
    expect([secrets.pepper, secrets.pepperFileProblems]).toEqual([pepper, ["shorter than 32 characters (KEYGATE_PEPPER's minimum)"]]);
  });

  it("reports a pepper of the minimum length readable by its group, and not its length", () => {
    const pepper = "y".repeat(PEPPER_MIN_LENGTH);
    const secrets = loadSecrets(dataDirWithPepper(pepper, 0o640), FROM_FILE);
    expect([secrets.pepper, secrets.pepperFileProblems]).toEqual([pepper, ["readable by group or others (mode 0640; chmod 600 it)"]]);
  });

  it("reports nothing for a pepper from KEYGATE_PEPPER, whatever the data directory holds", () => {
    const secrets = loadSecrets(dataDirWithPepper("short", 0o644), { ...FROM_FILE, pepper: "z".repeat(40) });
    expect([secrets.pepperFile, secrets.pepperFileProblems]).toEqual([null, []]);
  });
});

describe("the embedded pepper file: error", () => {
  it("refuses a pepper file this user may not read, naming it", () => {
    const dataDir = dataDirWithPepper("q".repeat(43), 0o600, UNREADABLE);
    const load = (): unknown => loadSecrets(dataDir, FROM_FILE);
    expect(load).toThrow(ConfigError);
    expect(load).toThrow(`${join(dataDir, "pepper")} cannot be read by this user (permission denied)`);
  });
});
