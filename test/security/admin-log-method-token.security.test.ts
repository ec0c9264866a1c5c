import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ADMIN_TOKEN, postJson, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

// A failed admin login logged `method`, the path's last segment, cut to 200 characters. The
// logger redacts configured admin tokens by their exact text, after the cut: a token straddling
// character 200 was no longer its text, and its first part went into the log. An operator's
// token need not look like kgadm_… (any 24 characters or more), so only the exact match protects
// it. A segment that is no KeyAdmin method is now logged by its length alone.

const OPERATOR_TOKEN = "opsAdminToken9f8e7d6c5b4a3928170615243342";

let kg: TestKeygate;
beforeAll(async () => {
  kg = await startKeygate({ env: { KEYGATE_ADMIN_TOKENS: `${ADMIN_TOKEN},${OPERATOR_TOKEN}` } });
});
afterAll(async () => {
  await kg.stop();
});

describe("admin port security: a failed login's log line holds no part of an admin token sent as the method", () => {
  // 190 and 160 put the cut at 200 inside the token (its first 10 or 40 characters before it); 0, the token alone.
  it.each([190, 160, 0])("a method name of %i characters, then an admin token, no Authorization: 401, its length logged, no part of the token", async (prefix) => {
    const from = kg.logLines.length;
    const answer = await postJson(kg.ports.admin, `${"M".repeat(prefix)}${OPERATOR_TOKEN}`, {}, null);
    expect(answer.status).toBe(401);
    const lines = kg.logLines.slice(from);
    const line = lines.find((l) => l.includes("admin authentication failed"));
    if (line === undefined) throw new Error("no failed authentication was logged");
    const fields = JSON.parse(line) as Record<string, unknown>;
    expect({ method: fields["method"], methodLength: fields["methodLength"] }).toEqual({ method: undefined, methodLength: prefix + OPERATOR_TOKEN.length });
    expect(lines.join("")).not.toContain(OPERATOR_TOKEN.slice(0, 8));
  });
});
