import { spawnSync } from "node:child_process";
import { existsSync, readFileSync, readdirSync } from "node:fs";
import { join, resolve } from "node:path";
import { describe, expect, it } from "vitest";
import { parseAllDocuments } from "yaml";
import { z } from "zod";
import { substitute } from "../harness/proxies.js";

const root = resolve(import.meta.dirname, "../..");
const readme = readFileSync(resolve(root, "README.md"), "utf8");

describe("README", () => {
  it("every file or folder under deploy/, scripts/, test/ or proto/ that it names exists", () => {
    const paths = [...readme.matchAll(/(?<![\w/])((?:deploy|scripts|test|proto|\.ci)\/[\w./-]*[\w/])/g)].map((m) => m[1] ?? "");
    expect(paths.length).toBeGreaterThan(10);
    const missing = [...new Set(paths)].filter((p) => !existsSync(resolve(root, p)));
    expect(missing).toEqual([]);
  });

  it("every KEYGATE_* variable the code reads is in the environment table", () => {
    const config = readFileSync(resolve(root, "src/config.ts"), "utf8");
    const variables = [...new Set([...config.matchAll(/\b(KEYGATE_[A-Z_]+):/g)].map((m) => m[1] ?? ""))];
    expect(variables.length).toBeGreaterThan(10);
    for (const variable of variables) expect(readme, variable).toContain(`| \`${variable}\``);
  });

  it("every npm script it runs exists", () => {
    const pkg: unknown = JSON.parse(readFileSync(resolve(root, "package.json"), "utf8"));
    const scripts = typeof pkg === "object" && pkg !== null && "scripts" in pkg && typeof pkg.scripts === "object" && pkg.scripts !== null ? Object.keys(pkg.scripts) : [];
    const used = [...readme.matchAll(/npm run ([\w:-]+)/g)].map((m) => m[1] ?? "");
    for (const script of used) expect(scripts, script).toContain(script);
  });
});

// ---- the Deploy section's commands, against the files they use ------------------------------------

const DEPLOY = resolve(root, "deploy");

/** The Deploy section: from its heading to the next one. */
function deploySection(): string {
  const start = readme.indexOf("\n## Deploy\n");
  const end = readme.indexOf("\n## ", start + 1);
  if (start < 0 || end < 0) throw new Error("README has no Deploy section");
  return readme.slice(start, end);
}

