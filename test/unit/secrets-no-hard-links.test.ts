import { mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
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
});
