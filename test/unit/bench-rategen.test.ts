import { spawnSync } from "node:child_process";
import { join, resolve } from "node:path";
import { describe, expect, it } from "vitest";
import { parseRategenReport, rategenInstallPath } from "../../bench/rategen.js";

const root = resolve(import.meta.dirname, "../..");

/** A report as rategen prints it, with `overrides` applied. */
function report(overrides: Record<string, unknown> = {}): string {
  return JSON.stringify({
    tool: "rategen",
    targetRps: 3000,
    concurrency: 0,
    connections: 2,
    durationSeconds: 2,
    timeoutSeconds: 10,
    timer: "timerfd",
    scheduled: 6000,
    sent: 5990,
    completed: 5980,
    dropped: 10,
    timedOut: 4,
    transportErrors: 6,
    seconds: 2.5,
    rps: 2392,
    statusCodes: { OK: 5970, Unavailable: 10 },
    errorMessages: { "stream reset by the server: REFUSED_STREAM": 6 },
    latencyMs: { mean: 0.9, p50: 0.4, p90: 1.2, p99: 3.5, p999: 9.25, max: 12 },
    sendLagMs: { p50: 0.03, p99: 0.5, max: 2 },
    latencyMeasured: "from each request's scheduled send time",
    ...overrides,
  });
}

describe("bench rategen (open-loop fixed-rate load generator)", () => {
  it("maps its report to the fixed-rate row: every call that was not a gRPC OK answer is an error", () => {
    const result = parseRategenReport(`some stderr noise\n${report()}\n`);
    expect(result.tool).toBe("rategen");
    expect(result.requests).toBe(5980);
    expect(result.seconds).toBe(2.5);
    expect(result.rps).toBe(2392);
    expect(result.latencyMs).toEqual({ average: 0.9, p50: 0.4, p90: 1.2, p99: 3.5, max: 12 });
    // Timeouts are DeadlineExceeded, as ghz counts its own.
    expect(result.statusCodes).toEqual({ OK: 5970, Unavailable: 10, DeadlineExceeded: 4 });
    // 10 Unavailable + 4 timed out + 6 transport errors + 10 dropped.
    expect(result.errors).toBe(30);
    expect(result.errorMessages).toEqual({
      "stream reset by the server: REFUSED_STREAM": 6,
      "dropped: more than -max-inflight calls in flight": 10,
      "no answer within the timeout": 4,
    });
    expect(result.openLoop).toEqual({ scheduled: 6000, sent: 5990, dropped: 10, timedOut: 4, transportErrors: 6, p999Ms: 9.25, sendLagMs: { p50: 0.03, p99: 0.5, max: 2 }, timer: "timerfd" });
  });

  it("says a closed-loop run is one, with its calls in flight", () => {
    const result = parseRategenReport(report({ targetRps: 0, concurrency: 64, scheduled: 5990, dropped: 0 }));
    expect(result.endReason).toBe("closed loop: 64 in flight, 5990 sent");
    expect(parseRategenReport(report()).endReason).toBe("open loop: 6000 scheduled, 5990 sent");
  });

  it("reads a run with no answer as NaN latencies and zero errors only when nothing failed", () => {
    const none = { mean: null, p50: null, p90: null, p99: null, p999: null, max: null };
    const result = parseRategenReport(report({ completed: 0, sent: 0, dropped: 0, timedOut: 0, transportErrors: 0, statusCodes: {}, errorMessages: {}, latencyMs: none, sendLagMs: { p50: null, p99: null, max: null } }));
    expect(result.requests).toBe(0);
    expect(result.errors).toBe(0);
    expect(Number.isNaN(result.latencyMs.p99)).toBe(true);
    expect(Number.isNaN(result.openLoop?.p999Ms)).toBe(true);
  });

  it("refuses a report that is not rategen's", () => {
    expect(() => parseRategenReport(report({ tool: "ghz" }))).toThrow(/tool/);
    expect(() => parseRategenReport(report({ completed: -1 }))).toThrow(/completed/);
    expect(() => parseRategenReport("rategen: -rate: must be above 0\n")).toThrow(SyntaxError);
  });

  it("looks for the binary where bench/install-rategen.sh builds it: both hash the same source the same way", () => {
    const printed = spawnSync("bash", [join(root, "bench/install-rategen.sh"), "--print-path"], { encoding: "utf8" });
    expect(printed.stderr).toBe("");
    expect(printed.status).toBe(0);
    expect(printed.stdout.trim()).toBe(rategenInstallPath());
    expect(rategenInstallPath()).toMatch(/\/rategen-[0-9a-f]{16}$/);
  });
});
