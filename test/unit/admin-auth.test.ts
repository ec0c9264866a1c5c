import { createHash } from "node:crypto";
import * as crypto from "node:crypto";
import { beforeEach, describe, expect, it, vi } from "vitest";
import { AUTH_FAILURE_LIMIT, AdminAuth, AuthFailureLimiter } from "../../src/admin/auth.js";
import { KeyFormat } from "../../src/keys/key-format.js";

// auth.ts imports timingSafeEqual from node:crypto; wrapping it lets the test count comparisons.
vi.mock("node:crypto", async (importOriginal) => {
  const actual = await importOriginal<typeof import("node:crypto")>();
  return { ...actual, timingSafeEqual: vi.fn(actual.timingSafeEqual) };
});

const format = new KeyFormat("kg");
const TOKENS = ["kgadm_first_token_0123456789abcdef", "kgadm_second_token_0123456789abcdef", "kgadm_third_token_0123456789abcdef"];
const DIGESTS = TOKENS.map((token) => createHash("sha256").update(token, "utf8").digest().toString("hex"));

describe("admin token comparison security", () => {
  const compare = vi.mocked(crypto.timingSafeEqual);
  beforeEach(() => {
    compare.mockClear();
  });

  /** The configured digests compared in one attempt, in order, as hex. */
  function comparedDigests(): string[] {
    return compare.mock.calls.map(([, known]) => Buffer.from(known.buffer, known.byteOffset, known.byteLength).toString("hex"));
  }

  const attempts: Array<[string, string, boolean]> = [
    ["the first token (a match that could stop early)", TOKENS[0] ?? "", true],
    ["the middle token", TOKENS[1] ?? "", true],
    ["the last token", TOKENS[2] ?? "", true],
    ["a wrong token of the same length", `${(TOKENS[0] ?? "").slice(0, -1)}X`, false],
    ["a wrong token of another length", "kgadm_short", false],
    ["a very long token", "t".repeat(10_000), false],
    ["an API key", format.generate("live"), false],
  ];

  it.each(attempts)("compares every configured token, each once, for %s", (_label, token, matches) => {
    const auth = new AdminAuth(TOKENS, format);
    const result = auth.authenticate(`Bearer ${token}`);
    expect(result.ok).toBe(matches);
    expect(comparedDigests()).toEqual(DIGESTS);
    // Equal-length digests are compared, never the raw token, so its length cannot leak.
    for (const [candidate] of compare.mock.calls) expect(candidate.byteLength).toBe(32);
  });

  it("identifies the matching token by its id, whichever position it holds", () => {
    const auth = new AdminAuth(TOKENS, format);
    const ids = TOKENS.map((token) => {
      const result = auth.authenticate(`Bearer ${token}`);
      return result.ok ? result.tokenId : null;
    });
    expect(ids).toEqual(DIGESTS.map((d) => `tok_${d.slice(0, 8)}`));
    expect(new Set(ids).size).toBe(TOKENS.length);
  });

  it("tells an API key used as an admin token apart, without revealing anything about the tokens", () => {
    const auth = new AdminAuth(TOKENS, format);
    expect(auth.authenticate(`Bearer ${format.generate("live")}`)).toEqual({ ok: false, message: "API keys cannot manage keys; use an admin token" });
    expect(auth.authenticate("Bearer nope")).toEqual({ ok: false, message: "the admin token is not valid" });
    expect(auth.authenticate(null)).toMatchObject({ ok: false });
    expect(auth.authenticate(`Basic ${TOKENS[0] ?? ""}`)).toMatchObject({ ok: false });
  });
});

describe("admin authentication failure limit", () => {
  const intervalMs = (AUTH_FAILURE_LIMIT.windowSeconds * 1000) / AUTH_FAILURE_LIMIT.limit;

  function limiterAt(startMs: number): { limiter: AuthFailureLimiter; advance(ms: number): void } {
    let nowMs = startMs;
    return {
      limiter: new AuthFailureLimiter(() => nowMs),
      advance(ms: number) {
        nowMs += ms;
      },
    };
  }

  it("allows a burst of failures, then blocks that source only", () => {
    const { limiter } = limiterAt(1_700_000_000_000);
    for (let i = 0; i < AUTH_FAILURE_LIMIT.limit; i++) {
      expect(limiter.blockedForSeconds("10.0.0.1")).toBe(0);
      limiter.fail("10.0.0.1");
    }
    expect(limiter.blockedForSeconds("10.0.0.1")).toBe(intervalMs / 1000);
    expect(limiter.blockedForSeconds("10.0.0.2")).toBe(0);
  });

  it("decays: one more attempt per interval, and the full burst back after the window", () => {
    const { limiter, advance } = limiterAt(1_700_000_000_000);
    for (let i = 0; i < AUTH_FAILURE_LIMIT.limit; i++) limiter.fail("src");
    advance(intervalMs - 1);
    expect(limiter.blockedForSeconds("src")).toBeGreaterThan(0);
    advance(1);
    expect(limiter.blockedForSeconds("src")).toBe(0);
    limiter.fail("src");
    expect(limiter.blockedForSeconds("src")).toBeGreaterThan(0);

    advance(AUTH_FAILURE_LIMIT.windowSeconds * 1000);
    for (let i = 0; i < AUTH_FAILURE_LIMIT.limit; i++) {
      expect(limiter.blockedForSeconds("src"), `attempt ${i + 1} after the window`).toBe(0);
      limiter.fail("src");
    }
    expect(limiter.blockedForSeconds("src")).toBeGreaterThan(0);
  });
});
