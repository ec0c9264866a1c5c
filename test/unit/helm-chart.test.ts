import { execFileSync, spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { homedir, tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { parse as parseYaml, parseAllDocuments } from "yaml";
import { z } from "zod";
import { loadPolicyFile, parsePolicy } from "../../src/config.js";
import { requireServer } from "../harness/ports.js";

// deploy/helm/keygate against the kustomize manifests it mirrors: with its default values,
// `helm template` must render the objects `kustomize build deploy/k8s/overlays/prod` renders
// (Helm's release labels aside, and the policy ConfigMap named without kustomize's hash), and
// pass kubernetes-validate --strict. helm, kustomize and kubernetes-validate come from
// .ci/install-k8s-tools.sh.

const ROOT = resolve(import.meta.dirname, "../..");
const CHART = join(ROOT, "deploy/helm/keygate");
const PROD = join(ROOT, "deploy/k8s/overlays/prod");
const TOOL_DIR = join(process.env["KEYGATE_CACHE_DIR"] ?? join(homedir(), ".cache/keygate"), "bin");
const INSTALL_HINT = "run bash .ci/install-k8s-tools.sh";

function findTool(name: string, args: readonly string[]): string | undefined {
  for (const candidate of [join(TOOL_DIR, name), name]) {
    if (spawnSync(candidate, args, { stdio: "ignore" }).status === 0) return candidate;
  }
  return undefined;
}

const helm = findTool("helm", ["version", "--short"]);
const kustomize = findTool("kustomize", ["version"]);
const kubernetesValidate = findTool("kubernetes-validate", ["--version"]);
const READY =
  requireServer("helm", helm !== undefined, INSTALL_HINT) &&
  requireServer("kustomize", kustomize !== undefined, INSTALL_HINT) &&
  requireServer("kubernetes-validate", kubernetesValidate !== undefined, INSTALL_HINT);

const RELEASE_LABELS = ["helm.sh/chart", "app.kubernetes.io/instance", "app.kubernetes.io/managed-by"];
const idSchema = z.object({ kind: z.string(), metadata: z.object({ name: z.string() }) });

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

function docsOf(text: string): unknown[] {
  return parseAllDocuments(text)
    .map((d): unknown => d.toJS())
    .filter((d) => d !== null && d !== undefined);
}

function helmTemplate(...args: string[]): string {
  return execFileSync(helm ?? "helm", ["template", "keygate", CHART, "--namespace", "keygate", ...args], { encoding: "utf8" });
}

/** An object with release labels, the policy checksum and kustomize's ConfigMap hash taken out, and env sorted by name. */
function normalized(doc: unknown): unknown {
  if (Array.isArray(doc)) {
    const items = doc.map(normalized);
    const byName = items.every((item) => isRecord(item) && typeof item["name"] === "string" && ("value" in item || "valueFrom" in item));
    return byName ? [...items].sort((a, b) => String(isRecord(a) ? a["name"] : "").localeCompare(String(isRecord(b) ? b["name"] : ""))) : items;
  }
  if (!isRecord(doc)) return doc;
  const out: Record<string, unknown> = {};
  for (const [key, value] of Object.entries(doc)) {
    if (RELEASE_LABELS.includes(key) || key === "checksum/policy") continue;
    out[key] = typeof value === "string" && /^keygate-policy-[a-z0-9]{10}$/.test(value) ? "keygate-policy" : normalized(value);
  }
  return out;
}

function byId(docs: readonly unknown[]): Map<string, unknown> {
  return new Map(
    docs.map((doc) => {
      const id = idSchema.parse(doc);
      const name = id.kind === "ConfigMap" ? id.metadata.name.replace(/-[a-z0-9]{10}$/, "") : id.metadata.name;
      return [`${id.kind}/${name}`, normalized(doc)];
    }),
  );
}

describe.runIf(READY)("Helm chart", () => {
  const scratch = mkdtempSync(join(tmpdir(), "keygate-helm-"));
  afterAll(() => rmSync(scratch, { recursive: true, force: true }));

  it("passes helm lint", () => {
    const result = spawnSync(helm ?? "helm", ["lint", CHART, "--strict"], { encoding: "utf8" });
    expect(result.stdout + result.stderr).toContain("1 chart(s) linted, 0 chart(s) failed");
    expect(result.status).toBe(0);
  });

  it("renders, with its defaults, the same objects as the kustomize prod overlay", () => {
    const chart = byId(docsOf(helmTemplate()));
    const prod = byId(docsOf(execFileSync(kustomize ?? "kustomize", ["build", PROD], { encoding: "utf8" })));
    expect([...chart.keys()].sort()).toEqual([...prod.keys()].sort());
    for (const [id, doc] of prod) expect(chart.get(id), id).toEqual(doc);
  });

  it("labels every object with the release and creates no Secret", () => {
    for (const doc of docsOf(helmTemplate())) {
      const meta = z.object({ kind: z.string(), metadata: z.object({ labels: z.record(z.string(), z.string()) }) }).parse(doc);
      expect(meta.kind).not.toBe("Secret");
      expect(meta.metadata.labels["app.kubernetes.io/instance"]).toBe("keygate");
      expect(meta.metadata.labels["app.kubernetes.io/name"]).toBe("keygate");
    }
  });

  it.each(["1.27.0", "newest bundled"])("matches the Kubernetes %s schemas, every resource, no unknown field", (version) => {
    const file = join(scratch, "chart.yaml");
    writeFileSync(file, helmTemplate());
    const run = spawnSync(kubernetesValidate ?? "kubernetes-validate", ["--strict", ...(version === "newest bundled" ? [] : ["-k", version]), file], { encoding: "utf8" });
    const lines = `${run.stdout}\n${run.stderr}`.split("\n").filter((l) => l.trim() !== "");
    expect(lines.filter((l) => !l.startsWith("INFO "))).toEqual([]);
    expect(run.status).toBe(0);
    expect(lines.filter((l) => / passed for resource /.test(l))).toHaveLength(9);
  });

  it("ships the example policy, and rolls the pods when the policy value changes", () => {
    expect(parsePolicy(parseYaml(readFileSync(join(CHART, "files/policy.yaml"), "utf8")), "chart policy")).toEqual(
      loadPolicyFile(join(ROOT, "deploy/config/keygate.example.yaml")),
    );
    const checksum = (text: string) =>
      z
        .object({ spec: z.object({ template: z.object({ metadata: z.object({ annotations: z.record(z.string(), z.string()) }) }) }) })
        .parse(docsOf(text).find((d) => isRecord(d) && d["kind"] === "Deployment")).spec.template.metadata.annotations["checksum/policy"];
    const before = checksum(helmTemplate());
    const edited = join(scratch, "policy.yaml");
    writeFileSync(edited, readFileSync(join(CHART, "files/policy.yaml"), "utf8").replace("ttlSeconds: 30", "ttlSeconds: 20"));
    const after = checksum(helmTemplate("--set-file", `policy=${edited}`));
    expect(before).toMatch(/^[0-9a-f]{64}$/);
    expect(after).toMatch(/^[0-9a-f]{64}$/);
    expect(after).not.toBe(before);
  });

  // A block scalar takes its indentation from its first line unless told: a policy file whose
  // first line is indented (a commented-out block, say) would fail to render, or read differently.
  it("puts a policy file whose first line is indented into the ConfigMap as written", () => {
    const policy = "  # plans below\nplans: {}\n";
    const file = join(scratch, "indented-policy.yaml");
    writeFileSync(file, policy);
    const configMap = z
      .object({ kind: z.literal("ConfigMap"), data: z.object({ "policy.yaml": z.string() }) })
      .parse(docsOf(helmTemplate("--set-file", `policy=${file}`)).find((d) => isRecord(d) && d["kind"] === "ConfigMap"));
    expect(configMap.data["policy.yaml"]).toBe(policy);
  });

  // The kubelet's SIGKILL comes terminationGracePeriodSeconds after the preStop hook starts:
  // the preStop sleep, keygate's delay (not ready, still answering), its drain (up to the grace)
  // and its final flush of last-used times and usage must fit, with the 15 s for the flush that
  // the defaults (5 + 15 + 20 + 15 = 55) leave.
  it.each([
    ["15", "20"],
    ["15", "45"],
    ["15", "60"],
    ["15", "12.5"],
    ["15", "300"],
    ["0", "20"],
    ["7.5", "20"],
    ["300", "300"],
  ])("with shutdownDelaySeconds=%s and shutdownGraceSeconds=%s, the kubelet waits for the preStop sleep, the delay, the drain and the final flush", (delay, grace) => {
    const containerSchema = z.object({
      env: z.array(z.object({ name: z.string(), value: z.string().optional() })),
      lifecycle: z.object({ preStop: z.object({ exec: z.object({ command: z.tuple([z.literal("sleep"), z.string().regex(/^\d+$/)]) }) }) }),
    });
    const podSchema = z.object({ spec: z.object({ template: z.object({ spec: z.object({ terminationGracePeriodSeconds: z.number().int(), containers: z.tuple([containerSchema]) }) }) }) });
    const rendered = helmTemplate("--set", `shutdownDelaySeconds=${delay}`, "--set", `shutdownGraceSeconds=${grace}`);
    const pod = podSchema.parse(docsOf(rendered).find((d) => isRecord(d) && d["kind"] === "Deployment")).spec.template.spec;
    const [container] = pod.containers;
    expect(container.env.find((e) => e.name === "KEYGATE_SHUTDOWN_DELAY_SECONDS")?.value).toBe(delay);
    expect(container.env.find((e) => e.name === "KEYGATE_SHUTDOWN_GRACE_SECONDS")?.value).toBe(grace);
    const preStopSeconds = Number(container.lifecycle.preStop.exec.command[1]);
    expect(preStopSeconds).toBeGreaterThan(0);
    expect(pod.terminationGracePeriodSeconds).toBeGreaterThanOrEqual(preStopSeconds + Number(delay) + Number(grace) + 15);
  });

  it("takes the image, the budget and the NetworkPolicy switch from values", () => {
    const docs = docsOf(helmTemplate("--set", "image.tag=9.9.9", "--set", "checkBudgetMs=120", "--set", "networkPolicy.enabled=false"));
    expect(docs.some((d) => isRecord(d) && d["kind"] === "NetworkPolicy")).toBe(false);
    const text = JSON.stringify(docs);
    expect(text).toContain('"image":"registry.example.com/keygate:9.9.9"');
    expect(text).toContain('{"name":"KEYGATE_CHECK_BUDGET_MS","value":"120"}');
  });
});
