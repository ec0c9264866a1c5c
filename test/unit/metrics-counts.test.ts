import { describe, expect, it } from "vitest";
import { Metrics } from "../../src/server/metrics.js";

/** The value of one series in the exposition text, or null when it is absent. */
function series(text: string, name: string, labels: string): number | null {
  const line = text.split("\n").find((l) => l.startsWith(`${name}{${labels}} `));
  return line === undefined ? null : Number(line.slice(line.lastIndexOf(" ") + 1));
}

describe("Metrics: Check and cache counts kept as numbers, reported at each scrape", () => {
  it("reports each count once, whatever the number of scrapes between them", async () => {
    const metrics = new Metrics({ defaultMetrics: false });
    for (let i = 0; i < 3; i++) metrics.recordCheck("grpc", "OK", 0, 1);
    metrics.recordCheck("grpc", "KEY_REVOKED", 0, 1);
    metrics.recordCheck("http", "UNAVAILABLE", 0, 1);
    metrics.cacheResult("l1", "hit");
    metrics.cacheResult("l1", "miss");
    metrics.cacheResult("l1", "hit");
    let text = await metrics.registry.metrics();
    expect(series(text, "keygate_checks_total", 'decision="allow",reason="OK",mode="grpc"')).toBe(3);
    expect(series(text, "keygate_checks_total", 'decision="deny",reason="KEY_REVOKED",mode="grpc"')).toBe(1);
    expect(series(text, "keygate_checks_total", 'decision="error",reason="UNAVAILABLE",mode="http"')).toBe(1);
    expect(series(text, "keygate_cache_lookups_total", 'layer="l1",result="hit"')).toBe(2);
    expect(series(text, "keygate_cache_lookups_total", 'layer="l1",result="miss"')).toBe(1);
    expect(series(text, "keygate_cache_lookups_total", 'layer="l2",result="hit"')).toBeNull();
    // A scrape with nothing new changes nothing; counts after it add to what was reported.
    text = await metrics.registry.metrics();
    expect(series(text, "keygate_checks_total", 'decision="allow",reason="OK",mode="grpc"')).toBe(3);
    metrics.recordCheck("grpc", "OK", 0, 1);
    metrics.recordCheck("grpc", "OK", 0, 1);
    metrics.cacheResult("l2", "negative");
    text = await metrics.registry.metrics();
    expect(series(text, "keygate_checks_total", 'decision="allow",reason="OK",mode="grpc"')).toBe(5);
    expect(series(text, "keygate_checks_total", 'decision="deny",reason="KEY_REVOKED",mode="grpc"')).toBe(1);
    expect(series(text, "keygate_cache_lookups_total", 'layer="l1",result="hit"')).toBe(2);
    expect(series(text, "keygate_cache_lookups_total", 'layer="l2",result="negative"')).toBe(1);
    expect(series(text, "keygate_check_duration_seconds_count", 'mode="grpc"')).toBe(6);
  });
});
