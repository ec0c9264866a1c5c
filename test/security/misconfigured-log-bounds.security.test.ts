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
// (256 of them). The line now shows only keygate's own settings, each cut to 64 characters with
// its length, and is throttled on those heads.

const MSG = "bad per-route settings from the proxy";
const MiB = 1024 * 1024;
const HEAD = 64;

interface MisconfiguredLine {
  level: number;
  contextExtensions: Record<string, string>;
  contextExtensionLengths: Record<string, number>;
  since: number;
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
  it("shows a megabyte setting as its first 64 characters and its length, and leaves out extensions keygate ignores", async () => {
    const from = kg.logLines.length;
    // Not hex: 64 hex digits cut from a longer run look like a key hash, which the log redacts.
    const values = Array.from({ length: 8 }, (_, i) => `${i.toString().padStart(8, "0")}${"Z".repeat(MiB)}`);
    for (const cost of values) await misconfigured({ cost, note: `${cost}-ignored` });
    const lines = linesSince(from);
    // Each value's head differs, so each is a line of its own, as many as there were settings.
    expect(lines).toHaveLength(values.length);
    for (const [i, line] of lines.entries()) {
      expect(Buffer.byteLength(line)).toBeLessThan(1024);
      const parsed = JSON.parse(line) as MisconfiguredLine;
      expect(parsed.level).toBe(50);
      expect(parsed.contextExtensions).toEqual({ cost: `${(values[i] as string).slice(0, HEAD)}…` });
      expect(parsed.contextExtensionLengths).toEqual({ cost: 8 + MiB });
      expect(parsed.since).toBe(0);
    }
  }, 60_000);

  it("throttles settings on their heads: values that differ only past 64 characters are one line", async () => {
    const from = kg.logLines.length;
    const head = `quota-${"q".repeat(HEAD)}`.slice(0, HEAD);
    for (let i = 0; i < 5; i++) await misconfigured({ quota: `${head}${i}${"z".repeat(MiB)}` });
    const lines = linesSince(from);
    expect(lines).toHaveLength(1);
    expect((JSON.parse(lines[0] as string) as MisconfiguredLine).contextExtensions).toEqual({ quota: `${head}…` });
  }, 60_000);

  it("never cuts a surrogate pair in half", async () => {
    const from = kg.logLines.length;
    // The emoji's high surrogate is the 64th code unit: the head keeps 63.
    const cost = `${"s".repeat(HEAD - 1)}😀${"t".repeat(100)}`;
    await misconfigured({ cost });
    const lines = linesSince(from);
    expect(lines).toHaveLength(1);
    const parsed = JSON.parse(lines[0] as string) as MisconfiguredLine;
    expect(parsed.contextExtensions).toEqual({ cost: `${"s".repeat(HEAD - 1)}…` });
    expect(parsed.contextExtensionLengths).toEqual({ cost: cost.length });
  });

  it("redacts a key the cut would leave too short to look like one", async () => {
    const from = kg.logLines.length;
    const key = format.generate("live");
    // "kg_live_" ends at 58: cut first, the head would hold 6 of the key's characters, which the
    // log's scrubber (8 or more after "_live_") would let through.
    const cost = `${"c".repeat(49)}-${key}`;
    await misconfigured({ cost });
    const lines = linesSince(from);
    expect(lines).toHaveLength(1);
    expect(lines[0]).not.toContain(key.slice(0, HEAD - 50));
    expect((JSON.parse(lines[0] as string) as MisconfiguredLine).contextExtensions).toEqual({ cost: `${"c".repeat(49)}-[redacted]…` });
  });
});
