import { spawnSync } from "node:child_process";
import { copyFileSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { parse as parseYaml, stringify as stringifyYaml } from "yaml";
import { z } from "zod";
import { Metrics } from "../../src/server/metrics.js";
import { requireServer } from "../harness/ports.js";
import { promtool } from "../harness/promtool.js";

// The PrometheusRule in deploy/k8s/monitoring/ against keygate itself (every metric it names is one
// keygate exports, every alert has a runbook section in the README) and against promtool (the
// rules parse, and fire on the series in test/fixtures/prometheus/alert-rules.test.yaml and only
// there). `promtool check metrics` lints what /metrics serves.

const ROOT = resolve(import.meta.dirname, "../..");
const RULE_FILE = join(ROOT, "deploy/k8s/monitoring/prometheusrule.yaml");
const RULE_TESTS = join(ROOT, "test/fixtures/prometheus/alert-rules.test.yaml");

const ruleSchema = z.object({
  alert: z.string(),
  expr: z.string(),
  for: z.string(),
  labels: z.object({ severity: z.enum(["critical", "warning"]) }),
  annotations: z.object({ summary: z.string(), description: z.string(), runbook: z.string() }),
});
const prometheusRuleSchema = z.object({
  apiVersion: z.literal("monitoring.coreos.com/v1"),
  kind: z.literal("PrometheusRule"),
  metadata: z.object({ name: z.string(), namespace: z.literal("keygate") }),
  spec: z.object({ groups: z.array(z.object({ name: z.string(), rules: z.array(ruleSchema).min(1) })).min(1) }),
});

const prometheusRule = prometheusRuleSchema.parse(parseYaml(readFileSync(RULE_FILE, "utf8")));
const rules = prometheusRule.spec.groups.flatMap((g) => g.rules);

/** A metrics registry with every series keygate's Check path can produce, as /metrics serves it. */
async function exercisedMetricsText(): Promise<string> {
  const metrics = new Metrics({ defaultMetrics: true });
  metrics.recordCheck("grpc", "OK", 0, 0.2);
  metrics.recordCheck("http", "UNAVAILABLE", 0, 3);
  metrics.cacheResult("l1", "hit");
  metrics.cacheResult("l2", "miss");
  metrics.backendCall("store", "find_snapshot", 0.002, true);
  metrics.backendCall("redis", "limit", 0.001, false);
  metrics.configReloaded("policy", "failed");
  metrics.connectionOpened("grpc");
  metrics.connectionRejected("http");
  metrics.watchQueue("usage", () => 3);
  metrics.watchReady(() => true);
  metrics.watchRedis(() => false);
  return metrics.registry.metrics();
}

describe("alert rules: what they name", () => {
  it("cover replicas down, gone or not ready, errors, UNAVAILABLE, latency, Redis lost or failing, store errors, reload failures, a cache-hit collapse and unhandled rejections", () => {
    expect(rules.map((r) => r.alert).sort()).toEqual(
      [
        "KeygateCacheHitCollapse",
        "KeygateCheckErrors",
        "KeygateCheckLatencyHigh",
        "KeygateConfigReloadFailing",
        "KeygateConnectionsRejected",
        "KeygateDown",
        "KeygateMisconfigured",
        "KeygateNotReady",
        "KeygateRedisErrors",
        "KeygateRedisLost",
        "KeygateStoreErrors",
        "KeygateUnavailableAnswers",
        "KeygateUnhandledRejections",
        "KeygateWriteBehindBacklog",
      ].sort(),
    );
  });

  it("query only metrics keygate exports, each selected by the ServiceMonitor's job", async () => {
    const metrics = new Metrics({ defaultMetrics: true });
    // keygate_redis_connected exists only in a keygate with Redis.
    metrics.watchRedis(() => true);
    const exported = new Set((await metrics.registry.getMetricsAsJSON()).map((m) => m.name));
    exported.add("up");
    for (const rule of rules) {
      const series = [...rule.expr.matchAll(/\b(keygate_[a-z_]+|up)(\{[^}]*\})/g)];
      expect(series.length, rule.alert).toBeGreaterThan(0);
      for (const [, name = "", selector = ""] of series) {
        expect(exported.has(name.replace(/_(bucket|sum|count)$/, "")), `${rule.alert}: ${name}`).toBe(true);
        expect(selector, `${rule.alert}: ${name}`).toContain('job="keygate-admin"');
      }
    }
  });

  it("keygate_redis_connected is exported only by a keygate with Redis (a 0 without Redis would page)", async () => {
    const metrics = new Metrics({ defaultMetrics: false });
    expect(await metrics.registry.metrics()).not.toContain("keygate_redis_connected");
    expect(await metrics.registry.metrics()).toContain("keygate_ready 0");
    let connected = true;
    metrics.watchRedis(() => connected);
    expect(await metrics.registry.metrics()).toContain("keygate_redis_connected 1");
    connected = false;
    expect(await metrics.registry.metrics()).toContain("keygate_redis_connected 0");
  });

  it("each point at a README runbook section of the alert's name", () => {
    const readme = readFileSync(join(ROOT, "README.md"), "utf8");
    const headings = new Set([...readme.matchAll(/^#{2,4} (.+)$/gm)].map(([, title = ""]) => title.trim().toLowerCase()));
    for (const rule of rules) {
      expect(rule.annotations.runbook, rule.alert).toBe(`README.md#${rule.alert.toLowerCase()}`);
      expect(headings.has(rule.alert.toLowerCase()), `README has no "#### ${rule.alert}" section`).toBe(true);
    }
  });

  it("the ServiceMonitor's job is the admin Service's name", () => {
    const monitor = z
      .object({ spec: z.object({ selector: z.object({ matchLabels: z.record(z.string(), z.string()) }), jobLabel: z.string().optional() }) })
      .parse(parseYaml(readFileSync(join(ROOT, "deploy/k8s/monitoring/servicemonitor.yaml"), "utf8")));
    // Without jobLabel the Prometheus Operator names the job after the scraped Service.
    expect(monitor.spec.jobLabel).toBeUndefined();
    const services = readFileSync(join(ROOT, "deploy/k8s/base/service.yaml"), "utf8");
    expect(services).toMatch(/name: keygate-admin\n/);
  });
});

const HAS_PROMTOOL = requireServer("promtool", promtool !== undefined, "apt-get install prometheus (Debian's package ships promtool)");

describe.skipIf(!HAS_PROMTOOL)("alert rules and metrics: promtool", () => {
  const scratch = mkdtempSync(join(tmpdir(), "keygate-promtool-"));
  afterAll(() => rmSync(scratch, { recursive: true, force: true }));
  writeFileSync(join(scratch, "rules.yaml"), stringifyYaml({ groups: prometheusRule.spec.groups }));
  copyFileSync(RULE_TESTS, join(scratch, "alert-rules.test.yaml"));

  const run = (args: readonly string[], input?: string) =>
    spawnSync(promtool ?? "promtool", args, { cwd: scratch, encoding: "utf8", input });

  it("promtool check rules: every group parses", () => {
    const result = run(["check", "rules", "rules.yaml"]);
    expect(result.stdout + result.stderr).toContain(`SUCCESS: ${rules.length} rules found`);
    expect(result.status).toBe(0);
  });

  it("promtool test rules: each alert fires on its series, with its labels and text, and none on healthy traffic", () => {
    const result = run(["test", "rules", "alert-rules.test.yaml"]);
    expect(result.stdout + result.stderr).toContain("SUCCESS");
    expect(result.status).toBe(0);
  });

  // Each change is one a reviewer could make by mistake; the fixture's cases must catch it.
  const weakened: ReadonlyArray<{ alert: string; change: string; expr: (expr: string) => string }> = [
    { alert: "KeygateUnavailableAnswers", change: "a threshold of 50%", expr: (e) => e.replace("> 0.01", "> 0.5") },
    { alert: "KeygateDown", change: "no absent() arm (targets gone never fire)", expr: (e) => e.replace(/\s+or absent\(.*\)\s*$/s, "") },
    { alert: "KeygateDown", change: "absent() without the namespace (the alert loses it)", expr: (e) => e.replace(', namespace="keygate"})', "})") },
    { alert: "KeygateNotReady", change: "min instead of max (one replica not ready pages)", expr: (e) => e.replace("max by", "min by") },
    { alert: "KeygateStoreErrors", change: "one ratio over every op (failing flushes diluted by lookups)", expr: (e) => e.replaceAll("namespace, job, op", "namespace, job") },
    {
      alert: "KeygateRedisLost",
      change: "only when every replica has lost Redis",
      expr: () => 'max by (namespace, job) (keygate_redis_connected{job="keygate-admin"}) == 0',
    },
  ];
  it.each(weakened)("promtool test rules fails for $alert with $change (the cases are not vacuous)", ({ alert, expr }) => {
    const changed = prometheusRule.spec.groups.map((g) => ({
      ...g,
      rules: g.rules.map((r) => (r.alert === alert ? { ...r, expr: expr(r.expr) } : r)),
    }));
    expect(JSON.stringify(changed)).not.toBe(JSON.stringify(prometheusRule.spec.groups));
    writeFileSync(join(scratch, "rules.yaml"), stringifyYaml({ groups: changed }));
    try {
      const result = run(["test", "rules", "alert-rules.test.yaml"]);
      expect(result.status).not.toBe(0);
      expect(result.stdout + result.stderr).toContain(`alertname: ${alert}`);
    } finally {
      writeFileSync(join(scratch, "rules.yaml"), stringifyYaml({ groups: prometheusRule.spec.groups }));
    }
  });

  it("promtool check metrics: /metrics has no lint problem", async () => {
    const text = await exercisedMetricsText();
    expect(text).toContain("keygate_checks_total{");
    expect(text).toContain("keygate_ready 1");
    expect(text).toContain("keygate_redis_connected 0");
    const result = run(["check", "metrics"], text);
    expect(result.stdout + result.stderr).toBe("");
    expect(result.status).toBe(0);
  });
});
