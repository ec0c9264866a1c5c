import { execFileSync, spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync } from "node:fs";
import { homedir, tmpdir } from "node:os";
import { join, relative, resolve } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { parse as parseYaml, parseAllDocuments } from "yaml";
import { z } from "zod";
import { IDENTITY_FIELDS } from "../../src/authz/identity.js";
import { METADATA_HEADER_PREFIX } from "../../src/authz/pipeline.js";
import { RouteTable } from "../../src/authz/routes.js";
import { loadConfig, loadPolicyFile, parsePolicy } from "../../src/config.js";
import { Authorization } from "../../src/gen/envoy/service/auth/v3/external_auth_pb.js";
import type { Config } from "../../src/config.js";
import { requireServer } from "../harness/ports.js";
import { judgedHeaders } from "../../src/server/original-request.js";
import { IMAGE_JEMALLOC } from "../../src/server/allocator.js";
import { KEYGATE_NODE_FLAGS } from "../../src/server/node-flags.js";

// Structural checks of everything under deploy/: the manifests must agree with keygate itself
// (ports, probes, policy, routes) and with each other (selectors, ports, names). Nothing here
// needs a cluster or the network. kustomize cross-checks the renders, and kubernetes-validate
// checks them against the Kubernetes JSON schemas (both from .ci/install-k8s-tools.sh).

const ROOT = resolve(import.meta.dirname, "../..");
const DEPLOY = join(ROOT, "deploy");
const K8S = join(DEPLOY, "k8s");
const BASE = join(K8S, "base");
const OVERLAYS = { dev: join(K8S, "overlays/dev"), prod: join(K8S, "overlays/prod") } as const;
const EXAMPLE_POLICY = join(DEPLOY, "config/keygate.example.yaml");
const ENVOY = join(DEPLOY, "envoy/envoy.yaml");
const COMPOSE = join(DEPLOY, "compose.yaml");
const DOCKERFILE = join(DEPLOY, "Dockerfile");

const DEFAULTS = loadConfig({});
const SECRET_ENV = /PEPPER|TOKEN|URI|URL|PASSWORD/;
const EXTENSION_KEYS = new Set(["required_scopes", "project_id", "cost"]);

const ALLOWED_KINDS: Readonly<Record<string, readonly string[]>> = {
  Deployment: ["apps/v1"],
  Service: ["v1"],
  PodDisruptionBudget: ["policy/v1"],
  HorizontalPodAutoscaler: ["autoscaling/v2"],
  NetworkPolicy: ["networking.k8s.io/v1"],
  ConfigMap: ["v1"],
  ServiceAccount: ["v1"],
  Kustomization: ["kustomize.config.k8s.io/v1beta1"],
  AuthorizationPolicy: ["security.istio.io/v1", "security.istio.io/v1beta1"],
  IstioOperator: ["install.istio.io/v1alpha1"],
  DestinationRule: ["networking.istio.io/v1"],
  ServiceMonitor: ["monitoring.coreos.com/v1"],
  PrometheusRule: ["monitoring.coreos.com/v1"],
};

// ---- reading ------------------------------------------------------------------------------------

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

function yamlFilesUnder(dir: string): string[] {
  const out: string[] = [];
  for (const entry of readdirSync(dir)) {
    const path = join(dir, entry);
    if (statSync(path).isDirectory()) out.push(...yamlFilesUnder(path));
    else if (/\.ya?ml$/.test(entry)) out.push(path);
  }
  return out.sort();
}

/** The policy files configMapGenerators read: YAML, but keygate policy, not Kubernetes manifests. */
const GENERATOR_SOURCES = new Set([join(BASE, "policy/policy.yaml")]);

/** Kubernetes manifests under dir: its YAML files except the generators' sources. */
function manifestFilesUnder(dir: string): string[] {
  return yamlFilesUnder(dir).filter((file) => !GENERATOR_SOURCES.has(file));
}

/** Every non-empty document of a (multi-document) YAML file; a syntax error throws. */
function loadDocs(path: string): unknown[] {
  const docs: unknown[] = [];
  for (const doc of parseAllDocuments(readFileSync(path, "utf8"))) {
    if (doc.errors.length > 0) throw new Error(`${relative(ROOT, path)}: ${doc.errors.map((e) => e.message).join("; ")}`);
    const value: unknown = doc.toJS();
    if (value !== null && value !== undefined) docs.push(value);
  }
  return docs;
}

function loadOne(path: string): unknown {
  const docs = loadDocs(path);
  if (docs.length !== 1) throw new Error(`${relative(ROOT, path)}: expected one document, found ${docs.length}`);
  return docs[0];
}

// ---- Kubernetes shapes (only the fields the checks read) -------------------------------------------

const labelsSchema = z.record(z.string(), z.string());
const portRefSchema = z.union([z.number().int(), z.string()]);
const idSchema = z.object({ apiVersion: z.string(), kind: z.string(), metadata: z.object({ name: z.string() }) });

const probeSchema = z.object({
  grpc: z.object({ port: z.number().int(), service: z.string().optional() }).optional(),
  httpGet: z.object({ path: z.string(), port: portRefSchema }).optional(),
  tcpSocket: z.object({ port: portRefSchema }).optional(),
  exec: z.object({ command: z.array(z.string()) }).optional(),
});

const envVarSchema = z.object({
  name: z.string(),
  value: z.string().optional(),
  valueFrom: z
    .object({ secretKeyRef: z.object({ name: z.string(), key: z.string() }).optional() })
    .optional(),
});

const securityContextSchema = z.object({
  runAsNonRoot: z.boolean().optional(),
  runAsUser: z.number().int().optional(),
  readOnlyRootFilesystem: z.boolean().optional(),
  allowPrivilegeEscalation: z.boolean().optional(),
  capabilities: z.object({ drop: z.array(z.string()).optional() }).optional(),
  seccompProfile: z.object({ type: z.string() }).optional(),
});

const quantitySchema = z.union([z.string(), z.number()]);
const containerSchema = z.object({
  name: z.string(),
  image: z.string(),
  ports: z.array(z.object({ name: z.string().optional(), containerPort: z.number().int() })).default([]),
  env: z.array(envVarSchema).default([]),
  volumeMounts: z.array(z.object({ name: z.string(), mountPath: z.string(), readOnly: z.boolean().optional() })).default([]),
  resources: z.object({
    requests: z.object({ cpu: quantitySchema, memory: quantitySchema }),
    limits: z.object({ cpu: quantitySchema, memory: quantitySchema }),
  }),
  securityContext: securityContextSchema.default({}),
  startupProbe: probeSchema,
  livenessProbe: probeSchema,
  readinessProbe: probeSchema,
  lifecycle: z.object({
    preStop: z.object({
      exec: z.object({ command: z.array(z.string()) }).optional(),
      sleep: z.object({ seconds: z.number().int() }).optional(),
    }),
  }),
});
type Container = z.infer<typeof containerSchema>;

const volumeSchema = z.object({
  name: z.string(),
  emptyDir: z.object({}).optional(),
  persistentVolumeClaim: z.object({ claimName: z.string() }).optional(),
  configMap: z.object({ name: z.string() }).optional(),
});

const deploymentSchema = z.object({
  apiVersion: z.literal("apps/v1"),
  kind: z.literal("Deployment"),
  metadata: z.object({ name: z.string() }),
  spec: z.object({
    /** Absent when the HPA owns the count. */
    replicas: z.number().int().optional(),
    selector: z.object({ matchLabels: labelsSchema }),
    template: z.object({
      metadata: z.object({ labels: labelsSchema }),
      spec: z.object({
        terminationGracePeriodSeconds: z.number().int().default(30),
        securityContext: securityContextSchema.default({}),
        containers: z.array(containerSchema).length(1),
        volumes: z.array(volumeSchema).default([]),
        topologySpreadConstraints: z
          .array(z.object({ topologyKey: z.string(), labelSelector: z.object({ matchLabels: labelsSchema }) }))
          .default([]),
        affinity: z
          .object({
            podAntiAffinity: z
              .object({
                requiredDuringSchedulingIgnoredDuringExecution: z
                  .array(z.object({ topologyKey: z.string(), labelSelector: z.object({ matchLabels: labelsSchema }) }))
                  .default([]),
              })
              .optional(),
          })
          .optional(),
      }),
    }),
  }),
});
type Deployment = z.infer<typeof deploymentSchema>;

const serviceSchema = z.object({
  kind: z.literal("Service"),
  metadata: z.object({ name: z.string() }),
  spec: z.object({
    selector: labelsSchema,
    ports: z.array(
      z.object({ name: z.string().optional(), port: z.number().int(), targetPort: portRefSchema.optional(), appProtocol: z.string().optional() }),
    ),
  }),
});
type Service = z.infer<typeof serviceSchema>;

const peerSchema = z.object({
  namespaceSelector: z.object({ matchLabels: labelsSchema.optional() }).optional(),
  podSelector: z.object({ matchLabels: labelsSchema.optional() }).optional(),
  ipBlock: z.object({ cidr: z.string() }).optional(),
});
const networkPolicySchema = z.object({
  kind: z.literal("NetworkPolicy"),
  metadata: z.object({ name: z.string() }),
  spec: z.object({
    podSelector: z.object({ matchLabels: labelsSchema }),
    policyTypes: z.array(z.string()),
    ingress: z.array(
      z.object({
        from: z.array(peerSchema).optional(),
        ports: z.array(z.object({ port: portRefSchema, protocol: z.string().optional() })).optional(),
      }),
    ),
  }),
});
type NetworkPolicy = z.infer<typeof networkPolicySchema>;

const pdbSchema = z.object({
  kind: z.literal("PodDisruptionBudget"),
  spec: z.object({ maxUnavailable: z.number().int(), unhealthyPodEvictionPolicy: z.string().optional(), selector: z.object({ matchLabels: labelsSchema }) }),
});

const hpaSchema = z.object({
  kind: z.literal("HorizontalPodAutoscaler"),
  spec: z.object({
    scaleTargetRef: z.object({ apiVersion: z.string(), kind: z.string(), name: z.string() }),
    minReplicas: z.number().int(),
    maxReplicas: z.number().int(),
    metrics: z.array(
      z.object({
        type: z.string(),
        resource: z.object({ name: z.string(), target: z.object({ type: z.string(), averageUtilization: z.number().optional() }) }).optional(),
      }),
    ),
  }),
});

const configMapSchema = z.object({ kind: z.literal("ConfigMap"), metadata: z.object({ name: z.string() }), data: z.record(z.string(), z.string()) });

const kustomizationSchema = z.object({
  apiVersion: z.literal("kustomize.config.k8s.io/v1beta1"),
  kind: z.literal("Kustomization"),
  namespace: z.string().optional(),
  resources: z.array(z.string()).default([]),
  patches: z.array(z.object({ path: z.string() })).default([]),
  images: z.array(z.object({ name: z.string(), newName: z.string().optional(), newTag: z.string().optional() })).default([]),
  configMapGenerator: z
    .array(
      z.object({
        name: z.string(),
        files: z.array(z.string()),
        options: z.object({ labels: labelsSchema.optional() }).optional(),
      }),
    )
    .default([]),
});

// ---- a small kustomize: resources, strategic-merge patches, $patch: delete -----------------------

/** List fields that strategic merge patches merge by key instead of replacing. */
const MERGE_KEYS: Readonly<Record<string, string>> = {
  containers: "name",
  initContainers: "name",
  env: "name",
  volumes: "name",
  volumeMounts: "mountPath",
  ports: "containerPort",
};

