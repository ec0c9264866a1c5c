import { describe, expect, it } from "vitest";
import { ConfigError, loadConfig } from "../../src/config.js";
import type { RedisTopology } from "../../src/config.js";
import { BARE_LAYOUT, CLUSTER_LAYOUT, keyLayout } from "../../src/cache/redis-client.js";

function topology(url: string): RedisTopology | undefined {
  return loadConfig({ KEYGATE_REDIS_URL: url }).redis;
}

/** The ConfigError message for a KEYGATE_REDIS_URL, asserting it names the variable and never the secret. */
function refusal(url: string, secret = "s3cret-pass"): string {
  let message = "";
  try {
    loadConfig({ KEYGATE_REDIS_URL: url });
  } catch (error) {
    expect(error).toBeInstanceOf(ConfigError);
    message = error instanceof Error ? error.message : String(error);
  }
  expect(message).toMatch(/^invalid environment: KEYGATE_REDIS_URL: /);
  expect(message).not.toContain(secret);
  return message;
}

describe("KEYGATE_REDIS_URL topologies", () => {
  describe("happy", () => {
    it("redis:// and rediss:// stay one server, passed to ioredis as written", () => {
      expect(topology("redis://:pw@10.0.0.1:6380/2")).toEqual({ kind: "standalone", url: "redis://:pw@10.0.0.1:6380/2" });
      expect(topology("rediss://cache.internal:6379")).toEqual({ kind: "standalone", url: "rediss://cache.internal:6379" });
    });

    it("redis+cluster:// lists seed nodes; credentials are percent-decoded; rediss+cluster:// is TLS", () => {
      expect(topology("redis+cluster://kg:p%40ss%2Fword@10.0.0.1:7000,10.0.0.2:7001,[::1]:7002,node4")).toEqual({
        kind: "cluster",
        nodes: [
          { host: "10.0.0.1", port: 7000 },
          { host: "10.0.0.2", port: 7001 },
          { host: "::1", port: 7002 },
          { host: "node4", port: 6379 },
        ],
        tls: false,
        username: "kg",
        password: "p@ss/word",
      });
      expect(topology("rediss+cluster://:pw@h1:7000/")).toMatchObject({ kind: "cluster", tls: true, username: undefined, password: "pw" });
    });

    it("redis+sentinel:// lists Sentinels and names the master; db and the Sentinels' own credentials are optional", () => {
      expect(topology("redis+sentinel://s1:26379,s2:26380,s3/mymaster")).toEqual({
        kind: "sentinel",
        sentinels: [
          { host: "s1", port: 26379 },
          { host: "s2", port: 26380 },
          { host: "s3", port: 26379 },
        ],
        masterName: "mymaster",
        db: 0,
        tls: false,
        username: undefined,
        password: undefined,
        sentinelUsername: undefined,
        sentinelPassword: undefined,
      });
      expect(topology("rediss+sentinel://app:pw@s1:26379/main-1/3?sentinelPassword=sp%26x&sentinelUsername=watcher")).toMatchObject({
        kind: "sentinel",
        masterName: "main-1",
        db: 3,
        tls: true,
        username: "app",
        password: "pw",
        sentinelUsername: "watcher",
        sentinelPassword: "sp&x",
      });
      expect(topology("redis+sentinel://s1/mymaster?db=5")).toMatchObject({ db: 5 });
    });
  });

  describe("error", () => {
    it("each bad form is one message naming KEYGATE_REDIS_URL and what is wrong, without the password", () => {
      expect(refusal("http://:s3cret-pass@h:1")).toContain("must start with redis://, rediss://, redis+cluster://");
      expect(refusal("redis+cluster://:s3cret-pass@h1:7000,,h2:7001")).toContain("each seed node is host:port (port 1-65535)");
      expect(refusal("redis+cluster://:s3cret-pass@h1:70000")).toContain("each seed node is host:port");
      expect(refusal("redis+cluster://:s3cret-pass@h1:7000/2")).toContain("a Redis Cluster has only database 0");
      expect(refusal("redis+cluster://:s3cret-pass@h1:7000?db=1")).toContain("redis+cluster:// takes no query parameters");
      expect(refusal("redis+sentinel://:s3cret-pass@s1:26379")).toContain("needs the master's name as its path");
      expect(refusal("redis+sentinel://:s3cret-pass@s1:26379/my master")).toContain("needs the master's name as its path");
      expect(refusal("redis+sentinel://:s3cret-pass@s1:26379/mymaster/x")).toContain("the database is a number");
      expect(refusal("redis+sentinel://s1:26379/mymaster?password=s3cret-pass")).toContain('unknown query parameter "password"');
      expect(refusal("redis+sentinel://:s3cret-pass%zz@s1/mymaster")).toContain("must be percent-encoded");
      expect(refusal("redis+sentinel://s1:26379/mymaster#frag")).toContain("must start with");
    });
  });
});

describe("Redis key names by topology", () => {
  it("one server and Sentinel keep the released names, so an upgrade finds its balances and counts", () => {
    expect(keyLayout({ kind: "standalone", url: "redis://h" })).toBe(BARE_LAYOUT);
    expect(keyLayout({ kind: "sentinel", sentinels: [], masterName: "m", db: 0, tls: false, username: undefined, password: undefined, sentinelUsername: undefined, sentinelPassword: undefined })).toBe(
      BARE_LAYOUT,
    );
    expect(`kg:rl:${BARE_LAYOUT.bucket("acme", "a:acme")}`).toBe("kg:rl:a:acme");
    expect(`kg:c:${BARE_LAYOUT.owner("acme")}`).toBe("kg:c:acme");
    expect(BARE_LAYOUT.l2Prefix).toBe("kg:");
  });

  it("a Cluster tags every owner's keys with the owner, and all of L2 with one tag", () => {
    expect(keyLayout({ kind: "cluster", nodes: [], tls: false, username: undefined, password: undefined })).toBe(CLUSTER_LAYOUT);
    expect(`kg:rl:${CLUSTER_LAYOUT.bucket("acme", "k:key_01")}`).toBe("kg:rl:{acme}:k:key_01");
    expect(`kg:q:${CLUSTER_LAYOUT.owner("acme")}:2026-01-01`).toBe("kg:q:{acme}:2026-01-01");
    expect(`kg:c:${CLUSTER_LAYOUT.owner("acme")}`).toBe("kg:c:{acme}");
    // An id starting with "}" would make an empty tag: it goes behind a space, which no owner id holds.
    expect(`kg:c:${CLUSTER_LAYOUT.owner("}acme")}`).toBe("kg:c:{ }acme}");
    expect(`kg:rl:${CLUSTER_LAYOUT.bucket("}acme", "a:}acme")}`).toBe("kg:rl:{ }acme}:a:}acme");
    expect(`kg:c:${CLUSTER_LAYOUT.owner("a}cme")}`).toBe("kg:c:{a}cme}");
    expect(CLUSTER_LAYOUT.l2Prefix).toBe("kg:{l2}:");
  });
});
