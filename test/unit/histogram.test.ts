import fc from "fast-check";
import { Histogram, Registry } from "prom-client";
import { describe, expect, it } from "vitest";
import { OneLabelHistogram } from "../../src/server/histogram.js";

const BOUNDS = [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1];

describe("OneLabelHistogram", () => {
  it("reads out as prom-client's Histogram fed the same observations: exposition text and JSON", async () => {
    const observation = fc.tuple(
      fc.constantFrom("grpc", "http", "a\"b\\c"),
      fc.oneof(fc.double({ min: 0, max: 2, noNaN: true }), fc.constantFrom(...BOUNDS), fc.constant(0), fc.constant(5)),
    );
    await fc.assert(
      fc.asyncProperty(fc.array(observation, { maxLength: 200 }), async (observations) => {
        const reference = new Registry();
        const ours = new Registry();
        const histogram = new Histogram({ name: "h_seconds", help: "help \\ text", labelNames: ["mode"], buckets: BOUNDS, registers: [reference] });
        const fast = new OneLabelHistogram("h_seconds", "help \\ text", "mode", BOUNDS, [ours]);
        for (const [mode, value] of observations) {
          histogram.labels(mode).observe(value);
          fast.cell(mode).observe(value);
        }
        expect(await ours.metrics()).toBe(await reference.metrics());
        expect(await ours.getMetricsAsJSON()).toEqual(await reference.getMetricsAsJSON());
      }),
      { numRuns: 200, seed: 13 },
    );
  });

  it("counts a value on a bound in that bound's bucket, one past the last only in +Inf, and resets", async () => {
    const registry = new Registry();
    const fast = new OneLabelHistogram("h_seconds", "h", "mode", [0.1, 1], [registry]);
    const cell = fast.cell("grpc");
    cell.observe(0.1);
    cell.observe(1.5);
    const text = await registry.metrics();
    expect(text).toContain('h_seconds_bucket{le="0.1",mode="grpc"} 1\n');
    expect(text).toContain('h_seconds_bucket{le="1",mode="grpc"} 1\n');
    expect(text).toContain('h_seconds_bucket{le="+Inf",mode="grpc"} 2\n');
    expect(text).toContain('h_seconds_count{mode="grpc"} 2\n');
    expect(text).toContain('h_seconds_sum{mode="grpc"} 1.6\n');
    registry.resetMetrics();
    expect(await registry.metrics()).not.toContain("h_seconds_bucket");
  });
});
