import { existsSync, mkdirSync, symlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { ADMIN_TOKEN, postJson } from "../harness/keygate.js";
import { embeddedEnv, serveUntilExit, spawnedKeygates, spawnKeygate } from "../harness/process.js";

// KEYGATE_PEPPER must be at least 32 characters, but a data/pepper file shorter than that (written
// by hand, or a restore gone wrong) may be the pepper a released keygate made its keys with: their
// hashes depend on it, so refusing it would refuse every key, and an upgrade must keep working.
// It is used, and the start logs one error-level line naming the file and what is wrong with it
// (too short, readable by group or others), never the pepper. A symbolic link to a file is read
// through (a Kubernetes Secret volume's files are links); a pepper path that cannot be read as a
// file is refused, naming it.

const { running, children, tempDataDir } = spawnedKeygates("keygate-pepper-file-");

const SHORT_PEPPER = "short~pepper~7";
const WEAK_PEPPER_MSG = "the pepper file is weaker than a generated one; keygate uses it, since the stored keys' hashes depend on it";

async function checkStatus(port: number, secret: string): Promise<number> {
  const res = await fetch(`http://127.0.0.1:${port}/check/v1/things`, { headers: { "x-api-key": secret } });
  await res.arrayBuffer();
  return res.status;
}

function errorLines(stdout: string): Array<Record<string, unknown>> {
  return stdout
    .split("\n")
    .filter((line) => line.startsWith("{"))
    .map((line) => JSON.parse(line) as Record<string, unknown>)
    .filter((line) => typeof line["level"] === "number" && line["level"] >= 50);
}

describe("embedded keygate: a pepper file shorter than KEYGATE_PEPPER may be: happy", () => {
  it("is used, with one error-level line naming the file and its problems but not the pepper, and its keys pass after a restart", async () => {
    const { dir, dataDir } = tempDataDir();
    const pepperFile = join(dataDir, "pepper");
    writeFileSync(pepperFile, `${SHORT_PEPPER}\n`, { mode: 0o644 });
    const env = embeddedEnv({ dataDir, adminToken: ADMIN_TOKEN, extra: { KEYGATE_LOG_LEVEL: "info" } });
    const first = await spawnKeygate({ cwd: dir, env });
    running.push(first);
    expect(errorLines(first.stdout()).map(({ level, file, problems, msg }) => ({ level, file, problems, msg }))).toEqual([
      {
        level: 50,
        file: pepperFile,
        problems: ["shorter than 32 characters (KEYGATE_PEPPER's minimum)", "readable by group or others (mode 0644; chmod 600 it)"],
        msg: WEAK_PEPPER_MSG,
      },
    ]);
    const created = await postJson(first.ports.admin, "CreateKey", { ownerId: "short-pepper", name: "k" });
    const secret = String(created.json["secret"]);
    expect(await checkStatus(first.ports.http, secret)).toBe(200);
    expect(await first.stop("SIGTERM")).toBe(0);

    const again = await spawnKeygate({ cwd: dir, env });
    running.push(again);
    expect(await checkStatus(again.ports.http, secret)).toBe(200);
    expect(await again.stop("SIGTERM")).toBe(0);
    for (const output of [first.stdout(), first.stderr(), again.stdout(), again.stderr()]) expect(output).not.toContain(SHORT_PEPPER);
  }, 60_000);

  it("reads a pepper through a symbolic link to an owner-only file, with no error line", async () => {
    const { dir, dataDir } = tempDataDir();
    const secretDir = join(dir, "secret-volume");
    mkdirSync(secretDir, { mode: 0o700 });
    writeFileSync(join(secretDir, "pepper"), `${"p".repeat(43)}\n`, { mode: 0o600 });
    symlinkSync(join(secretDir, "pepper"), join(dataDir, "pepper"));
    const keygate = await spawnKeygate({ cwd: dir, env: embeddedEnv({ dataDir, adminToken: ADMIN_TOKEN, extra: { KEYGATE_LOG_LEVEL: "info" } }) });
    running.push(keygate);
    const created = await postJson(keygate.ports.admin, "CreateKey", { ownerId: "linked-pepper", name: "k" });
    expect(await checkStatus(keygate.ports.http, String(created.json["secret"]))).toBe(200);
    expect(errorLines(keygate.stdout())).toEqual([]);
    expect(await keygate.stop("SIGTERM")).toBe(0);
  }, 60_000);
});

describe("embedded keygate: a pepper path that cannot be read as a file: error", () => {
  it("refuses a directory, naming it", async () => {
    const { dir, dataDir } = tempDataDir();
    mkdirSync(join(dataDir, "pepper"));
    const exited = await serveUntilExit(dir, embeddedEnv({ dataDir, adminToken: ADMIN_TOKEN }), children);
    expect(exited.code).toBe(2);
    expect(exited.stderr).toBe(`keygate: ${join(dataDir, "pepper")} is a directory, not a file\n`);
  }, 60_000);

  it("refuses a symbolic link to nothing, naming it, and generates no pepper in its place", async () => {
    const { dir, dataDir } = tempDataDir();
    symlinkSync(join(dir, "missing-secret"), join(dataDir, "pepper"));
    const exited = await serveUntilExit(dir, embeddedEnv({ dataDir, adminToken: ADMIN_TOKEN }), children);
    expect(exited.code).toBe(2);
    expect(exited.stderr).toBe(`keygate: ${join(dataDir, "pepper")} is a symbolic link to a file that does not exist\n`);
    expect(existsSync(join(dir, "missing-secret"))).toBe(false);
  }, 60_000);
});