function strategicMerge(base: unknown, patch: unknown, field = ""): unknown {
  if (isRecord(base) && isRecord(patch)) {
    const out: Record<string, unknown> = { ...base };
    for (const [key, value] of Object.entries(patch)) {
      if (key === "$patch") continue;
      if (value === null) delete out[key];
      else out[key] = key in base ? strategicMerge(base[key], value, key) : value;
    }
    return out;
  }
  const mergeKey = MERGE_KEYS[field];
  if (Array.isArray(base) && Array.isArray(patch) && mergeKey !== undefined) {
    const out: unknown[] = [...base];
    for (const item of patch) {
      const at = isRecord(item) ? out.findIndex((b) => isRecord(b) && b[mergeKey] === item[mergeKey]) : -1;
      if (at >= 0) out[at] = strategicMerge(out[at], item);
      else out.push(item);
    }
    return out;
  }
  return patch;
}

function sameObject(a: unknown, b: unknown): boolean {
  const x = idSchema.safeParse(a);
  const y = idSchema.safeParse(b);
  return x.success && y.success && x.data.kind === y.data.kind && x.data.metadata.name === y.data.metadata.name;
}

/** A ConfigMap name as kustomize generates it: the generator's name and a 10-character content hash. */
const GENERATED_NAME = /^(.+)-[a-z0-9]{10}$/;

/** ConfigMaps from a configMapGenerator (`key=path` or `path` files), named with a content hash like kustomize's. */
function generateConfigMaps(dir: string, generators: z.infer<typeof kustomizationSchema>["configMapGenerator"]): { docs: unknown[]; renames: Map<string, string> } {
  const docs: unknown[] = [];
  const renames = new Map<string, string>();
  for (const generator of generators) {
    const data: Record<string, string> = {};
    for (const file of generator.files) {
      const [key, path] = file.includes("=") ? file.split("=", 2) : [file.split("/").at(-1), file];
      data[key ?? ""] = readFileSync(resolve(dir, path ?? ""), "utf8");
    }
    const hash = createHash("sha256").update(JSON.stringify({ data, kind: "ConfigMap", name: generator.name })).digest("hex").slice(0, 10);
    const name = `${generator.name}-${hash}`;
    renames.set(generator.name, name);
    docs.push({ apiVersion: "v1", kind: "ConfigMap", metadata: { name, labels: generator.options?.labels ?? {} }, data });
  }
  return { docs, renames };
}

/** Points pod volumes that name a generated ConfigMap at its hashed name, as kustomize does. */
function renameConfigMapReferences(doc: unknown, renames: ReadonlyMap<string, string>): unknown {
  if (Array.isArray(doc)) return doc.map((item) => renameConfigMapReferences(item, renames));
  if (!isRecord(doc)) return doc;
  const out: Record<string, unknown> = {};
  for (const [key, value] of Object.entries(doc)) {
    const renamed = key === "configMap" && isRecord(value) && typeof value["name"] === "string" ? renames.get(value["name"]) : undefined;
    out[key] = renamed !== undefined && isRecord(value) ? { ...value, name: renamed } : renameConfigMapReferences(value, renames);
  }
  return out;
}

/** The documents a kustomization produces (resources and generated ConfigMaps, then its patches applied in order). */
function renderKustomization(dir: string): unknown[] {
  const kustomization = kustomizationSchema.parse(loadOne(join(dir, "kustomization.yaml")));
  let docs: unknown[] = [];
  for (const resource of kustomization.resources) {
    const path = resolve(dir, resource);
    docs.push(...(statSync(path).isDirectory() ? renderKustomization(path) : loadDocs(path)));
  }
  const generated = generateConfigMaps(dir, kustomization.configMapGenerator);
  docs = [...docs.map((doc) => renameConfigMapReferences(doc, generated.renames)), ...generated.docs];
  for (const { path } of kustomization.patches) {
    for (const patch of loadDocs(resolve(dir, path))) {
      const at = docs.findIndex((doc) => sameObject(doc, patch));
      if (at < 0) throw new Error(`${relative(ROOT, join(dir, path))}: patch matches no resource`);
      if (isRecord(patch) && patch["$patch"] === "delete") docs.splice(at, 1);
      else docs[at] = strategicMerge(docs[at], patch);
    }
  }
  return docs;
}

function ofKind<T>(docs: readonly unknown[], kind: string, schema: z.ZodType<T>): T[] {
  return docs.filter((doc) => isRecord(doc) && doc["kind"] === kind).map((doc) => schema.parse(doc));
}

function theDeployment(docs: readonly unknown[]): Deployment {
  const deployments = ofKind(docs, "Deployment", deploymentSchema);
  expect(deployments).toHaveLength(1);
  const [deployment] = deployments;
  if (deployment === undefined) throw new Error("no Deployment");
  return deployment;
}

function theContainer(deployment: Deployment): Container {
  const [container] = deployment.spec.template.spec.containers;
  if (container === undefined) throw new Error("no container");
  return container;
}

function selects(selector: Readonly<Record<string, string>>, labels: Readonly<Record<string, string>>): boolean {
  const entries = Object.entries(selector);
  return entries.length > 0 && entries.every(([k, v]) => labels[k] === v);
}

/** The container port a probe, Service or NetworkPolicy port names (by number or by name). */
function containerPort(container: Container, ref: number | string): number | undefined {
  const port = container.ports.find((p) => (typeof ref === "number" ? p.containerPort === ref : p.name === ref));
  return port?.containerPort;
}

/** keygate's effective settings for this container: its literal env over keygate's defaults. */
function keygateConfigOf(container: Container): Config {
  const env: Record<string, string> = {};
  for (const name of ["KEYGATE_GRPC_PORT", "KEYGATE_HTTP_AUTHZ_PORT", "KEYGATE_ADMIN_PORT", "KEYGATE_SHUTDOWN_GRACE_SECONDS", "KEYGATE_SHUTDOWN_DELAY_SECONDS"]) {
    const value = container.env.find((e) => e.name === name)?.value;
    if (value !== undefined) env[name] = value;
  }
  return loadConfig(env);
}

function preStopSeconds(container: Container): number {
  const { exec, sleep } = container.lifecycle.preStop;
  if (sleep !== undefined) return sleep.seconds;
  const command = exec?.command ?? [];
  const seconds = command[0] === "sleep" || command[0] === "/bin/sleep" ? Number(command[1]) : Number.NaN;
  if (!Number.isInteger(seconds)) throw new Error(`preStop must sleep a whole number of seconds, got ${JSON.stringify(command)}`);
  return seconds;
}

// ---- the variants: base, dev, prod ------------------------------------------------------------------

/** Memoizes a reader, so a broken file fails the tests that read it instead of the whole module. */
function lazy<T>(make: () => T): () => T {
  let value: { ok: T } | undefined;
  return () => (value ??= { ok: make() }).ok;
}

const VARIANTS = [
  // With an HPA the Deployment names no count (the HPA's floor is checked below); dev runs one.
  { name: "base", docs: lazy(() => renderKustomization(BASE)), replicas: (n: number | undefined) => n === undefined, store: "none" },
  { name: "dev", docs: lazy(() => renderKustomization(OVERLAYS.dev)), replicas: (n: number | undefined) => n === 1, store: "embedded" },
  { name: "prod", docs: lazy(() => renderKustomization(OVERLAYS.prod)), replicas: (n: number | undefined) => n === undefined, store: "mongodb" },
] as const;

function variantDocs(name: "base" | "dev" | "prod"): unknown[] {
  const variant = VARIANTS.find((v) => v.name === name);
  if (variant === undefined) throw new Error(`no variant ${name}`);
  return variant.docs();
}

function checkDeployment(docs: readonly unknown[]): void {
  const deployment = theDeployment(docs);
  const pod = deployment.spec.template;
  const container = theContainer(deployment);
  const config = keygateConfigOf(container);

  expect(deployment.metadata.name).toBe("keygate");
  expect(pod.metadata.labels["app.kubernetes.io/name"]).toBe("keygate");
  expect(selects(deployment.spec.selector.matchLabels, pod.metadata.labels)).toBe(true);

  // Named container ports carry keygate's listeners.
  expect(Object.fromEntries(container.ports.map((p) => [p.name, p.containerPort]))).toEqual({
    "grpc-authz": config.grpcPort,
    "http-authz": config.httpAuthzPort,
    admin: config.adminPort,
  });

  // Liveness and startup: gRPC health on the Check port. Readiness: /readyz on the admin port.
  for (const probe of [container.startupProbe, container.livenessProbe]) {
    expect(probe.grpc?.port).toBe(config.grpcPort);
    expect(containerPort(container, probe.grpc?.port ?? -1)).toBe(config.grpcPort);
  }
  expect(container.readinessProbe.httpGet?.path).toBe("/readyz");
  expect(containerPort(container, container.readinessProbe.httpGet?.port ?? -1)).toBe(config.adminPort);

  // Hardening, on the container (the pod-level context may repeat it).
  const sc = container.securityContext;
  expect(sc.runAsNonRoot).toBe(true);
  expect(sc.runAsUser).toBe(10001);
  expect(sc.readOnlyRootFilesystem).toBe(true);
  expect(sc.allowPrivilegeEscalation).toBe(false);
  expect(sc.capabilities?.drop).toContain("ALL");
  expect(sc.seccompProfile?.type ?? pod.spec.securityContext.seccompProfile?.type).toBe("RuntimeDefault");
  expect(pod.spec.securityContext.runAsNonRoot).toBe(true);

  // A read-only root still needs a writable /tmp; every mount names a declared volume.
  const volumes = new Map(pod.spec.volumes.map((v) => [v.name, v]));
  for (const mount of container.volumeMounts) expect(volumes.has(mount.name), `volume ${mount.name}`).toBe(true);
  const tmp = container.volumeMounts.find((m) => m.mountPath === "/tmp");
  expect(tmp !== undefined && volumes.get(tmp.name)?.emptyDir !== undefined).toBe(true);

  // SIGTERM: preStop sleep, then keygate's drain, then its final flush of last-used times and
  // usage; the kubelet must wait for all three (15 s for the flush, as the Helm chart renders it).
  const preStop = preStopSeconds(container);
  expect(preStop).toBeGreaterThan(0);
  expect(pod.spec.terminationGracePeriodSeconds).toBeGreaterThanOrEqual(preStop + config.shutdownDelaySeconds + config.shutdownGraceSeconds + 15);

  // Replicas spread over nodes.
  const spreadByHost = pod.spec.topologySpreadConstraints.some(
    (c) => c.topologyKey === "kubernetes.io/hostname" && selects(c.labelSelector.matchLabels, pod.metadata.labels),
  );
  const antiAffinityByHost = (pod.spec.affinity?.podAntiAffinity?.requiredDuringSchedulingIgnoredDuringExecution ?? []).some(
    (t) => t.topologyKey === "kubernetes.io/hostname" && selects(t.labelSelector.matchLabels, pod.metadata.labels),
  );
  expect(spreadByHost || antiAffinityByHost).toBe(true);

  // KEYGATE_CONFIG names the policy file inside a mounted ConfigMap that has that key.
  const configPath = container.env.find((e) => e.name === "KEYGATE_CONFIG")?.value ?? "";
  const policyMount = container.volumeMounts.find((m) => configPath.startsWith(`${m.mountPath}/`));
  const configMapName = policyMount === undefined ? undefined : volumes.get(policyMount.name)?.configMap?.name;
  const configMap = ofKind(docs, "ConfigMap", configMapSchema).find((c) => c.metadata.name === configMapName);
  expect(configMap?.data[configPath.slice((policyMount?.mountPath.length ?? 0) + 1)]).toBeTypeOf("string");

  // Secrets only by reference.
  for (const env of container.env) {
    if (SECRET_ENV.test(env.name)) expect(env.valueFrom?.secretKeyRef, env.name).toBeDefined();
  }
}

