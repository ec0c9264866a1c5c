import { Writable } from "node:stream";
import { describe, expect, it } from "vitest";
import { redactText } from "../../src/keys/redact.js";
import { createLogger } from "../../src/server/logger.js";

// A configured secret (Redis/MongoDB password, admin token, pepper) must vanish whole from a log
// line or start error (README, "Logs"), also where part of it has a secret's shape: replaced
// after the shape, the literal would no longer occur, and the rest of the secret would be printed.
const PASSWORD = "stage_test_Passw0rd.q7#Vm2!Lp9xZr4Tk"; // a Redis password an operator might choose
const TOKEN = "ops_live_ci1234567;Rk8vQ2mX7pLz9Wc4Yt6N"; // an admin token (>= 24 chars, no comma)
const HEX_PEPPER = `${"0123456789abcdef".repeat(4)}.tail-Of-The-Pepper-42`; // KEYGATE_PEPPER

describe("literal secrets are redacted whole, even where part of one has a secret's shape", () => {
  it("redactText removes every configured secret whole", () => {
    for (const secret of [PASSWORD, TOKEN, HEX_PEPPER]) {
      const out = redactText(`connect failed: redis://:${secret}@redis:6379 (${secret})`, [secret]);
      expect(out).toBe("connect failed: redis://:[redacted]@redis:6379 ([redacted])");
    }
  });

  it("a log line through createLogger carries no part of a configured secret", () => {
    const lines: string[] = [];
    const sink = new Writable({
      write(chunk: Buffer, _e, cb) {
        lines.push(chunk.toString("utf8"));
        cb();
      },
    });
    const secrets = [PASSWORD, TOKEN, HEX_PEPPER].sort((a, b) => b.length - a.length);
    const logger = createLogger("info", sink, secrets);
    logger.error({ err: new Error(`ERR AUTH failed for redis://:${PASSWORD}@redis:6379`) }, "Redis limits failed");
    logger.warn({ detail: `token ${TOKEN} rejected` }, `pepper ${HEX_PEPPER} in use`);
    const text = lines.join("");
    expect(text).not.toContain("q7#Vm2!Lp9xZr4Tk");
    expect(text).not.toContain("Rk8vQ2mX7pLz9Wc4Yt6N");
    expect(text).not.toContain("tail-Of-The-Pepper-42");
  });
});
