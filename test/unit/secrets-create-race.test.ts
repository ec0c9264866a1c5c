import { mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { loadSecrets } from "../../src/server/secrets.js";

// Shared mode (KEYGATE_REDIS_URL set): several keygates hold one data directory together, so
// two first starts (docker compose --scale, two pods on one volume) generate data/pepper at the
// same time. The start that lost the race to create it failed (EEXIST), and one that read the
// winner's file before it was written was told the file was empty. Now each writes its value
// under a name of its own and links it at data/pepper: the loser reads the winner's. The holdsKeys
// callback runs exactly in that window (after the look that found no file, before the create),
// so it stands in for the other process creating data/pepper there.

const root = mkdtempSync(join(tmpdir(), "keygate-pepper-race-"));
afterAll(() => rmSync(root, { recursive: true, force: true }));

const OTHER_PEPPER = "pepper-written-by-the-other-keygate-0123456789abcdef";

describe("two first starts on one shared data directory", () => {
  it("the start whose O_EXCL create loses to another process's uses that process's pepper instead of failing", () => {
    const dataDir = mkdtempSync(join(root, "data-"));
    const pepperFile = join(dataDir, "pepper");
    const otherProcessCreatesIt = (): boolean => {
      writeFileSync(pepperFile, `${OTHER_PEPPER}\n`, { mode: 0o600, flag: "wx" });
      return false;
    };
    let outcome: string;
    try {
      const secrets = loadSecrets(dataDir, { pepper: undefined, adminTokens: ["kgadm_test_token_0123456789abcdefghij"], adminTokensFile: undefined }, otherProcessCreatesIt);
      outcome = secrets.pepper === OTHER_PEPPER ? "uses the other start's pepper" : "uses a pepper of its own";
    } catch (error) {
      outcome = `start fails: ${error instanceof Error ? error.message : String(error)}`;
    }
    expect(outcome).toBe("uses the other start's pepper");
    expect(readFileSync(pepperFile, "utf8").trim()).toBe(OTHER_PEPPER);
    // Nothing of the losing start's is left beside it.
    expect(readdirSync(dataDir).filter((name) => name.startsWith("pepper"))).toEqual(["pepper"]);
  });

  it("a start with no other one generates the pepper with mode 0600 and leaves no temporary file", () => {
    const dataDir = mkdtempSync(join(root, "data-"));
    const secrets = loadSecrets(dataDir, { pepper: undefined, adminTokens: ["kgadm_test_token_0123456789abcdefghij"], adminTokensFile: undefined }, () => false);
    expect(readFileSync(join(dataDir, "pepper"), "utf8")).toBe(`${secrets.pepper}\n`);
    expect((statSync(join(dataDir, "pepper")).mode & 0o777).toString(8)).toBe("600");
    expect(readdirSync(dataDir).filter((name) => name.startsWith("pepper"))).toEqual(["pepper"]);
  });
});
