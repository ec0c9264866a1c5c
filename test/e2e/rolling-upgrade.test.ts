import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { postJson } from "../harness/keygate.js";
import { until } from "../harness/poll.js";
import type { KeygateProcess } from "../harness/process.js";
import { checkReplica, rollingUpgradeServers, startRollingUpgrade } from "../harness/rolling-upgrade.js";
import type { Answer, RollingUpgrade } from "../harness/rolling-upgrade.js";

/** Polls every 20 ms: each probe is a request to a replica, and nothing here times the wait. */
const POLL = { intervalMs: 20 } as const;

// A rolling upgrade: a replica of the previous release and one of this keygate share MongoDB and
// Redis (each reads, or leaves be, what the other caches), then the old one is replaced. The old
// replica is the release's own code, built from its sources (test/fixtures/upgrade/<commit>) on its
// own dependency tree by .ci/install-release.sh. Every
// Check through either is answered, and answered right: no gRPC error, no wrong allow.
const RELEASE = "1dffb08";

const servers = rollingUpgradeServers(RELEASE);

const check = (replica: KeygateProcess, secret: string): Promise<Answer> => checkReplica(replica, secret, "rolling");

async function createKey(replica: KeygateProcess, ownerId: string): Promise<{ id: string; secret: string }> {
  expect((await postJson(replica.ports.admin, "UpsertAccount", { ownerId, plan: "business" })).status).toBe(200);
  const answer = await postJson(replica.ports.admin, "CreateKey", { ownerId, name: "rolling upgrade" });
  expect(answer.status, JSON.stringify(answer.json)).toBe(200);
  return { id: (answer.json["key"] as { id: string }).id, secret: answer.json["secret"] as string };
}

describe.runIf(servers)(`rolling upgrade from ${RELEASE}: both versions on one MongoDB and one Redis`, () => {
  let upgrade: RollingUpgrade;
  let old: KeygateProcess;
  let current: KeygateProcess;
  /** Every answer of the suite, to count failed Checks at the end. */
  const answers: Answer[] = [];
  const checked = async (replica: KeygateProcess, secret: string): Promise<Answer> => {
    const answer = await check(replica, secret);
    answers.push(answer);
    return answer;
  };

  beforeAll(async () => {
    // The old replica runs first, as before an upgrade; the new one joins it.
    upgrade = await startRollingUpgrade(RELEASE, { tempPrefix: "keygate-rolling-" });
    ({ old, current } = upgrade);
  }, 180_000);

  afterAll(() => upgrade?.stop());

  it("keys made through either replica are allowed by both, Check after Check", async () => {
    const fromOld = await createKey(old, "rolling-old");
    const fromNew = await createKey(current, "rolling-new");
    const seen: Record<string, number> = {};
    for (let i = 0; i < 100; i++) {
      for (const replica of [old, current]) {
        for (const key of [fromOld, fromNew]) {
          const answer = await checked(replica, key.secret);
          seen[String(answer)] = (seen[String(answer)] ?? 0) + 1;
        }
      }
    }
    expect(seen).toEqual({ allow: 400 });
  });

  it("a key revoked through either replica is refused by both", async () => {
    const revokedByNew = await createKey(old, "rolling-revoke-1");
    const revokedByOld = await createKey(current, "rolling-revoke-2");
    for (const replica of [old, current]) for (const key of [revokedByNew, revokedByOld]) expect(await checked(replica, key.secret)).toBe("allow");
    expect((await postJson(current.ports.admin, "RevokeKey", { id: revokedByNew.id, reason: "rolling" })).status).toBe(200);
    expect((await postJson(old.ports.admin, "RevokeKey", { id: revokedByOld.id, reason: "rolling" })).status).toBe(200);
    for (const replica of [old, current]) {
      for (const key of [revokedByNew, revokedByOld]) {
        await until(async () => (await checked(replica, key.secret)) === 401, 5000, "the revoked key refused", POLL);
      }
    }
  });

  it("after the old replica is replaced by a new one, every key answers as before", async () => {
    const kept = await createKey(old, "rolling-kept");
    expect(await checked(current, kept.secret)).toBe("allow");
    expect(await old.stop("SIGTERM")).toBe(0);
    old = await upgrade.startThisVersion();
    for (const replica of [old, current]) expect(await checked(replica, kept.secret)).toBe("allow");
  });

  it("a replica of the release still starts on the store after this version recorded its pepper check there, and knows every key", async () => {
    const kept = await createKey(current, "rolling-after-check");
    const another = await upgrade.startRelease();
    try {
      for (const replica of [another, current]) expect(await checked(replica, kept.secret)).toBe("allow");
    } finally {
      expect(await another.stop("SIGTERM")).toBe(0);
    }
  });

  it("no Check failed along the way", () => {
    expect(answers.length).toBeGreaterThan(400);
    expect(answers.filter((answer) => typeof answer === "string" && answer.startsWith("grpc error"))).toEqual([]);
  });
});
