import { Redis } from "ioredis";
import { describe, expect, it } from "vitest";
import { ConfigError, connectionPasswords, loadConfig } from "../../src/config.js";
import type { RedisTopology } from "../../src/config.js";
import { BARE_LAYOUT, CLUSTER_LAYOUT, keyLayout } from "../../src/cache/redis-client.js";
import { RedisConnectError, connectRedis } from "../../src/cache/redis.js";
import { redactLogObject } from "../../src/keys/redact.js";

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

    // Passwords from `openssl rand -base64` hold "/" and "+"; ioredis reads redis:// with WHATWG
    // URL, whose TypeError quotes the whole URL, so a form it cannot read is refused here, by name.
    it.each([
      ["an unescaped / (the host ends at it)", "redis://:Zk9/s3cret-pass@127.0.0.1:6379/0"],
      ["an unescaped / after a digits-only start (it reads as a port)", "redis://user:123/s3cret-pass@127.0.0.1:6379"],
      ["an unescaped #", "redis://:ab#s3cret-pass@127.0.0.1:6379/0"],
      ["an unescaped # after a digits-only start (it reads as a port)", "rediss://user:123#s3cret-pass@127.0.0.1:6379"],
      ["an unescaped ? after a digits-only start (it reads as a port)", "redis://user:123?s3cret-pass@127.0.0.1:6379"],
      ["a % that starts no escape", "redis://:s3cret-pass%zz@127.0.0.1:6379/0"],
      ["a % in the user name", "redis://us%zzer:s3cret-pass@127.0.0.1:6379"],
      ["a port out of range", "redis://:s3cret-pass@127.0.0.1:65536"],
    ])("a redis:// URL with %s is refused as not a URL, without the password", (_title, url) => {
      expect(refusal(url)).toBe("invalid environment: KEYGATE_REDIS_URL: is not a valid URL; percent-encode / ? # @ % in the user name and password");
    });

    it.each([
      ["redis+cluster://:Zk9/s3cret-pass@h1:7000,h2:7001", "each seed node is host:port"],
      ["redis+cluster://user:7000/s3cret-pass@h1:7000", "a Redis Cluster has only database 0"],
      ["redis+cluster://:ab#s3cret-pass@h1:7000", "must start with"],
      ["redis+cluster://:s3cret-pass%zz@h1:7000", "must be percent-encoded"],
      ["redis+sentinel://:Zk9/s3cret-pass@s1:26379/mymaster", "each Sentinel is host:port"],
      ["redis+sentinel://user:26379/s3cret-pass@s1:26379/mymaster", "needs the master's name as its path"],
      ["redis+sentinel://:ab#s3cret-pass@s1:26379/mymaster", "must start with"],
    ])("the multi-host form %s is refused by its own parser, without the password", (url, problem) => {
      expect(refusal(url)).toContain(problem);
    });
  });

  describe("security", () => {
    it("a percent-encoded password is a valid redis:// URL, and ioredis reads it back decoded", () => {
      const url = "redis://:Zk9%2Fs3cret%2Bpass%23x%25@127.0.0.1:6379/0";
      expect(topology(url)).toEqual({ kind: "standalone", url });
      const redis = new Redis(url, { lazyConnect: true });
      expect(redis.options.password).toBe("Zk9/s3cret+pass#x%");
      redis.disconnect();
    });

    it("connectRedis turns a URL ioredis cannot parse into a RedisConnectError that holds neither the URL nor the error quoting it", async () => {
      const error: unknown = await connectRedis("redis://:ab#s3cret-pass@127.0.0.1:6379/0").catch((e: unknown) => e);
      expect(error).toBeInstanceOf(RedisConnectError);
      expect(error instanceof Error ? error.cause : "no error").toBeUndefined();
      expect(JSON.stringify(redactLogObject(error))).not.toContain("s3cret-pass");
      expect(String(error)).not.toContain("s3cret-pass");
    });

    it("every password in KEYGATE_REDIS_URL and KEYGATE_MONGODB_URI, as written and decoded, goes to the log redaction", () => {
      const passwords = (env: Record<string, string>): string[] => connectionPasswords(loadConfig(env)).sort();
      expect(passwords({})).toEqual([]);
      expect(passwords({ KEYGATE_REDIS_URL: "redis://127.0.0.1:6379", KEYGATE_MONGODB_URI: "mongodb://h1:27017,h2:27017/keygate" })).toEqual([]);
      expect(passwords({ KEYGATE_REDIS_URL: "redis://kg:p%2Fw%23d@127.0.0.1:6379/0" })).toEqual(["p%2Fw%23d", "p/w#d"]);
      expect(passwords({ KEYGATE_REDIS_URL: "rediss://127.0.0.1:6379?password=q%2Fpw" })).toEqual(["q/pw"]);
      expect(passwords({ KEYGATE_REDIS_URL: "redis+cluster://:cl%40pw@h1:7000" })).toEqual(["cl@pw"]);
      expect(passwords({ KEYGATE_REDIS_URL: "redis+sentinel://:mpw@s1/mymaster?sentinelPassword=spw" })).toEqual(["mpw", "spw"]);
      // The MongoDB driver ends the password at the first "@", WHATWG URL at the last: both are kept.
      expect(passwords({ KEYGATE_MONGODB_URI: "mongodb://kg:m%2Fpw@h1:27017,h2:27017/keygate?authSource=admin" })).toEqual(["m%2Fpw", "m/pw"]);
      expect(passwords({ KEYGATE_MONGODB_URI: "mongodb://kg:a@b%zz@h1/keygate" })).toEqual(["a", "a@b%zz"]);
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