// ---- envoy shapes -------------------------------------------------------------------------------

const perRouteSchema = z.object({
  "@type": z.literal("type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute"),
  disabled: z.boolean().optional(),
  check_settings: z.object({ context_extensions: z.record(z.string(), z.string()).default({}) }).optional(),
});

const envoyRouteSchema = z.object({
  match: z.object({
    path: z.string().optional(),
    prefix: z.string().optional(),
    path_separated_prefix: z.string().optional(),
    safe_regex: z.unknown().optional(),
    headers: z.array(z.object({ name: z.string(), string_match: z.object({ exact: z.string() }) })).default([]),
  }),
  route: z.object({ cluster: z.string() }).optional(),
  request_headers_to_remove: z.array(z.string()).default([]),
  typed_per_filter_config: z.record(z.string(), z.unknown()).default({}),
});
type EnvoyRoute = z.infer<typeof envoyRouteSchema>;

const extAuthzSchema = z.object({
  "@type": z.literal("type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz"),
  transport_api_version: z.string(),
  grpc_service: z.object({ envoy_grpc: z.object({ cluster_name: z.string() }), timeout: z.string() }),
  failure_mode_allow: z.boolean(),
  include_peer_certificate: z.boolean().optional(),
  with_request_body: z.unknown().optional(),
});

const hcmSchema = z.object({
  "@type": z.literal("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"),
  route_config: z.object({ virtual_hosts: z.array(z.object({ name: z.string(), request_headers_to_remove: z.array(z.string()).default([]), routes: z.array(envoyRouteSchema) })) }),
  normalize_path: z.boolean().optional(),
  merge_slashes: z.boolean().optional(),
  path_with_escaped_slashes_action: z.string().optional(),
  common_http_protocol_options: z.object({ headers_with_underscores_action: z.string().optional() }).optional(),
  http_filters: z.array(z.object({ name: z.string(), typed_config: z.record(z.string(), z.unknown()) })),
});

const socketAddressSchema = z.object({ address: z.string(), port_value: z.number().int() });
const envoySecondsSchema = z
  .string()
  .regex(/^\d+(\.\d+)?s$/)
  .transform((d) => Number(d.slice(0, -1)));
const healthCheckSchema = z.object({
  timeout: envoySecondsSchema,
  interval: envoySecondsSchema,
  unhealthy_threshold: z.number().int(),
  grpc_health_check: z.object({ service_name: z.string() }).optional(),
});
const envoySchema = z.object({
  static_resources: z.object({
    listeners: z.array(
      z.object({
        address: z.object({ socket_address: socketAddressSchema }),
        filter_chains: z.array(z.object({ filters: z.array(z.object({ name: z.string(), typed_config: z.unknown() })) })),
      }),
    ),
    clusters: z.array(
      z.object({
        name: z.string(),
        typed_extension_protocol_options: z.record(z.string(), z.unknown()).optional(),
        health_checks: z.array(healthCheckSchema).default([]),
        load_assignment: z.object({
          endpoints: z.array(z.object({ lb_endpoints: z.array(z.object({ endpoint: z.object({ address: z.object({ socket_address: socketAddressSchema }) }) })) })),
        }),
      }),
    ),
  }),
});
const http2OptionsSchema = z.object({
  "@type": z.literal("type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"),
  explicit_http_config: z.object({ http2_protocol_options: z.object({}) }),
});

function readEnvoy() {
  const bootstrap = envoySchema.parse(loadOne(ENVOY));
  const [listener] = bootstrap.static_resources.listeners;
  if (listener === undefined) throw new Error("envoy.yaml has no listener");
  const hcmFilter = listener.filter_chains.flatMap((c) => c.filters).find((f) => f.name === "envoy.filters.network.http_connection_manager");
  if (hcmFilter === undefined) throw new Error("envoy.yaml has no http_connection_manager");
  const hcm = hcmSchema.parse(hcmFilter.typed_config);
  const authzFilter = hcm.http_filters.find((f) => f.name === "envoy.filters.http.ext_authz");
  if (authzFilter === undefined) throw new Error("envoy.yaml has no ext_authz filter");
  const routes = hcm.route_config.virtual_hosts.flatMap((v) => v.routes);
  const endpoints = new Map(
    bootstrap.static_resources.clusters.map((c) => [c.name, c.load_assignment.endpoints.flatMap((e) => e.lb_endpoints.map((l) => l.endpoint.address.socket_address))]),
  );
  return { bootstrap, listener, hcm, extAuthz: extAuthzSchema.parse(authzFilter.typed_config), routes, endpoints };
}

function perRouteAuthz(route: EnvoyRoute): z.infer<typeof perRouteSchema> | undefined {
  const raw = route.typed_per_filter_config["envoy.filters.http.ext_authz"];
  return raw === undefined ? undefined : perRouteSchema.parse(raw);
}

/** Envoy's first-match rule for the matchers this config uses; anything else is refused. */
function envoyRouteMatches(route: EnvoyRoute, method: string, path: string): boolean {
  const { match } = route;
  const kinds = [match.path, match.prefix, match.path_separated_prefix, match.safe_regex].filter((m) => m !== undefined);
  if (kinds.length !== 1) throw new Error(`route needs exactly one path matcher: ${JSON.stringify(match)}`);
  for (const header of match.headers) {
    if (header.name !== ":method") throw new Error(`the route simulation knows only :method header matches, not ${header.name}`);
    if (header.string_match.exact !== method) return false;
  }
  if (match.path !== undefined) return path === match.path;
  if (match.prefix !== undefined) return path.startsWith(match.prefix);
  if (match.path_separated_prefix !== undefined) return path === match.path_separated_prefix || path.startsWith(`${match.path_separated_prefix}/`);
  throw new Error("safe_regex routes cannot be checked against keygate's routes table");
}

// ---- the tests ------------------------------------------------------------------------------------

describe("deploy manifests: files and kinds", () => {
  const k8sAndIstio = [...manifestFilesUnder(K8S), ...yamlFilesUnder(join(DEPLOY, "istio"))];

  it("finds the manifests this test is about", () => {
    const names = k8sAndIstio.map((f) => relative(DEPLOY, f));
    expect(names).toEqual(
      expect.arrayContaining([
        "k8s/base/kustomization.yaml",
        "k8s/base/deployment.yaml",
        "k8s/base/service.yaml",
        "k8s/base/networkpolicy.yaml",
        "k8s/overlays/dev/kustomization.yaml",
        "k8s/overlays/prod/kustomization.yaml",
        "istio/mesh-config.yaml",
        "istio/authorization-policy.yaml",
      ]),
    );
    expect(existsSync(ENVOY)).toBe(true);
  });

  it("parses every YAML document, and each has an allowed apiVersion and kind", () => {
    for (const file of [...k8sAndIstio, ENVOY]) expect(() => loadDocs(file), relative(ROOT, file)).not.toThrow();
    for (const file of k8sAndIstio) {
      const docs = loadDocs(file);
      expect(docs.length, relative(ROOT, file)).toBeGreaterThan(0);
      for (const doc of docs) {
        const head = z.object({ apiVersion: z.string(), kind: z.string() }).parse(doc);
        expect(ALLOWED_KINDS[head.kind] ?? [], `${relative(ROOT, file)}: ${head.kind}`).toContain(head.apiVersion);
      }
    }
  });

  it("holds no inline Secret anywhere under deploy/", () => {
    // Helm templates are not YAML until rendered: test/unit/helm-chart.test.ts checks the render.
    for (const file of yamlFilesUnder(DEPLOY).filter((f) => !f.startsWith(`${join(DEPLOY, "helm")}/`))) {
      for (const doc of loadDocs(file)) {
        const inlineSecret = isRecord(doc) && doc["kind"] === "Secret" && (doc["data"] !== undefined || doc["stringData"] !== undefined);
        expect(inlineSecret, relative(ROOT, file)).toBe(false);
      }
    }
  });
});

describe("deploy manifests: kustomize", () => {
  it("references only files that exist, and lists every manifest beside each kustomization", () => {
    for (const dir of [BASE, OVERLAYS.dev, OVERLAYS.prod]) {
      const kustomization = kustomizationSchema.parse(loadOne(join(dir, "kustomization.yaml")));
      const referenced = [...kustomization.resources, ...kustomization.patches.map((p) => p.path)];
      for (const ref of referenced) expect(existsSync(resolve(dir, ref)), `${relative(ROOT, dir)}: ${ref}`).toBe(true);
      const beside = readdirSync(dir).filter((f) => /\.ya?ml$/.test(f) && f !== "kustomization.yaml");
      for (const file of beside) expect(referenced, `${relative(ROOT, dir)} does not list ${file}`).toContain(file);
    }
  });

  it("puts everything in the keygate namespace, which the Istio provider addresses", () => {
    const base = kustomizationSchema.parse(loadOne(join(BASE, "kustomization.yaml")));
    expect(base.namespace).toBe("keygate");
  });

  it("drops autoscaling and the disruption budget only in dev", () => {
    const kinds = (docs: readonly unknown[]) => docs.map((d) => idSchema.parse(d).kind).sort();
    const [base, dev, prod] = VARIANTS.map((v) => kinds(v.docs()));
    expect(base).toEqual(prod);
    expect(base).toEqual(expect.arrayContaining(["HorizontalPodAutoscaler", "PodDisruptionBudget"]));
    expect(dev).not.toContain("HorizontalPodAutoscaler");
    expect(dev).not.toContain("PodDisruptionBudget");
  });
});

const STORE_TEST_TITLES = {
  none: "picks no store: the overlays do",
  embedded: "stores SQLite on a volume at KEYGATE_DATA_DIR",
  mongodb: "takes MongoDB, Redis and secrets only from keygate-secrets",
} as const;

