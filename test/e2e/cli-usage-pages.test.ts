import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { runBuiltCli } from "../harness/built-cli.js";
import type { CliResult } from "../harness/built-cli.js";
import { ADMIN_TOKEN, postJson, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

// `keygate usage` follows GetUsage's next_page_token until the last page and prints one report of
// every row: a report of the first page alone would be a bill short of the rest, with nothing to
// say so. Its --json is the answer as KeyAdmin gives it without page_size.

const OWNER = "cli-usage-pages";
const RANGE = ["--from", "2026-05-01", "--to", "2026-05-03"];

describe("keygate usage over several pages", { timeout: 60_000 }, () => {
  let kg: TestKeygate;
  const cli = (args: readonly string[]): Promise<CliResult> => runBuiltCli(args, { url: `http://127.0.0.1:${kg.ports.admin}`, adminToken: ADMIN_TOKEN, timeoutMs: 20_000 });

  beforeAll(async () => {
    kg = await startKeygate();
    await kg.admin.upsertAccount({ ownerId: OWNER });
    const row = { ownerId: OWNER, outcome: "ALLOWED", count: 2, credits: 1 };
    await kg.app.store.applyUsage(
      [
        { ...row, keyId: "key_00000000000000000000000001", day: "2026-05-01" },
        { ...row, keyId: "key_00000000000000000000000002", day: "2026-05-01" },
        { ...row, keyId: "key_00000000000000000000000002", day: "2026-05-01", outcome: "RATE_LIMITED", count: 1, credits: 0 },
        { ...row, keyId: "key_00000000000000000000000001", day: "2026-05-02" },
        { ...row, keyId: "key_00000000000000000000000001", day: "2026-05-03" },
        { ...row, keyId: "key_00000000000000000000000002", day: "2026-05-03" },
      ],
      [],
    );
  });
  afterAll(async () => kg?.stop());

  it("happy: --page-size 2 fetches all 3 pages: --json is the whole range's answer, the table has every row", async () => {
    const [asJson, human] = await Promise.all([cli(["usage", OWNER, ...RANGE, "--page-size", "2", "--json"]), cli(["usage", OWNER, ...RANGE, "--page-size", "2"])]);
    const whole = await postJson(kg.ports.admin, "GetUsage", { ownerId: OWNER, from: "2026-05-01", to: "2026-05-03" });
    expect(whole.json["byKey"]).toHaveLength(5);
    expect([asJson.code, asJson.stderr]).toEqual([0, ""]);
    expect(JSON.parse(asJson.stdout)).toEqual(whole.json);
    expect([human.code, human.stderr]).toEqual([0, ""]);
    expect(human.stdout).toMatch(/^allowed:\s+10$/m);
    expect(human.stdout).toMatch(/^denied:\s+RATE_LIMITED=1$/m);
    const rows = human.stdout.split("\n").filter((line) => /^2026-05-0\d\s/.test(line));
    expect(rows.map((line) => line.split(/\s+/).slice(0, 2).join(" "))).toEqual([
      "2026-05-01 key_00000000000000000000000001",
      "2026-05-01 key_00000000000000000000000002",
      "2026-05-02 key_00000000000000000000000001",
      "2026-05-03 key_00000000000000000000000001",
      "2026-05-03 key_00000000000000000000000002",
    ]);
    expect(human.stdout).not.toMatch(/more:|page-token/);
  });

  it("error: --page-size 0 is bad usage (exit 2): sent, it would ask for the whole range in one answer", async () => {
    const result = await cli(["usage", OWNER, ...RANGE, "--page-size", "0"]);
    expect(result.code).toBe(2);
    expect(result.stderr.split("\n")[0]).toMatch(/--page-size.*must be between 1 and 1000/);
  });

  it("error: --page-size past 1000 is refused by keygate naming page_size (exit 1)", async () => {
    const result = await cli(["usage", OWNER, ...RANGE, "--page-size", "1001"]);
    expect(result.code).toBe(1);
    expect(result.stderr).toMatch(/page_size: must be between 0 and 1000/);
  });
});
