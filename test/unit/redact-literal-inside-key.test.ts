import { Writable } from "node:stream";
import { describe, expect, it } from "vitest";
import { connectionPasswords } from "../../src/config.js";
import { KeyFormat } from "../../src/keys/key-format.js";
import { redactText } from "../../src/keys/redact.js";
import { createLogger } from "../../src/server/logger.js";

// A configured literal (URL password, token, pepper) may occur inside a key: a short password such
// as "test" or "live" sits in every key's "kg_test_" / "kg_live_" head, and any short one may sit
// in the random part. The key is still redacted whole: the literal's marker must not split it so
// that the key's shape no longer matches and its random part is printed.
const format = new KeyFormat("kg");

function logged(secrets: readonly string[], line: string): string {
  const lines: string[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _e, cb) {
      lines.push(chunk.toString("utf8"));
      cb();
    },
  });
  createLogger("info", sink, secrets).warn({ detail: line }, line);
  return lines.join("");
}

describe("a configured literal inside a key does not unmask the key", () => {
  it("MongoDB password 'test' (a staging URI): a test key's random part stays out of the log", () => {
    const secrets = connectionPasswords({ redis: undefined, mongodbUri: "mongodb://keygate:test@mongo:27017/keygate" } as never);
    expect(secrets).toEqual(["test"]);
    const key = format.generate("test");
    const body = key.slice("kg_test_".length);
    const text = logged(secrets, `upstream refused the request carrying ${key}`);
    expect(text).not.toContain(body.slice(0, 16));
  });

  it("Redis password 'live': a live key's random part stays out of redactText's answer", () => {
    const key = format.generate("live");
    const body = key.slice("kg_live_".length);
    expect(redactText(`x-api-key ${key}`, ["live"])).not.toContain(body.slice(0, 16));
  });

  it("a 3-character password that happens to occur in the key's random part", () => {
    const key = format.generate("live");
    const body = key.slice("kg_live_".length);
    const password = body.slice(10, 13);
    const out = redactText(`x-api-key ${key}`, [password]);
    // The 25 characters after the password are printed on current code.
    expect(out).not.toContain(body.slice(13, 38));
  });
});
