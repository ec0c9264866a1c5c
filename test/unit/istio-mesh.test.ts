import { spawnSync } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import { join, resolve } from "node:path";
import { describe, expect, it } from "vitest";
import { parse as parseYaml } from "yaml";
import { z } from "zod";
import { DEFAULT_PROVIDER, mergeMeshConfig, providerEntry } from "../../src/deploy/istio-mesh.js";

// `keygate istio mesh-config` registers keygate in an existing mesh without resetting it.

const ROOT = resolve(import.meta.dirname, "../..");
const CLI = join(ROOT, "dist/cli.js");

const EXISTING_MESH = `# managed by the platform team
accessLogFile: /dev/stdout
defaultConfig:
  discoveryAddress: istiod.istio-system.svc:15012
extensionProviders:
  - name: oauth2-proxy
    envoyExtAuthzHttp:
      service: oauth2-proxy.auth.svc.cluster.local
      port: 4180
  - name: otel
    opentelemetry:
      service: otel-collector.observability.svc.cluster.local
      port: 4317
`;

const meshSchema = z.object({
  extensionProviders: z.array(z.object({ name: z.string() }).passthrough()),
  pathNormalization: z.object({ normalization: z.string() }),
  accessLogFile: z.string().optional(),
});

describe("merging keygate into an Istio mesh config", () => {
  it("keeps the other providers, their order, settings and comments, and appends keygate's", () => {
    const merged = mergeMeshConfig(EXISTING_MESH, "mesh");
    const mesh = meshSchema.parse(parseYaml(merged.yaml));
    expect(mesh.extensionProviders.map((p) => p.name)).toEqual(["oauth2-proxy", "otel", "keygate"]);
    expect(mesh.extensionProviders[2]).toEqual(providerEntry(DEFAULT_PROVIDER));
    expect(mesh.accessLogFile).toBe("/dev/stdout");
    expect(merged.yaml).toContain("# managed by the platform team");
    expect(mesh.pathNormalization.normalization).toBe("MERGE_SLASHES");
    expect(merged.notes).toEqual([expect.stringContaining("pathNormalization.normalization: unset (BASE) -> MERGE_SLASHES")]);
  });

  it("is idempotent, and replaces an older keygate entry instead of adding a second", () => {
    const once = mergeMeshConfig(EXISTING_MESH, "mesh").yaml;
    const twice = mergeMeshConfig(once, "mesh");
    expect(twice.yaml).toBe(once);
    expect(twice.notes).toEqual([]);
    const moved = mergeMeshConfig(once, "mesh", { ...DEFAULT_PROVIDER, port: 19191, timeout: "0.2s" });
    const providers = meshSchema.parse(parseYaml(moved.yaml)).extensionProviders;
    expect(providers.map((p) => p.name)).toEqual(["oauth2-proxy", "otel", "keygate"]);
    expect(providers[2]).toMatchObject({ envoyExtAuthzGrpc: { port: 19191, timeout: "0.2s", failOpen: false, statusOnError: "503" } });
  });

  it("keeps a stricter path normalization, and raises a weaker one", () => {
    const strict = mergeMeshConfig("pathNormalization:\n  normalization: DECODE_AND_MERGE_SLASHES\n", "mesh");
    expect(meshSchema.parse(parseYaml(strict.yaml)).pathNormalization.normalization).toBe("DECODE_AND_MERGE_SLASHES");
    expect(strict.notes).toEqual([]);
    const weak = mergeMeshConfig("pathNormalization:\n  normalization: NONE\n", "mesh");
    expect(meshSchema.parse(parseYaml(weak.yaml)).pathNormalization.normalization).toBe("MERGE_SLASHES");
    expect(weak.notes).toEqual([expect.stringContaining("NONE -> MERGE_SLASHES")]);
  });

  it("merges under meshConfig in istiod's Helm values and under spec.meshConfig in an IstioOperator, keeping the rest", () => {
    const helm = parseYaml(mergeMeshConfig("global:\n  hub: docker.io/istio\nmeshConfig:\n  accessLogFile: /dev/stdout\n", "helm").yaml);
    expect(helm).toMatchObject({ global: { hub: "docker.io/istio" }, meshConfig: { accessLogFile: "/dev/stdout", extensionProviders: [providerEntry(DEFAULT_PROVIDER)] } });
    const operator = parseYaml(
      mergeMeshConfig("apiVersion: install.istio.io/v1alpha1\nkind: IstioOperator\nspec:\n  profile: minimal\n", "operator").yaml,
    );
    expect(operator).toMatchObject({ kind: "IstioOperator", spec: { profile: "minimal", meshConfig: { extensionProviders: [providerEntry(DEFAULT_PROVIDER)] } } });
  });

  it("agrees with the provider deploy/istio/mesh-config.yaml ships", () => {
    const shipped = readFileSync(join(ROOT, "deploy/istio/mesh-config.yaml"), "utf8");
    const merged = mergeMeshConfig(shipped, "operator");
    expect(merged.notes).toEqual([]);
    expect(parseYaml(merged.yaml)).toEqual(parseYaml(shipped));
  });

  it("refuses what it cannot merge, naming the problem", () => {
    expect(() => mergeMeshConfig("extensionProviders: keygate\n", "mesh")).toThrow("extensionProviders is not a list");
    expect(() => mergeMeshConfig("meshConfig: [1]\n", "helm")).toThrow("meshConfig is not a map");
    expect(() => mergeMeshConfig("a: [\n", "mesh")).toThrow(/^not YAML/);
  });
});

describe.runIf(existsSync(CLI))("keygate istio mesh-config", () => {
  it("reads stdin, writes the merged config to stdout and notes to stderr", () => {
    const run = spawnSync(process.execPath, [CLI, "istio", "mesh-config", "--timeout", "0.2s"], { input: EXISTING_MESH, encoding: "utf8" });
    expect(run.status).toBe(0);
    const mesh = meshSchema.parse(parseYaml(run.stdout));
    expect(mesh.extensionProviders.map((p) => p.name)).toEqual(["oauth2-proxy", "otel", "keygate"]);
    expect(mesh.extensionProviders[2]).toMatchObject({ envoyExtAuthzGrpc: { timeout: "0.2s" } });
    expect(run.stderr).toBe("keygate: pathNormalization.normalization: unset (BASE) -> MERGE_SLASHES, so sidecars hand keygate and the app the same canonical path\n");
  });

  it("exits 2 on a bad file or option, printing nothing to stdout", () => {
    const bad = spawnSync(process.execPath, [CLI, "istio", "mesh-config"], { input: "extensionProviders: 3\n", encoding: "utf8" });
    expect(bad.status).toBe(2);
    expect(bad.stdout).toBe("");
    expect(bad.stderr).toBe("keygate: stdin: extensionProviders is not a list\n");
    const badPort = spawnSync(process.execPath, [CLI, "istio", "mesh-config", "--port", "0"], { input: "", encoding: "utf8" });
    expect(badPort.status).toBe(2);
    expect(badPort.stderr).toContain("a port from 1 to 65535");
  });
});