/** Every shell command of the section's ```sh blocks, continuations joined, comments dropped. */
function deployCommands(): string[] {
  const blocks = [...deploySection().matchAll(/```sh\n([\s\S]*?)```/g)].map((m) => m[1] ?? "");
  return blocks
    .flatMap((block) => block.replace(/\s*\\\n\s*/g, " ").split("\n"))
    .map((line) => line.replace(/\s+#(?![^']*'[^']*$).*$/, "").trim())
    .filter((line) => line !== "");
}

function indexOfCommand(commands: readonly string[], pattern: RegExp): number {
  const at = commands.findIndex((c) => pattern.test(c));
  expect(at, `no command matches ${pattern}`).toBeGreaterThanOrEqual(0);
  return at;
}

function yamlDocs(path: string): unknown[] {
  return parseAllDocuments(readFileSync(path, "utf8")).map((d): unknown => d.toJS());
}

function yamlUnder(dir: string): string[] {
  return readdirSync(dir, { recursive: true, encoding: "utf8" })
    .filter((f) => /\.ya?ml$/.test(f))
    .map((f) => join(dir, f));
}

/** Every value of `field` anywhere inside `value`, depth first. */
function collect(value: unknown, field: string, out: unknown[] = []): unknown[] {
  if (Array.isArray(value)) for (const item of value) collect(item, field, out);
  else if (typeof value === "object" && value !== null) {
    for (const [key, inner] of Object.entries(value)) {
      if (key === field) out.push(inner);
      collect(inner, field, out);
    }
  }
  return out;
}

const kustomizationSchema = z.object({
  namespace: z.string().optional(),
  images: z.array(z.object({ name: z.string(), newName: z.string(), newTag: z.string() })).default([]),
});
const baseKustomization = () => kustomizationSchema.parse(yamlDocs(join(DEPLOY, "k8s/base/kustomization.yaml"))[0]);

/** The Secret references the prod overlay renders from: its own files and the base's. */
function prodSecretRefs(): Array<{ name: string; key: string }> {
  const files = [...yamlUnder(join(DEPLOY, "k8s/base")), ...yamlUnder(join(DEPLOY, "k8s/overlays/prod"))];
  const refSchema = z.object({ name: z.string(), key: z.string() });
  return files.flatMap((f) => yamlDocs(f).flatMap((doc) => collect(doc, "secretKeyRef").map((ref) => refSchema.parse(ref))));
}

describe("README: Deploy commands match deploy/", () => {
  it("creates the Secret the prod overlay reads: same name, namespace and keys", () => {
    const commands = deployCommands();
    const create = commands.filter((c) => c.includes("create secret generic"));
    expect(create).toHaveLength(1);
    const command = create[0] ?? "";
    const literalKeys = [...command.matchAll(/--from-literal=([\w.-]+)=/g)].map((m) => m[1] ?? "");
    const refs = prodSecretRefs();
    expect(refs.length).toBeGreaterThanOrEqual(4);
    expect(new Set(literalKeys).size).toBe(literalKeys.length);
    expect(literalKeys.sort()).toEqual([...new Set(refs.map((r) => r.key))].sort());
    const secretName = /create secret generic (\S+)/.exec(command)?.[1];
    expect([...new Set(refs.map((r) => r.name))]).toEqual([secretName]);
    expect(/^kubectl -n (\S+) /.exec(command)?.[1]).toBe(baseKustomization().namespace);
    // Nothing else in the section writes the Secret another way.
    expect(deploySection()).not.toMatch(/--from-(literal|file|env-file)=KEYGATE_/);
  });

  it("creates the namespace and the Secret before applying prod, and prod before Istio", () => {
    const commands = deployCommands();
    const namespace = baseKustomization().namespace ?? "";
    const createNamespace = indexOfCommand(commands, new RegExp(`^kubectl create namespace ${namespace}$`));
    const createSecret = indexOfCommand(commands, /create secret generic/);
    const applyProd = indexOfCommand(commands, /^kubectl apply -k deploy\/k8s\/overlays\/prod\b/);
    // The provider is merged into the running mesh config, never installed over it.
    expect(commands.some((c) => /^istioctl install\b/.test(c))).toBe(false);
    const installIstio = indexOfCommand(commands, /^keygate istio mesh-config mesh\.yaml > mesh-with-keygate\.yaml$/);
    const applyMesh = indexOfCommand(commands, /^kubectl -n istio-system create configmap istio --from-file=mesh=mesh-with-keygate\.yaml .*\| kubectl apply /);
    expect(installIstio).toBeLessThan(applyMesh);
    const applyPolicy = indexOfCommand(commands, /^kubectl apply -f deploy\/istio\/authorization-policy\.yaml$/);
    expect(createNamespace).toBeLessThan(createSecret);
    expect(createSecret).toBeLessThan(applyProd);
    expect(applyProd).toBeLessThan(installIstio);
    expect(installIstio).toBeLessThan(applyPolicy);
  });

  it("labels namespaces with the label keygate's NetworkPolicy admits, the Istio workload's among them", () => {
    const policies = yamlDocs(join(DEPLOY, "k8s/base/networkpolicy.yaml"));
    const admitted = new Set(
      collect(policies, "namespaceSelector")
        .flatMap((selector) => Object.entries(z.object({ matchLabels: z.record(z.string(), z.string()).default({}) }).parse(selector).matchLabels))
        .filter(([key]) => key !== "kubernetes.io/metadata.name")
        .map(([key, value]) => `${key}=${value}`),
    );
    expect(admitted.size).toBeGreaterThan(0);
    const labels = deployCommands().flatMap((c) => {
      const m = /^kubectl label namespace (\S+) (\S+=\S+)$/.exec(c);
      return m === null ? [] : [{ namespace: m[1] ?? "", label: m[2] ?? "" }];
    });
    expect(labels.length).toBeGreaterThanOrEqual(2);
    for (const { label } of labels) expect(admitted, label).toContain(label);
    const policyNamespace = z
      .object({ metadata: z.object({ namespace: z.string() }) })
      .parse(yamlDocs(join(DEPLOY, "istio/authorization-policy.yaml"))[0]).metadata.namespace;
    expect(labels.map((l) => l.namespace)).toContain(policyNamespace);
  });

  it("builds and pushes the image the base deploys, and repoints the base at it", () => {
    const commands = deployCommands();
    const [image] = baseKustomization().images;
    expect(image).toBeDefined();
    const deployment = yamlDocs(join(DEPLOY, "k8s/base/deployment.yaml"))[0];
    expect(collect(deployment, "image")).toEqual([image?.name]);
    const defaultImage = /^IMAGE=(\S+)$/.exec(commands.find((c) => c.startsWith("IMAGE=")) ?? "")?.[1];
    expect(defaultImage).toBe(`${image?.newName}:${image?.newTag}`);
    const build = indexOfCommand(commands, /^docker build -f deploy\/Dockerfile -t "\$IMAGE" \.$/);
    const push = indexOfCommand(commands, /^docker push "\$IMAGE"$/);
    const setImage = indexOfCommand(commands, new RegExp(`^\\(cd deploy/k8s/base && kustomize edit set image ${image?.name}="\\$IMAGE"\\)$`));
    const applyProd = indexOfCommand(commands, /^kubectl apply -k deploy\/k8s\/overlays\/prod\b/);
    expect(build).toBeLessThan(push);
    expect(push).toBeLessThan(setImage);
    expect(setImage).toBeLessThan(applyProd);
  });

  it("fills exactly the nginx template's placeholders, as the e2e harness does", () => {
    const template = readFileSync(join(DEPLOY, "nginx/keygate.conf.template"), "utf8");
    const placeholders = [...new Set([...template.matchAll(/\$\{([A-Z_][A-Z0-9_]*)\}/g)].map((m) => m[1] ?? ""))].sort();
    expect(placeholders.length).toBeGreaterThan(0);
    const commands = deployCommands();
    const envsubst = commands.find((c) => c.startsWith("envsubst ")) ?? "";
    const shellFormat = /^envsubst '([^']*)' < deploy\/nginx\/keygate\.conf\.template > \S+$/.exec(envsubst)?.[1];
    expect(shellFormat, envsubst).toBeDefined();
    const listed = [...(shellFormat ?? "").matchAll(/\$\{(\w+)\}/g)].map((m) => m[1] ?? "");
    expect([...listed].sort()).toEqual(placeholders);
    const exported = new Map(
      [...(commands.find((c) => c.startsWith("export KEYGATE_HTTP_AUTHZ=")) ?? "").matchAll(/(\w+)=(\S+)/g)].map((m) => [m[1] ?? "", m[2] ?? ""]),
    );
    expect([...exported.keys()].sort()).toEqual(placeholders);
    // Where envsubst is installed, run the README's command: it must produce what the tests run.
    if (spawnSync("envsubst", ["--version"], { stdio: "ignore" }).status !== 0) return;
    const values = Object.fromEntries(exported);
    const rendered = spawnSync("envsubst", [shellFormat ?? ""], { input: template, encoding: "utf8", env: { ...process.env, ...values, kg_status: "must-stay" } });
    expect(rendered.status).toBe(0);
    expect(rendered.stdout).toBe(substitute(template, values));
    expect(rendered.stdout).toContain("$kg_status");
  });

  it("runs Caddy with every placeholder of the Caddyfile set", () => {
    const caddyfile = readFileSync(join(DEPLOY, "caddy/Caddyfile"), "utf8");
    // Placeholders on comment lines belong to the TLS variant (the TLS section runs that one).
    const active = caddyfile.split("\n").filter((line) => !/^\s*#/.test(line)).join("\n");
    const placeholders = [...new Set([...active.matchAll(/\{\$([A-Z_][A-Z0-9_]*)\}/g)].map((m) => m[1] ?? ""))].sort();
    const run = deployCommands().find((c) => c.includes("caddy run")) ?? "";
    expect(run).toMatch(/caddy run --config deploy\/caddy\/Caddyfile --adapter caddyfile$/);
    const assigned = [...run.matchAll(/(?:^|\s)(\w+)=\S+/g)].map((m) => m[1] ?? "");
    expect(assigned.sort()).toEqual(placeholders);
  });

  it("states the nginx limit on unknown x-keygate-* headers, as the shipped config does", () => {
    const template = readFileSync(join(DEPLOY, "nginx/keygate.conf.template"), "utf8");
    const upstreamLocation = template.slice(template.indexOf("location / {"));
    const cleared = [...upstreamLocation.matchAll(/proxy_set_header (X-Keygate-[\w-]+) \$kg_/g)].map((m) => (m[1] ?? "").toLowerCase());
    expect(cleared.sort()).toEqual(["x-keygate-key-id", "x-keygate-mode", "x-keygate-owner-id", "x-keygate-plan", "x-keygate-project-id", "x-keygate-role", "x-keygate-scopes"]);
    expect(template).toMatch(/cannot remove\s+(#\s*)?request headers by prefix/);
    expect(deploySection()).toMatch(/nginx cannot remove request headers by\s+prefix/);
  });
});
