import { describe, expect, it } from "vitest";
import { budget, summarizeTurns, turnsText } from "../../bench/report.js";
import type { TurnRun, TurnScenario } from "../../bench/scenarios.js";

const run = (target: string, round: number, cpuMicrosPerCheck: number, errors = 0, scenario: TurnScenario = "hot"): TurnRun => ({ scenario, target, round, cpuMicrosPerCheck, checks: 100_000, errors });

describe("bench scenarios in turns", () => {
  it("judges keygate's median CPU per Check over the ceiling's, each from its own runs", () => {
    const runs = [run("noop-h2", 1, 24), run("embedded", 1, 36), run("embedded", 2, 33), run("noop-h2", 2, 22), run("noop-h2", 3, 23), run("embedded", 3, 40)];
    const turns = summarizeTurns(runs, "noop-h2", "embedded");
    expect(turns).toStrictEqual({
      scenario: "hot",
      ceiling: { target: "noop-h2", micros: [24, 22, 23], median: 23, errors: 0 },
      keygate: { target: "embedded", micros: [36, 33, 40], median: 36, errors: 0 },
      ratio: 1.565,
    });
    const lines = budget([], [], null, [], [turns!]).filter((l) => l.goal.includes("in turns"));
    expect(lines).toStrictEqual([{ goal: "embedded hot (rategen closed loop, in turns with noop-h2, median of 3): CPU per Check <= 1.5x noop-h2", measured: "1.56x", met: false }]);
    expect(turnsText(turns!)).toContain("embedded / noop-h2: 1.565x (medians)");
  });

  it("takes the middle two's mean for an even count, and judges nothing when a call failed", () => {
    const even = summarizeTurns([run("noop-h2", 1, 20), run("noop-h2", 2, 22), run("embedded", 1, 30), run("embedded", 2, 29)], "noop-h2", "embedded");
    expect(even?.ceiling.median).toBe(21);
    expect(even?.keygate.median).toBe(29.5);
    expect(even?.ratio).toBe(1.405);
    const failed = summarizeTurns([run("noop-h2", 1, 20), run("embedded", 1, 25, 3)], "noop-h2", "embedded");
    expect(failed?.ratio).toBeNull();
    expect(failed?.keygate.errors).toBe(3);
    expect(summarizeTurns([run("noop-h2", 1, 20)], "noop-h2", "embedded")).toBeNull();
  });

  it("keeps each scenario's runs apart and judges flood-malformed against 1.2x", () => {
    const runs = [run("noop-h2", 1, 24), run("embedded", 1, 36), run("noop-h2", 1, 20, 0, "flood-malformed"), run("embedded", 1, 25, 0, "flood-malformed")];
    const hot = summarizeTurns(runs, "noop-h2", "embedded", "hot");
    const malformed = summarizeTurns(runs, "noop-h2", "embedded", "flood-malformed");
    expect(hot?.ratio).toBe(1.5);
    expect(malformed).toStrictEqual({
      scenario: "flood-malformed",
      ceiling: { target: "noop-h2", micros: [20], median: 20, errors: 0 },
      keygate: { target: "embedded", micros: [25], median: 25, errors: 0 },
      ratio: 1.25,
    });
    const lines = budget([], [], null, [], [hot!, malformed!]).filter((l) => l.goal.includes("in turns"));
    expect(lines).toStrictEqual([
      { goal: "embedded hot (rategen closed loop, in turns with noop-h2, median of 1): CPU per Check <= 1.5x noop-h2", measured: "1.50x", met: true },
      { goal: "embedded flood-malformed (rategen closed loop, in turns with noop-h2, median of 1): CPU per Check <= 1.2x noop-h2", measured: "1.25x", met: false },
    ]);
    expect(turnsText(malformed!)).toContain("flood-malformed in turns (rategen closed loop");
  });
});
