import { rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { DatabaseSync } from "node:sqlite";
import { stringify } from "yaml";
import { afterAll, expect, it } from "vitest";
import { ADMIN_TOKEN, postJson } from "../harness/keygate.js";
import { suiteWithServer } from "../harness/ports.js";
import { embeddedEnv, spawnKeygate } from "../harness/process.js";
import type { KeygateProcess } from "../harness/process.js";
import { until } from "../harness/poll.js";
import { TEN_CREDITS_POLICY } from "../harness/limits-policy.js";
import { fillDisk, tmpfsMounts } from "../harness/tmpfs.js";

// Usage and spent credits are written behind, and on SIGTERM (README, Caching and write-behind).
// When the store refuses the last flush (here a full disk), keygate tries it again until the
// shutdown grace period ends; what is still unwritten then ends with the process, so it says so:
// one error-level line with the count of rows, requests and spent credits, and exit code 1. A disk
// freed within the grace period loses nothing, and the stop exits 0.
//
// Each case runs on a tmpfs of its own (32 MB) filled to the last byte, which needs mount(8): it is
// skipped loudly without it, and fails in CI, which runs as root.

const tmpfs = tmpfsMounts("keygate-sigterm-full-disk-");
const running: KeygateProcess[] = [];

const disks = ((): { lost: string; freed: string } | null => {
  const lost = tmpfs.mount("lost", 32);
  const freed = lost === null ? null : tmpfs.mount("freed", 32);
  return lost === null || freed === null ? null : { lost, freed };
})();

afterAll(async () => {
  await Promise.all(running.map((p) => p.stop("SIGKILL").catch(() => null)));
  tmpfs.remove();
});

interface LogLine {
  level: number;
  msg: string;
  requests?: number;
  rows?: number;
  creditsSpent?: number;
}

function logLines(stdout: string): LogLine[] {
  return stdout
    .split("\n")
    .filter((line) => line.startsWith("{"))
    .map((line) => JSON.parse(line) as LogLine);
}

const FLUSH_FAILED = '"msg":"usage flush failed; will retry"';

/**
 * A keygate on `disk` with 300 keys of 10 credits each, the disk then filled, and rounds of one
 * billed Check a key until a usage flush has failed. Returns the keygate, its data directory, the
 * filler file, the secrets and how many Checks were allowed.
 */
async function keygateOnFullDisk(disk: string, graceSeconds: number) {
  const policy = join(disk, "policy.yaml");
  writeFileSync(
    policy,
    stringify({
      ...TEN_CREDITS_POLICY,
      limits: { usageFlushSeconds: 1 },
      lastUsedFlushSeconds: 1,
    }),
  );
  const dataDir = join(disk, "data");
  const extra = { KEYGATE_LOG_LEVEL: "info", KEYGATE_SHUTDOWN_GRACE_SECONDS: String(graceSeconds) };
  const env = embeddedEnv({ dataDir, adminToken: ADMIN_TOKEN, policyFile: policy, extra });
  const creator = await spawnKeygate({ cwd: disk, env });
  running.push(creator);
  const secrets: string[] = [];
  for (let i = 0; i < 300; i++) {
    const created = await postJson(creator.ports.admin, "CreateKey", { ownerId: `full-${i}`, name: "k" });
    expect(created.status).toBe(200);
    secrets.push(String(created.json["secret"]));
  }
  // A stop checkpoints and removes the WAL, so the keygate that serves the Checks starts with an
  // empty one: its first flush needs new blocks on the full disk. (The WAL keeps its largest size
  // while open, and the key writes could have left room for a few flushes.)
  expect(await creator.stop("SIGTERM")).toBe(0);
  const keygate = await spawnKeygate({ cwd: disk, env });
  running.push(keygate);
  const filler = fillDisk(disk);
  let allowed = 0;
  const flushFailed = (): boolean => keygate.stdout().includes(FLUSH_FAILED);
  // At most 8 rounds: every key has credit for 10, so every Check is allowed and billed.
  for (let round = 0; round < 8 && !flushFailed(); round++) {
    for (const secret of secrets) {
      const res = await fetch(`http://127.0.0.1:${keygate.ports.http}/check/v1/scrape`, { headers: { "x-api-key": secret } });
      await res.arrayBuffer();
      expect(res.status).toBe(200);
      allowed += 1;
    }
    // Each round is written behind within a second: stop as soon as a write has failed.
    await until(flushFailed, 2500, "a usage flush to fail", { intervalMs: 50 }).catch(() => undefined);
  }
  await until(flushFailed, 15_000, "a usage flush to fail on the full disk");
  return { keygate, dataDir, filler, secrets, allowed };
}

/** Allowed requests in the store's usage rows. */
function storedAllowed(dataDir: string): number {
  const stored = new DatabaseSync(join(dataDir, "keygate.db"), { readOnly: true });
  try {
    return Number((stored.prepare("SELECT COALESCE(SUM(count), 0) AS n FROM usage WHERE outcome = 'ALLOWED'").get() as { n: number }).n);
  } finally {
    stored.close();
  }
}

suiteWithServer("embedded keygate: SIGTERM while the disk is full", disks, "mounting a tmpfs needs root (mount -t tmpfs)", ({ lost, freed }) => {
  it("error: when the grace period ends with billed usage unwritten, logs what is lost at error level and exits 1", async () => {
    const { keygate, dataDir, secrets, allowed } = await keygateOnFullDisk(lost, 2);
    const code = await keygate.stop("SIGTERM");
    const lostRequests = allowed - storedAllowed(dataDir);
    const afterDrain = logLines(keygate.stdout().slice(keygate.stdout().indexOf('"msg":"draining"')));
    const usageLost = afterDrain.filter((line) => line.level >= 50 && line.msg.startsWith("usage not written at shutdown"));
    // What is at stake: allowed, billed requests that are not in the store.
    expect(lostRequests).toBeGreaterThan(0);
    expect(code).toBe(1);
    expect(usageLost).toHaveLength(1);
    expect(usageLost[0]?.requests).toBe(lostRequests);
    expect(usageLost[0]?.creditsSpent).toBeGreaterThan(0);
    // Nothing claims a retry that the ending process will not make.
    expect(afterDrain.filter((line) => line.msg.includes("will retry"))).toEqual([]);
    for (const secret of secrets) expect(keygate.stdout()).not.toContain(secret);
  }, 180_000);

  it("happy: a disk freed within the grace period gets the last flush, and the stop exits 0", async () => {
    const { keygate, dataDir, filler, allowed } = await keygateOnFullDisk(freed, 120);
    keygate.child.kill("SIGTERM");
    await until(() => keygate.stdout().includes('"msg":"usage flush failed during shutdown"'), 30_000, "the last flush to fail on the full disk");
    rmSync(filler);
    const code = await keygate.stop("SIGTERM");
    expect(code).toBe(0);
    expect(storedAllowed(dataDir)).toBe(allowed);
    const afterDrain = logLines(keygate.stdout().slice(keygate.stdout().indexOf('"msg":"draining"')));
    expect(afterDrain.filter((line) => line.level >= 50)).toEqual([]);
  }, 180_000);
});