describe.each(VARIANTS)("deploy manifests: $name", ({ name, docs: render, replicas, store }) => {
  it("runs a hardened, probed keygate Deployment", () => {
    checkDeployment(render());
  });

  it(`has the replica count ${name} needs`, () => {
    expect(replicas(theDeployment(render()).spec.replicas)).toBe(true);
  });

  it(STORE_TEST_TITLES[store], () => {
    const deployment = theDeployment(render());
    const container = theContainer(deployment);
    const env = new Map(container.env.map((e) => [e.name, e]));
    if (store === "none") {
      expect([...env.keys()].filter((k) => k === "KEYGATE_DATA_DIR" || k === "KEYGATE_MONGODB_URI")).toEqual([]);
      return;
    }
    if (store === "embedded") {
      expect(env.has("KEYGATE_MONGODB_URI")).toBe(false);
      const dataDir = env.get("KEYGATE_DATA_DIR")?.value;
      const mount = container.volumeMounts.find((m) => m.mountPath === dataDir);
      const volume = deployment.spec.template.spec.volumes.find((v) => v.name === mount?.name);
      expect(volume?.emptyDir !== undefined || volume?.persistentVolumeClaim !== undefined).toBe(true);
      return;
    }
    for (const variable of ["KEYGATE_MONGODB_URI", "KEYGATE_REDIS_URL", "KEYGATE_PEPPER", "KEYGATE_ADMIN_TOKENS"]) {
      expect(env.get(variable)?.value, variable).toBeUndefined();
      expect(env.get(variable)?.valueFrom?.secretKeyRef?.name, variable).toBe("keygate-secrets");
    }
  });

  it("routes both Services to the pods and to declared container ports", () => {
    const deployment = theDeployment(render());
    const container = theContainer(deployment);
    const services = new Map(ofKind(render(), "Service", serviceSchema).map((s) => [s.metadata.name, s]));
    expect([...services.keys()].sort()).toEqual(["keygate-admin", "keygate-authz"]);
    for (const service of services.values()) {
      expect(selects(service.spec.selector, deployment.spec.template.metadata.labels), service.metadata.name).toBe(true);
      for (const port of service.spec.ports) {
        expect(containerPort(container, port.targetPort ?? port.port), `${service.metadata.name}:${port.port}`).toBeDefined();
      }
    }
    const target = (service: Service | undefined, port: number) => {
      const entry = service?.spec.ports.find((p) => p.port === port);
      return { appProtocol: entry?.appProtocol, containerPort: entry === undefined ? undefined : containerPort(container, entry.targetPort ?? entry.port) };
    };
    expect(target(services.get("keygate-authz"), DEFAULTS.grpcPort)).toEqual({ appProtocol: "grpc", containerPort: DEFAULTS.grpcPort });
    expect(target(services.get("keygate-authz"), DEFAULTS.httpAuthzPort).containerPort).toBe(DEFAULTS.httpAuthzPort);
    expect(target(services.get("keygate-admin"), DEFAULTS.adminPort).containerPort).toBe(DEFAULTS.adminPort);
  });

  it("lets only the proxies reach the authz ports, and only clients and Prometheus the admin port", () => {
    const deployment = theDeployment(render());
    const container = theContainer(deployment);
    const policies = ofKind(render(), "NetworkPolicy", networkPolicySchema);
    expect(policies.length).toBeGreaterThan(0);
    const sourcesByPort = new Map<number, NetworkPolicy["spec"]["ingress"][number]["from"][]>();
    for (const policy of policies) {
      expect(selects(policy.spec.podSelector.matchLabels, deployment.spec.template.metadata.labels), policy.metadata.name).toBe(true);
      expect(policy.spec.policyTypes).toContain("Ingress");
      for (const rule of policy.spec.ingress) {
        // A rule without `from` or `ports` opens to everyone or to every port.
        expect(rule.from?.length ?? 0, policy.metadata.name).toBeGreaterThan(0);
        expect(rule.ports?.length ?? 0, policy.metadata.name).toBeGreaterThan(0);
        for (const port of rule.ports ?? []) {
          const resolved = containerPort(container, port.port);
          expect(resolved, `${policy.metadata.name}: port ${port.port}`).toBeDefined();
          if (resolved !== undefined) sourcesByPort.set(resolved, [...(sourcesByPort.get(resolved) ?? []), rule.from]);
        }
      }
    }
    expect([...sourcesByPort.keys()].sort()).toEqual([DEFAULTS.adminPort, DEFAULTS.httpAuthzPort, DEFAULTS.grpcPort].sort());

    const peers = (port: number) => (sourcesByPort.get(port) ?? []).flatMap((from) => from ?? []);
    const namespaces = (port: number) => peers(port).map((p) => p.namespaceSelector?.matchLabels?.["kubernetes.io/metadata.name"]);
    for (const port of [DEFAULTS.grpcPort, DEFAULTS.httpAuthzPort]) {
      expect(namespaces(port)).toEqual(expect.arrayContaining(["ingress-nginx", "istio-system"]));
      // Namespaces only, each named or labelled: no pod label alone opens the Check port.
      for (const peer of peers(port)) {
        expect(peer.podSelector).toBeUndefined();
        expect(peer.ipBlock).toBeUndefined();
        expect(Object.keys(peer.namespaceSelector?.matchLabels ?? {}).length).toBeGreaterThan(0);
      }
    }
    const adminPeers = peers(DEFAULTS.adminPort);
    expect(adminPeers.some((p) => p.podSelector?.matchLabels?.["keygate.io/client"] === "true")).toBe(true);
    expect(
      adminPeers.some(
        (p) => p.namespaceSelector?.matchLabels?.["kubernetes.io/metadata.name"] === "monitoring" && p.podSelector?.matchLabels?.["app.kubernetes.io/name"] === "prometheus",
      ),
    ).toBe(true);
    for (const peer of adminPeers) expect(peer.podSelector?.matchLabels, "every admin peer is selected by pod label").toBeDefined();
  });

  it("leaves at most one replica unavailable in voluntary disruptions, keeps not-Ready ones through a store outage, and autoscales on CPU from at least 2", () => {
    if (store === "embedded") {
      // One embedded replica: a budget of one could never be met, and a second replica would
      // have a store of its own.
      expect(ofKind(render(), "PodDisruptionBudget", pdbSchema)).toEqual([]);
      expect(ofKind(render(), "HorizontalPodAutoscaler", hpaSchema)).toEqual([]);
      return;
    }
    const deployment = theDeployment(render());
    const [pdb] = ofKind(render(), "PodDisruptionBudget", pdbSchema);
    expect(pdb?.spec.maxUnavailable).toBe(1);
    // Not AlwaysAllow: during a MongoDB outage every replica is not Ready on purpose (/readyz pings
    // the store, test/integration/alert-store-lost.test.ts), and a replacement exits 2 at start while
    // MongoDB is unreachable (test/e2e/startup-errors.test.ts). AlwaysAllow would let a drain evict
    // every warm replica at once, and keygate would return only after the replacements' crash-loop
    // back-off; the default evicts a not-Ready replica only while the budget holds.
    expect(pdb?.spec.unhealthyPodEvictionPolicy ?? "IfHealthyBudget").toBe("IfHealthyBudget");
    expect(selects(pdb?.spec.selector.matchLabels ?? {}, deployment.spec.template.metadata.labels)).toBe(true);
    const [hpa] = ofKind(render(), "HorizontalPodAutoscaler", hpaSchema);
    expect(hpa?.spec.scaleTargetRef).toEqual({ apiVersion: "apps/v1", kind: "Deployment", name: deployment.metadata.name });
    expect(hpa?.spec.minReplicas).toBeGreaterThanOrEqual(2);
    expect(deployment.spec.replicas).toBeUndefined();
    expect(hpa?.spec.maxReplicas).toBeGreaterThan(hpa?.spec.minReplicas ?? Infinity);
    expect(hpa?.spec.metrics.some((m) => m.type === "Resource" && m.resource?.name === "cpu")).toBe(true);
  });
});

describe("deploy manifests: policy ConfigMap", () => {
  it("holds the example policy, valid by keygate's own parser", () => {
    const [configMap] = ofKind(renderKustomization(BASE), "ConfigMap", configMapSchema);
    const text = configMap?.data["policy.yaml"];
    expect(text).toBeTypeOf("string");
    const policy = parsePolicy(parseYaml(text ?? ""), "ConfigMap keygate-policy");
    expect(policy).toEqual(loadPolicyFile(EXAMPLE_POLICY));
    expect(configMap?.metadata.name).toMatch(GENERATED_NAME);
  });

});

describe("deploy manifests: envoy.yaml", () => {
  const read = lazy(() => {
    const policy = loadPolicyFile(EXAMPLE_POLICY);
    return { envoy: readEnvoy(), policy, table: new RouteTable(policy.routes, policy.routeMatching) };
  });

  it("listens on 10000 and runs ext_authz, failing closed, before the router", () => {
    const { envoy } = read();
    expect(envoy.listener.address.socket_address.port_value).toBe(10000);
    const names = envoy.hcm.http_filters.map((f) => f.name);
    expect(names.at(-1)).toBe("envoy.filters.http.router");
    expect(names.indexOf("envoy.filters.http.ext_authz")).toBeLessThan(names.indexOf("envoy.filters.http.router"));
    expect(envoy.extAuthz.transport_api_version).toBe("V3");
    expect(envoy.extAuthz.failure_mode_allow).toBe(false);
    // keygate reads no client certificate: sending one would add 2-4 KB to every Check.
    expect(envoy.extAuthz.include_peer_certificate).toBeUndefined();
    expect(envoy.extAuthz.grpc_service.timeout).toMatch(/^\d+(\.\d+)?s$/);
    // keygate decides on headers only: no body buffering.
    expect(envoy.extAuthz.with_request_body).toBeUndefined();
  });

  it("normalizes paths before routing, and refuses escaped slashes and underscored header names", () => {
    const { envoy } = read();
    expect(envoy.hcm.normalize_path).toBe(true);
    expect(envoy.hcm.merge_slashes).toBe(true);
    // keygate refuses %2F and %5C too; a redirect to the unescaped path would change its meaning.
    expect(envoy.hcm.path_with_escaped_slashes_action).toBe("REJECT_REQUEST");
    expect(envoy.hcm.common_http_protocol_options?.headers_with_underscores_action).toBe("REJECT_REQUEST");
  });

  it("sends Checks over HTTP/2 to keygate's gRPC port", () => {
    const { envoy } = read();
    const clusterName = envoy.extAuthz.grpc_service.envoy_grpc.cluster_name;
    const cluster = envoy.bootstrap.static_resources.clusters.find((c) => c.name === clusterName);
    expect(cluster).toBeDefined();
    expect(envoy.endpoints.get(clusterName)?.map((a) => a.port_value)).toEqual([DEFAULTS.grpcPort]);
    const options = cluster?.typed_extension_protocol_options?.["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"];
    expect(http2OptionsSchema.safeParse(options).success).toBe(true);
  });

  // From SIGTERM keygate reports NOT_SERVING but answers for KEYGATE_SHUTDOWN_DELAY_SECONDS, then
  // sends its GOAWAY: a Check Envoy sent as that GOAWAY crossed it is refused (REFUSED_STREAM), and
  // Envoy answers the client 503 without retrying it (envoyproxy/envoy#36450). So the Deployment's
  // delay must outlast what these health checks take to mark the replica unhealthy: at worst a
  // check passed just before SIGTERM, then unhealthy_threshold failures an interval apart, the last
  // one timing out.
  it("health-checks keygate's Check service, and marks a draining replica unhealthy within the Deployment's drain delay", () => {
    const { envoy } = read();
    const clusterName = envoy.extAuthz.grpc_service.envoy_grpc.cluster_name;
    const checks = envoy.bootstrap.static_resources.clusters.find((c) => c.name === clusterName)?.health_checks ?? [];
    expect(checks.map((c) => c.grpc_health_check?.service_name)).toEqual([Authorization.typeName]);
    const detectionSeconds = Math.max(...checks.map((c) => c.unhealthy_threshold * c.interval + c.timeout));
    expect(detectionSeconds).toBe(11);
    for (const variant of VARIANTS) {
      const delaySeconds = keygateConfigOf(theContainer(theDeployment(variant.docs()))).shutdownDelaySeconds;
      expect(delaySeconds, variant.name).toBeGreaterThan(detectionSeconds);
    }
  });

  it("routes only to defined clusters, and only /healthz skips keygate", () => {
    const { envoy } = read();
    for (const route of envoy.routes) expect(envoy.endpoints.has(route.route?.cluster ?? ""), JSON.stringify(route.match)).toBe(true);
    const skipping = envoy.routes.filter((r) => perRouteAuthz(r)?.disabled === true);
    expect(skipping.map((r) => r.match.path)).toEqual(["/healthz"]);
  });

  it("a route that skips keygate removes every identity header keygate would, each forwarded metadata header of the policy, and the credential headers", () => {
    const { envoy, policy } = read();
    const expected = [...IDENTITY_FIELDS.map((f) => f.header), ...policy.forwardMetadata.map((name) => `${METADATA_HEADER_PREFIX}${name}`), ...policy.credentialHeaders];
    const skipping = envoy.routes.filter((r) => perRouteAuthz(r)?.disabled === true);
    expect(skipping.length).toBeGreaterThan(0);
    for (const route of skipping) expect(route.request_headers_to_remove, JSON.stringify(route.match)).toEqual(expected);
  });

  it("sets only context_extensions keys keygate reads, with scopes from the policy's catalog", () => {
    const { envoy, policy } = read();
    const catalog = new Set(policy.scopes.catalog);
    const withExtensions = envoy.routes.map((r) => perRouteAuthz(r)?.check_settings?.context_extensions).filter((e) => e !== undefined);
    expect(withExtensions.length).toBeGreaterThan(0);
    for (const extensions of withExtensions) {
      for (const key of Object.keys(extensions)) expect(EXTENSION_KEYS.has(key), key).toBe(true);
      for (const scope of (extensions["required_scopes"] ?? "").split(",").map((s) => s.trim()).filter((s) => s !== "")) {
        expect(catalog.has(scope), scope).toBe(true);
      }
      if (extensions["cost"] !== undefined) expect(extensions["cost"]).toMatch(/^\d{1,9}$/);
    }
  });

  it("asks for exactly what keygate's routes table would, for every method and path", () => {
    const { envoy, policy, table } = read();
    const prefixes = new Set<string>(["/", "/unrouted", "/healthz"]);
    for (const route of policy.routes) prefixes.add(route.pathPrefix);
    for (const route of envoy.routes) {
      const p = route.match.path_separated_prefix ?? route.match.prefix ?? route.match.path;
      if (p !== undefined) prefixes.add(p);
    }
    const paths = [...prefixes].flatMap((p) => [p, `${p.replace(/\/$/, "")}/x`, `${p}x`]);
    const methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];
    let compared = 0;
    for (const method of methods) {
      for (const path of paths) {
        const route = envoy.routes.find((r) => envoyRouteMatches(r, method, path));
        expect(route, `${method} ${path} matches no Envoy route`).toBeDefined();
        const authz = route === undefined ? undefined : perRouteAuthz(route);
        if (authz?.disabled === true) continue;
        const extensions = authz?.check_settings?.context_extensions;
        expect(table.requirements(method, path, extensions), `${method} ${path}`).toEqual(table.requirements(method, path, undefined));
        if (extensions !== undefined) compared += 1;
      }
    }
    // Every route of the policy is mirrored by an Envoy route that sends its scopes.
    for (const route of policy.routes) {
      // A "*" route is checked with a method it actually serves (GET may belong to another).
      const method = route.method !== "*" ? route.method : (methods.find((m) => table.match(m, route.pathPrefix) === route) ?? "GET");
      const envoyRoute = envoy.routes.find((r) => envoyRouteMatches(r, method, route.pathPrefix));
      const sent = envoyRoute === undefined ? undefined : perRouteAuthz(envoyRoute)?.check_settings?.context_extensions?.["required_scopes"];
      expect(sent, `${method} ${route.pathPrefix}`).toBe(route.requiredScopes.join(","));
    }
    expect(compared).toBeGreaterThan(0);
  });
});

