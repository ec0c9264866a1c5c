import { describe, expect, it } from "vitest";
import { Metrics } from "../../src/server/metrics.js";

// /metrics needs no token: each scrape rendered the registry on its own, so a flood of them
// (pipelined on one connection, or HTTP/2 streams) built and held one ~10 KiB text each.
// Scrapes while a render runs share it; none is kept after, so a scrape that follows a Check
// counts it (test/integration/check-defect-counted.test.ts scrapes, acts and scrapes again).

describe("Metrics.render: one render for the scrapes that arrive while it runs", () => {
  it("scrapes during a render share it; the next scrape renders again and sees what was counted since", async () => {
    const metrics = new Metrics({ defaultMetrics: false });
    let readyAsked = 0;
    let answerReady: (ready: boolean) => void = () => undefined;
    metrics.watchReady(() => {
      readyAsked += 1;
      return new Promise<boolean>((resolve) => (answerReady = resolve));
    });
    metrics.recordCheck("grpc", "OK", 0, 1);
    const first = metrics.render();
    const second = metrics.render();
    expect(second).toBe(first);
    expect(readyAsked).toBe(1);
    answerReady(true);
    const text = await first;
    expect(text).toContain('keygate_checks_total{decision="allow",reason="OK",mode="grpc"} 1\n');
    expect(text).toContain("\nkeygate_ready 1\n");

    metrics.recordCheck("grpc", "OK", 0, 1);
    const third = metrics.render();
    expect(third).not.toBe(first);
    expect(readyAsked).toBe(2);
    answerReady(false);
    const after = await third;
    expect(after).toContain('keygate_checks_total{decision="allow",reason="OK",mode="grpc"} 2\n');
    expect(after).toContain("\nkeygate_ready 0\n");
  });

  it("error: a failed render fails every scrape that shared it, and the next scrape renders again", async () => {
    const metrics = new Metrics({ defaultMetrics: false });
    let ready: () => Promise<boolean> = () => Promise.reject(new Error("store ping threw"));
    metrics.watchReady(() => ready());
    const first = metrics.render();
    const second = metrics.render();
    expect(second).toBe(first);
    await expect(first).rejects.toThrow("store ping threw");
    ready = () => Promise.resolve(true);
    expect(await metrics.render()).toContain("\nkeygate_ready 1\n");
  });
});
