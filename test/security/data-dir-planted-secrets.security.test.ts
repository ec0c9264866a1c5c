import { chmodSync, chownSync, lchownSync, mkdirSync, readFileSync, statSync, symlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { postJson } from "../harness/keygate.js";
import { requireServer } from "../harness/ports.js";
import { spawnedKeygates, spawnKeygate } from "../harness/process.js";

// keygate creates its data directory 0700, but one that is already there is used as it is: a
// Kubernetes volume with fsGroup is root:<group> 2775, the dev overlay's emptyDir is 0777, and a
// directory under /tmp may be another local user's. Whoever can write it could put an admin-token
// (or pepper) of their own there before keygate's first start, and keygate would serve with it as
// a do-everything admin token (or hash keys with a pepper they know). So a secret file keygate
// reads from the data directory, or the link at its name, must be owned by the user keygate runs
// as or by root (a Secret volume's files): another owner stops the start (exit 2) with one line
// naming the file and both uids, never the content. The directory's own owner and mode are not
// refused. Making files another user owns needs root: CI runs as root, so these run there.

const { running, tempDir, startOutcome } = spawnedKeygates("keygate-planted-secrets-");

const isRoot = typeof process.getuid === "function" && process.getuid() === 0;
const asRoot = requireServer("root-only data directory ownership", isRoot, "these tests chown files to uid 65534, which needs root");

const NOBODY = 65534;
const PLANTED = "kgadm_planted_by_another_local_user_0123456789";
const LISTENERS = { KEYGATE_HOST: "127.0.0.1", KEYGATE_GRPC_PORT: "0", KEYGATE_HTTP_AUTHZ_PORT: "0", KEYGATE_ADMIN_PORT: "0", KEYGATE_LOG_LEVEL: "info" };

/** A data directory as another user leaves it: theirs, and writable by everyone. */
function foreignDataDir(): { dir: string; dataDir: string } {
  const dir = tempDir();
  chmodSync(dir, 0o755);
  const dataDir = join(dir, "data");
  mkdirSync(dataDir);
  chmodSync(dataDir, 0o777);
  chownSync(dataDir, NOBODY, NOBODY);
  return { dir, dataDir };
}

/** A file owner-only in `owner`'s name, as that user would write it. */
function plant(path: string, text: string, owner: number): void {
  writeFileSync(path, `${text}\n`, { mode: 0o600 });
  chownSync(path, owner, owner);
}

const refusal = (path: string, what: string): { code: number; lastLine: string } => ({
  code: 2,
  lastLine:
    `keygate: ${path} ${what} owned by uid ${NOBODY}, not by uid 0 that keygate runs as (nor root): another user may have put it there. ` +
    "Delete it, or if it is yours, chown it to the user keygate runs as",
});


describe.skipIf(!asRoot)("secret files another user put in the data directory: security", { timeout: 60_000 }, () => {
  it("refuses an admin-token another user owns, naming it and both uids, never the token", async () => {
    const { dir, dataDir } = foreignDataDir();
    plant(join(dataDir, "admin-token"), PLANTED, NOBODY);
    const { code, lastLine, output } = await startOutcome(dir, { KEYGATE_DATA_DIR: dataDir, ...LISTENERS });
    expect({ code, lastLine }).toEqual(refusal(join(dataDir, "admin-token"), "is a file"));
    expect(output).not.toContain(PLANTED);
  });

  it("refuses a pepper another user owns, naming it, never the pepper", async () => {
    const { dir, dataDir } = foreignDataDir();
    const pepper = "planted-pepper-".repeat(4);
    plant(join(dataDir, "pepper"), pepper, NOBODY);
    const { code, lastLine, output } = await startOutcome(dir, { KEYGATE_DATA_DIR: dataDir, KEYGATE_ADMIN_TOKENS: "kgadm_test_token_0123456789abcdefghij", ...LISTENERS });
    expect({ code, lastLine }).toEqual(refusal(join(dataDir, "pepper"), "is a file"));
    expect(output).not.toContain(pepper);
  });

  it("refuses an admin-token link another user made, even to a root-owned file whose text they know", async () => {
    const { dir, dataDir } = foreignDataDir();
    const known = join(dir, "root-owned-known-text");
    plant(known, PLANTED, 0);
    symlinkSync(known, join(dataDir, "admin-token"));
    lchownSync(join(dataDir, "admin-token"), NOBODY, NOBODY);
    const { code, lastLine, output } = await startOutcome(dir, { KEYGATE_DATA_DIR: dataDir, ...LISTENERS });
    expect({ code, lastLine }).toEqual(refusal(join(dataDir, "admin-token"), "is a symbolic link"));
    expect(output).not.toContain(PLANTED);
  });

  it("refuses an admin-token link of keygate's own user to a file another user owns", async () => {
    const { dir, dataDir } = foreignDataDir();
    const theirs = join(dir, "theirs");
    plant(theirs, PLANTED, NOBODY);
    symlinkSync(theirs, join(dataDir, "admin-token"));
    const { code, lastLine, output } = await startOutcome(dir, { KEYGATE_DATA_DIR: dataDir, ...LISTENERS });
    expect({ code, lastLine }).toEqual(refusal(join(dataDir, "admin-token"), "is a symbolic link to a file"));
    expect(output).not.toContain(PLANTED);
  });

  it("refuses an admin-token.unshown another user put there: the token would be printed again, into the start's log", async () => {
    const { dir, dataDir } = foreignDataDir();
    const first = await startOutcome(dir, { KEYGATE_DATA_DIR: dataDir, ...LISTENERS });
    const token = readFileSync(join(dataDir, "admin-token"), "utf8").trim();
    // The first start printed it once; a second start prints nothing.
    expect({ code: first.code, printed: first.output.split(token).length - 1 }).toEqual({ code: "served", printed: 1 });
    const second = await startOutcome(dir, { KEYGATE_DATA_DIR: dataDir, ...LISTENERS });
    expect({ code: second.code, printed: second.output.includes(token) }).toEqual({ code: "served", printed: false });
    plant(join(dataDir, "admin-token.unshown"), "", NOBODY);
    const { code, lastLine, output } = await startOutcome(dir, { KEYGATE_DATA_DIR: dataDir, ...LISTENERS });
    expect({ code, lastLine, printed: output.includes(token) }).toEqual({ ...refusal(join(dataDir, "admin-token.unshown"), "is a file"), printed: false });
  });
});

describe.skipIf(!asRoot)("a data directory another user owns, or a group shares: happy", { timeout: 60_000 }, () => {
  it("is used as it is (an emptyDir is 0777, an fsGroup volume root:<group> 2775): keygate's own generated admin token works", async () => {
    for (const shape of ["foreign 0777", "fsGroup 2775"] as const) {
      const { dir, dataDir } = foreignDataDir();
      if (shape === "fsGroup 2775") {
        chownSync(dataDir, 0, NOBODY);
        chmodSync(dataDir, 0o2775);
      }
      const keygate = await spawnKeygate({ cwd: dir, env: { KEYGATE_DATA_DIR: dataDir, ...LISTENERS } });
      running.push(keygate);
      const tokenFile = join(dataDir, "admin-token");
      expect({ shape, uid: statSync(tokenFile).uid, mode: (statSync(tokenFile).mode & 0o777).toString(8) }).toEqual({ shape, uid: 0, mode: "600" });
      const created = await postJson(keygate.ports.admin, "CreateKey", { ownerId: "own", name: "k" }, readFileSync(tokenFile, "utf8").trim());
      expect({ shape, status: created.status }).toEqual({ shape, status: 200 });
      expect(await keygate.stop("SIGTERM")).toBe(0);
    }
  });
});