// ---- compose ------------------------------------------------------------------------------------

const composeSchema = z.object({
  services: z.record(
    z.string(),
    z.object({
      image: z.string().optional(),
      build: z.object({ context: z.string(), dockerfile: z.string() }).optional(),
      environment: z.record(z.string(), z.union([z.string(), z.number(), z.boolean()])).default({}),
      ports: z.array(z.string()).default([]),
      volumes: z.array(z.string()).default([]),
      depends_on: z.record(z.string(), z.object({ condition: z.string() })).default({}),
    }),
  ),
});

describe("deploy manifests: compose.yaml", () => {
  const read = lazy(() => ({ compose: composeSchema.parse(loadOne(COMPOSE)), envoy: readEnvoy() }));

  it("names its services as envoy.yaml addresses them", () => {
    const { compose, envoy } = read();
    const addresses = [...envoy.endpoints.values()].flat().map((a) => a.address);
    expect(addresses.sort()).toEqual(["app", "keygate"]);
    for (const address of addresses) expect(Object.keys(compose.services), address).toContain(address);
    const envoyService = compose.services["envoy"];
    expect(envoyService?.volumes.some((v) => v.startsWith("./envoy/envoy.yaml:"))).toBe(true);
    expect(envoyService?.ports.some((p) => p.endsWith(":10000"))).toBe(true);
    for (const [name, service] of Object.entries(compose.services)) {
      for (const dependency of Object.keys(service.depends_on)) expect(Object.keys(compose.services), `${name} depends on ${dependency}`).toContain(dependency);
    }
    expect(Object.keys(compose.services["envoy"]?.depends_on ?? {}).sort()).toEqual(["app", "keygate"]);
    const appPort = envoy.endpoints.get("app")?.[0]?.port_value;
    expect(compose.services["app"]?.environment["HTTP_PORT"]).toBe(String(appPort));
  });

  it("builds keygate from deploy/Dockerfile and publishes its gRPC port", () => {
    const { compose } = read();
    const keygate = compose.services["keygate"];
    expect(keygate?.build).toBeDefined();
    const build = keygate?.build ?? { context: "", dockerfile: "" };
    expect(resolve(DEPLOY, build.context, build.dockerfile)).toBe(DOCKERFILE);
    const containerPorts = (keygate?.ports ?? []).map((p) => Number(p.split(":").at(-1)?.split("/")[0]));
    expect(containerPorts).toContain(DEFAULTS.grpcPort);
  });

  it("points keygate at the compose MongoDB and Redis, and writes no secret inline", () => {
    const { compose } = read();
    const env = compose.services["keygate"]?.environment ?? {};
    expect(Object.keys(compose.services)).toContain(new URL(String(env["KEYGATE_MONGODB_URI"])).hostname);
    expect(Object.keys(compose.services)).toContain(new URL(String(env["KEYGATE_REDIS_URL"])).hostname);
    const secretNames = Object.values(compose.services).flatMap((s) => Object.entries(s.environment)).filter(([k]) => /PEPPER|TOKEN|PASSWORD|SECRET/.test(k));
    expect(secretNames.map(([k]) => k).sort()).toEqual(["KEYGATE_ADMIN_TOKENS", "KEYGATE_PEPPER"]);
    for (const [key, value] of secretNames) expect(String(value), key).toMatch(new RegExp(`^\\$\\{${key}:\\?[^}]*\\}$`));
  });
});

// ---- Dockerfile ---------------------------------------------------------------------------------

interface Instruction {
  op: string;
  args: string;
}

