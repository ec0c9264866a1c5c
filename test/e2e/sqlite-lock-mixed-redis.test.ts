import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { stringify } from "yaml";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ADMIN_TOKEN, postJson } from "../harness/keygate.js";
import { requireServer } from "../harness/ports.js";
import { embeddedEnv, spawnKeygate } from "../harness/process.js";
import type { KeygateProcess } from "../harness/process.js";
import { redisAvailable, startRedis } from "../harness/redis-server.js";
import type { RedisServer } from "../harness/redis-server.js";
import { TEN_CREDITS_POLICY } from "../harness/limits-policy.js";

// An embedded data directory is held by one keygate without Redis (its limits and credit balances
// are in-process), or by any number of keygates with Redis (they share limits in Redis, as
// replicas do), never by both kinds at once: a keygate with Redis beside one without would each
// count credits from the same store balance, so a balance of 10 would admit 20 requests. (A
// careless upgrade: "add Redis" to the new process and start it before the old one has stopped.)
// The keygates with Redis take keygate.lock's SQLite lock shared, the one without it exclusive.

const redisReady = requireServer("redis-server", redisAvailable(), "apt-get install redis-server");
const root = mkdtempSync(join(tmpdir(), "keygate-lock-mixed-redis-"));
const running: KeygateProcess[] = [];
let redis: RedisServer | null = null;
beforeAll(async () => {
  if (redisReady) redis = await startRedis();
});
afterAll(async () => {
  await Promise.all(running.map((p) => p.stop("SIGKILL").catch(() => null)));
  await redis?.stop();
  rmSync(root, { recursive: true, force: true });
});

async function checkStatus(port: number, secret: string): Promise<number> {
  const res = await fetch(`http://127.0.0.1:${port}/check/v1/scrape`, { headers: { "x-api-key": secret } });
  await res.arrayBuffer();
  return res.status;
}

/** A start on `env`: the process, or the error its exit gave. */
async function start(env: Record<string, string>): Promise<{ keygate: KeygateProcess | null; refusal: string }> {
  try {
    const keygate = await spawnKeygate({ cwd: root, env });
    running.push(keygate);
    return { keygate, refusal: "" };
  } catch (error) {
    return { keygate: null, refusal: error instanceof Error ? error.message : String(error) };
  }
}

/** The environment of an embedded keygate on a fresh data directory, with a metered plan of 10 credits. */
function freshEnv(): { env: Record<string, string>; dataDir: string } {
  const dataDir = mkdtempSync(join(root, "data-"));
  const policy = `${dataDir}-policy.yaml`;
  writeFileSync(
    policy,
    stringify(TEN_CREDITS_POLICY),
  );
  return { env: embeddedEnv({ dataDir, adminToken: ADMIN_TOKEN, policyFile: policy, extra: { KEYGATE_LOG_LEVEL: "info" } }), dataDir };
}

const NEVER_STALE = "The lock is never stale: the operating system releases it when the process holding it ends, so do not delete keygate.lock";

describe.skipIf(!redisReady)("one embedded data directory: keygates with and without Redis never serve it together", () => {
  it("security: a keygate with Redis is refused on a directory a keygate without Redis serves, so a balance of 10 admits 10 requests", async () => {
    if (redis === null) throw new Error("no redis");
    const { env, dataDir } = freshEnv();
    const { keygate: embedded } = await start(env);
    if (embedded === null) throw new Error("the embedded keygate did not start");
    const created = await postJson(embedded.ports.admin, "CreateKey", { ownerId: "mixed-owner", name: "k" });
    const secret = String(created.json["secret"]);

    const { keygate: withRedis, refusal } = await start({ ...env, KEYGATE_REDIS_URL: redis.url });
    let allowed = 0;
    for (let i = 0; i < 10; i++) if ((await checkStatus(embedded.ports.http, secret)) === 200) allowed += 1;
    if (withRedis !== null) for (let i = 0; i < 10; i++) if ((await checkStatus(withRedis.ports.http, secret)) === 200) allowed += 1;
    expect({ secondServing: withRedis !== null, allowed }).toEqual({ secondServing: false, allowed: 10 });
    expect(refusal).toContain("exited with 2");
    expect(refusal).toContain(
      `KEYGATE_DATA_DIR ${dataDir} is in use by another keygate process (one without Redis, which holds ${join(dataDir, "keygate.lock")} alone); ` +
        "keygates with Redis share a data directory only with each other: stop that one first, or give it KEYGATE_REDIS_URL too. " +
        NEVER_STALE,
    );
    expect(await embedded.stop("SIGTERM")).toBe(0);
  }, 120_000);

  it("security: keygates with Redis share a directory with each other, and a keygate without Redis is refused beside them", async () => {
    if (redis === null) throw new Error("no redis");
    const { env, dataDir } = freshEnv();
    const withRedis = { ...env, KEYGATE_REDIS_URL: redis.url };
    const { keygate: a, refusal: refusedA } = await start(withRedis);
    const { keygate: b, refusal: refusedB } = await start(withRedis);
    expect([refusedA, refusedB]).toEqual(["", ""]);
    if (a === null || b === null) throw new Error("the keygates with Redis did not both start");
    const created = await postJson(a.ports.admin, "CreateKey", { ownerId: "shared-owner", name: "k" });
    const secret = String(created.json["secret"]);

    const { keygate: embedded, refusal } = await start(env);
    // The two with Redis share one balance of 10 through Redis.
    let allowed = 0;
    for (let i = 0; i < 6; i++) if ((await checkStatus(a.ports.http, secret)) === 200) allowed += 1;
    for (let i = 0; i < 6; i++) if ((await checkStatus(b.ports.http, secret)) === 200) allowed += 1;
    if (embedded !== null) for (let i = 0; i < 10; i++) if ((await checkStatus(embedded.ports.http, secret)) === 200) allowed += 1;
    expect({ embeddedServing: embedded !== null, allowed }).toEqual({ embeddedServing: false, allowed: 10 });
    expect(refusal).toContain("exited with 2");
    expect(refusal).toContain(
      `KEYGATE_DATA_DIR ${dataDir} is in use by another keygate process (one or more with KEYGATE_REDIS_URL, which share ${join(dataDir, "keygate.lock")}); ` +
        "a keygate without Redis needs the data directory to itself: set KEYGATE_REDIS_URL as they do, or stop them first. " +
        NEVER_STALE,
    );
    expect(await Promise.all([a.stop("SIGTERM"), b.stop("SIGTERM")])).toEqual([0, 0]);
  }, 120_000);
});
