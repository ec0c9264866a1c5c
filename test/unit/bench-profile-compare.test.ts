import { describe, expect, it } from "vitest";
import { busyMicrosPerCheck, costByCategory } from "../../bench/profile.js";
import type { ProfiledRun } from "../../bench/profile.js";
import { profileComparisonText } from "../../bench/report.js";

// The bench profiles keygate and the node:http2 no-op under the same one-key load and reports
// busy main-thread time a Check by where the code lives, side by side.

function run(target: string, rps: number, idlePercent: number, byCategory: Array<[string, number]>): ProfiledRun {
  return {
    target,
    scenario: "one key (h2load)",
    rps,
    profile: { samples: 1000, windowSeconds: 6, idlePercent, top: [], byCategory: byCategory.map(([category, selfPercent]) => ({ category, selfPercent })) },
  };
}

describe("bench profile comparison happy", () => {
  it("turns a run's busy share into µs a Check, and splits it by where the code lives", () => {
    // 75 % of one core busy at 25,000 Checks/s: 30 µs a Check.
    const keygate = run("embedded", 25_000, 25, [["node internals", 40], ["keygate dist/authz", 30], ["(garbage collector)", 30]]);
    // 60 % busy at 50,000/s: 12 µs.
    const noop = run("noop-h2", 50_000, 40, [["node internals", 75], ["(garbage collector)", 20], ["other", 5]]);
    expect(busyMicrosPerCheck(keygate)).toBeCloseTo(30, 10);
    expect(busyMicrosPerCheck(noop)).toBeCloseTo(12, 10);
    expect(costByCategory(keygate, noop)).toStrictEqual([
      { category: "node internals", target: 12, ceiling: 9 },
      { category: "keygate dist/authz", target: 9, ceiling: 0 },
      { category: "(garbage collector)", target: 9, ceiling: 2.4 },
      { category: "other", target: 0, ceiling: 0.6 },
    ]);
    const text = profileComparisonText([keygate, noop], "noop-h2");
    expect(text.split("\n")[0]).toBe(
      "busy main thread a Check, one key (h2load): embedded 30.0 us, noop-h2 12.0 us (2.50x; CPU per Check above also counts the kernel's share), by where the code lives:",
    );
    expect(text).toContain("keygate dist/authz");
    expect(text.split("\n").find((line) => line.startsWith("(garbage collector)"))?.split(/\s+/)).toStrictEqual(["(garbage", "collector)", "9.00", "2.40", "6.60"]);
  });
});

describe("bench profile comparison error", () => {
  it("prints nothing without both profiles, and no µs for a run that answered nothing", () => {
    const keygate = run("embedded", 25_000, 25, [["node internals", 100]]);
    expect(profileComparisonText([keygate], "noop-h2")).toBe("");
    expect(profileComparisonText([], "noop-h2")).toBe("");
    expect(busyMicrosPerCheck(run("noop-h2", 0, 100, []))).toBeNaN();
  });
});