/** Dockerfile instructions by stage, with line continuations joined and comments dropped. */
function readDockerfile(path: string): Instruction[][] {
  const joined = readFileSync(path, "utf8")
    .split("\n")
    .filter((line) => !/^\s*#/.test(line))
    .join("\n")
    .replace(/\\\n/g, " ");
  const stages: Instruction[][] = [];
  for (const line of joined.split("\n")) {
    const m = /^\s*([A-Za-z]+)\s+(.*)$/.exec(line);
    if (m === null) continue;
    const op = (m[1] ?? "").toUpperCase();
    if (op === "FROM") stages.push([]);
    stages.at(-1)?.push({ op, args: (m[2] ?? "").trim() });
  }
  return stages;
}

describe("deploy manifests: Dockerfile", () => {
  const stagesOf = lazy(() => readDockerfile(DOCKERFILE));
  const args = (op: string) => (stagesOf().at(-1) ?? []).filter((i) => i.op === op).map((i) => i.args);

  // The image runs the Node line the checkout pins (package-lock.json's `node` dev dependency),
  // the one the tests and the bench run on.
  const pinnedMajor = lazy(() => {
    const lock = z.object({ packages: z.object({ "node_modules/node": z.object({ version: z.string() }) }) }).parse(JSON.parse(readFileSync(join(ROOT, "package-lock.json"), "utf8")));
    return lock.packages["node_modules/node"].version.split(".")[0] ?? "";
  });

  it("builds on the pinned Node line in every stage", () => {
    const stages = stagesOf();
    expect(stages.length).toBeGreaterThanOrEqual(2);
    const earlier = new Set<string>();
    for (const stage of stages) {
      const from = /^(\S+)(?:\s+AS\s+(\w+))?$/i.exec(stage[0]?.args ?? "");
      const image = from?.[1] ?? "";
      // Either an image of the pinned Node line or an earlier stage (which is one).
      if (!earlier.has(image)) expect(image).toMatch(new RegExp(`^node:${pinnedMajor()}[-.\\w]*$`));
      if (from?.[2] !== undefined) earlier.add(from[2]);
    }
  });

  it("runs as the same non-root uid the Deployment requires", () => {
    const user = args("USER").at(-1) ?? "";
    expect(user).not.toMatch(/^(root|0)(:|$)/);
    const container = theContainer(theDeployment(renderKustomization(BASE)));
    expect(user.split(":")[0]).toBe(String(container.securityContext.runAsUser));
  });

  it("starts keygate under tini, in production mode, with keygate's node flags", () => {
    expect(args("ENV").join(" ")).toMatch(/\bNODE_ENV=production\b/);
    expect(args("RUN").join(" ")).toMatch(/apt-get install[^&]*\btini\b/);
    expect(JSON.parse(args("ENTRYPOINT").at(-1) ?? "null")).toEqual(["/usr/bin/tini", "--"]);
    const pkg = z.object({ bin: z.object({ keygate: z.string() }), scripts: z.object({ start: z.string() }) }).parse(JSON.parse(readFileSync(join(ROOT, "package.json"), "utf8")));
    expect(JSON.parse(args("CMD").at(-1) ?? "null")).toEqual(["node", ...KEYGATE_NODE_FLAGS, pkg.bin.keygate, "serve"]);
    // `npm start` launches the same way.
    expect(pkg.scripts.start).toBe(["node", ...KEYGATE_NODE_FLAGS, pkg.bin.keygate, "serve"].join(" "));
  });

  it("runs keygate on jemalloc: installs libjemalloc2, links it where LD_PRELOAD names it", () => {
    expect(args("RUN").join(" ")).toMatch(/apt-get install[^&]*\blibjemalloc2\b/);
    const link = args("RUN").join(" ").match(/\bln -s (?:"[^"]*"|\S+) (\S+)/)?.[1];
    expect(link).toBe(IMAGE_JEMALLOC);
    expect(/\bLD_PRELOAD=(\S+)/.exec(args("ENV").join(" "))?.[1]).toBe(IMAGE_JEMALLOC);
  });

  it("installs exactly the lockfile: npm ci to build, npm ci --omit=dev for what ships", () => {
    const stages = stagesOf();
    const runs = stages.flat().filter((i) => i.op === "RUN").map((i) => i.args);
    // No fallback that could resolve a tree the lockfile does not record, and no pruning.
    for (const run of runs) {
      expect(run, run).not.toContain("||");
      expect(run, run).not.toMatch(/\bnpm (install|i|prune)\b/);
    }
    const stageName = (stage: Instruction[]) => /\s+AS\s+(\w+)$/i.exec(stage[0]?.args ?? "")?.[1];
    const runsIn = (stage: Instruction[]) => stage.filter((i) => i.op === "RUN").map((i) => i.args);
    const builder = stages.find((stage) => runsIn(stage).some((r) => r.includes("npm run build")));
    expect(builder === undefined ? [] : runsIn(builder)).toContainEqual(expect.stringMatching(/^npm ci(?!.*--omit)/));
    const deps = stages.find((stage) => runsIn(stage).some((r) => /npm ci --omit=dev/.test(r)));
    expect(deps, "a stage runs npm ci --omit=dev").toBeDefined();
    // The runtime image takes node_modules from that stage and dist from the builder.
    const copiesFrom = (target: string) => args("COPY").find((a) => a.endsWith(` ./${target}`))?.match(/^--from=(\w+)/)?.[1];
    expect(copiesFrom("node_modules")).toBe(deps === undefined ? "?" : stageName(deps));
    expect(copiesFrom("dist")).toBe(builder === undefined ? "?" : stageName(builder));
  });

  it("exposes keygate's ports and a data volume at KEYGATE_DATA_DIR", () => {
    const exposed = args("EXPOSE").join(" ").split(/\s+/).map(Number);
    expect(exposed).toEqual(expect.arrayContaining([DEFAULTS.grpcPort, DEFAULTS.httpAuthzPort, DEFAULTS.adminPort]));
    const dataDir = /\bKEYGATE_DATA_DIR=(\S+)/.exec(args("ENV").join(" "))?.[1];
    expect(dataDir).toBeDefined();
    expect(JSON.parse(args("VOLUME").at(-1) ?? "null")).toEqual([dataDir]);
  });

  it("starts every stage from one Debian 13 (trixie) image of the pinned Node line, the base .ci/build-image.sh assembles", () => {
    const stages = stagesOf();
    const names = new Set(stages.map((stage) => /\s+AS\s+(\w+)$/i.exec(stage[0]?.args ?? "")?.[1]));
    const bases = new Set(stages.map((stage) => (stage[0]?.args ?? "").split(/\s+/)[0] ?? "").filter((image) => !names.has(image)));
    expect([...bases]).toEqual([`node:${pinnedMajor()}-trixie-slim`]);
    // The runtime stage builds on it directly, not on a stage that carries a compiler.
    expect(stages.at(-1)?.[0]?.args).toMatch(new RegExp(`^node:${pinnedMajor()}-trixie-slim\\s+AS\\s+runtime$`, "i"));
  });

  it("labels the image with the OCI annotations, versioned as package.json", () => {
    const pkg = z.object({ version: z.string(), description: z.string(), license: z.string() }).parse(JSON.parse(readFileSync(join(ROOT, "package.json"), "utf8")));
    const unquote = (value: string) => value.replace(/^"(.*)"$/, "$1");
    const argDefaults = new Map(
      args("ARG").map((a) => {
        const [name = "", value = ""] = a.split(/=(.*)/s);
        return [name, unquote(value)] as const;
      }),
    );
    const labels = new Map([...args("LABEL").join(" ").matchAll(/([\w.-]+)=("(?:[^"\\]|\\.)*"|\S+)/g)].map((m) => [m[1] ?? "", unquote(m[2] ?? "")]));
    const oci = (key: string) => labels.get(`org.opencontainers.image.${key}`);
    expect(oci("title")).toBe("keygate");
    expect(oci("description")).toBe(pkg.description);
    expect(oci("licenses")).toBe(pkg.license);
    expect(oci("licenses")).toBe("Apache-2.0");
    expect(oci("base.name")).toBe(`docker.io/library/${(stagesOf().at(-1)?.[0]?.args ?? "").split(/\s+/)[0] ?? ""}`);
    // version, revision, created and source come from build args; VERSION defaults to package.json's.
    for (const [key, arg] of [["version", "VERSION"], ["revision", "REVISION"], ["created", "CREATED"], ["source", "SOURCE"]] as const) {
      expect(oci(key), key).toBe(`\${${arg}}`);
      expect(argDefaults.has(arg), `ARG ${arg} in the runtime stage`).toBe(true);
    }
    expect(argDefaults.get("VERSION")).toBe(pkg.version);
    // Last, so that a new revision or date rebuilds no layer.
    const ops = (stagesOf().at(-1) ?? []).map((i) => i.op);
    expect(ops.slice(ops.indexOf("ARG"))).toEqual([...ops.slice(ops.indexOf("ARG")).filter((op) => op === "ARG"), "LABEL"]);
  });

  it("copies only paths that exist in the repository", () => {
    const stages = stagesOf();
    const copies = stages.flat().filter((i) => i.op === "COPY" && !i.args.startsWith("--from"));
    expect(copies.length).toBeGreaterThan(0);
    for (const copy of copies) {
      const parts = copy.args.split(/\s+/).filter((p) => !p.startsWith("--"));
      for (const source of parts.slice(0, -1)) expect(existsSync(join(ROOT, source)), source).toBe(true);
    }
  });
});

// ---- real tools: kustomize renders, kubernetes-validate schemas ------------------------------------
// .ci/install-k8s-tools.sh installs both into the cache directory; PATH works too.

const TOOL_DIR = join(process.env["KEYGATE_CACHE_DIR"] ?? join(homedir(), ".cache/keygate"), "bin");

/** The cached tool, else the one on PATH, if it runs with `args`; undefined otherwise. */
function findTool(name: string, args: readonly string[]): string | undefined {
  for (const candidate of [join(TOOL_DIR, name), name]) {
    if (spawnSync(candidate, args, { stdio: "ignore" }).status === 0) return candidate;
  }
  return undefined;
}

const INSTALL_HINT = "run bash .ci/install-k8s-tools.sh";

/** `kustomize build DIR`, or `kubectl kustomize DIR` where only kubectl is installed. */
const kustomizeCommand = ((): readonly string[] | undefined => {
  const kustomize = findTool("kustomize", ["version"]);
  if (kustomize !== undefined) return [kustomize, "build"];
  const kubectl = findTool("kubectl", ["version", "--client"]);
  return kubectl === undefined ? undefined : [kubectl, "kustomize"];
})();
const HAS_KUSTOMIZE = requireServer("kustomize", kustomizeCommand !== undefined, INSTALL_HINT);

const builds = new Map<string, string>();
function kustomizeBuild(dir: string): string {
  const [command, ...args] = kustomizeCommand ?? [];
  if (command === undefined) throw new Error("no kustomize");
  let text = builds.get(dir);
  if (text === undefined) {
    text = execFileSync(command, [...args, dir], { encoding: "utf8" });
    builds.set(dir, text);
  }
  return text;
}

describe.skipIf(!HAS_KUSTOMIZE)("deploy manifests: kustomize build", () => {
  it.each(VARIANTS)("renders $name as the checks above assume", ({ name }) => {
    const rendered = parseAllDocuments(kustomizeBuild(name === "base" ? BASE : OVERLAYS[name])).map((d): unknown => d.toJS());
    // Generated ConfigMaps compare by generator name: the content hash is kustomize's own.
    const ids = (docs: readonly unknown[]) =>
      docs
        .map((d) => idSchema.parse(d))
        .map((id) => `${id.kind}/${id.kind === "ConfigMap" ? (GENERATED_NAME.exec(id.metadata.name)?.[1] ?? id.metadata.name) : id.metadata.name}`)
        .sort();
    const ours = variantDocs(name);
    expect(ids(rendered)).toEqual(ids(ours));
    checkDeployment(rendered);
    const deployment = theDeployment(rendered);
    expect(deployment.spec.replicas).toBe(theDeployment(ours).spec.replicas);
    expect(theContainer(deployment).env).toEqual(expect.arrayContaining(theContainer(theDeployment(ours)).env));
    for (const doc of rendered) expect(z.object({ metadata: z.object({ namespace: z.string() }) }).parse(doc).metadata.namespace).toBe("keygate");
    // The base kustomization's `images` entry replaces the placeholder name.
    const images = kustomizationSchema.parse(loadOne(join(BASE, "kustomization.yaml"))).images;
    const placeholder = images.find((i) => i.name === theContainer(theDeployment(ours)).image);
    expect(placeholder?.newName).toBeDefined();
    expect(theContainer(deployment).image).toBe(`${placeholder?.newName}:${placeholder?.newTag}`);
  });
});

describe.skipIf(!HAS_KUSTOMIZE)("deploy manifests: generated policy ConfigMap", () => {
  it("kustomize names it by content, so a policy edit rolls the Deployment onto a new ConfigMap", () => {
    const rendered = (baseDir: string) => {
      const docs = parseAllDocuments(kustomizeBuild(baseDir)).map((d): unknown => d.toJS());
      const [configMap] = ofKind(docs, "ConfigMap", configMapSchema);
      const volume = theDeployment(docs).spec.template.spec.volumes.find((v) => v.name === "policy");
      return { name: configMap?.metadata.name, mounted: volume?.configMap?.name };
    };
    const before = rendered(BASE);
    expect(before.name).toMatch(/^keygate-policy-[a-z0-9]{10}$/);
    expect(before.mounted).toBe(before.name);
    const copy = mkdtempSync(join(tmpdir(), "keygate-base-"));
    try {
      execFileSync("cp", ["-r", `${BASE}/.`, copy]);
      const policyFile = join(copy, "policy/policy.yaml");
      writeFileSync(policyFile, readFileSync(policyFile, "utf8").replace("ttlSeconds: 30", "ttlSeconds: 20"));
      const after = rendered(copy);
      expect(after.name).toMatch(/^keygate-policy-[a-z0-9]{10}$/);
      expect(after.name).not.toBe(before.name);
      expect(after.mounted).toBe(after.name);
    } finally {
      rmSync(copy, { recursive: true, force: true });
    }
  });
});

// Custom resources: kubernetes-validate ships only the built-in Kubernetes schemas, so these are
// not schema-checked (their shape is checked by the Istio and monitoring tests below).
const SCHEMALESS_CRDS: Readonly<Record<string, string>> = {
  "deploy/istio/mesh-config.yaml": "IstioOperator install.istio.io/v1alpha1",
  "deploy/istio/authorization-policy.yaml": "AuthorizationPolicy security.istio.io/v1",
  "deploy/istio/destination-rule-tls.yaml": "DestinationRule networking.istio.io/v1",
  "deploy/k8s/monitoring/servicemonitor.yaml": "ServiceMonitor monitoring.coreos.com/v1",
  "deploy/k8s/monitoring/prometheusrule.yaml": "PrometheusRule monitoring.coreos.com/v1",
};
// The oldest release whose schemas accept every field used (matchLabelKeys is beta from 1.27),
// and the newest the package ships (its default, 1.37).
const KUBERNETES_VERSIONS = ["1.27.0", "newest bundled"] as const;

const kubernetesValidate = findTool("kubernetes-validate", ["--version"]);
const HAS_VALIDATOR = requireServer("kubernetes-validate", kubernetesValidate !== undefined, INSTALL_HINT);

interface Validation {
  status: number | null;
  passed: string[];
  problems: string[];
}

/** Runs `kubernetes-validate --strict` on one file: which resources passed, and every other line. */
function validate(file: string, version: (typeof KUBERNETES_VERSIONS)[number]): Validation {
  const args = ["--strict", ...(version === "newest bundled" ? [] : ["-k", version]), file];
  const run = spawnSync(kubernetesValidate ?? "kubernetes-validate", args, { encoding: "utf8" });
  const lines = `${run.stdout}\n${run.stderr}`.split("\n").filter((line) => line.trim() !== "");
  const passed = lines.flatMap((line) => /^INFO \S+ passed for resource (\S+) against version/.exec(line)?.[1] ?? []);
  return { status: run.status, passed: passed.sort(), problems: lines.filter((line) => !line.startsWith("INFO ")) };
}

describe.skipIf(!HAS_VALIDATOR || !HAS_KUSTOMIZE)("deploy manifests: kubernetes-validate --strict", () => {
  const scratch = lazy(() => mkdtempSync(join(tmpdir(), "keygate-validate-")));
  afterAll(() => rmSync(scratch(), { recursive: true, force: true }));

  const renderedFile = (name: string, text: string): string => {
    const file = join(scratch(), `${name}.yaml`);
    writeFileSync(file, text);
    return file;
  };

  it.each(VARIANTS.flatMap((variant) => KUBERNETES_VERSIONS.map((version) => ({ name: variant.name, version }))))(
    "$name matches the Kubernetes $version schemas, every resource, no unknown field",
    ({ name, version }) => {
      const text = kustomizeBuild(name === "base" ? BASE : OVERLAYS[name]);
      const result = validate(renderedFile(name, text), version);
      expect(result.problems).toEqual([]);
      expect(result.status).toBe(0);
      const expected = parseAllDocuments(text).map((d) => {
        const id = idSchema.parse(d.toJS());
        return `${id.kind.toLowerCase()}/${id.metadata.name}`;
      });
      expect(result.passed).toEqual(expected.sort());
    },
  );

  it("rejects an unknown field and a wrong type (the validator is strict, not silent)", () => {
    const text = kustomizeBuild(OVERLAYS.prod);
    const misspelt = validate(renderedFile("misspelt", text.replace("terminationGracePeriodSeconds:", "terminationGracePeriodSecs:")), "newest bundled");
    expect(misspelt.status).not.toBe(0);
    expect(misspelt.problems.join("\n")).toMatch(/deployment\/keygate.*'terminationGracePeriodSecs' was unexpected/);
    const wrongType = validate(renderedFile("wrong-type", text.replace(/^(\s+)maxUnavailable: 1$/m, "$1maxUnavailable: [1]")), "newest bundled");
    expect(wrongType.status).not.toBe(0);
    expect(wrongType.problems.join("\n")).toMatch(/poddisruptionbudget\/keygate/);
  });

  it("leaves unchecked only the listed custom resources, which have no bundled schema", () => {
    const outsideKustomize = [...manifestFilesUnder(K8S), ...yamlFilesUnder(join(DEPLOY, "istio"))]
      .filter((file) => ![BASE, OVERLAYS.dev, OVERLAYS.prod].some((dir) => file.startsWith(`${dir}/`)))
      .map((file) => relative(ROOT, file));
    expect(outsideKustomize.sort()).toEqual(Object.keys(SCHEMALESS_CRDS).sort());
    for (const [file, kindAndVersion] of Object.entries(SCHEMALESS_CRDS)) {
      const [kind, apiVersion] = kindAndVersion.split(" ");
      const head = z.object({ apiVersion: z.string(), kind: z.string() }).parse(loadOne(join(ROOT, file)));
      expect(`${head.kind} ${head.apiVersion}`, file).toBe(kindAndVersion);
      const result = validate(join(ROOT, file), "newest bundled");
      expect(result.passed, file).toEqual([]);
      expect(result.problems, file).toEqual([expect.stringContaining(`Couldn't find schema for kind ${kind} with api version ${apiVersion}`)]);
    }
  });
});

// ---- Istio --------------------------------------------------------------------------------------

describe("deploy manifests: Istio", () => {
  const operator = lazy(() =>
    z.object({
      kind: z.literal("IstioOperator"),
      spec: z.object({
        meshConfig: z.object({
          pathNormalization: z.object({ normalization: z.string() }).optional(),
          extensionProviders: z.array(z.object({ name: z.string(), envoyExtAuthzGrpc: z.record(z.string(), z.unknown()).optional() })),
        }),
      }),
    })
    .parse(loadOne(join(DEPLOY, "istio/mesh-config.yaml"))),
  );
  const policy = lazy(() =>
    z.object({
      kind: z.literal("AuthorizationPolicy"),
      spec: z.object({
        selector: z.object({ matchLabels: labelsSchema }),
        action: z.string(),
        provider: z.object({ name: z.string() }),
        rules: z.array(z.record(z.string(), z.unknown())),
      }),
    })
    .parse(loadOne(join(DEPLOY, "istio/authorization-policy.yaml"))),
  );

  it("registers keygate's gRPC Service as a fail-closed ext_authz provider", () => {
    const provider = operator().spec.meshConfig.extensionProviders.find((p) => p.name === "keygate");
    const grpc = z
      .strictObject({
        service: z.string(),
        port: z.number().int(),
        timeout: z.string().regex(/^\d+(\.\d+)?(ms|s)$/),
        failOpen: z.boolean(),
        statusOnError: z.string().optional(),
        clearRouteCache: z.boolean().optional(),
        includeRequestBodyInCheck: z.unknown().optional(),
      })
      .parse(provider?.envoyExtAuthzGrpc);
    const namespace = kustomizationSchema.parse(loadOne(join(BASE, "kustomization.yaml"))).namespace;
    expect(grpc.service).toBe(`keygate-authz.${namespace}.svc.cluster.local`);
    const authz = ofKind(variantDocs("prod"), "Service", serviceSchema).find((s) => s.metadata.name === "keygate-authz");
    expect(authz?.spec.ports.find((p) => p.port === grpc.port)?.appProtocol).toBe("grpc");
    expect(grpc.failOpen).toBe(false);
    expect(grpc.includeRequestBodyInCheck).toBeUndefined();
  });

  it("has sidecars normalize paths and merge slashes, leaving escaped slashes for keygate to refuse", () => {
    expect(operator().spec.meshConfig.pathNormalization).toEqual({ normalization: "MERGE_SLASHES" });
  });

  it("sends every request to sample-api through keygate, /healthz too: an unchecked request would keep a client's x-keygate-* headers", () => {
    expect(policy().spec.action).toBe("CUSTOM");
    expect(operator().spec.meshConfig.extensionProviders.map((p) => p.name)).toContain(policy().spec.provider.name);
    expect(policy().spec.selector.matchLabels).toEqual({ app: "sample-api" });
    // One rule with no condition (no `to`, `from` or `when`) matches every request.
    expect(policy().spec.rules).toEqual([{}]);
  });
});

describe("deploy manifests: monitoring", () => {
  it("the ServiceMonitor scrapes /metrics on the admin Service's named port", () => {
    const monitor = z
      .object({
        spec: z.object({
          selector: z.object({ matchLabels: z.record(z.string(), z.string()) }),
          endpoints: z.array(z.object({ port: z.string(), path: z.string() })),
        }),
      })
      .parse(loadOne(join(K8S, "monitoring", "servicemonitor.yaml")));
    const services = ofKind(loadDocs(join(BASE, "service.yaml")), "Service", z.object({
      metadata: z.object({ name: z.string(), labels: z.record(z.string(), z.string()) }),
      spec: z.object({ ports: z.array(z.object({ name: z.string() })) }),
    }));
    const selected = services.filter((s) => selects(monitor.spec.selector.matchLabels, s.metadata.labels));
    expect(selected.map((s) => s.metadata.name)).toEqual(["keygate-admin"]);
    for (const endpoint of monitor.spec.endpoints) {
      expect(endpoint.path).toBe("/metrics");
      expect(selected[0]?.spec.ports.map((p) => p.name)).toContain(endpoint.port);
    }
  });

  it("the Grafana dashboard queries only metrics keygate exports, each filtered by job", async () => {
    const dashboard = z
      .object({ panels: z.array(z.object({ title: z.string(), targets: z.array(z.object({ expr: z.string() })) })) })
      .parse(JSON.parse(readFileSync(join(DEPLOY, "grafana", "keygate-dashboard.json"), "utf8")));
    const { Metrics } = await import("../../src/server/metrics.js");
    const exported = new Set((await new Metrics({ defaultMetrics: true }).registry.getMetricsAsJSON()).map((m) => m.name));
    const titles = dashboard.panels.map((p) => p.title.toLowerCase()).join(" | ");
    for (const topic of ["checks per second", "errors", "p99", "cache hit ratio", "denials by reason"]) expect(titles).toContain(topic);
    for (const panel of dashboard.panels) {
      for (const target of panel.targets) {
        for (const [, name = "", selector = ""] of target.expr.matchAll(/\b(keygate_[a-z_]+|process_[a-z_]+)(\{[^}]*\})?/g)) {
          const base = name.replace(/_(bucket|sum|count)$/, "");
          expect(exported.has(base), `${panel.title}: ${name}`).toBe(true);
          // Every series is filtered by the dashboard's job variable, so one Prometheus can hold several keygates.
          expect(selector, `${panel.title}: ${name}`).toContain('job=~"$job"');
        }
      }
    }
  });
});

// ---- HTTP-mode proxies: nginx, Caddy, Traefik ------------------------------------------------------

describe("deploy manifests: HTTP-mode proxy configs set exactly the headers keygate judges", () => {
  const NGINX = join(DEPLOY, "nginx/keygate.conf.template");
  const CADDY = join(DEPLOY, "caddy/Caddyfile");
  const TRAEFIK = join(DEPLOY, "traefik/keygate.yaml");
  const OTHER_FAMILY = ["X-Forwarded-Uri", "X-Forwarded-Method", "X-Forwarded-Host", "X-Original-URL"];

  /** The body of an nginx `location <name> { ... }` block (no nested blocks in these). */
  function nginxLocation(template: string, name: string): string {
    const start = template.indexOf(`location ${name} {`);
    expect(start, name).toBeGreaterThanOrEqual(0);
    return template.slice(start, template.indexOf("\n    }", start));
  }

  it("nginx: the check sets keygate's pair from what nginx serves and clears the other proxies' names", () => {
    const check = nginxLocation(readFileSync(NGINX, "utf8"), "= /_keygate_check");
    const judged = judgedHeaders("nginx");
    expect(judged).toEqual({ uri: "X-Original-URI", method: "X-Original-Method" });
    expect(check).toMatch(/proxy_pass http:\/\/keygate_authz\/check;/);
    const set = new Map([...check.matchAll(/^\s*proxy_set_header (\S+) (.+);$/gm)].map((m) => [m[1] ?? "", m[2] ?? ""]));
    expect(set.get(judged?.uri ?? "")).toBe("$request_uri");
    expect(set.get(judged?.method ?? "")).toBe("$request_method");
    for (const name of OTHER_FAMILY) expect(set.get(name), name).toBe('""');
    expect(readFileSync(NGINX, "utf8")).toContain("KEYGATE_HTTP_AUTHZ_PROXY=nginx");
  });

  /**
   * Headers that name another method or path than the request's own: the original-request headers
   * of the proxies keygate works behind, and the URL-rewrite and method-override headers some
   * frameworks and servers obey. None may reach the API from a client.
   */
  const REWRITE_HEADERS = ["X-Original-URI", "X-Original-Method", "X-Original-URL", "X-Rewrite-URL", "X-Forwarded-Uri", "X-Forwarded-Method", "X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override"];

  it("every shipped proxy drops the rewrite and method-override headers on the way to the API", () => {
    const toApi = new Map([...nginxLocation(readFileSync(NGINX, "utf8"), "/").matchAll(/^\s*proxy_set_header (\S+) (.+);$/gm)].map((m) => [(m[1] ?? "").toLowerCase(), m[2] ?? ""]));
    for (const name of REWRITE_HEADERS) expect(toApi.get(name.toLowerCase()), `nginx ${name}`).toBe('""');
    const caddyfile = readFileSync(CADDY, "utf8");
    const reverseProxy = caddyfile.slice(caddyfile.search(/^\s*reverse_proxy /m));
    const dropped = new Set([...reverseProxy.matchAll(/^\s*header_up -(\S+)$/gm)].map((m) => (m[1] ?? "").toLowerCase()));
    // X-Original-* goes before the check (request_header -X-Original-*), for the API as well.
    for (const name of REWRITE_HEADERS.filter((n) => !n.startsWith("X-Original-"))) expect(dropped.has(name.toLowerCase()), `Caddy ${name}`).toBe(true);
    expect(caddyfile).toContain("request_header -X-Original-*");
    // Every name holding "_" (X_Api_Key, X_HTTP_Method_Override...) goes before the check, first.
    expect(caddyfile.slice(caddyfile.search(/^\s*route \{/m)).match(/^\s*request_header (\S+)$/m)?.[1]).toBe("-*_*");
    const { http } = traefik();
    expect(http.routers["keygate-api"]?.middlewares).toEqual(["keygate-auth", "keygate-strip-credentials", "keygate-strip-rewrites"]);
    const rewrites = http.middlewares["keygate-strip-rewrites"]?.headers.customRequestHeaders ?? {};
    expect(Object.keys(rewrites).map((k) => k.toLowerCase()).sort()).toEqual([...REWRITE_HEADERS, "X_Api_Key"].map((k) => k.toLowerCase()).sort());
    expect(Object.values(rewrites).every((v) => v === "")).toBe(true);
    const [vhost] = readEnvoy().hcm.route_config.virtual_hosts;
    expect(vhost?.request_headers_to_remove).toEqual(REWRITE_HEADERS.map((n) => n.toLowerCase()));
  });

  const patternsSchema = z.object({ patterns: z.array(z.object({ exact: z.string().optional(), prefix: z.string().optional() }).strict()) });
  const envoyHttpSchema = z.object({
    static_resources: z.object({
      listeners: z.array(
        z.object({
          filter_chains: z.array(
            z.object({
              filters: z.array(
                z.object({
                  typed_config: z.object({
                    normalize_path: z.literal(true),
                    merge_slashes: z.literal(true),
                    path_with_escaped_slashes_action: z.literal("REJECT_REQUEST"),
                    common_http_protocol_options: z.object({ headers_with_underscores_action: z.literal("REJECT_REQUEST") }),
                    route_config: z.object({ virtual_hosts: z.array(z.object({ request_headers_to_remove: z.array(z.string()) })) }),
                    http_filters: z.array(z.object({ name: z.string(), typed_config: z.record(z.string(), z.unknown()) })),
                  }),
                }),
              ),
            }),
          ),
        }),
      ),
      clusters: z.array(
        z.object({
          name: z.string(),
          load_assignment: z.unknown(),
          health_checks: z
            .array(z.object({ timeout: envoySecondsSchema, interval: envoySecondsSchema, unhealthy_threshold: z.number(), http_health_check: z.object({ path: z.string() }).optional() }))
            .optional(),
        }),
      ),
    }),
  });
  const envoyHttpAuthzSchema = z.object({
    failure_mode_allow: z.literal(false),
    allowed_headers: patternsSchema,
    http_service: z.object({
      server_uri: z.object({ uri: z.string(), cluster: z.string(), timeout: z.string() }),
      path_prefix: z.literal("/check"),
      authorization_response: z.object({ allowed_upstream_headers: patternsSchema, allowed_client_headers_on_success: patternsSchema, allowed_client_headers: patternsSchema }),
    }),
  });

  /** Whether an Envoy string matcher list (exact or prefix entries) matches `name`. */
  function envoyMatches(list: z.infer<typeof patternsSchema>, name: string): boolean {
    return list.patterns.some((p) => p.exact === name || (p.prefix !== undefined && name.startsWith(p.prefix)));
  }

  it("Envoy's HTTP service: keygate sees every header it judges or strips, and its identity and rate-limit headers reach the app", () => {
    const bootstrap = envoyHttpSchema.parse(loadOne(join(DEPLOY, "envoy/envoy-http.yaml")));
    const hcm = bootstrap.static_resources.listeners[0]?.filter_chains[0]?.filters[0]?.typed_config;
    const authzFilter = hcm?.http_filters.find((f) => f.name === "envoy.filters.http.ext_authz");
    expect(authzFilter).toBeDefined();
    const authz = envoyHttpAuthzSchema.parse(authzFilter?.typed_config);
    expect(authz.http_service.server_uri.uri).toBe(`http://keygate:${DEFAULTS.httpAuthzPort}`);
    expect(bootstrap.static_resources.clusters.map((c) => c.name)).toContain(authz.http_service.server_uri.cluster);
    // Authorization is always sent by Envoy's HTTP service; every other credential header must be listed.
    for (const name of DEFAULTS.policy.credentialHeaders.filter((h) => h !== "authorization")) expect(envoyMatches(authz.allowed_headers, name), name).toBe(true);
    for (const name of ["x-keygate-owner-id", "x-keygate-tenant", "x-request-id"]) expect(envoyMatches(authz.allowed_headers, name), name).toBe(true);
    const response = authz.http_service.authorization_response;
    for (const name of ["x-keygate-key-id", "x-keygate-owner-id", "x-keygate-project-id", "x-keygate-scopes", "x-keygate-plan", "x-keygate-role", "x-keygate-mode"]) {
      expect(envoyMatches(response.allowed_upstream_headers, name), name).toBe(true);
    }
    const rateHeaders = ["x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset", "ratelimit-policy", "ratelimit", "x-credits-remaining"];
    for (const name of rateHeaders) expect(envoyMatches(response.allowed_client_headers_on_success, name), name).toBe(true);
    for (const name of ["content-type", "www-authenticate", "retry-after", ...rateHeaders]) expect(envoyMatches(response.allowed_client_headers, name), name).toBe(true);
    // No credential header is ever copied into the request to the app or the answer to the client.
    for (const name of DEFAULTS.policy.credentialHeaders) {
      expect(envoyMatches(response.allowed_upstream_headers, name), name).toBe(false);
      expect(envoyMatches(response.allowed_client_headers, name), name).toBe(false);
    }
    expect(hcm?.route_config.virtual_hosts[0]?.request_headers_to_remove).toEqual(REWRITE_HEADERS.map((n) => n.toLowerCase()));
    expect(readFileSync(join(DEPLOY, "envoy/envoy-http.yaml"), "utf8")).toContain("KEYGATE_HTTP_AUTHZ_PROXY");
  });

  // At the end of its drain delay keygate closes idle keep-alive connections on the HTTP port: a
  // Check Envoy sends on one as it closes is an ext_authz error. The same bound as the gRPC checks'.
  it("Envoy's HTTP service: health-checks /readyz and marks a draining replica unhealthy within the Deployment's drain delay", () => {
    const bootstrap = envoyHttpSchema.parse(loadOne(join(DEPLOY, "envoy/envoy-http.yaml")));
    const checks = bootstrap.static_resources.clusters.find((c) => c.name === "keygate_http")?.health_checks ?? [];
    expect(checks.map((c) => c.http_health_check?.path)).toEqual(["/readyz"]);
    const detectionSeconds = Math.max(...checks.map((c) => c.unhealthy_threshold * c.interval + c.timeout));
    expect(detectionSeconds).toBe(11);
    for (const variant of VARIANTS) {
      expect(keygateConfigOf(theContainer(theDeployment(variant.docs()))).shutdownDelaySeconds, variant.name).toBeGreaterThan(detectionSeconds);
    }
  });

  it("Caddy: forward_auth calls a bare /check and nginx's names are dropped before it", () => {
    const caddyfile = readFileSync(CADDY, "utf8");
    // forward_auth itself sets X-Forwarded-Method and X-Forwarded-Uri, replacing a client's.
    expect(judgedHeaders("caddy")).toEqual({ uri: "X-Forwarded-Uri", method: "X-Forwarded-Method" });
    expect(caddyfile).toMatch(/forward_auth \{\$KEYGATE_HTTP_AUTHZ\} \{\s*uri \/check\s/);
    const drop = caddyfile.indexOf("request_header -X-Original-*");
    expect(drop).toBeGreaterThanOrEqual(0);
    expect(drop).toBeLessThan(caddyfile.search(/^\s*forward_auth \{/m));
    expect(caddyfile).toContain("KEYGATE_HTTP_AUTHZ_PROXY=caddy");
  });

  const traefikSchema = z.object({
    http: z.object({
      routers: z.record(z.string(), z.object({ entryPoints: z.array(z.string()), rule: z.string(), middlewares: z.array(z.string()), service: z.string() })),
      middlewares: z.object({
        "keygate-auth": z.object({
          forwardAuth: z.object({
            address: z.string(),
            trustForwardHeader: z.literal(false),
            authRequestHeaders: z.array(z.string()),
            authResponseHeadersRegex: z.string(),
            authResponseHeaders: z.array(z.string()),
          }),
        }),
        "keygate-strip-credentials": z.object({ headers: z.object({ customRequestHeaders: z.record(z.string(), z.string()) }) }),
        "keygate-strip-rewrites": z.object({ headers: z.object({ customRequestHeaders: z.record(z.string(), z.string()) }) }).optional(),
      }),
      services: z.record(z.string(), z.object({ loadBalancer: z.object({ servers: z.array(z.object({ url: z.string() })) }) })),
    }),
  });

  /** The file as Traefik's file provider reads it: `{{ env "NAME" }}` filled in first. */
  function traefik(): z.infer<typeof traefikSchema> {
    const values: Record<string, string> = { KEYGATE_HTTP_AUTHZ: "keygate:8181", API_UPSTREAM: "api:8000" };
    const rendered = readFileSync(TRAEFIK, "utf8").replace(/\{\{\s*env "(\w+)"\s*\}\}/g, (_m, name: string) => values[name] ?? `<unset ${name}>`);
    expect(rendered).not.toContain("{{");
    // The file parses as YAML as it ships, and means the same once Traefik has filled it in.
    loadOne(TRAEFIK);
    return traefikSchema.parse(parseYaml(rendered));
  }

  it("Traefik: ForwardAuth to a bare /check, never trusting a client's X-Forwarded-*, with only the key's headers sent", () => {
    const { http } = traefik();
    expect(judgedHeaders("traefik")).toEqual({ uri: "X-Forwarded-Uri", method: "X-Forwarded-Method" });
    const auth = http.middlewares["keygate-auth"].forwardAuth;
    expect(auth.address).toBe("http://keygate:8181/check");
    const sent = auth.authRequestHeaders.map((h) => h.toLowerCase());
    for (const credential of DEFAULTS.policy.credentialHeaders) expect(sent).toContain(credential);
    expect(sent.filter((h) => /^x-(original|forwarded)-/.test(h))).toEqual([]);
    expect(http.services["keygate-api-upstream"]?.loadBalancer.servers).toEqual([{ url: "http://api:8000" }]);
  });

  it("Traefik: every x-keygate-* spelling is replaced by keygate's, rate-limit headers go upstream, and the key is removed after the check", () => {
    const { http } = traefik();
    const auth = http.middlewares["keygate-auth"].forwardAuth;
    // Go's RE2 takes the (?i) flag inline; JavaScript takes it as a flag.
    expect(auth.authResponseHeadersRegex.startsWith("(?i)")).toBe(true);
    const identity = new RegExp(auth.authResponseHeadersRegex.slice("(?i)".length), "i");
    for (const name of ["X-Keygate-Owner-Id", "X_keygate_owner_id", "X-Keygate_tenant", "X-KEYGATE-Scopes"]) expect(identity.test(name), name).toBe(true);
    for (const name of ["X-Keygateway", "Authorization", "X-Request-Id"]) expect(identity.test(name), name).toBe(false);
    expect(auth.authResponseHeaders).toEqual(["X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset", "RateLimit-Policy", "RateLimit", "X-Credits-Remaining"]);
    const stripped = http.middlewares["keygate-strip-credentials"].headers.customRequestHeaders;
    expect(Object.fromEntries(Object.entries(stripped).map(([k, v]) => [k.toLowerCase(), v]))).toEqual(
      Object.fromEntries(DEFAULTS.policy.credentialHeaders.map((h) => [h, ""])),
    );
    const router = http.routers["keygate-api"];
    expect(router?.middlewares).toEqual(["keygate-auth", "keygate-strip-credentials", "keygate-strip-rewrites"]);
    expect(router?.service).toBe("keygate-api-upstream");
    expect(readFileSync(TRAEFIK, "utf8")).toContain("KEYGATE_HTTP_AUTHZ_PROXY=traefik");
  });
});
