import { spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { parse as parseYaml, stringify as stringifyYaml } from "yaml";
import { z } from "zod";

const RULE_FILE = resolve(import.meta.dirname, "../../deploy/k8s/monitoring/prometheusrule.yaml");

/** promtool on PATH or where Debian's prometheus package puts it; undefined when neither runs. */
export const promtool: string | undefined = ["promtool", "/usr/bin/promtool"].find((p) => spawnSync(p, ["--version"], { stdio: "ignore" }).status === 0);

/** The labels a ServiceMonitor scrape of one keygate replica adds to its samples. */
const SCRAPE_LABELS = 'job="keygate-admin",namespace="keygate",instance="a"';

/** Sample lines of a /metrics text, by series with the scrape's labels added. */
function keygateSamples(text: string): Map<string, number> {
  const out = new Map<string, number>();
  for (const line of text.split("\n")) {
    if (!line.startsWith("keygate_")) continue;
    const at = line.lastIndexOf(" ");
    const series = line.slice(0, at);
    const labelled = series.includes("{") ? series.replace("{", `{${SCRAPE_LABELS},`) : `${series}{${SCRAPE_LABELS}}`;
    out.set(labelled, Number(line.slice(at + 1)));
  }
  return out;
}

/**
 * promtool input series for 30 minutes of one replica from two scrapes of its /metrics taken
 * `seconds` apart: counters go on at the rate measured between them, gauges keep the second
 * scrape's value, and `up` is 1 (Prometheus reaches the replica).
 */
export function seriesFromScrapes(first: string, second: string, seconds: number): Array<{ series: string; values: string }> {
  const before = keygateSamples(first);
  const out = [{ series: `up{${SCRAPE_LABELS}}`, values: "1x30" }];
  for (const [series, value] of keygateSamples(second)) {
    const name = series.slice(0, series.indexOf("{"));
    const counter = /_(total|count|sum|bucket)$/.test(name);
    const perMinute = counter ? Math.max(0, ((value - (before.get(series) ?? value)) * 60) / seconds) : 0;
    out.push({ series, values: `${value}+${perMinute}x30` });
  }
  return out;
}

/**
 * Runs `promtool test rules` with one test on deploy/k8s/monitoring/prometheusrule.yaml's groups:
 * `expected` are the ALERTS samples (alertstate="firing") that `selector` must select after 20
 * minutes of `series`, exactly; an empty list means none fires.
 */
export function firingAfter20m(series: ReadonlyArray<{ series: string; values: string }>, selector: string, expected: ReadonlyArray<Record<string, string>>): { passed: boolean; output: string } {
  const rule = z.object({ spec: z.object({ groups: z.array(z.unknown()) }) }).parse(parseYaml(readFileSync(RULE_FILE, "utf8")));
  const scratch = mkdtempSync(join(tmpdir(), "keygate-promtool-"));
  try {
    writeFileSync(join(scratch, "rules.yaml"), stringifyYaml({ groups: rule.spec.groups }));
    const labels = (alert: Record<string, string>): string =>
      `{${Object.entries({ __name__: "ALERTS", alertstate: "firing", ...alert })
        .map(([k, v]) => `${k}="${v}"`)
        .join(", ")}}`;
    const test = {
      rule_files: ["rules.yaml"],
      evaluation_interval: "1m",
      tests: [
        {
          interval: "1m",
          input_series: series,
          promql_expr_test: [{ expr: `ALERTS{alertstate="firing", ${selector}}`, eval_time: "20m", exp_samples: expected.map((alert) => ({ labels: labels(alert), value: 1 })) }],
        },
      ],
    };
    writeFileSync(join(scratch, "test.yaml"), stringifyYaml(test));
    const run = spawnSync(promtool ?? "promtool", ["test", "rules", "test.yaml"], { cwd: scratch, encoding: "utf8" });
    return { passed: run.status === 0, output: `${run.stdout}${run.stderr}` };
  } finally {
    rmSync(scratch, { recursive: true, force: true });
  }
}
