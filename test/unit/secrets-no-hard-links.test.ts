import { mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Worker } from "node:worker_threads";
import { afterAll, describe, expect, it, vi } from "vitest";

// A data directory on a file system without hard links (exFAT/FAT, s3fs, gcsfuse, some SMB
// shares): link(2) answers EPERM (or ENOTSUP/EOPNOTSUPP). The pepper and admin token are written
// under a name of their own and linked into place; there, every first start exited 1 with
// "EPERM: operation not permitted, link ..." (seen for real on an exfat-fuse mount). Where link(2)
// is refused so, they are created in place (O_EXCL) as before. Here link(2) answers as such a
// file system's does.
vi.mock("node:fs", async (importOriginal) => {
  const actual = await importOriginal<typeof import("node:fs")>();
  return {
    ...actual,
    linkSync: () => {
      throw Object.assign(new Error("EPERM: operation not permitted, link"), { code: "EPERM", errno: -1, syscall: "link" });
    },
  };
});

const { loadSecrets } = await import("../../src/server/secrets.js");

const WINNERS_PEPPER = "pepper-written-by-the-winning-keygate-0123456789abcdef";

const root = mkdtempSync(join(tmpdir(), "keygate-nolink-"));
afterAll(() => rmSync(root, { recursive: true, force: true }));

describe("a data directory on a file system without hard links", () => {
  it("a first start generates the pepper and admin token there, mode 0600, instead of failing on link(2)", () => {
    const dataDir = mkdtempSync(join(root, "data-"));
    let outcome: string;
    try {
      const secrets = loadSecrets(dataDir, { pepper: undefined, adminTokens: undefined, adminTokensFile: undefined }, () => false);
      outcome =
        readFileSync(join(dataDir, "pepper"), "utf8") === `${secrets.pepper}\n` && readFileSync(join(dataDir, "admin-token"), "utf8") === `${secrets.adminTokens[0]}\n`
          ? "generated"
          : "generated but files differ";
      expect(secrets.generatedAdminToken).not.toBeNull();
      expect((statSync(join(dataDir, "pepper")).mode & 0o777).toString(8)).toBe("600");
    } catch (error) {
      outcome = `start fails: ${error instanceof Error ? error.message : String(error)}`;
    }
    expect(outcome).toBe("generated");
    expect(readdirSync(dataDir).filter((name) => name.endsWith(".tmp"))).toEqual([]);
  });

  // The winning start creates the file in place (O_CREAT|O_EXCL) and writes it just after, so it
  // is empty for a moment (on SMB or FUSE across hosts, until its close). A start whose look comes
  // then was told the file was empty, "delete it to generate a new one": advice that, followed,
  // would change the pepper under every key made meanwhile. Here the winner is a worker thread
  // that writes 50 ms after the start began.
  it("a start that finds the winner's file created in place but not yet written waits for the write and uses its pepper instead of failing on an empty file", async () => {
    const dataDir = mkdtempSync(join(root, "data-"));
    const pepperFile = join(dataDir, "pepper");
    // The winner's open(O_CREAT|O_EXCL, 0600): there, empty.
    writeFileSync(pepperFile, "", { mode: 0o600, flag: "wx" });
    const go = new Int32Array(new SharedArrayBuffer(4));
    const winner = new Worker(
      `const { workerData } = require("node:worker_threads");
       const { writeFileSync } = require("node:fs");
       const go = new Int32Array(workerData.go);
       Atomics.wait(go, 0, 0);
       Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 50);
       writeFileSync(workerData.path, workerData.value + "\\n");`,
      { eval: true, workerData: { go: go.buffer, path: pepperFile, value: WINNERS_PEPPER } },
    );
    const done = new Promise((resolve) => winner.once("exit", resolve));
    await new Promise((resolve) => winner.once("online", resolve));
    Atomics.store(go, 0, 1);
    Atomics.notify(go, 0);
    let outcome: string;
    try {
      const secrets = loadSecrets(dataDir, { pepper: undefined, adminTokens: ["kgadm_test_token_0123456789abcdefghij"], adminTokensFile: undefined }, () => false);
      outcome = secrets.pepper === WINNERS_PEPPER ? "uses the winner's pepper" : "uses another pepper";
    } catch (error) {
      outcome = `start fails: ${error instanceof Error ? error.message.replace(dataDir, "<data>") : String(error)}`;
    }
    await done;
    expect(outcome).toBe("uses the winner's pepper");
  });
});
