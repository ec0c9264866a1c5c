import { describe, expect, it } from "vitest";
import { isUnanswered } from "../../src/cache/redis.js";
import { ConfigError } from "../../src/config.js";
import { BackendUnansweredError, mongoStartError, untilAnswered } from "../../src/server/startup-errors.js";
import { collectingLogger } from "../harness/authz-core.js";

/** A clock that only moves when the retry loop sleeps, plus what it slept. */
function fakeTime(): { nowMs: () => number; sleepMs: (ms: number) => Promise<void>; slept: number[] } {
  let now = 0;
  const slept: number[] = [];
  return {
    nowMs: () => now,
    sleepMs: (ms) => {
      slept.push(ms);
      now += ms;
      return Promise.resolve();
    },
    slept,
  };
}

function failingTimes(count: number, error: () => Error): { attempt: () => Promise<string>; calls: () => number } {
  let calls = 0;
  return {
    attempt: () => {
      calls += 1;
      return calls <= count ? Promise.reject(error()) : Promise.resolve("open");
    },
    calls: () => calls,
  };
}

const unanswered = (): Error => new BackendUnansweredError("KEYGATE_REDIS_URL: nothing accepts connections at that host and port (ECONNREFUSED)");

describe("untilAnswered.happy", () => {
  it("tries again after 1, 2, 4, then every 5 s, one warning line a failed try, until the backend answers", async () => {
    const time = fakeTime();
    const { logger, lines } = collectingLogger();
    const backend = failingTimes(5, unanswered);
    await expect(untilAnswered(backend.attempt, { giveUpAtMs: 60_000, logger, ...time })).resolves.toBe("open");
    expect(backend.calls()).toBe(6);
    expect(time.slept).toEqual([1000, 2000, 4000, 5000, 5000]);
    expect(lines).toHaveLength(5);
    const first = JSON.parse(lines[0] ?? "{}") as Record<string, unknown>;
    expect(first).toMatchObject({
      level: 40,
      retryInMs: 1000,
      givesUpInMs: 60_000,
      msg: "KEYGATE_REDIS_URL: nothing accepts connections at that host and port (ECONNREFUSED); trying again (the start waits KEYGATE_STARTUP_WAIT_SECONDS)",
    });
  });
});

describe("untilAnswered.error", () => {
  it("gives up with the last error once the wait is over, its last sleep cut to what is left", async () => {
    const time = fakeTime();
    const { logger } = collectingLogger();
    const backend = failingTimes(100, unanswered);
    await expect(untilAnswered(backend.attempt, { giveUpAtMs: 4500, logger, ...time })).rejects.toBeInstanceOf(BackendUnansweredError);
    expect(time.slept).toEqual([1000, 2000, 1500]);
    expect(backend.calls()).toBe(4);
  });

  it("with no wait (KEYGATE_STARTUP_WAIT_SECONDS=0) fails at the first try", async () => {
    const time = fakeTime();
    const { logger, lines } = collectingLogger();
    const backend = failingTimes(1, unanswered);
    await expect(untilAnswered(backend.attempt, { giveUpAtMs: 0, logger, ...time })).rejects.toBeInstanceOf(BackendUnansweredError);
    expect(backend.calls()).toBe(1);
    expect(lines).toEqual([]);
  });

  it("does not try again after a mistake no wait mends (refused credentials)", async () => {
    const time = fakeTime();
    const { logger, lines } = collectingLogger();
    const backend = failingTimes(1, () => new ConfigError("KEYGATE_REDIS_URL: Redis refused the credentials (WRONGPASS)"));
    await expect(untilAnswered(backend.attempt, { giveUpAtMs: 60_000, logger, ...time })).rejects.toThrow("Redis refused the credentials");
    expect(backend.calls()).toBe(1);
    expect(time.slept).toEqual([]);
    expect(lines).toEqual([]);
  });
});

/** An error shaped as the MongoDB driver's, by name and message. */
function driverError(name: string, message: string): Error {
  const error = new Error(message);
  error.name = name;
  return error;
}

describe("which start failures are tried again", () => {
  it("MongoDB: a server that does not answer is; a certificate not trusted and refused credentials are not", () => {
    expect(mongoStartError(driverError("MongoServerSelectionError", "connect ECONNREFUSED 127.0.0.1:27017"))).toBeInstanceOf(BackendUnansweredError);
    expect(mongoStartError(driverError("MongoServerSelectionError", "getaddrinfo ENOTFOUND mongo-0.mongo"))).toBeInstanceOf(BackendUnansweredError);
    expect(mongoStartError(driverError("MongoServerSelectionError", "Server selection timed out after 3000 ms"))).toBeInstanceOf(BackendUnansweredError);
    const untrusted = mongoStartError(driverError("MongoServerSelectionError", "self-signed certificate in certificate chain"));
    expect(untrusted).toBeInstanceOf(ConfigError);
    expect(untrusted).not.toBeInstanceOf(BackendUnansweredError);
    expect(untrusted.message).toMatch(/^KEYGATE_MONGODB_URI: no MongoDB server answered/);
    const refused = mongoStartError(driverError("MongoServerError", "Authentication failed."));
    expect(refused).not.toBeInstanceOf(BackendUnansweredError);
    expect(refused.message).toMatch(/^KEYGATE_MONGODB_URI: MongoDB refused the credentials/);
  });

  it("Redis: refused, unresolved, reset and timed-out connections are; refused credentials and certificates are not", () => {
    const withCode = (code: string, message = code): Error => Object.assign(new Error(message), { code });
    for (const code of ["ECONNREFUSED", "ENOTFOUND", "EAI_AGAIN", "ECONNRESET", "ETIMEDOUT", "EHOSTUNREACH"]) expect(isUnanswered(withCode(code)), code).toBe(true);
    expect(isUnanswered(new Error("All sentinels are unreachable. Retrying from scratch after 10ms."))).toBe(true);
    expect(isUnanswered(new Error("Failed to refresh slots cache."))).toBe(true);
    expect(isUnanswered(new Error("no ready connection within 5000 ms (timeout)"))).toBe(true);
    expect(isUnanswered(new Error("WRONGPASS invalid username-password pair or user is disabled."))).toBe(false);
    expect(isUnanswered(new Error("NOAUTH Authentication required."))).toBe(false);
    expect(isUnanswered(withCode("UNABLE_TO_VERIFY_LEAF_SIGNATURE", "unable to verify the first certificate"))).toBe(false);
    expect(isUnanswered(withCode("ERR_TLS_CERT_ALTNAME_INVALID", "Hostname/IP does not match certificate's altnames"))).toBe(false);
  });
});
