import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { stringify } from "yaml";
import { describe, expect, it } from "vitest";
import { TEST_POLICY, postJson, startKeygate } from "../harness/keygate.js";

// A token is named in logs by its id, never by itself: the refusal of a call its token may not
// make says which token it was, under a field the log scrubber does not blank.
describe("a permission refusal is logged with the token's id", () => {
  it("the log line names the token by id (not [redacted]) and holds no token", async () => {
    const dir = mkdtempSync(join(tmpdir(), "keygate-tokens-"));
    const path = join(dir, "admin-tokens.yaml");
    const token = "usage-reader-token-0123456789abcdef";
    writeFileSync(path, stringify({ tokens: [{ name: "usage-reader", token, permissions: ["usage:read"] }] }));
    const kg = await startKeygate({ policy: TEST_POLICY, env: { KEYGATE_ADMIN_TOKENS_FILE: path } });
    try {
      expect((await postJson(kg.ports.admin, "CreateKey", { ownerId: "o", name: "n" }, token)).status).toBe(403);
      const line = kg.logLines.find((l) => l.includes("admin call refused: missing permission")) ?? "";
      expect(line).not.toBe("");
      expect(line.includes(token)).toBe(false);
      expect(line).toContain('"usage-reader"');
    } finally {
      await kg.stop();
    }
  });
});
