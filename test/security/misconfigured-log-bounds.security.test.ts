import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { KeyFormat } from "../../src/keys/key-format.js";
import { checkInit, checkOutcome, startKeygate } from "../harness/keygate.js";
import type { TestKeygate } from "../harness/keygate.js";

// A Check with unusable per-route settings (context_extensions) is a ROUTE_MISCONFIGURED denial,
// reached after only the key's public CRC32 check, and a client talking to the Check port can
// send a setting of up to the 4 MiB message limit, a new one each time. Its error line used to be
// throttled on all the extensions stringified and to carry them whole: each such Check wrote a
// line of a megabyte, scanned for secrets character by character (~94 ms of CPU against ~12 ms
// for the same bytes in an extension keygate ignores), and kept the megabyte as a throttle key
// (256 of them). The line now shows only keygate's own settings: a value of up to 64 characters
// whole (scrubbed like the whole line), a longer one by its length alone. A cut piece of a long
// one was tried first: it could hold part of a key, a hash or the pepper that no longer had its
// shape or its whole text for the log's scrubber to find.

const MSG = "bad per-route settings from the proxy";
const MiB = 1024 * 1024;
const HEAD = 64;

interface MisconfiguredLine {
  level: number;
  contextExtensions: Record<string, string>;
  since: number;
}

/** How the line shows a setting longer than HEAD. */
function notShown(value: string): string {
  return `[${value.length} characters, not shown]`;
}

let kg: TestKeygate;
const format = new KeyFormat("kg");
/** Well-formed and never issued: the routes step is reached without a key. */
const forged = format.generate("live");

beforeAll(async () => {
  kg = await startKeygate();
});
afterAll(async () => {
  await kg?.stop();
});

/** Sends one Check with these per-route settings; it must be refused as ROUTE_MISCONFIGURED. */
async function misconfigured(extensions: Record<string, string>): Promise<void> {
  expect(checkOutcome(await kg.check(checkInit({ "x-api-key": forged }, "/v1/things", "GET", extensions)))).toEqual({ status: 500, code: "ROUTE_MISCONFIGURED" });
}

/** The error lines written since `from` (an index into kg.logLines), raw. */
function linesSince(from: number): string[] {
  return kg.logLines.slice(from).filter((line) => line.includes(MSG));
}

describe("the ROUTE_MISCONFIGURED error line, security", () => {
  it("shows a megabyte setting by its length, and leaves out extensions keygate ignores", async () => {
    const from = kg.logLines.length;
    // Eight distinct values of distinct lengths: eight lines, none holding a megabyte.
    const values = Array.from({ length: 8 }, (_, i) => `${i.toString().padStart(8, "0")}${"Z".repeat(MiB + i)}`);
    for (const cost of values) await misconfigured({ cost, note: `${cost}-ignored` });
    const lines = linesSince(from);
    expect(lines).toHaveLength(values.length);
    for (const [i, line] of lines.entries()) {
      expect(Buffer.byteLength(line)).toBeLessThan(1024);
      const parsed = JSON.parse(line) as MisconfiguredLine;
      expect(parsed.level).toBe(50);
      expect(parsed.contextExtensions).toEqual({ cost: notShown(values[i] as string) });
      expect(parsed.since).toBe(0);
    }
  });

  it("throttles long settings on their lengths: values of one length are one line, whatever they hold", async () => {
    const from = kg.logLines.length;
    const values = ["q", "r", "s"].map((c) => `quota-${c.repeat(2 * HEAD)}`);
    for (const quota of values) await misconfigured({ quota });
    const lines = linesSince(from);
    expect(lines).toHaveLength(1);
    expect((JSON.parse(lines[0] as string) as MisconfiguredLine).contextExtensions).toEqual({ quota: notShown(values[0] as string) });
  });

  it("shows a setting of up to 64 characters whole, a secret in it scrubbed", async () => {
    const from = kg.logLines.length;
    const key = format.generate("live");
    const cost = `c-${key}`;
    expect(cost.length).toBeLessThanOrEqual(HEAD);
    await misconfigured({ cost, quota: "free-for-all" });
    const lines = linesSince(from);
    expect(lines).toHaveLength(1);
    expect(lines[0]).not.toContain(key.slice(0, 12));
    expect((JSON.parse(lines[0] as string) as MisconfiguredLine).contextExtensions).toEqual({ cost: "c-[redacted]", quota: "free-for-all" });
  });

  it("shows none of a long setting's characters, so no piece of a key in it", async () => {
    const from = kg.logLines.length;
    const key = format.generate("live");
    // A key straddling character 64, and one past 256 behind a long key-shaped run.
    const straddling = `${"c".repeat(49)}-${key}`;
    const far = `x_live_${"A".repeat(233)}-${key}`;
    await misconfigured({ cost: straddling });
    await misconfigured({ cost: far });
    const lines = linesSince(from);
    expect(lines).toHaveLength(2);
    for (const line of lines) expect(line).not.toContain(key.slice(0, 11));
    expect(lines.map((line) => (JSON.parse(line) as MisconfiguredLine).contextExtensions)).toEqual([{ cost: notShown(straddling) }, { cost: notShown(far) }]);
  });
});
