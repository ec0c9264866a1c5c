import { existsSync, mkdtempSync, renameSync, rmSync, unlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { stringify } from "yaml";
import { afterAll, describe, expect, it } from "vitest";
import { ADMIN_TOKEN, postJson } from "../harness/keygate.js";
import { embeddedEnv, spawnKeygate } from "../harness/process.js";
import type { KeygateProcess } from "../harness/process.js";
import { until } from "../harness/poll.js";
import { TEN_CREDITS_POLICY } from "../harness/limits-policy.js";

// Without Redis, one serving keygate a data directory (README, KEYGATE_DATA_DIR): its credit
// balances are in-process, so a second keygate on the same database would spend each balance
// again. The lock is held on keygate.lock's file, not its name, and an operator may delete
// keygate.lock for a stale lock file (a crashed process's lock file is still there, after all).
// The holder notices at once (it watches the file, and looks again every second), locks the file
// now at that name, and says so; a second start is still refused, and the refusal says the lock
// is never stale. A balance of 10 admits 10 requests.

const root = mkdtempSync(join(tmpdir(), "keygate-lock-file-removed-"));
const running: KeygateProcess[] = [];
afterAll(async () => {
  await Promise.all(running.map((p) => p.stop("SIGKILL").catch(() => null)));
  rmSync(root, { recursive: true, force: true });
});

async function checkStatus(port: number, secret: string): Promise<number> {
  const res = await fetch(`http://127.0.0.1:${port}/check/v1/scrape`, { headers: { "x-api-key": secret } });
  await res.arrayBuffer();
  return res.status;
}

const RELOCKED = '"msg":"keygate.lock was deleted or replaced while this keygate held it; locked the file now there.';

/** A second keygate's start on the same environment: the process, or the error its exit gave. */
async function secondStart(env: Record<string, string>): Promise<{ second: KeygateProcess | null; refusal: string }> {
  try {
    const second = await spawnKeygate({ cwd: root, env });
    running.push(second);
    return { second, refusal: "" };
  } catch (error) {
    return { second: null, refusal: error instanceof Error ? error.message : String(error) };
  }
}

describe("embedded keygate: the data directory lock after keygate.lock is deleted or replaced", () => {
  for (const [what, disturb] of [
    ["deleted", (path: string) => unlinkSync(path)],
    ["replaced by another file", (path: string) => {
      writeFileSync(`${path}.new`, "");
      renameSync(`${path}.new`, path);
    }],
  ] as const) {
    it(`security: ${what}, still refuses a second keygate on the same database, so a balance of 10 admits 10 requests`, async () => {
      const policy = join(root, "policy.yaml");
      writeFileSync(
        policy,
        stringify(TEN_CREDITS_POLICY),
      );
      const dataDir = mkdtempSync(join(root, "data-"));
      const env = embeddedEnv({ dataDir, adminToken: ADMIN_TOKEN, policyFile: policy, extra: { KEYGATE_LOG_LEVEL: "info" } });
      const first = await spawnKeygate({ cwd: root, env });
      running.push(first);
      const created = await postJson(first.ports.admin, "CreateKey", { ownerId: "lock-owner", name: "k" });
      const secret = String(created.json["secret"]);

      const lockFile = join(dataDir, "keygate.lock");
      disturb(lockFile);
      await until(() => first.stdout().includes(RELOCKED), 10_000, "the first keygate to lock keygate.lock again");
      expect(existsSync(lockFile)).toBe(true);

      const { second, refusal } = await secondStart(env);
      let allowed = 0;
      for (let i = 0; i < 10; i++) if ((await checkStatus(first.ports.http, secret)) === 200) allowed += 1;
      if (second !== null) for (let i = 0; i < 10; i++) if ((await checkStatus(second.ports.http, secret)) === 200) allowed += 1;
      expect({ secondServing: second !== null, allowed }).toEqual({ secondServing: false, allowed: 10 });
      expect(await checkStatus(first.ports.http, secret)).toBe(402);
      expect(refusal).toContain("exited with 2");
      expect(refusal).toContain(`KEYGATE_DATA_DIR ${dataDir} is in use by another keygate process (one without Redis, which holds ${lockFile} alone)`);
      expect(refusal).toContain("The lock is never stale: the operating system releases it when the process holding it ends, so do not delete keygate.lock");
      expect(await first.stop("SIGTERM")).toBe(0);
    }, 120_000);
  }
});
