import { describe, expect, it } from "vitest";
import { Metrics } from "../../src/server/metrics.js";

// Metrics.render (9809c58) hands every scrape that arrives while a render runs that render's text.
// prom-client reads every synchronous collect() (keygate_checks_total included) when the render
// STARTS, then awaits keygate_ready's collect (the shared store ping, up to 2 s on a slow store;
// MongoDB: one round trip whenever the 1 s cached answer has expired). A scrape that starts after
// a Check has completed, but while an earlier scrape's render waits for the ping, answers counts
// read before that Check: contrary to "a scrape that follows a Check counts it" (README).

describe("/metrics shared render: a scrape that starts after a Check counts it", () => {
  it("a scrape joining a render begun before the Check still counts the Check", async () => {
    const metrics = new Metrics({ defaultMetrics: false });
    let answerPing: (ready: boolean) => void = () => undefined;
    metrics.watchReady(() => new Promise<boolean>((resolve) => (answerPing = resolve)));
    metrics.recordCheck("grpc", "OK", 0, 1);
    const earlierScrape = metrics.render(); // e.g. the second Prometheus of an HA pair; the store ping is slow
    metrics.recordCheck("grpc", "OK", 0, 1); // a Check completes
    const laterScrape = metrics.render(); // starts after the Check completed
    answerPing(true);
    await earlierScrape;
    const text = await laterScrape;
    expect(text).toContain('keygate_checks_total{decision="allow",reason="OK",mode="grpc"} 2\n');
  });
});
